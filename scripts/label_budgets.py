"""Write budget-labelled cold-start data (JSONL, the ``labelled`` schema) from reference solutions.

Each row gets ``response = <budget>N</budget><solution>{reference}</solution>``, where N counts the
solution's tokens under the model's tokenizer, and ``budget = b_max = N``. Rows whose answer cannot be
extracted, or whose rendered target would not parse back to the gold answer, are dropped and counted.

  python scripts/label_budgets.py --jsonl ../shared/data/gsm8k/train.jsonl --schema gsm8k \\
      --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --output data/gsm8k_train_labelled.jsonl
  python scripts/label_budgets.py --source-config my_source.yaml --output labelled.jsonl   # tiny model

The DataModule reads the output with ``JsonlSource(path, schema="labelled")``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from typing import Optional, Sequence

from selfbudget_pl.data.budget_labels import label_records, write_jsonl
from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.data.sources import SCHEMAS, JsonlSource
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.models import ModelLoader

log = logging.getLogger("label_budgets")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--jsonl", help="a JSONL file of problems")
    where.add_argument("--source-config", help="a YAML file holding one source config (with _target_)")
    parser.add_argument("--schema", default="auto", choices=SCHEMAS, help="schema of --jsonl rows")
    parser.add_argument("--limit", type=int, default=None, help="label only the first LIMIT rows")
    parser.add_argument("--data-root", default=None, help="directory relative source paths are resolved against")
    parser.add_argument("--model", default=None, help="hub id or folder whose tokenizer counts tokens (default: tiny)")
    parser.add_argument("--round-to", type=int, default=1, help="round budgets up to a multiple of this")
    parser.add_argument("--on-bad-answer", default="drop", choices=("drop", "error"))
    parser.add_argument("--output", required=True, help="where to write the labelled JSONL")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.jsonl:
        source = JsonlSource(args.jsonl, schema=args.schema, limit=args.limit)
    else:
        if args.limit is not None:
            sys.exit("--limit applies to --jsonl; set `limit:` in the source config instead")
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        source = instantiate(OmegaConf.load(args.source_config))
    tokenizer = ModelLoader(name_or_path=args.model).load_tokenizer()
    dropped = DroppedRows()
    records = source.load(on_bad_answer=args.on_bad_answer, dropped=dropped, root=args.data_root)
    labelled = label_records(records, tokenizer, OutputFormat(), args.round_to, dropped)
    rows = write_jsonl(labelled, args.output)
    dropped.log_summary(log)
    budgets = [record["budget"] for record in labelled]
    log.info(
        "wrote %d rows to %s; budget mean %.1f, median %.0f, max %d",
        rows, args.output,
        statistics.fmean(budgets) if budgets else 0.0,
        statistics.median(budgets) if budgets else 0, max(budgets, default=0),
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
