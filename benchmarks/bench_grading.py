"""Completions graded per second through the reward path: parse -> grade -> token count -> reward.

Completions are MATH-500 gold answers and equivalent rewritings (``\\frac{a}{b}`` -> ``a/b`` / decimal /
``\\dfrac``, reordered sums, spacing, ``\\left(``), plus wrong answers, rendered as full SelfBudgeter
responses and scored in GRPO-sized batches by :func:`selfbudget_pl.rewards.annotate.annotate` and
:class:`BudgetGuidedReward`, with the grader's pool on ``--workers`` processes. Also prints the grader's
agreement with ``grader/cases.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/bench_grading.py --workers 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from selfbudget_pl.format import OutputFormat
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.rewards.budget import BudgetGuidedReward
from selfbudget_pl.rewards.combine import WeightedRewards
from selfbudget_pl.rewards.grader import MathGrader, fast_verdict
from selfbudget_pl.rollout.base import Rollouts
from selfbudget_pl.rewards.annotate import annotate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FRACTION = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
SUM = re.compile(r"^([^+\-]+)\+([^+\-]+)$")


def gold_answers() -> list[str]:
    path = SHARED / "math500" / "test.jsonl"
    if path.exists():
        return [json.loads(line)["answer"] for line in path.read_text().splitlines()]
    rng = random.Random(0)  # fallback: MATH-like answers
    return [rng.choice([str(rng.randint(-99, 9999)), f"\\frac{{{rng.randint(1, 50)}}}{{{rng.randint(2, 60)}}}",
                        f"{rng.randint(2, 9)}\\sqrt{{{rng.choice([2, 3, 5, 7])}}}", f"x^2+{rng.randint(1, 9)}x"])
            for _ in range(500)]


def rewritings(gold: str) -> list[str]:
    """Equivalent spellings of ``gold`` (the answer itself first)."""
    spaced = re.sub(r"\s*([=+,]|(?<!\\)[()])\s*", r" \1 ", gold).strip()
    forms = [gold, gold.replace(" ", ""), spaced, gold.replace("\\frac", "\\dfrac")]
    fraction = FRACTION.match(gold)
    if fraction:
        numerator, denominator = int(fraction[1]), int(fraction[2])
        forms.append(f"{numerator}/{denominator}")
        value = Fraction(numerator, denominator)
        if value.denominator in (2, 4, 5, 8, 10, 20, 25, 50, 100):
            forms.append(str(float(value)))
    total = SUM.match(gold)
    if total:
        forms.append(f"{total[2]}+{total[1]}")
    if gold.startswith("(") and gold.endswith(")"):
        forms.append("\\left" + gold[:-1] + "\\right)")
    return list(dict.fromkeys(forms))


def wrong(gold: str, other: str) -> str:
    try:
        return str(int(gold.replace(",", "")) + 1)
    except ValueError:
        return other


def gsm8k_answers() -> list[str]:
    path = SHARED / "gsm8k" / "test.jsonl"
    if path.exists():
        return [json.loads(line)["answer"].split("####")[-1].strip() for line in path.read_text().splitlines()]
    return [str(random.Random(i).randint(0, 100_000)) for i in range(1319)]


def integer_rewritings(gold: str) -> list[str]:
    value = int(gold.replace(",", ""))
    return list(dict.fromkeys([gold, f"{value:,}", f"{value}.0", f"\\${value}"]))


def make_items(seed: int, kind: str = "math500") -> list[tuple[str, str]]:
    """(completion, gold) pairs: every rewriting of every gold, plus one wrong answer per gold."""
    rng = random.Random(seed)
    fmt = OutputFormat()
    golds = gold_answers() if kind == "math500" else gsm8k_answers()
    forms = rewritings if kind == "math500" else integer_rewritings
    items = []
    for gold in golds:
        for answer in forms(gold) + [wrong(gold, rng.choice(golds))]:
            words = " ".join(rng.choice(["so", "then", "we", "get", "x", "=", "2", "+", "3"]) for _ in range(rng.randint(20, 120)))
            items.append((fmt.render(rng.randint(50, 400), f" {words} \\boxed{{{answer}}} "), gold))
    rng.shuffle(items)
    return items


def run(items: list[tuple[str, str]], workers: int, batch_size: int, tokenizer) -> dict[str, float]:
    fmt = OutputFormat()
    reward = WeightedRewards({"budget_guided": BudgetGuidedReward()})
    with MathGrader(workers=workers) as grader:
        grader.start()  # workers importing math-verify is start-up, not grading
        started = time.perf_counter()
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            n = len(batch)
            rollouts = Rollouts(
                prompt_ids=[[0]] * n, completion_ids=[[0]] * n, completions=[c for c, _ in batch],
                finish_reasons=["eos"] * n, group_index=[0] * n, columns={"answer": [g for _, g in batch], "b_max": [None] * n},
            )
            annotations = annotate(rollouts, fmt, grader, tokenizer)
            reward(rollouts.completions, parsed=annotations.parsed, correct=annotations.correct,
                   solution_lengths=annotations.solution_lengths, b_max=[None] * n, progress=0.5)
        elapsed = time.perf_counter() - started
    return {"completions": len(items), "seconds": elapsed, "per_s": len(items) / elapsed}


def stage_costs(items: list[tuple[str, str]], tokenizer) -> dict[str, float]:
    """Seconds per completion of each stage, single process (where the time goes)."""
    fmt = OutputFormat()
    sample = items[:400]
    started = time.perf_counter()
    parsed = [fmt.parse(c) for c, _ in sample]
    parse_s = time.perf_counter() - started
    started = time.perf_counter()
    for output in parsed:
        tokenizer(output.solution or "", add_special_tokens=False)
    token_s = time.perf_counter() - started
    fast = [fast_verdict(p.answer or "", g) for p, (_, g) in zip(parsed, sample)]
    slow_pairs = [(p.answer, g) for p, (_, g), v in zip(parsed, sample, fast) if v is None and p.answer]
    grader = MathGrader(workers=0, cache_size=0)
    started = time.perf_counter()
    grader.grade_batch([p for p, _ in slow_pairs], [g for _, g in slow_pairs])
    verify_s = time.perf_counter() - started
    return {
        "parse_ms": 1e3 * parse_s / len(sample),
        "tokenize_ms": 1e3 * token_s / len(sample),
        "fast_path_share": 1 - len(slow_pairs) / len(sample),
        "math_verify_ms_per_slow_item": 1e3 * verify_s / max(1, len(slow_pairs)),
    }


def cases_agreement() -> None:
    path = SHARED / "grader" / "cases.jsonl"
    if not path.exists():
        print("cases.jsonl not found; skipping agreement")
        return
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [row for row in rows if not row.get("params") and not row.get("flag")]
    with MathGrader(workers=2) as grader:
        verdicts = grader.grade_batch([row["pred"] for row in rows], [row["gold"] for row in rows])
    disagree = [row for row, verdict in zip(rows, verdicts) if verdict != row["equal"]]
    print(f"cases.jsonl agreement (unflagged, default params): {len(rows) - len(disagree)}/{len(rows)}")
    for row in disagree:
        print(f"  id {row['id']}: label {row['equal']}, pred {row['pred'][:50]!r}, gold {row['gold'][:50]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=80, help="completions per annotate call (GRPO batch)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = ModelLoader(cache_dir=tempfile.mkdtemp()).load_tokenizer()
    gsm8k = make_items(seed=0, kind="gsm8k")
    rates = [run(gsm8k, args.workers, args.batch_size, tokenizer)["per_s"] for _ in range(args.repeats)]
    print(f"GSM8K integer answers ({len(gsm8k)} completions, all on the fast path): median "
          f"{sorted(rates)[len(rates) // 2]:.0f} completions/s")
    items = make_items(seed=0)
    slow = sum(fast_verdict(OutputFormat().parse(c).answer or "", g) is None for c, g in items)
    print(f"{len(items)} completions ({len(gold_answers())} golds), {slow} ({slow / len(items):.1%}) need math-verify, "
          f"the rest are decided on the fast path")
    print("stage costs:", {k: round(v, 3) for k, v in stage_costs(items, tokenizer).items()})
    rates = [run(items, args.workers, args.batch_size, tokenizer)["per_s"] for _ in range(args.repeats)]
    print(f"MATH-500, cold cache, {args.workers} workers: median {sorted(rates)[len(rates) // 2]:.0f} completions/s "
          f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
    # GRPO-like: each gold's completions recur (G samples, mostly the same few answers): warm cache.
    repeated = items * 4
    random.Random(1).shuffle(repeated)
    warm = run(repeated, args.workers, args.batch_size, tokenizer)
    print(f"each pair seen 4x (cache warm after first sight): {warm['per_s']:.0f} completions/s")
    cases_agreement()


if __name__ == "__main__":
    main()
