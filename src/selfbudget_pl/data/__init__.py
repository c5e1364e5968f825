"""Budget-labelled math data: sources -> records -> labels -> batches, for SFT and GRPO."""

from selfbudget_pl.data.budget_labels import label_record, label_records, round_budget
from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.data.prompts import build_prompt, encode_prompt
from selfbudget_pl.data.records import DataError, DroppedRows, MathRecord
from selfbudget_pl.data.sources import HFSource, JsonlSource, SyntheticSource

__all__ = [
    "BudgetMathDataModule",
    "DataError",
    "DroppedRows",
    "HFSource",
    "JsonlSource",
    "MathRecord",
    "SyntheticSource",
    "build_prompt",
    "encode_prompt",
    "label_record",
    "label_records",
    "round_budget",
]
