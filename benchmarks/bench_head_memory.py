"""Peak memory and time of GRPO's log-prob forward+backward at Qwen2.5's vocabulary, head by head.

One micro-batch of 2 completions x 2048 tokens (64-token prompts) on a random-weight 2-layer model of
Qwen2.5-0.5B's shape (vocabulary 151,936, hidden 896; ``configs/model/qwen2.5_0.5b_shape.yaml``),
fp32, temperature 0.6: the token-level GRPO loss (ratio 1) plus the logged entropy, forward and backward.

    python benchmarks/bench_head_memory.py                   # every variant, then the equality check
    python benchmarks/bench_head_memory.py --variant after   # one variant

Variants:
    before      the head as it was: the model's own lm_head over every completion token ([C, V] logits),
                an out-of-place ``/ temperature``, our chunked logsumexp and entropy (packed forward)
    after       GRPOModule.completion_logprobs: the chunked head (selfbudget_pl.modules.head)
    trl         TRL's padded forward with ``selective_log_softmax`` and ``entropy_from_logits``
    trl_fused   TRL's own chunked head (``add_fused_lm_head``, its GRPOTrainer default since 1.x)

Each variant runs in a fresh process. Peak memory is the process's resident high-water mark during the
step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus its resident size before: what
the step adds on top of the weights and inputs, parameter gradients included.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("before", "after", "trl", "trl_fused")
PROMPT, ROWS, TEMPERATURE = 64, 2, 0.6
COMPLETION = 2048  # --completion-tokens


def build(variant: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from selfbudget_pl.modules.experience import Experience
    from selfbudget_pl.modules.grpo import GRPOModule

    loader = instantiate(OmegaConf.load(REPO / "configs" / "model" / "qwen2.5_0.5b_shape.yaml"), _convert_="object")
    module = GRPOModule(
        model_loader=loader, optimizer=partial(torch.optim.AdamW), sampling={"temperature": TEMPERATURE},
    )  # fmt: skip
    module.model = model = loader.load_model().train()
    if variant == "trl_fused":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(vocab, (ROWS, PROMPT), generator=generator)
    completion_ids = torch.randint(vocab, (ROWS, COMPLETION), generator=generator)
    ones = partial(torch.ones, dtype=torch.long)
    experience = Experience(
        prompt_ids, ones(ROWS, PROMPT), completion_ids, ones(ROWS, COMPLETION), torch.tensor([1.0, -1.0])
    )
    return module, model, experience


def score(variant: str, module, model, micro) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, T]`` log-probs (with grad) and the entropies, as ``variant`` computes them."""
    from selfbudget_pl.modules import packing
    from selfbudget_pl.modules.losses import entropy_from_logits, token_logprobs

    mask = micro.completion_mask.bool()
    if variant == "after":
        return module.completion_logprobs(model, micro)
    if variant == "before":
        batch = packing.pack(micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask)
        logits = packing.completion_rows(packing.packed_forward(model, batch)) / TEMPERATURE
        logprobs = packing.unpack(token_logprobs(logits, micro.completion_ids[mask]), mask)
        with torch.no_grad():
            return logprobs, entropy_from_logits(logits)
    input_ids = torch.cat([micro.prompt_ids, micro.completion_ids], 1)
    attention_mask = torch.cat([micro.prompt_mask, micro.completion_mask], 1)
    width = micro.completion_ids.shape[1]
    if variant == "trl":
        from trl.trainer.utils import entropy_from_logits as trl_entropy
        from trl.trainer.utils import selective_log_softmax

        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1).logits
        logits = logits[:, :-1, :] / TEMPERATURE
        logprobs = selective_log_softmax(logits, micro.completion_ids)
        with torch.no_grad():
            return logprobs, trl_entropy(logits)[mask]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-width] = -100
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return output.log_probs[:, -width:], output.entropy[:, -width:][mask].detach()


def step(variant: str, module, model, micro) -> tuple[torch.Tensor, torch.Tensor]:
    """The measured work: the loss's forward and backward. Returns the detached log-probs and entropies."""
    from selfbudget_pl.modules.losses import policy_loss

    logprobs, entropy = score(variant, module, model, micro)
    loss = policy_loss(logprobs, logprobs.detach(), micro.advantages, micro.completion_mask).loss
    loss.backward()
    return logprobs.detach(), entropy.sum()


def _status(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(variant: str, repeats: int) -> dict:
    from selfbudget_pl.modules.experience import Experience

    module, model, experience = build(variant)
    # Warm-up on 64 tokens (lazy initialisation), so the measured steps are alike.
    warm = Experience(
        experience.prompt_ids, experience.prompt_mask, experience.completion_ids[:, :64],
        experience.completion_mask[:, :64], experience.advantages,
    )  # fmt: skip
    step(variant, module, model, warm)
    model.zero_grad(set_to_none=True)
    peaks, seconds, cpu_seconds = [], [], []
    for _ in range(repeats):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        before = _status("VmRSS")
        started, cpu_started = time.perf_counter(), time.process_time()
        step(variant, module, model, experience)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        peaks.append(_status("VmHWM") - before)
        model.zero_grad(set_to_none=True)
    # CPU seconds (all threads): on a shared machine, wall time depends on the other processes' load.
    return {"variant": variant, "peak_mib": peaks, "seconds": seconds, "cpu_seconds": cpu_seconds}


def check() -> dict:
    """Largest difference of every variant's log-probs, entropies and gradients from ``before``'s."""
    results, reference = {}, None
    for variant in VARIANTS:
        module, model, experience = build(variant)
        logprobs, entropy = step(variant, module, model, experience)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        if reference is None:
            reference = (logprobs, entropy, grads)
            continue
        results[variant] = {
            "logprobs": float((logprobs - reference[0]).abs().max()),
            "entropy_sum_rel": float(abs(entropy - reference[1]) / reference[1]),
            "grads": max(float((grads[name] - g).abs().max()) for name, g in reference[2].items()),
            "grad_scale": max(float(g.abs().max()) for g in reference[2].values()),
        }
        del module, model
        gc.collect()
    return results


def main() -> None:
    global COMPLETION
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="only the equality check")
    parser.add_argument("--completion-tokens", type=int, default=COMPLETION, help="per completion (2 completions)")
    args = parser.parse_args()
    COMPLETION = args.completion_tokens
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.variant:
        print(json.dumps(measure(args.variant, args.repeats)))
        return
    if args.check:
        print(json.dumps(check(), indent=2))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--completion-tokens", str(COMPLETION)]  # fmt: skip
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print("| variant | peak MiB (mean, min-max) | seconds (mean, min-max) |\n|---|---|---|")
    for row in rows:
        peak, secs = row["peak_mib"], row["seconds"]
        print(f"| {row['variant']} | {sum(peak) / len(peak):.0f} ({min(peak):.0f}-{max(peak):.0f}) | "
              f"{sum(secs) / len(secs):.1f} ({min(secs):.1f}-{max(secs):.1f}) |")  # fmt: skip
    print(json.dumps(check(), indent=2))


if __name__ == "__main__":
    main()
