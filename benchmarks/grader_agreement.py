"""Agreement of our grader, and of math-verify alone, with other graders' labelled test pairs.

Reads ``tests/data/other_graders_cases.jsonl`` (or ``--cases``), grades every row with ``MathGrader()``
through a two-worker pool, and with math-verify alone called two ways: on the raw text
(``verify(parse(gold), parse(pred))``) and with bare answers inside ``$...$`` as its README writes them.
Prints agreement, false credit (labelled wrong, graded right) and misses, then every row where any of
the three differs from its label.

    OMP_NUM_THREADS=1 python benchmarks/grader_agreement.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from selfbudget_pl.rewards.grader import MathGrader, answer_text_of
from selfbudget_pl.rewards.verify_worker import as_documented, prepare_math_verify

CASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "other_graders_cases.jsonl"


def math_verify_alone(rows: list[dict], wrap: Callable[[str], str]) -> list[bool]:
    from math_verify import parse, verify

    prepare_math_verify()
    verdicts = []
    for row in rows:
        pred, gold = answer_text_of(row["pred"]), answer_text_of(row["gold"])
        try:
            verdicts.append(pred is not None and gold is not None and bool(verify(parse(wrap(gold)), parse(wrap(pred)))))
        except Exception:  # noqa: BLE001 - math-verify's own failures count as "not equal"
            verdicts.append(False)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=CASES)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.cases.read_text().splitlines() if line.strip()]
    with MathGrader(workers=2, cache_size=0) as grader:
        ours = grader.grade_batch([row["pred"] for row in rows], [row["gold"] for row in rows])
        print("grader counts:", grader.pop_metrics())
    graders = {
        "ours": ours,
        "math-verify, raw text": math_verify_alone(rows, lambda text: text),
        "math-verify, $...$": math_verify_alone(rows, as_documented),
    }
    for name, verdicts in graders.items():
        agree = sum(v == row["expected"] for v, row in zip(verdicts, rows))
        false_credit = sum(v and not row["expected"] for v, row in zip(verdicts, rows))
        print(f"{name}: {agree}/{len(rows)} agree, {false_credit} false credit, {len(rows) - agree - false_credit} missed")
    print("| row | source | prediction | gold | label | " + " | ".join(graders) + " |")
    for index, row in enumerate(rows):
        verdicts = [graders[name][index] for name in graders]
        if any(v != row["expected"] for v in verdicts):
            source = row["source"].split("@")[0] + "::" + row["source"].split("::")[-1]
            print(f"| {index} | {source} | `{str(row['pred'])[:45]}` | `{str(row['gold'])[:35]}` | {row['expected']} | "
                  + " | ".join(str(v) for v in verdicts) + " |")


if __name__ == "__main__":
    main()
