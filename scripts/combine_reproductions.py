"""Combine reproduction runs made separately (e.g. one GRPO seed per machine, each with
``selfbudget-reproduce sft_model=<the same SFT export> grpo_seeds=[N]``) into one table of the targets per
seed, with mean, standard deviation and the worst seed, as ``grpo_seeds=[0,1,2]`` in one run reports it.

  python scripts/combine_reproductions.py logs/runs/seed0 logs/runs/seed1 logs/runs/seed2 [--markdown out.md]

Runs from different SFT models may share GRPO seeds: ``--labels sft0 sft1 sft2`` names their seeds
``sft0/0``, ``sft1/0``, ... (one label per run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from selfbudget_pl.reproduce import combine_figures, targets_markdown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="reproduction output directories (each holds figures.json)")
    parser.add_argument("--markdown", default=None, help="also write the table here")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run: its seeds become LABEL/SEED")
    args = parser.parse_args(argv)
    figures = []
    for run in args.runs:
        path = Path(run) / "figures.json"
        if not path.is_file():
            sys.exit(f"{run}: no figures.json (not a finished reproduction run)")
        figures.append(json.loads(path.read_text()))
    try:
        combined = combine_figures(figures, [str(run) for run in args.runs], args.labels)
    except ValueError as error:
        sys.exit(f"combine_reproductions: {error}")
    table = targets_markdown(combined)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
