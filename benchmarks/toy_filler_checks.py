"""What a toy GRPO model's tokens go to: per difficulty, the mean stated budget and length, the most common
budget and its share, and the share of the answer's checks (``?a-b=c``) whose arithmetic is wrong. The toy
grader reads only the boxed answer, so a wrong check is filler that lands a completion on its budget; the
SFT model writes none.

    python benchmarks/toy_filler_checks.py logs/reproduce_toy/<timestamp> [more runs ...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

CHECK = re.compile(r"\?(\d{1,6})-(\d{1,6})=(\d{1,6})")


def filler_table(completions: Path) -> list[dict]:
    """One row per difficulty (and one for all) of an evaluation's ``completions.jsonl``."""
    rows = [json.loads(line) for line in completions.read_text().splitlines() if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row.get("difficulty"))].append(row)
        groups["all"].append(row)
    table = []
    for difficulty, members in sorted(groups.items()):
        checks = [match for row in members for match in CHECK.findall(row["text"])]
        wrong = sum(int(a) - int(b) != int(c) for a, b, c in checks)
        budgets = Counter(row["budget"] for row in members if row.get("budget") is not None)
        mode, count = budgets.most_common(1)[0] if budgets else (None, 0)
        table.append({
            "difficulty": difficulty, "n": len(members),
            "budget": statistics.fmean(budgets.elements()) if budgets else None,
            "length": statistics.fmean(row["length"] for row in members),
            "budget_mode": mode, "mode_share": count / len(members),
            "checks": len(checks), "wrong_checks": wrong / len(checks) if checks else 0.0,
        })  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="reproduction output directories")
    args = parser.parse_args()
    print("| run | evaluation | difficulty | n | mean budget | mean length | most common budget (share) | checks | wrong checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in map(Path, args.runs):
        for completions in sorted(run.glob("eval_*/completions.jsonl")):
            for row in filler_table(completions):
                budget = "–" if row["budget"] is None else f"{row['budget']:.1f}"
                print(f"| {run.name} | {completions.parent.name} | {row['difficulty']} | {row['n']} | {budget} | "
                      f"{row['length']:.1f} | {row['budget_mode']} ({100 * row['mode_share']:.0f}%) | {row['checks']} | "
                      f"{100 * row['wrong_checks']:.0f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
