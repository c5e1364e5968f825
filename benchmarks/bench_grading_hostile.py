"""Grading time of a batch with hostile items in it against the same batch without them.

Per seed: 256 (answer, gold) pairs drawn from the MATH-500 mix of ``bench_grading.make_items`` (gold
answers, rewritings, wrong answers), graded by ``MathGrader(workers=2)``; then the same batch with 10%
of the predictions (26) replaced by the project's hostile answers (``tests/test_hostile.py``: code
injections, power towers, ``(10^{100})!``, 400 nested braces, 150 nested fractions, 1 MB of digits, ...).
Each batch is graded by a fresh grader whose pool was started (and warmed) before timing, no verdict
cache, so neither batch profits from the other; clean and mixed alternate ``--repeats`` times and the
medians are compared, so a burst of load on a shared machine does not land on one side only.
Target: mixed <= 1.5x clean.

    OMP_NUM_THREADS=1 python benchmarks/bench_grading_hostile.py --seeds 0 1 2 3 4 --repeats 3
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


def seconds(pairs: list[tuple[str, str]], workers: int) -> tuple[float, str]:
    """Grading seconds, and the grader's counts: timeouts / retries / worker restarts."""
    with MathGrader(workers=workers, cache_size=0) as grader:
        grader.start()
        started = time.perf_counter()
        grader.grade_batch([p for p, _ in pairs], [g for _, g in pairs])
        elapsed = time.perf_counter() - started
        counts = grader.pop_metrics()
        return elapsed, "/".join(f"{counts[f'grader/{k}']:.0f}" for k in ("timeouts", "retries", "worker_restarts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--repeats", type=int, default=3, help="alternating clean/mixed runs per seed (medians)")
    args = parser.parse_args()
    ratios = []
    print("| seed | clean s (runs) | mixed s (runs) | median mixed / median clean | timeouts/retries/restarts per run (clean; mixed) |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        clean, mixed = batches(seed, args.size, args.hostile_share)
        runs = {"clean": [], "mixed": []}
        for _ in range(args.repeats):
            for name, pairs in (("clean", clean), ("mixed", mixed)):
                runs[name].append(seconds(pairs, args.workers))
        clean_s, mixed_s = (statistics.median(t for t, _ in runs[name]) for name in ("clean", "mixed"))
        ratios.append(mixed_s / clean_s)
        shown = {name: ", ".join(f"{t:.2f}" for t, _ in runs[name]) for name in runs}
        counts = {name: " ".join(c for _, c in runs[name]) for name in runs}
        print(f"| {seed} | {clean_s:.2f} ({shown['clean']}) | {mixed_s:.2f} ({shown['mixed']}) | {ratios[-1]:.2f} | "
              f"{counts['clean']}; {counts['mixed']} |")
    print(f"ratio mean {statistics.mean(ratios):.2f}, min {min(ratios):.2f}, worst {max(ratios):.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
