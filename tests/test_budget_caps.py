"""The budget cap is never off by accident: GRPO rows take b_max from the labelling script's file, and a run
whose rows all lack one while the budget penalty or pre-filling is on stops at start-up naming the keys."""

from __future__ import annotations

import json

import pytest
from hydra.utils import instantiate

from selfbudget_pl.schema import ConfigError
from selfbudget_pl.models import ModelLoader
from selfbudget_pl.train import train

from .test_train import compose_small

def test_grpo_on_rows_without_b_max_stops_at_start_up_naming_the_keys(tmp_path, tiny_cache, shared_data):
    # data=gsm8k has no label file and no reference caps: r_b and pre-filling would silently do nothing.
    cfg = compose_small("grpo_toy", tmp_path, "data=gsm8k", "data.mode=grpo", "model.name_or_path=null")
    with pytest.raises(ConfigError, match=r"bad config value: data.b_max_labels=null: no train row has a b_max "
                                          r"\(budget cap\), so "
                                          r"reward.functions.budget_guided.budget_penalty=-0.3 and "
                                          r"module.prefill_fraction=0.5 do nothing: point data.b_max_labels"):
        train(cfg)


def test_a_label_file_gives_grpo_rows_their_b_max(tmp_path, tiny_cache, shared_data):
    cfg = compose_small("grpo_toy", tmp_path, "data=gsm8k", "data.mode=grpo", "model.name_or_path=null")
    problems = [json.loads(line)["question"] for line in (shared_data / "gsm8k" / "train.jsonl").open()][:2]
    labels = tmp_path / "labels.jsonl"
    rows = [{"id": f"q{i}", "problem": problem, "answer": "1", "response": None, "budget": None, "b_max": 40 + i}
            for i, problem in enumerate(problems)]
    labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    datamodule = instantiate(cfg.data, b_max_labels=str(labels), _convert_="object")
    datamodule.connect(ModelLoader().load_tokenizer())
    datamodule.setup("fit")
    caps = {example["problem"]: example["b_max"] for example in datamodule.datasets["train"]}
    assert [caps[problem] for problem in problems] == [40, 41]
    assert {cap for problem, cap in caps.items() if problem not in problems} == {None}
