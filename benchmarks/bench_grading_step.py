"""Grading seconds per GRPO step: plain math-verify in the worker pool against the grader's fast path.

Two batches, each graded ``--steps`` times with fresh pairs and no verdict cache (a step's answers are new):
- paper: 8 prompts x G = 5 = 40 completions per device, final answers of MATH-500 kind (each prompt's
  gold, its rewritings and wrong answers from ``bench_grading.make_items``, drawn per prompt);
- toy: ``experiment=grpo_toy``'s 16 prompts x G = 8 = 128 completions of the synthetic sums (integer
  golds; right, off-by-some, or a copied operand).

For each: seconds per step with every pair sent to math-verify in the pool (``MathGrader._verify``, the
fast path bypassed) and with ``grade_batch`` (fast path first), and the step time at which grading would
be 5% of the step (20x the grading time).

    OMP_NUM_THREADS=1 python benchmarks/bench_grading_step.py --workers 2 --steps 25
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.grader import MathGrader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grading import make_items  # noqa: E402  (a sibling script, not a package)


def paper_batches(steps: int, seed: int) -> list[list[tuple[str, str]]]:
    """``steps`` batches of 8 prompts x 5 answers of MATH-500 kind."""
    fmt = OutputFormat()
    by_gold: dict[str, list[str]] = {}
    for completion, gold in make_items(seed=seed):
        by_gold.setdefault(gold, []).append(fmt.parse(completion).answer or "")
    golds = sorted(by_gold)
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        batch = []
        for gold in rng.sample(golds, 8):
            batch += [(rng.choice(by_gold[gold]), gold) for _ in range(5)]
        batches.append(batch)
    return batches


def toy_batches(steps: int, seed: int) -> list[list[tuple[str, str]]]:
    """``steps`` batches of 16 synthetic sums x 8 answers."""
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        batch = []
        for _ in range(16):
            operands = [rng.randint(1, 9) for _ in range(rng.randint(2, 6))]
            gold = sum(operands)
            answers = [gold, gold, gold, gold + rng.choice([-2, -1, 1, 2]), rng.choice(operands), gold, gold + 10, gold]
            batch += [(str(answer), str(gold)) for answer in answers]
        batches.append(batch)
    return batches


def seconds_per_step(batches: list[list[tuple[str, str]]], workers: int, fast_path: bool) -> list[float]:
    times = []
    with MathGrader(workers=workers, cache_size=0) as grader:
        grader.start()  # pool start-up is not a step's cost
        for batch in batches:
            started = time.perf_counter()
            if fast_path:
                grader.grade_batch([p for p, _ in batch], [g for _, g in batch])
            else:
                grader._verify(list(dict.fromkeys(batch)))  # what grade_batch sends the pool: distinct pairs
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("| batch | grading | s/step mean | spread (min-max over seeds' means) | worst step | step time where it is 5% |")
    print("|---|---|---|---|---|---|")
    for name, make in (("paper (8 x 5, MATH-500 answers)", paper_batches), ("toy (16 x 8, synthetic sums)", toy_batches)):
        for label, fast in (("math-verify in the pool", False), ("fast path, then pool", True)):
            means, worst = [], 0.0
            for seed in args.seeds:
                times = seconds_per_step(make(args.steps, seed), args.workers, fast)
                means.append(statistics.mean(times))
                worst = max(worst, max(times))
            mean = statistics.mean(means)
            print(f"| {name} | {label} | {mean:.4f} | {min(means):.4f}-{max(means):.4f} | {worst:.4f} | {20 * mean:.2f} s |")


if __name__ == "__main__":
    main()
