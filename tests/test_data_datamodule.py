"""The DataModule: exact SFT masking, GRPO prompt batches, shuffling, DDP samplers, drops, configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from selfbudget_pl.data.collate import IGNORE_INDEX
from selfbudget_pl.data.datamodule import BudgetMathDataModule
from selfbudget_pl.data.prompts import build_prompt
from selfbudget_pl.data.records import DataError
from selfbudget_pl.data.sources import JsonlSource
from selfbudget_pl.data.synthetic import SyntheticSource

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


def _datamodule(tokenizer, train_size=48, val_size=16, **kwargs) -> BudgetMathDataModule:
    kwargs.setdefault("batch_size", 8)
    val = [SyntheticSource(size=val_size, split="val")] if val_size else []
    dm = BudgetMathDataModule(train=[SyntheticSource(size=train_size, seed=1)], val=val, **kwargs)
    dm.connect(tokenizer)
    dm.setup("fit")
    return dm


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sft_batch_supervises_exactly_the_response_and_eos(tokenizer):
    dm = _datamodule(tokenizer)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "budget"}
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        ids, labels = batch["input_ids"][row, :length], batch["labels"][row]
        supervised = labels != IGNORE_INDEX
        assert not supervised[length:].any()  # padding is never a target
        start = int(supervised.nonzero()[0])
        assert supervised[start:length].all()  # one contiguous target span to the end
        prompt = tokenizer.decode(ids[:start])
        target = tokenizer.decode(labels[start:length])
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
        assert target.startswith("<budget>") and target.endswith("</solution><|endoftext|>")
        assert torch.equal(ids[start:], labels[start:length])
        budget = int(batch["budget"][row])
        assert target.startswith(f"<budget>{budget}</budget><solution>")
        # The label is the number of target tokens between </budget> and the final EOS.
        target_ids = labels[start:length].tolist()
        after_tag = target_ids[target_ids.index(tokenizer.convert_tokens_to_ids("</budget>")) + 1 : -1]
        assert len(after_tag) == budget


def test_sft_val_batches_also_carry_prompts_and_columns(tokenizer):
    dm = _datamodule(tokenizer, val_batch_size=5)
    batch = next(iter(dm.val_dataloader()))
    expected = {"input_ids", "labels", "budget", "prompt_input_ids", "prompt_ids", "answer", "difficulty", "b_max"}
    assert expected <= set(batch)
    assert len(batch["answer"]) == 5 == batch["input_ids"].shape[0]
    for row, prompt_ids in enumerate(batch["prompt_ids"]):
        assert batch["input_ids"][row, : len(prompt_ids)].tolist() == prompt_ids
        assert tokenizer.decode(prompt_ids) == build_prompt(batch["problem"][row], tokenizer)
        assert batch["b_max"][row] == int(batch["budget"][row])


def test_grpo_batches_are_left_padded_prompts_with_columns(tokenizer):
    dm = _datamodule(tokenizer, mode="grpo", reference_b_max=True)  # opt-in: caps from the references
    batch = next(iter(dm.train_dataloader()))
    assert "labels" not in batch
    assert set(batch) >= {"prompt_input_ids", "prompt_attention_mask", "prompt_ids", "id", "problem", "answer",
                          "difficulty", "b_max", "source"}
    width = batch["prompt_input_ids"].shape[1]
    for row, prompt_ids in enumerate(batch["prompt_ids"]):
        assert all(isinstance(token, int) for token in prompt_ids)
        mask = batch["prompt_attention_mask"][row]
        assert mask[width - len(prompt_ids):].all() and not mask[: width - len(prompt_ids)].any()
        assert batch["prompt_input_ids"][row, width - len(prompt_ids):].tolist() == prompt_ids
        assert batch["answer"][row] == str(sum(int(v) for v in batch["problem"][row].split("+")))
        assert isinstance(batch["b_max"][row], int) and batch["b_max"][row] > 0
    no_cap = _datamodule(tokenizer, mode="grpo")  # the default: no label file, no cap
    assert next(iter(no_cap.train_dataloader()))["b_max"] == [None] * 8


def test_grpo_keeps_problems_without_a_reference_solution(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "amc.jsonl", [{"problem": "1+2", "answer": 3.0}, {"problem": "2+2", "answer": 4}])
    dm = BudgetMathDataModule(train=[JsonlSource(path)], mode="grpo", batch_size=2)
    dm.connect(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["answer"]) == ["3", "4"] and batch["b_max"] == [None, None]
    sft = BudgetMathDataModule(train=[JsonlSource(path)], mode="sft")
    sft.connect(tokenizer)
    with pytest.raises(DataError, match="train split is empty.*no_reference_solution"):
        sft.setup("fit")


def test_shuffling_is_seeded(tokenizer):
    def first_ids(seed):
        dm = _datamodule(tokenizer, seed=seed, val_size=0)
        return [batch["input_ids"][:, :12].tolist() for batch in dm.train_dataloader()]

    assert first_ids(0) == first_ids(0)
    assert first_ids(0) != first_ids(1)
    dm = _datamodule(tokenizer, val_size=0)
    loader = dm.train_dataloader()
    assert [b["budget"].tolist() for b in loader] != [b["budget"].tolist() for b in loader]  # reshuffled per epoch


def test_lightning_can_swap_in_a_distributed_sampler(tokenizer):
    from lightning.pytorch.utilities.data import _update_dataloader

    dm = _datamodule(tokenizer, train_size=40, val_size=0, mode="grpo")
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ranked = _update_dataloader(loader, sampler)
        assert ranked.sampler is sampler and ranked.collate_fn is loader.collate_fn
        ids = [row_id for batch in ranked for row_id in batch["id"]]
        assert len(ids) == len(set(ids)) == 20
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_worker_processes_give_the_same_batches(tokenizer):
    dm = _datamodule(tokenizer, val_size=0, batch_size=16)
    dm_workers = _datamodule(tokenizer, val_size=0, batch_size=16, num_workers=1)
    plain = next(iter(dm.train_dataloader()))
    with_workers = next(iter(dm_workers.train_dataloader()))
    assert torch.equal(plain["input_ids"], with_workers["input_ids"])


def test_over_long_rows_are_dropped_and_counted_not_truncated(tokenizer):
    dm = _datamodule(tokenizer, train_size=200, val_size=0, max_length=60)
    dropped = dm.dropped.count("train", "longer_than_60")
    assert 0 < dropped < 200 and len(dm.datasets["train"]) == 200 - dropped
    assert all(len(e["prompt_ids"]) + len(e["response_ids"]) <= 60 for e in dm.datasets["train"])
    dm = _datamodule(tokenizer, train_size=200, val_size=0, max_prompt_length=10, mode="grpo")
    kept = dm.datasets["train"]
    assert all(len(e["prompt_ids"]) <= 10 for e in kept) and len(kept) + dm.dropped.count("train") == 200


def test_val_held_out_from_train_shares_no_problem(tokenizer):
    dm = BudgetMathDataModule(train=[SyntheticSource(size=300, k_min=2, k_max=3)], val_size=20, seed=4)
    dm.connect(tokenizer)
    dm.setup("fit")
    train = {e["problem"] for e in dm.datasets["train"]}
    val = [e["problem"] for e in dm.datasets["val"]]
    assert len(val) == len(set(val)) == 20 and not train & set(val)


def test_val_rows_seen_in_train_are_dropped_and_logged(tokenizer, tmp_path, caplog):
    rows = [{"question": f"q{i}", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(6)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:4])
    val = _write_jsonl(tmp_path / "val.jsonl", rows[2:])
    dm = BudgetMathDataModule(train=[JsonlSource(train)], val=[JsonlSource(val)], batch_size=2)
    dm.connect(tokenizer)
    with caplog.at_level("WARNING", logger="selfbudget_pl.data.datamodule"):
        dm.setup("fit")
    assert [e["problem"] for e in dm.datasets["val"]] == ["q4", "q5"]
    assert dm.dropped.by_reason("val") == {"problem_also_in_train": 2}
    assert "val: dropped 2 row(s): problem_also_in_train" in caplog.text


def test_bad_answers_drop_or_raise_by_config(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "a", "answer": "#### 1"}, {"question": "b", "answer": "?"}])
    dm = BudgetMathDataModule(train=[JsonlSource(path, name="g")], batch_size=1)
    dm.connect(tokenizer)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1 and dm.dropped.by_reason("g") == {"unextractable_answer": 1}
    strict = BudgetMathDataModule(train=[JsonlSource(path)], on_bad_row="error")
    strict.connect(tokenizer)
    with pytest.raises(DataError, match=f"{path}:2"):
        strict.setup("fit")


def test_empty_or_missing_splits_are_errors(tokenizer, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    empty = BudgetMathDataModule(train=[JsonlSource(tmp_path / "empty.jsonl")])
    empty.connect(tokenizer)
    with pytest.raises(DataError, match="train split is empty"):
        empty.setup("fit")
    nothing = BudgetMathDataModule()
    nothing.connect(tokenizer)
    with pytest.raises(DataError, match="no sources"):
        nothing.setup("fit")
    with pytest.raises(RuntimeError, match="connect"):
        BudgetMathDataModule(train=[SyntheticSource(size=4)]).setup("fit")
    with pytest.raises(ValueError, match="mode"):
        BudgetMathDataModule(mode="rl")


def test_lightning_fit_runs_without_a_val_split(tokenizer):
    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.weight * batch["budget"].float()).sum()

        def validation_step(self, batch, batch_idx):
            raise AssertionError("no val split was configured")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _datamodule(tokenizer, train_size=16, val_size=0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=1)
    trainer.fit(Probe(), datamodule=dm)
    assert trainer.global_step == 2


def test_synthetic_config_instantiates_and_overrides_reach_every_split(tokenizer):
    root = OmegaConf.create({"data": OmegaConf.load(CONFIGS / "synthetic.yaml")})  # mounted as in train.yaml
    cfg = root.data
    cfg.train[0].size, cfg.val[0].size, cfg.test[0].size = 32, 8, 8
    cfg.train[0].k_max = 3  # one override; val/test follow by interpolation
    dm = instantiate(cfg, _convert_="all")
    assert isinstance(dm, BudgetMathDataModule) and dm.mode == "sft"
    assert [source.k_max for split in ("train", "val", "test") for source in dm.sources[split]] == [3, 3, 3]
    dm.connect(tokenizer)
    dm.setup("fit")
    assert {len(dm.datasets[split]) for split in ("train", "val", "test")} == {32, 8}
    assert next(iter(dm.test_dataloader()))["prompt_input_ids"].shape[0] == 8


@pytest.mark.parametrize("name", ["math", "gsm8k"])
def test_real_data_configs_instantiate_and_load(name, shared_data, tokenizer):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.data_root = str(shared_data)
    for split in ("train", "val", "test"):
        for source in cfg[split]:
            source.limit = 6
    cfg.num_workers = 0
    dm = instantiate(cfg, _convert_="all")
    assert all(isinstance(source, JsonlSource) for source in dm.sources["train"])
    dm.connect(tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and all(batch["answer"])


def test_hub_config_builds_hf_sources_without_loading():
    dm = instantiate(OmegaConf.load(CONFIGS / "math_hub.yaml"), _convert_="all")
    names = [(source.name_or_path, source.schema) for split in ("train", "val") for source in dm.sources[split]]
    assert names == [("openai/gsm8k", "gsm8k"), ("DigitalLearningGmbH/MATH-lighteval", "math"),
                     ("HuggingFaceH4/MATH-500", "math500")]


def test_data_root_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("SELFBUDGET_DATA", "/somewhere/data")
    assert OmegaConf.load(CONFIGS / "math.yaml").data_root == "/somewhere/data"
    monkeypatch.delenv("SELFBUDGET_DATA")
    assert OmegaConf.load(CONFIGS / "gsm8k.yaml").data_root == "../shared/data"


def test_chat_template_false_gives_plain_prompts_to_every_split(tokenizer):
    data = _datamodule(tokenizer, train_size=4, val_size=2, chat_template=False)
    for split in ("train", "val"):
        for example in data.datasets[split]:
            assert tokenizer.decode(example["prompt_ids"]) == example["problem"]
