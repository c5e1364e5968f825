"""Where one GRPO step of ours goes (the toy setting of ``bench_grpo_vs_trl.py``): median seconds of
sampling + reward, the update's forward (loss included), its backward, and the whole update; and the
GFLOP/s a single-thread ``torch.mm`` reaches on the tiny model's shapes (what the matmuls cannot beat).

    OMP_NUM_THREADS=1 python benchmarks/profile_grpo_step.py --steps 10
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
import warnings

import torch

import bench_grpo_vs_trl as bench
from selfbudget_pl.modules.grpo import GRPOModule

PARTS = {"sample_and_reward": "rollout + reward", "micro_batch_loss": "update forward",
         "manual_backward": "update backward", "update_policy": "whole update"}  # fmt: skip


def timed(seconds: dict[str, list[float]], name: str):
    method = getattr(GRPOModule, name)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = method(*args, **kwargs)
        seconds[name].append(time.perf_counter() - started)
        return result

    return wrapper


def matmul_gflops(rows: int, inner: int, cols: int, repeats: int = 50) -> float:
    a, b = torch.randn(rows, inner), torch.randn(cols, inner)
    for _ in range(5):
        a @ b.T
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps (the first two are dropped)")
    parser.add_argument("--packed-forward", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seconds: dict[str, list[float]] = {name: [] for name in PARTS}
    for name in PARTS:
        setattr(GRPOModule, name, timed(seconds, name))
    loader = bench.ModelLoader()
    tokenizer = loader.load_tokenizer()
    prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in bench.TOY_PROMPTS]
    run = argparse.Namespace(num_generations=4, max_new_tokens=64, steps=args.steps, packed_forward=args.packed_forward)
    steps = bench.run_ours(loader, prompt_ids, run)
    print(f"step: {statistics.median(steps[2:]):.3f} s")
    for name, label in PARTS.items():
        print(f"{label}: {statistics.median(seconds[name][2:]):.3f} s")
    for shape in [(2000, 128, 384), (2000, 384, 128), (32, 128, 768)]:  # update, and one decode step
        print(f"torch.mm {shape}: {matmul_gflops(*shape):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
