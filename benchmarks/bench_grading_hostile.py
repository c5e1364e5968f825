"""Grading time of a batch with hostile items in it against the same batch without them.

Per seed: 256 (answer, gold) pairs drawn from the MATH-500 mix of ``bench_grading.make_items`` (gold
answers, rewritings, wrong answers), graded by ``MathGrader(workers=2)``; then the same batch with 10%
of the predictions (26) replaced by the project's hostile answers (``tests/test_hostile.py``: code
injections, power towers, ``(10^{100})!``, 400 nested braces, 150 nested fractions, 1 MB of digits, ...).
Each batch is graded by a fresh grader whose pool was started (and warmed) before timing, no verdict
cache, so neither batch profits from the other. Target: mixed <= 1.5x clean.

    OMP_NUM_THREADS=1 python benchmarks/bench_grading_hostile.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.rewards.grader import MathGrader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_grading import make_items  # noqa: E402  (a sibling script, not a package)


def hostile_answers() -> list[str]:
    """The hostile suite's answers (tests/test_hostile.py), plus the long ones graded directly."""
    spec = importlib.util.spec_from_file_location("test_hostile", HERE.parent / "tests" / "test_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    answers = list(module.hostile_answers(Path(tempfile.mkdtemp()) / "canary").values())
    return answers + ["1" * 1_000_000, "{" * 10_000 + "1" + "}" * 10_000, "9" * 150_000]


def batches(seed: int, size: int, hostile_share: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    fmt = OutputFormat()
    pool = [(fmt.parse(completion).answer or "", gold) for completion, gold in make_items(seed=seed)]
    rng = random.Random(seed)
    clean = rng.sample(pool, size)
    hostile = hostile_answers()
    mixed = list(clean)
    for k, index in enumerate(rng.sample(range(size), round(hostile_share * size))):
        mixed[index] = (hostile[k % len(hostile)], mixed[index][1])
    return clean, mixed


def seconds(pairs: list[tuple[str, str]], workers: int) -> tuple[float, float]:
    with MathGrader(workers=workers, cache_size=0) as grader:
        grader.start()
        started = time.perf_counter()
        grader.grade_batch([p for p, _ in pairs], [g for _, g in pairs])
        return time.perf_counter() - started, grader.pop_metrics()["grader/timeouts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    ratios = []
    print("| seed | clean s | mixed s | mixed / clean | timeouts (clean, mixed) |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        clean, mixed = batches(seed, args.size, args.hostile_share)
        clean_s, clean_timeouts = seconds(clean, args.workers)
        mixed_s, mixed_timeouts = seconds(mixed, args.workers)
        ratios.append(mixed_s / clean_s)
        print(f"| {seed} | {clean_s:.3f} | {mixed_s:.3f} | {ratios[-1]:.2f} | {clean_timeouts:.0f}, {mixed_timeouts:.0f} |")
    print(f"ratio mean {statistics.mean(ratios):.2f}, min {min(ratios):.2f}, worst {max(ratios):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
