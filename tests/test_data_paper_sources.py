"""The paper's hub data (STILL-3-Preview RL, s1K-1.1) through the configs' own loading code: a local folder
laid out like the hub repository goes through the same ``datasets.load_dataset`` call as the hub id."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.data.sources import DataError, HFSource

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
S1K_COLUMNS = (
    "solution", "question", "cot_type", "source_type", "metadata", "gemini_thinking_trajectory",
    "gemini_attempt", "deepseek_thinking_trajectory", "deepseek_attempt",
)  # fmt: skip


def _hub_folder(root: Path, rows: list[dict]) -> Path:
    """A folder shaped like a hub dataset repo: data/train-00000-of-00001.parquet."""
    import datasets

    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def _data_cfg(name: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[f"data={name}"]).data


def _source(cfg_source, folder: Path) -> HFSource:
    source = instantiate(cfg_source, _convert_="all")
    source.name_or_path = str(folder)  # the hub id replaced by the local copy; nothing else changes
    return source


def test_still3_rl_config_reads_question_answer_rows(tmp_path):
    cfg = _data_cfg("still3_rl")
    assert cfg.mode == "grpo"
    (train,) = cfg.train
    assert (train.name_or_path, train.split, train.schema) == ("RUC-AIBOX/STILL-3-Preview-RL-Data", "train", "question_answer")
    folder = _hub_folder(tmp_path / "still3", [
        {"question": "What is $1+1$?", "answer": "2"},
        {"question": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}"},
        {"question": "Empty answer", "answer": " "},
    ])  # fmt: skip
    dropped = DroppedRows()
    records = _source(train, folder).load(dropped=dropped)
    assert [(r["problem"], r["answer"]) for r in records] == [("What is $1+1$?", "2"), ("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}")]
    assert all(r["solution"] is None and math.isnan(r["difficulty"]) for r in records)
    assert records[0]["source"] == "STILL-3-Preview-RL-Data/train"
    assert dropped.by_reason("STILL-3-Preview-RL-Data/train") == {"unextractable_answer": 1}


def test_cold_start_paper_config_reads_s1k_rows(tmp_path):
    cfg = _data_cfg("cold_start_paper")
    names = [source.name_or_path for source in cfg.train]
    assert names == ["openai/gsm8k", "DigitalLearningGmbH/MATH-lighteval", "simplescaling/s1K-1.1"]
    blank = dict.fromkeys(S1K_COLUMNS, "")
    folder = _hub_folder(tmp_path / "s1k", [
        {**blank, "question": "Find $x$ if $2x=6$.", "solution": "Divide by 2: $x = \\boxed{3}$.", "cot_type": "math"},
        {**blank, "question": "AIME-style question", "solution": "128", "cot_type": "math"},
        {**blank, "question": "Explain entropy.", "solution": "Entropy measures...\nIt follows that...", "cot_type": "science"},
    ])  # fmt: skip
    dropped = DroppedRows()
    records = _source(cfg.train[2], folder).load(dropped=dropped)
    assert [r["answer"] for r in records] == ["3", "128"]
    assert records[0]["solution"].endswith("\\boxed{3}$.")  # a worked solution: a cold-start target
    assert records[1]["solution"] is None  # a bare answer is no target
    assert dropped.by_reason("s1K-1.1/train") == {"unextractable_answer": 1}


def test_missing_field_names_the_row(tmp_path):
    folder = _hub_folder(tmp_path / "bad", [{"question": "q", "answer": "1"}, {"question": "q2", "answer": None}])
    with pytest.raises(DataError, match=r"row 2: missing field 'answer' \(schema 'question_answer'"):
        HFSource(str(folder), schema="question_answer").load(on_bad_row="error")


def test_r1_distill_7b_model_config():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=r1_distill_qwen_7b"])
    loader = instantiate(cfg.model, _convert_="object")
    assert loader.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert cfg.model.dtype == "float32" and cfg.model.frozen_dtype == "bfloat16" and cfg.model.lora.enabled is False
