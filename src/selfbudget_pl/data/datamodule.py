"""One LightningDataModule for both stages: budget-labelled SFT targets and GRPO prompts.

Flow: sources -> records (``id, problem, answer, solution, difficulty, source``) -> val/test rows whose
problem is also in train are dropped -> (SFT) targets labelled from reference solutions ->
prompts built and tokenised, over-long rows dropped -> collated batches. Every drop is counted and
logged once, per split and reason.

Batches (see :mod:`selfbudget_pl.data.collate`):

- ``mode="sft"``: train batches are SFT tensors (+ ``budget``); val batches are SFT tensors plus the
  GRPO prompt fields and columns, so one batch serves the validation loss and greedy generation.
- ``mode="grpo"``: train and val batches are left-padded prompts plus columns (``answer``,
  ``difficulty``, ``b_max``, ...).
- test batches are prompt batches in both modes (evaluation only generates).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from selfbudget_pl.data.budget_labels import label_record, label_records
from selfbudget_pl.data.collate import GRPOCollator, SFTCollator
from selfbudget_pl.data.loader import ResumableDataLoader
from selfbudget_pl.data.prompts import build_prompt, encode_prompt
from selfbudget_pl.data.records import DataError, DroppedRows, MathRecord
from selfbudget_pl.data.rows import BAD_ROW_POLICIES
from selfbudget_pl.data.sources import DEFAULT_MAX_LINE_BYTES, JsonlSource, Source
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.schema import Findings, Schema, Target, check_arguments, spec

log = logging.getLogger(__name__)

MODES = ("sft", "grpo")
SPLITS = ("train", "val", "test")


def problem_key(problem: str) -> str:
    """What counts as "the same problem" across splits: the text with whitespace collapsed."""
    return " ".join(problem.split())


@dataclass
class BudgetMathDataSchema(Schema):
    """The arguments of :class:`BudgetMathDataModule` (config group ``data``) and what each allows."""

    TARGETS = ("selfbudget_pl.data.datamodule.BudgetMathDataModule",)
    INJECTED = ("output_format",)

    train: Optional[list[Target]] = spec()
    val: Optional[list[Target]] = spec()
    test: Optional[list[Target]] = spec()
    mode: str = spec(choices=MODES)
    batch_size: int = spec(ge=1)
    val_batch_size: Optional[int] = spec(ge=1, note="null: batch_size")
    num_workers: int = spec(ge=0)
    seed: int = spec()
    prompt_template: str = spec(rule=lambda t: None if "{problem}" in t else "has no {problem} field")
    system_prompt: Optional[str] = spec()
    chat_template: Optional[bool] = spec(note="null: the model's chat template where it has one")
    max_length: Optional[int] = spec(ge=1, note="null: no limit")
    max_prompt_length: Optional[int] = spec(ge=1, note="null: no limit")
    on_bad_row: str = spec(choices=BAD_ROW_POLICIES)
    max_line_bytes: int = spec(ge=1)
    val_size: int = spec(ge=0)
    budget_round_to: int = spec(ge=1)
    b_max_labels: Optional[Union[str, list[str]]] = spec()
    reference_b_max: bool = spec()
    allow_uncapped: bool = spec()
    data_root: Optional[str] = spec()
    pin_memory: bool = spec()

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: Findings) -> None:
        if node.get("val") and isinstance(node.get("val_size"), int) and node["val_size"] > 0:
            findings.warning(f"{key}.val_size", node["val_size"],
                             f"is ignored: {key}.val has sources (the hold-out is only for runs without them)")


class BudgetMathDataModule(L.LightningDataModule):
    """Math problems as budget-labelled SFT data or GRPO prompts.

    Args:
        train/val/test: lists of sources (objects with ``load()``, e.g. :class:`~selfbudget_pl.data.
            sources.JsonlSource`); their records are concatenated per split.
        mode: ``sft`` | ``grpo`` (see module doc).
        batch_size: train batch size (per device); ``val_batch_size`` for val/test (default: the same).
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: seeds the train shuffle and the ``val_size`` hold-out.
        prompt_template: user message with a ``{problem}`` field; ``system_prompt``: optional system message.
        chat_template: render prompts in the model's chat template: null where it has one, true (required)
            or false (plain text); see :func:`~selfbudget_pl.data.prompts.use_chat_template`.
        output_format: the answer format SFT targets are rendered in (train.py passes the shared one).
        max_length: SFT rows with more prompt + response tokens are dropped (targets are never truncated).
        max_prompt_length: rows with a longer prompt are dropped (both modes).
        on_bad_row: a row that cannot be used (undecodable, invalid JSON, over-long, a missing field, an
            answer that is NaN or not a string/number, a duplicate id, ...: see :mod:`~selfbudget_pl.data.
            sources`) is ``drop``-ped and counted (logged at the end of loading) or an ``error``.
        max_line_bytes: a JSONL line longer than this is a bad row (read no further than this).
        val_size: with no val sources, hold out this many train problems as val (0: no validation).
        budget_round_to: budget labels are rounded up to a multiple of this (1: exact token counts).
        b_max_labels: the JSONL file(s) ``scripts/label_budgets.py --samples K`` writes (schema ``labelled``; a
            relative path is read from the working directory, not ``data_root``): each record whose problem
            one labels takes its ``b_max`` from it (None where the model had no correct answer: no cap).
        reference_b_max: in GRPO mode, a record without a ``b_max`` of its own (from a label file) gets
            ``b_max`` = the label length of its reference solution. Our deviation, opt-in: in the paper
            b_max is the length of the base model's own correct answer (``scripts/label_budgets.py
            --samples K`` writes it), infinite when it had none. False (default): no cap (``None``).
        allow_uncapped: GRPO may train with no row capped (no ``b_max`` anywhere) on purpose: a warning, not
            the start-up error that otherwise says the budget penalty and pre-filling would do nothing.
        data_root: directory that relative source paths are resolved against.
        pin_memory: DataLoader ``pin_memory`` (for GPU training).
    """

    def __init__(
        self,
        train: Sequence[Source] = (),
        val: Sequence[Source] = (),
        test: Sequence[Source] = (),
        mode: str = "sft",
        batch_size: int = 32,
        val_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        prompt_template: str = "{problem}",
        system_prompt: Optional[str] = None,
        chat_template: Optional[bool] = None,
        output_format: Optional[OutputFormat] = None,
        max_length: Optional[int] = None,
        max_prompt_length: Optional[int] = None,
        on_bad_row: str = "drop",
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        val_size: int = 0,
        budget_round_to: int = 1,
        b_max_labels: Optional[str | Sequence[str]] = None,
        reference_b_max: bool = False,
        allow_uncapped: bool = False,
        data_root: Optional[str] = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(BudgetMathDataSchema, locals(), "BudgetMathDataModule")
        self.sources = {"train": list(train or []), "val": list(val or []), "test": list(test or [])}
        self.mode = mode
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        self.output_format = output_format or OutputFormat()
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.on_bad_row = on_bad_row
        self.max_line_bytes = max_line_bytes
        self.val_size = val_size
        self.budget_round_to = budget_round_to
        self.b_max_labels = b_max_labels
        self.reference_b_max = reference_b_max
        self.allow_uncapped = allow_uncapped
        self.label_caps: dict[str, Optional[int]] = {}
        self.data_root = data_root
        self.pin_memory = pin_memory
        self.tokenizer: Any = None
        self.dropped = DroppedRows()
        self.records: dict[str, list[MathRecord]] = {}
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    def connect(self, tokenizer: Any) -> None:
        """Give the data the model's tokenizer (known only once the model is loaded); call before setup."""
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad and an EOS token (ModelLoader sets pad = EOS if missing)")
        self.tokenizer = tokenizer
        self.datasets = {}

    # -- loading -------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load, label and tokenise every split (once; later calls reuse the result)."""
        if self.tokenizer is None:
            raise RuntimeError("BudgetMathDataModule.connect(tokenizer) must be called before setup()")
        if stage in ("fit", None) and not self.sources["train"]:
            raise DataError("data.train has no sources")
        if self.datasets:
            return
        self.label_caps = self._load_label_caps()
        self.records = self._load_records()
        for split, records in self.records.items():
            self.datasets[split] = self._examples(split, records)
        self.dropped.log_summary(log)
        for split, examples in self.datasets.items():
            log.info("%s: %d examples (%s)", split, len(examples), self.mode)

    def _load_label_caps(self) -> dict[str, Optional[int]]:
        """``b_max`` per problem (:func:`problem_key`) from ``b_max_labels``; empty when none is set."""
        files = [self.b_max_labels] if isinstance(self.b_max_labels, str) else list(self.b_max_labels or [])
        caps: dict[str, Optional[int]] = {}
        for name in files:
            path = Path(name).expanduser()
            if not path.is_file():
                raise DataError(
                    f"data.b_max_labels: {name}: no such file; write it with `python scripts/label_budgets.py "
                    f"--samples K ... --output {name}` (README: Budget caps), or set data.b_max_labels=null"
                )
            records = JsonlSource(str(path), schema="labelled").load(
                on_bad_row=self.on_bad_row, dropped=self.dropped, max_line_bytes=self.max_line_bytes
            )
            caps.update((problem_key(record["problem"]), record.get("b_max")) for record in records)
        return caps

    def _load_records(self) -> dict[str, list[MathRecord]]:
        records = {split: self._load_split(split) for split in SPLITS if self.sources[split]}
        if "train" in records and "val" not in records and self.val_size > 0:
            records["train"], records["val"] = self._hold_out(records["train"])
        train_problems = {problem_key(record["problem"]) for record in records.get("train", [])}
        for split in ("val", "test"):
            if split in records and train_problems:
                records[split] = self._without_train_problems(split, records[split], train_problems)
        return records

    def _load_split(self, split: str) -> list[MathRecord]:
        records: list[MathRecord] = []
        for source in self.sources[split]:
            records.extend(
                source.load(
                    on_bad_row=self.on_bad_row, dropped=self.dropped, root=self.data_root,
                    max_line_bytes=self.max_line_bytes,
                )
            )  # fmt: skip
        if not records:
            raise DataError(f"{split} split is empty: sources {self.sources[split]} gave no usable rows")
        return records

    def _hold_out(self, records: list[MathRecord]) -> tuple[list[MathRecord], list[MathRecord]]:
        """``val_size`` distinct train problems become val; every train row of those problems leaves train."""
        problems = sorted({problem_key(record["problem"]) for record in records})
        if self.val_size >= len(problems):
            raise DataError(f"val_size={self.val_size} leaves no train data ({len(problems)} distinct problems)")
        held_out = set(random.Random(self.seed).sample(problems, self.val_size))
        val = {problem_key(r["problem"]): r for r in records if problem_key(r["problem"]) in held_out}
        train = [record for record in records if problem_key(record["problem"]) not in held_out]
        return train, list(val.values())

    def _without_train_problems(self, split: str, records: list[MathRecord], train: set[str]) -> list[MathRecord]:
        kept = []
        for record in records:
            if problem_key(record["problem"]) in train:
                self.dropped.add(split, "problem_also_in_train", record["id"])
            else:
                kept.append(record)
        return kept

    def _examples(self, split: str, records: list[MathRecord]) -> list[dict[str, Any]]:
        """Tokenised examples; SFT train/val rows get (and need) a target response."""
        needs_target = self.mode == "sft" and split != "test"
        if needs_target:
            # A labelled problem without a target (no correct cold-start answer) is RL data only.
            for record in records:
                if "b_max" in record and "response" not in record:
                    self.dropped.add(split, "no_cold_start_target", record["id"])
            records = [record for record in records if "response" in record or "b_max" not in record]
            records = label_records(
                records, self.tokenizer, self.output_format, self.budget_round_to, self.dropped, scope=split
            )
        examples = []
        for record in records:
            prompt = build_prompt(
                record["problem"], self.tokenizer, self.prompt_template, self.system_prompt, self.chat_template
            )
            prompt_ids = encode_prompt(prompt, self.tokenizer, self.chat_template)
            if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
                self.dropped.add(split, f"prompt_longer_than_{self.max_prompt_length}", record["id"])
                continue
            example: dict[str, Any] = {**record, "b_max": self._b_max(record), "prompt_ids": _ids(prompt_ids)}
            if needs_target:
                response_ids = self.tokenizer(record["response"], add_special_tokens=False)["input_ids"]
                response_ids.append(self.tokenizer.eos_token_id)
                if self.max_length is not None and len(prompt_ids) + len(response_ids) > self.max_length:
                    self.dropped.add(split, f"longer_than_{self.max_length}", record["id"])
                    continue
                example["response_ids"] = _ids(response_ids)
            examples.append(example)
        if not examples:
            raise DataError(f"{split} split is empty after dropping rows: {self.dropped.by_reason(split)}")
        return examples

    def _b_max(self, record: MathRecord) -> Optional[int]:
        if "b_max" in record:  # a label file's cap (None: no correct cold-start answer, no cap)
            return record["b_max"]
        key = problem_key(record["problem"])
        if key in self.label_caps:
            return self.label_caps[key]
        if self.reference_b_max and record.get("solution"):
            return label_record(record, self.tokenizer, self.output_format, self.budget_round_to)["b_max"]
        return None

    # -- loaders -------------------------------------------------------------------------------
    def _collator(self, split: str):
        pad_token_id = self.tokenizer.pad_token_id
        if self.mode == "grpo" or split == "test":
            return GRPOCollator(pad_token_id)
        return SFTCollator(pad_token_id, include_prompts=split == "val")

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = self._distributed_sampler(split) if shuffle else None
        return ResumableDataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed) if shuffle and sampler is None else None,
            collate_fn=self._collator(split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _distributed_sampler(self, split: str) -> Optional[DistributedSampler]:
        """Each rank's share of the shuffled split when the Trainer runs several processes, shuffled from
        ``seed``: the sampler Lightning would put in otherwise is seeded from the global seed instead."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return None
        return DistributedSampler(
            self.datasets[split], num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=True,
            seed=self.seed,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # No val split configured: an empty list tells Lightning to skip validation.
        return self._loader("val", self.val_batch_size, shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise DataError("data.test has no sources")
        return self._loader("test", self.val_batch_size, shuffle=False)


def _ids(ids: Sequence[int]) -> np.ndarray:
    # int32 arrays, not lists: a list of Python ints costs ~9x the memory, and DataLoader workers
    # would copy it page by page as reference counts change.
    return np.asarray(ids, dtype=np.int32)
