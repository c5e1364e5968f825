"""VLLMRolloutBackend on a real vLLM engine (the CPU build here, CUDA on a GPU machine): token parity with the
HF backend, the weight sync (after an optimizer step, with LoRA, lazily once per rollout), pre-filled prompts,
how completions end, and the refusals. README's second test command runs these (`pytest -m vllm`); in CI
(CI=true) a missing vLLM fails them instead of skipping.

The tiny model is the test fixture's (head size 32: the CPU attention kernels refuse 16) with sharper
random weights, so that greedy outputs depend on the prompt. One engine serves the whole module: every test
first loads the weights it compares against."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from selfbudget_pl.callbacks.reward import RewardScorer, Scores
from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.models import LoraSettings, ModelLoader, apply_lora
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend

from .conftest import randomize_lora_b, sharpen

pytestmark = pytest.mark.vllm


def require_vllm():
    """vllm, or a skip that says why; in CI (CI=true) a missing vllm is a failure, never a skip."""
    try:
        import vllm
    except ImportError as error:
        message = f"vLLM is not importable ({error}); README's second test command installs its CPU build"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the vllm tests: {message}", pytrace=False)
        pytest.skip(message)
    return vllm


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():  # module scope: before the module's engine fixtures
    require_vllm()


PROMPTS = ["the sum of 3+4", "how many", "what is the total cost of 12+30+7 so", "each has more"]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def sharp_dir(model_loader, tmp_path_factory):
    model = sharpen(model_loader.load_model())
    path = tmp_path_factory.mktemp("vllm_sharp_tiny")
    model.save_pretrained(path)
    model_loader.load_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loader(sharp_dir) -> ModelLoader:
    return ModelLoader(name_or_path=str(sharp_dir))


@pytest.fixture(scope="module")
def backend(loader):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    # float32 and eager: the same arithmetic as the HF model, so greedy tokens can be compared exactly.
    return VLLMRolloutBackend(
        loader.load_model(), loader.load_tokenizer(), dtype="float32", max_model_len=512, enforce_eager=True
    )


@pytest.fixture(scope="module")
def prompts(loader) -> list[list[int]]:
    tokenizer = loader.load_tokenizer()
    return [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]


def hf_rollouts(model, tokenizer, prompts, sampling=GREEDY, prefill=None, **backend_kwargs):
    return HFRolloutBackend(model, tokenizer, **backend_kwargs).generate(prompts, 1, sampling, prefill=prefill)


def assert_same_rollouts(engine, hf) -> None:
    assert engine.completion_ids == hf.completion_ids
    assert engine.finish_reasons == hf.finish_reasons
    assert engine.stop_token_ids == hf.stop_token_ids
    assert engine.completions == hf.completions


def engine_logprobs(backend, prompts, completions) -> list[list[float]]:
    """vLLM's log-probability of each given completion token (raw logits, teacher-forced as prompt)."""
    vllm = require_vllm()
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = backend.llm.generate(
        [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)], params, use_tqdm=False
    )
    values = []
    for prompt, completion, output in zip(prompts, completions, outputs):
        entries = output.prompt_logprobs[len(prompt) :]
        values.append([entry[token].logprob for entry, token in zip(entries, completion)])
    return values


def hf_logprobs(model, prompts, completions) -> list[list[float]]:
    values = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = torch.tensor([prompt + completion])
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            positions = range(len(prompt) - 1, len(prompt) - 1 + len(completion))
            values.append([float(logprobs[position, token]) for position, token in zip(positions, completion)])
    return values


def test_greedy_tokens_equal_the_hf_backend_on_the_checkpoint(backend, loader, prompts):
    model = loader.load_model()
    backend.sync_weights(model)
    engine = backend.generate(prompts, 1, GREEDY)
    assert_same_rollouts(engine, hf_rollouts(model, loader.load_tokenizer(), prompts))
    assert engine.truncated == [True] * len(prompts)
    assert len({tuple(ids) for ids in engine.completion_ids}) == len(prompts), "outputs ignore the prompt"
    # The plain transformers generate() path too, not only the fused decoder.
    assert_same_rollouts(engine, hf_rollouts(model, loader.load_tokenizer(), prompts, decoder="generate"))


def test_after_an_optimizer_step_the_synced_engine_follows_the_new_weights(backend, loader, prompts):
    tokenizer = loader.load_tokenizer()
    model = loader.load_model()
    backend.sync_weights(model)
    before = backend.generate(prompts, 1, GREEDY)
    logprobs_before = engine_logprobs(backend, prompts, before.completion_ids)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    ids = torch.tensor([prompts[0] + prompts[2]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    syncs = backend.num_syncs
    backend.mark_stale(model)
    assert backend.num_syncs == syncs, "mark_stale synced at once instead of before the next generate"
    after = backend.generate(prompts, 1, GREEDY)
    assert backend.num_syncs == syncs + 1
    backend.generate(prompts, 1, GREEDY)
    assert backend.num_syncs == syncs + 1, "a generate with no step in between synced again"

    model.eval()
    assert_same_rollouts(after, hf_rollouts(model, tokenizer, prompts))
    assert after.completion_ids != before.completion_ids, "the step did not change greedy outputs: nothing shown"
    # Log-probs of the same tokens: the engine's equal HF's on the new weights and moved from the old ones.
    engine_new = engine_logprobs(backend, prompts, before.completion_ids)
    hf_new = hf_logprobs(model, prompts, before.completion_ids)
    for engine_row, hf_row, old_row in zip(engine_new, hf_new, logprobs_before):
        assert engine_row == pytest.approx(hf_row, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(engine_row, old_row)) > 1e-2


def test_lora_weights_are_synced_merged(backend, loader, prompts):
    torch.manual_seed(0)
    policy = randomize_lora_b(apply_lora(loader.load_model(), LoraSettings(enabled=True, r=4)), 0.3)
    base = loader.load_model()
    backend.sync_weights(base)
    without_lora = backend.generate(prompts, 1, GREEDY)
    backend.sync_weights(policy)
    engine = backend.generate(prompts, 1, GREEDY)
    policy.eval()
    assert_same_rollouts(engine, hf_rollouts(policy, loader.load_tokenizer(), prompts))
    assert_same_rollouts(engine, hf_rollouts(copy.deepcopy(policy).merge_and_unload(), loader.load_tokenizer(), prompts))
    assert engine.completion_ids != without_lora.completion_ids, "the adapters changed nothing: nothing shown"


def test_prefilled_prompts_continue_from_the_prefill(backend, loader, prompts):
    model = loader.load_model()
    backend.sync_weights(model)
    prefill = "<budget>7</budget><solution>"
    engine = backend.generate(prompts, 2, GREEDY, prefill=prefill, columns={"id": list("abcd")})
    hf = HFRolloutBackend(model, loader.load_tokenizer()).generate(prompts, 2, GREEDY, prefill=prefill)
    assert_same_rollouts(engine, hf)
    assert all(text.startswith(prefill) for text in engine.completions)
    prefill_ids = loader.load_tokenizer().encode(prefill, add_special_tokens=False)
    assert all(context[-len(prefill_ids) :] == prefill_ids for context in engine.prompt_ids)
    assert engine.columns["id"] == list("aabbccdd") and engine.group_index == [0, 0, 1, 1, 2, 2, 3, 3]
    # One prefix per completion (GRPO's prefill_draw=completion): the engine samples each completion's own context.
    prefills = [f"<budget>{7 + 5 * index}</budget><solution>" if index % 3 else None for index in range(8)]
    engine = backend.generate(prompts, 2, GREEDY, prefill=prefills)
    assert_same_rollouts(engine, HFRolloutBackend(model, loader.load_tokenizer()).generate(prompts, 2, GREEDY, prefill=prefills))
    assert [text.startswith(prefix) for text, prefix in zip(engine.completions, prefills) if prefix] == [True] * 5
    assert engine.columns["prefilled"] == [prefix is not None for prefix in prefills]


def test_completions_end_at_eos_stop_strings_and_stop_tokens_as_in_the_hf_backend(backend, loader, prompts):
    tokenizer = loader.load_tokenizer()
    model = loader.load_model()
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # a larger EOS embedding row (tied lm_head): greedy reaches EOS within a few tokens
        model.model.embed_tokens.weight[eos] *= 6.0
    backend.sync_weights(model)
    engine = backend.generate(prompts, 1, GREEDY)
    hf = hf_rollouts(model, tokenizer, prompts)
    assert_same_rollouts(engine, hf)
    assert "eos" in engine.finish_reasons and eos in engine.stop_token_ids
    assert all(eos not in ids for ids in engine.completion_ids), "EOS left inside a completion"

    model = loader.load_model()
    backend.sync_weights(model)
    free = backend.generate(prompts, 1, GREEDY)
    # A stop string: the text of two tokens in the middle of the first completion; and a stop token that is
    # not EOS: the third token drawn. (Not a piece of a multi-byte character: transformers decodes one as
    # U+FFFD, vLLM holds it back until the character is complete, so such a "stop string" fires later there.)
    first = free.completion_ids[0]
    stop = next(
        text for start in range(4, len(first) - 1)
        if "\ufffd" not in (text := tokenizer.decode(first[start : start + 2], skip_special_tokens=False)).strip()
        and text.strip() and "\ufffd" not in tokenizer.decode(first[: start + 2], skip_special_tokens=False)
    )  # fmt: skip
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=24, stop=[stop])
    engine = backend.generate(prompts, 1, sampling)
    assert_same_rollouts(engine, hf_rollouts(model, tokenizer, prompts, sampling))
    assert engine.finish_reasons[0] == "stop" and engine.stop_token_ids[0] is None
    assert stop in engine.completions[0] and engine.completions[0].endswith(stop)

    third = free.completion_ids[1][2]
    backend.eos_token_ids = [eos, third]
    try:
        engine = backend.generate(prompts, 1, GREEDY)
    finally:
        backend.eos_token_ids = [eos]
    hf_backend = HFRolloutBackend(model, tokenizer)
    hf_backend.eos_token_ids = [eos, third]
    assert_same_rollouts(engine, hf_backend.generate(prompts, 1, GREEDY))
    assert engine.finish_reasons[1] == "eos" and engine.stop_token_ids[1] == third
    assert engine.completion_ids[1] == free.completion_ids[1][:2]
    # Only the length limit makes a completion truncated.
    assert engine.truncated == [reason == "length" for reason in engine.finish_reasons]
    assert free.truncated == [True] * len(prompts)


def test_a_stop_string_that_is_a_special_token_stops_generation(backend, loader, prompts):
    # The format's tags are special tokens: vLLM must match stop strings on text that keeps them.
    tokenizer = loader.load_tokenizer()
    model = loader.load_model()
    close = tokenizer.convert_tokens_to_ids("</solution>")
    with torch.no_grad():
        model.model.embed_tokens.weight[close] *= 6.0
    backend.sync_weights(model)
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=24, stop=["</solution>"])
    engine = backend.generate(prompts, 1, sampling)
    assert_same_rollouts(engine, hf_rollouts(model, tokenizer, prompts, sampling))
    assert "stop" in engine.finish_reasons
    stopped = engine.finish_reasons.index("stop")
    assert engine.completion_ids[stopped][-1] == close and engine.completions[stopped].endswith("</solution>")


def test_a_weight_name_the_engine_lacks_is_named_and_a_good_sync_recovers(backend, loader, prompts):
    model = loader.load_model()
    model.model.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(RuntimeError, match=r"model\.extra_scale"):
        backend.sync_weights(model)
    model = loader.load_model()
    backend.sync_weights(model)
    assert_same_rollouts(backend.generate(prompts, 1, GREEDY), hf_rollouts(model, loader.load_tokenizer(), prompts))


def test_models_vllm_cannot_run_are_refused_in_one_sentence(model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend
    from selfbudget_pl.tiny_model import TinyModelSpec, ensure_tiny_model

    model = model_loader.load_model()
    model.config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(ValueError, match=r"no implementation of NoSuchModelForCausalLM; use rollout=hf"):
        VLLMRolloutBackend(model, tokenizer)
    # The reproduction's toy model: head size 16 (hidden 64, 4 heads), which the CPU kernels refuse.
    toy = ModelLoader(name_or_path=str(ensure_tiny_model(TinyModelSpec(hidden_size=64, intermediate_size=256))))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        with pytest.raises(ValueError, match=r"not this model's 16 .*use rollout=hf"):
            VLLMRolloutBackend(toy.load_model(), tokenizer)


class FirstTokenReward(RewardScorer):
    """Reward 1 for an even first token: about half of the samples, so every group has a signal."""

    def score(self, rollouts, pl_module) -> Scores:
        return Scores(rewards=torch.tensor([float(bool(ids) and ids[0] % 2 == 0) for ids in rollouts.completion_ids]))


def test_grpo_syncs_once_per_rollout_and_the_engine_ends_on_the_trained_weights(backend, loader, prompts):
    from selfbudget_pl.modules.grpo import GRPOModule

    module = GRPOModule(
        model_loader=loader, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), num_generations=4,
        sampling=dict(temperature=1.0, max_new_tokens=6), warmup_steps=0, min_lr_ratio=1.0,
        num_iterations=2, mini_batch_size=4, micro_batch_size=4, rollout=lambda model, tokenizer, limits: backend,
    )  # fmt: skip
    rows = [{"prompt_ids": ids, "id": str(index), "answer": "7"} for index, ids in enumerate(prompts[:2])]
    data = torch.utils.data.DataLoader(
        rows * 2, batch_size=2, collate_fn=lambda batch: {key: [row[key] for row in batch] for key in batch[0]}
    )
    trainer = L.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[FirstTokenReward()], limit_val_batches=0,
    )  # fmt: skip
    syncs = backend.num_syncs
    trainer.fit(module, train_dataloaders=data)
    # 2 rollouts x (2 prompts x 4 samples = 8 completions: 2 mini-batches x 2 iterations) = 8 optimizer steps;
    # one sync before each rollout (the first for on_train_start), none after the other steps.
    assert trainer.global_step == 8
    assert backend.num_syncs - syncs == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # The last steps are synced lazily, by the next generate: then the engine holds the trained policy.
    engine = backend.generate(prompts, 1, GREEDY)
    assert backend.num_syncs - syncs == 3
    trained = module.model.eval()
    assert_same_rollouts(engine, hf_rollouts(trained, loader.load_tokenizer(), prompts))
    assert engine.completion_ids != hf_rollouts(loader.load_model(), loader.load_tokenizer(), prompts).completion_ids


REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_OVERRIDES = ["rollout.dtype=float32", "+rollout.enforce_eager=true", "rollout.max_model_len=512"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_selfbudget_eval_with_rollout_vllm_gives_the_hf_backends_completions(sharp_dir, tmp_path):
    common = [
        "-m", "selfbudget_pl.evaluate", f"model_path={sharp_dir}", "limit=6", "batch_size=4",
        "sampling.max_new_tokens=16", "budget=[null,9]", "grader.workers=0", "progress=false", "tensorboard=false",
    ]  # fmt: skip
    run_cli(*common, "rollout=vllm", *ENGINE_OVERRIDES, f"hydra.run.dir={tmp_path / 'vllm'}")
    run_cli(*common, "rollout=hf", f"hydra.run.dir={tmp_path / 'hf'}")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
            for name in ("vllm", "hf")}  # fmt: skip
    assert len(rows["vllm"]) == 12  # 6 problems, own budget and pre-filled 9
    keys = ("id", "requested_budget", "text", "response_tokens", "finish_reason", "truncated", "correct")
    assert [[row[key] for key in keys] for row in rows["vllm"]] == [[row[key] for key in keys] for row in rows["hf"]]
    assert json.loads((tmp_path / "vllm" / "summary.json").read_text())["rows"] == json.loads(
        (tmp_path / "hf" / "summary.json").read_text()
    )["rows"]


class AcceptAll:
    """Grades every answer correct: random weights never answer a sum, and what is under test is the sampling."""

    def grade_batch(self, answers, golds):
        return [True] * len(answers)


class Recording:
    """Passes generate() through to a backend and keeps what it returned."""

    def __init__(self, backend) -> None:
        self.backend, self.seen = backend, []

    def generate(self, *args, **kwargs):
        self.seen.append(self.backend.generate(*args, **kwargs))
        return self.seen[-1]


def test_self_labels_from_k_vllm_samples_keep_the_shortest_finished_one(backend, loader):
    from selfbudget_pl import labelling
    from selfbudget_pl.data.budget_labels import label_record
    from selfbudget_pl.data.synthetic import SyntheticSource
    from selfbudget_pl.format import OutputFormat

    tokenizer = loader.load_tokenizer()
    model = loader.load_model()
    with torch.no_grad():  # EOS likelier (tied lm_head): samples end at different lengths, some not at all
        model.model.embed_tokens.weight[tokenizer.eos_token_id] *= 4.0
    backend.sync_weights(model)
    records = SyntheticSource(size=6, split="test").load()
    recording = Recording(backend)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=0)
    result = labelling.label_from_samples(
        records, recording, tokenizer, AcceptAll(), samples=4, sampling=sampling, batch_size=4
    )
    rollouts = [r for call in recording.seen for r in _per_completion(call)]
    assert len(rollouts) == 6 * 4, "not K samples per problem"
    assert any(r["truncated"] for r in rollouts) and not all(r["truncated"] for r in rollouts)
    # Every problem comes back, with the b_max of the shortest finished sample (random text has no
    # \boxed{} answer, so it is a cap but not a cold-start target; test_self_labels.py covers targets).
    assert [record["id"] for record in result.records] == [record["id"] for record in records]
    assert result.counts["solved"] >= 1, "no problem had a finished sample: nothing shown"
    for index, record in enumerate(records):
        finished = [r["text"].strip() for r in rollouts[4 * index : 4 * index + 4] if not r["truncated"] and r["text"].strip()]
        if not finished:
            assert result.records[index]["b_max"] is None
            continue
        shortest = min(finished, key=lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
        expected = label_record({**record, "solution": shortest}, tokenizer, OutputFormat())["b_max"]
        assert result.records[index]["b_max"] == expected


def _per_completion(rollouts) -> list[dict]:
    return [{"text": text, "truncated": cut} for text, cut in zip(rollouts.completions, rollouts.truncated)]


def test_grpo_toy_experiment_runs_on_the_vllm_engine(sharp_dir, tmp_path):
    run_cli(
        "train.py", "experiment=grpo_toy", "rollout=vllm", *ENGINE_OVERRIDES, f"model.name_or_path={sharp_dir}",
        "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0", "data.batch_size=4",
        "module.num_generations=4", "module.sampling.max_new_tokens=24",
        "callbacks.model_checkpoint=null", f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
        f"module.export_dir={tmp_path / 'export'}",
    )  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    for tag in ("train/loss", "rewards/mean"):
        assert len(scalars[tag]) == 3 and all(math.isfinite(value) for value in scalars[tag]), (tag, scalars[tag])
    assert (tmp_path / "export" / "config.json").exists()


def test_labelling_through_vllm_builds_the_engine_without_an_hf_copy(sharp_dir, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3)))
    rollout = tmp_path / "rollout.yaml"
    # No max_model_len or max_num_seqs: the script sizes the engine for what it sends.
    rollout.write_text("_target_: selfbudget_pl.rollout.vllm.VLLMRolloutBackend\n_partial_: true\ndtype: float32\n"
                       "cpu_kv_cache_gb: 0.125\nenforce_eager: true\n")
    out = tmp_path / "out.jsonl"
    args = ["--jsonl", str(problems), "--schema", "gsm8k", "--samples", "2", "--max-new-tokens", "8",
            "--model", str(sharp_dir), "--rollout", str(rollout), "--output", str(out)]  # fmt: skip
    # Its own process (this one already holds an engine); loading the HF model there fails the run.
    code = (
        "import logging, runpy, sys, transformers\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "def no_hf_copy(*args, **kwargs):\n"
        "    raise AssertionError('label_budgets.py loaded the HF model although vLLM loads the checkpoint')\n"
        "transformers.AutoModelForCausalLM.from_pretrained = no_hf_copy\n"
        "script = runpy.run_path('scripts/label_budgets.py', run_name='label_budgets')\n"
        "sys.exit(script['main'](sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # The random model solves nothing, and a run that solves nothing exits 1 with its counts, by design:
    # what matters here is that it got that far, every problem sampled on the engine and none on HF.
    assert "loaded the HF model" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 1 and "no problem of 3" in result.stderr, result.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["problem"] for row in rows] == [f"{i}+1?" for i in range(3)]
    # Sized from the run: the longest prompt (as the script's default --data renders it) + 8 new tokens, and
    # the 3 problems x 2 samples of its one batch; not the model's position limit.
    data = OmegaConf.load(REPO_ROOT / "configs" / "data" / "math.yaml")
    prompts = encode_prompts([row["problem"] for row in rows], ModelLoader(name_or_path=str(sharp_dir)).load_tokenizer(),
                             data.prompt_template, data.get("system_prompt"), data.get("chat_template"))  # fmt: skip
    expected = max(map(len, prompts)) + 8
    assert f"vLLM engine sized for max_model_len={expected}, max_num_seqs=6" in result.stderr, result.stderr[-4000:]


def test_recorded_log_probs_equal_the_trainers_and_a_perturbed_sampler_gets_its_importance_weights(
    backend, loader, prompts
):
    from selfbudget_pl.modules.grpo import GRPOModule

    sampling = dict(temperature=0.7, max_new_tokens=8, seed=3)
    module = GRPOModule(
        model_loader=loader, optimizer=functools.partial(torch.optim.AdamW), num_generations=4, sampling=sampling,
        rollout=lambda model, tokenizer, limits: backend,
    )  # fmt: skip
    module.configure_model()
    assert module.active_correction() is not None  # enabled: auto turns it on for vLLM
    backend.sync_weights(module.model)
    rollouts = backend.generate(prompts, 4, SamplingSettings(**sampling))
    experience = module.make_experience(rollouts, torch.zeros(len(rollouts)))
    mask = experience.completion_mask.bool()
    trainer = module.score_completions(module.model, experience)  # at the sampling temperature
    # Same weights, float32 on both sides: equal up to float rounding (2e-5 seen; the stop tokens included).
    torch.testing.assert_close(experience.sampler_logprobs[mask], trainer[mask], atol=1e-4, rtol=0)
    _, _, weights = module.micro_batch_loss(experience, module._normaliser(experience))
    assert float(weights.ratio_max) == pytest.approx(1.0, abs=1e-3) and float(weights.capped) == 0.0

    # The engine samples from perturbed weights while the trainer keeps its own: the weights are then
    # exp(sum over the completion of trainer - sampler log-probs), masked above the cap. The cap is set to
    # the median expected ratio so that both sides of it are exercised.
    perturbed = copy.deepcopy(module.model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    backend.sync_weights(perturbed)
    experience = module.make_experience(backend.generate(prompts, 4, SamplingSettings(**sampling)), torch.zeros(16))
    mask = experience.completion_mask.bool()
    trainer = module.score_completions(module.model, experience)
    sampler = module.score_completions(perturbed, experience)
    torch.testing.assert_close(experience.sampler_logprobs[mask], sampler[mask], atol=1e-4, rtol=0)
    ratios = torch.exp(((trainer - sampler) * mask).sum(1))
    module.sampler_correction.cap = float(ratios.median())
    expected = torch.where(ratios > module.sampler_correction.cap, 0.0, ratios)[:, None] * mask
    _, _, weights = module.micro_batch_loss(experience, module._normaliser(experience))
    torch.testing.assert_close(weights.weights, expected, rtol=1e-3, atol=1e-5)
    assert 0.0 < float(weights.capped) < 1.0
    assert float(weights.logprob_gap) > 1e-3
