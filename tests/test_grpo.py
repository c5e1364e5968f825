"""GRPOModule on the tiny model in a real Lightning Trainer on CPU, with a stand-in reward hook."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch

from selfbudget_pl.callbacks.reward import RewardCallback, RewardScorer, RolloutHook, Scores
from selfbudget_pl.models import LoraSettings, ModelLoader
from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.modules.losses import group_advantages
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import Rollouts, SamplingSettings
from selfbudget_pl.tensors import pad

PROMPTS = ["the sum of 3+4", "how many", "what is the total cost of 12+30+7 so", "each has more"]


@pytest.fixture(scope="module")
def sharp_loader(model_loader, tmp_path_factory) -> ModelLoader:
    """The tiny model with sharper random weights, saved as a checkpoint: init-scale weights give a
    near-uniform next-token distribution, where a preferred token is almost never sampled."""
    model, tokenizer = model_loader.load_model(), model_loader.load_tokenizer()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("sharp_tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return ModelLoader(name_or_path=str(path))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]


class FirstTokenReward(RewardScorer):
    """Reward 1 when a completion starts with one of ``targets``, else 0; records what it saw."""

    def __init__(self, targets: set[int]) -> None:
        self.targets = targets
        self.seen: list[Rollouts] = []

    def score(self, rollouts: Rollouts, pl_module: L.LightningModule) -> Scores:
        starts = [ids[0] if ids else None for ids in rollouts.completion_ids]
        self.seen.append(rollouts)
        return Scores(rewards=torch.tensor([float(start in self.targets) for start in starts]))


EVEN_FIRST_TOKEN = set(range(0, 1000, 2))  # about half of all samples: every group has a signal


def _loader(prompt_ids: list[list[int]], batch_size: int) -> torch.utils.data.DataLoader:
    rows = [{"prompt_ids": ids, "id": str(index), "answer": "7"} for index, ids in enumerate(prompt_ids)]
    collate = lambda batch: {key: [row[key] for row in batch] for key in batch[0]}  # noqa: E731
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _module(loader: ModelLoader, **overrides) -> GRPOModule:
    settings = dict(
        model_loader=loader,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
        num_generations=4,
        sampling=dict(temperature=1.0, max_new_tokens=3),
        warmup_steps=0,
        min_lr_ratio=1.0,
    )
    return GRPOModule(**{**settings, **overrides})


def _trainer(max_steps: int, callbacks: list[L.Callback], enable_checkpointing: bool = False) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip


def _first_token_probability(module: GRPOModule, prompt: list[int], token: int) -> float:
    with torch.no_grad():
        return float(module.model(input_ids=torch.tensor([prompt])).logits[0, -1].softmax(-1)[token])


def test_a_reward_for_one_token_raises_its_probability(sharp_loader, prompt_ids):
    module = _module(sharp_loader, num_generations=8, grader=MathGrader(workers=0))
    module.configure_model()
    with torch.no_grad():
        first = module.model(input_ids=torch.tensor([prompt_ids[0]])).logits[0, -1].softmax(-1)
    target = int(first.topk(4).indices[3])  # sampled now and then, far from certain
    before = _first_token_probability(module, prompt_ids[0], target)
    reward = FirstTokenReward({target})
    trainer = _trainer(20, [reward])
    trainer.fit(module, train_dataloaders=_loader(prompt_ids[:1], batch_size=1))
    after = _first_token_probability(module, prompt_ids[0], target)
    assert before < 0.1 and after > 0.5, (before, after)
    assert trainer.global_step == 20
    metrics = trainer.callback_metrics
    for name in ("rewards/mean", "rewards/std", "rewards/frac_zero_std", "completions/mean_length",
                 "completions/clipped_ratio", "train/entropy", "clip_ratio/region_mean", "train/loss",
                 "rollout/tokens_per_s", "train/tokens_per_s", "grader/timeouts"):
        assert name in metrics, name
    assert float(metrics["rewards/mean"]) > 0.5
    assert all(len(rollouts) == 8 for rollouts in reward.seen)


def test_a_missing_or_second_scorer_names_the_reward_config(sharp_loader, prompt_ids):
    class NoReward(RolloutHook):
        def on_rollouts(self, trainer, pl_module, rollouts, scores):
            pass

    with pytest.raises(RuntimeError, match=r"exactly one reward scorer .* found 0 .*`reward` config group"):
        _trainer(1, [NoReward()]).fit(_module(sharp_loader), train_dataloaders=_loader(prompt_ids, 2))
    two = [FirstTokenReward({1}), FirstTokenReward({2})]
    with pytest.raises(RuntimeError, match=r"found 2 \(\['FirstTokenReward', 'FirstTokenReward'\]\)"):
        _trainer(1, two).fit(_module(sharp_loader), train_dataloaders=_loader(prompt_ids, 2))


def test_rewards_of_the_wrong_shape_are_refused_naming_the_scorer(sharp_loader, prompt_ids):
    class OnePerPrompt(RewardScorer):
        def score(self, rollouts, pl_module):
            return Scores(rewards=torch.zeros(len(rollouts) // 4))

    with pytest.raises(ValueError, match=r"OnePerPrompt.score returned rewards of shape \(2,\) for 8 completions"):
        _trainer(1, [OnePerPrompt()]).fit(_module(sharp_loader), train_dataloaders=_loader(prompt_ids[:2], 2))


def test_experience_pads_prompts_left_completions_right_and_keeps_the_sampled_stop_token(sharp_loader, tokenizer):
    module = _module(sharp_loader, sampling=dict(temperature=1.0, max_new_tokens=3, stop=["</solution>"]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stop_ids = tokenizer.encode("</solution>", add_special_tokens=False)
    rollouts = Rollouts(
        prompt_ids=[[5, 6, 7], [8]],
        completion_ids=[[9], stop_ids],
        completions=["x", "</solution>"],
        finish_reasons=["eos", "stop"],
        group_index=[0, 0],
        stop_token_ids=[eos, None],
    )
    experience = module.make_experience(rollouts, torch.tensor([0.5, -0.5]))
    assert experience.prompt_ids.tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert experience.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    # Ended by EOS: the sampled stop token is trained, so stopping is learned. Ended by the stop
    # string: nothing is added.
    width = max(2, len(stop_ids))
    assert experience.completion_ids.tolist()[0] == [9, eos] + [pad] * (width - 2)
    assert experience.completion_ids.tolist()[1] == stop_ids + [pad] * (width - len(stop_ids))
    trimmed = experience.rows(1, 2)
    assert trimmed.prompt_ids.tolist() == [[8]] and trimmed.completion_ids.tolist() == [stop_ids]


def test_a_drawn_stop_token_that_is_not_the_pad_id_is_scored_by_the_loss(sharp_loader, prompt_ids):
    # A checkpoint whose end-of-turn id is neither its pad id nor the tokenizer's EOS (chat models list
    # several): the stop token drawn by the sampler is in the experience and gets a log-prob, so the
    # policy learns when to stop; nothing is guessed back from the text.
    module = _module(sharp_loader, sampling=dict(temperature=0.0, max_new_tokens=8))
    module.configure_model()
    tokenizer, prompt = module.tokenizer, prompt_ids[0]
    free = module.rollout_backend.generate([prompt], 1, module.sampling).completion_ids[0]
    stop, first = free[2], free.index(free[2])
    assert stop not in (tokenizer.pad_token_id, tokenizer.eos_token_id)
    module.model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    module._rollout_backend = None  # rebuilt: it reads the stop ids from the model
    rollouts = module.rollout_backend.generate([prompt, prompt_ids[2]], 1, module.sampling)
    assert rollouts.finish_reasons[0] == "eos" and rollouts.stop_token_ids[0] == stop
    experience = module.make_experience(rollouts, torch.tensor([1.0, -1.0]))
    assert experience.completion_ids[0, : first + 1].tolist() == free[:first] + [stop]
    assert int(experience.completion_mask[0].sum()) == first + 1
    logprobs, _ = module.completion_logprobs(module.model, experience)
    with torch.no_grad():
        logits = module.model(input_ids=torch.tensor([prompt + free[:first]])).logits[0, -1]
    expected = float(torch.log_softmax(logits, -1)[stop])
    assert float(logprobs[0, first]) == pytest.approx(expected, abs=1e-5) and expected < -1e-3


def test_micro_batch_losses_match_a_hand_computed_policy_gradient(sharp_loader, prompt_ids):
    module = _module(sharp_loader, micro_batch_size=3)
    module.configure_model()
    completions = [[11, 12, 13], [14], [15, 16], [17, 18, 19], [20], [21, 22]]
    rollouts = Rollouts(
        prompt_ids=[prompt_ids[i // 3] for i in range(6)],
        completion_ids=completions,
        completions=["a"] * 6,
        finish_reasons=["length"] * 6,  # no stop token: the tensors below are exactly these tokens
        group_index=[0, 0, 0, 1, 1, 1],
    )
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 3)
    experience = module.make_experience(rollouts, advantages)

    # Ours: two micro-batches of 3 sharing the mini-batch normaliser, gradients accumulated.
    normaliser = module._normaliser(experience)
    for micro in experience.chunks(3):
        module.micro_batch_loss(micro, normaliser)[0].loss.backward()
    ours = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)

    # By hand: one unpadded forward per completion, log-softmax at temperature 1, token-mean REINFORCE.
    total = 0.0
    for prompt, completion, advantage in zip(rollouts.prompt_ids, completions, advantages):
        logits = module.model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        total = total - (advantage * logprobs).sum()
    (total / sum(len(c) for c in completions)).backward()
    for name, parameter in module.model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_token_bounded_micro_batches_give_the_unsplit_steps_gradients(sharp_loader, prompt_ids, aggregation):
    module = _module(sharp_loader, micro_batch_tokens=11, loss_aggregation=aggregation)
    module.configure_model()
    completions = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [14], [15, 16], [17, 18, 19], [20], [21, 22]]
    rollouts = Rollouts(
        prompt_ids=[prompt_ids[1]] * 3 + [prompt_ids[0]] * 3, completion_ids=completions, completions=["a"] * 6,
        finish_reasons=["length"] * 6, group_index=[0, 0, 0, 1, 1, 1],
    )  # fmt: skip
    experience = module.make_experience(rollouts, group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0]), 3))
    normaliser = module._normaliser(experience)
    micros = module.micro_batches(experience)
    # The 12-token first completion (its prompt included) goes alone; the rest fill up to 11 tokens each.
    sizes = [int(micro.prompt_mask.sum() + micro.completion_mask.sum()) for micro in micros]
    assert [len(micro) for micro in micros] == [1, 2, 1, 1, 1] and max(sizes[1:]) <= 11 < sizes[0], sizes
    for micro in micros:
        module.micro_batch_loss(micro, normaliser)[0].loss.backward()
    split = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)
    module.micro_batch_loss(experience, normaliser)[0].loss.backward()
    for name, parameter in module.model.named_parameters():
        # The same float32 terms summed in another order (the tied embedding's gradient gathers every token):
        # equal to within rounding at the tensor's own scale, far below a wrong normaliser's error.
        scale = float(parameter.grad.abs().max())
        torch.testing.assert_close(split[name], parameter.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_several_iterations_and_mini_batches_step_per_mini_batch_with_old_logprobs(sharp_loader, prompt_ids):
    module = _module(sharp_loader, num_iterations=2, mini_batch_size=4, micro_batch_size=2)
    trainer = _trainer(4, [FirstTokenReward(EVEN_FIRST_TOKEN)])
    trainer.fit(module, train_dataloaders=_loader(prompt_ids, batch_size=2))
    # One batch: 2 prompts x 4 samples = 8 completions -> 2 mini-batches x 2 iterations = 4 steps.
    assert trainer.global_step == 4
    assert "clip_ratio/low_mean" in trainer.callback_metrics


def test_old_logprobs_make_the_first_step_on_policy(sharp_loader, prompt_ids):
    module = _module(sharp_loader)
    module.configure_model()
    rollouts = Rollouts(
        prompt_ids=[prompt_ids[0]] * 4, completion_ids=[[11, 12], [13], [14, 15], [16]],
        completions=["a"] * 4, finish_reasons=["length"] * 4, group_index=[0] * 4,
    )  # fmt: skip
    experience = module.make_experience(rollouts, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    experience.old_logprobs = module.score_completions(module.model, experience)
    loss, _, _ = module.micro_batch_loss(experience, module._normaliser(experience))
    # With cached old log-probs from the same weights the ratio is 1: nothing is clipped and the loss
    # equals the on-policy one.
    assert float(loss.clip_region) == 0.0
    experience.old_logprobs = None
    on_policy, _, _ = module.micro_batch_loss(experience, module._normaliser(experience))
    torch.testing.assert_close(loss.loss, on_policy.loss)


def test_auto_leaves_the_correction_off_for_the_hf_sampler(sharp_loader):
    # It samples with the trainer's own weights and kernels (tests/test_sampler_logprobs.py: forced on, it works).
    auto = _module(sharp_loader)
    auto.configure_model()
    assert auto.active_correction() is None


def test_kl_reference_is_the_frozen_start_or_the_adapters_switched_off(sharp_loader, prompt_ids):
    full = _module(sharp_loader, beta=0.1)
    full.configure_model()
    assert full.ref_model is not None and not any(p.requires_grad for p in full.ref_model.parameters())
    full.train()
    assert full.model.training and not full.ref_model.training

    lora_loader = ModelLoader(name_or_path=sharp_loader.name_or_path, lora=LoraSettings(enabled=True, r=4))
    lora = _module(lora_loader, beta=0.1, optimizer=functools.partial(torch.optim.AdamW, lr=3e-2))
    trainer = _trainer(3, [FirstTokenReward(EVEN_FIRST_TOKEN)])
    trainer.fit(lora, train_dataloaders=_loader(prompt_ids, batch_size=2))
    assert lora.ref_model is None  # no copy: the reference is the base model under the adapters
    # After a few steps the adapters have moved the policy away from the base model.
    assert float(trainer.callback_metrics["train/kl"]) > 0.0


def test_kl_to_the_reference_is_zero_before_training(sharp_loader, prompt_ids):
    lora_loader = ModelLoader(name_or_path=sharp_loader.name_or_path, lora=LoraSettings(enabled=True, r=4))
    module = _module(lora_loader, beta=0.1)
    module.configure_model()
    rollouts = Rollouts(
        prompt_ids=[prompt_ids[0]] * 2, completion_ids=[[11, 12], [13]],
        completions=["a"] * 2, finish_reasons=["length"] * 2, group_index=[0] * 2,
    )  # fmt: skip
    experience = module.make_experience(rollouts, torch.tensor([1.0, -1.0]))
    experience.ref_logprobs = module.reference_logprobs(experience)
    loss, _, _ = module.micro_batch_loss(experience, module._normaliser(experience))
    assert float(loss.kl) == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero: policy == reference


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(sharp_loader, prompt_ids, tmp_path: Path):
    # A checkpoint every 2 steps, which is also every epoch (2 prompts, one per batch): Lightning restarts
    # an interrupted epoch from its first batch unless the dataloader is stateful (the DataModule's job).
    # A schedule, so its state must resume too; beta > 0: a reference model, rebuilt (not restored) on resume.
    settings = dict(warmup_steps=2, min_lr_ratio=0.1, beta=0.1)
    data = lambda: _loader(prompt_ids[:2], batch_size=1)  # noqa: E731
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)

    L.seed_everything(0)
    uninterrupted = _module(sharp_loader, **settings)
    reward = FirstTokenReward(EVEN_FIRST_TOKEN)
    _trainer(4, [reward, checkpoints], enable_checkpointing=True).fit(uninterrupted, train_dataloaders=data())
    after_first_epoch = next(tmp_path.glob("*step=2.ckpt"))
    saved = torch.load(after_first_epoch, weights_only=False)["state_dict"]
    assert any(key.startswith("model.") for key in saved)
    assert not [key for key in saved if "ref_model" in key]  # the reference is the base checkpoint, not saved

    L.seed_everything(1)  # a different process state: the checkpoint must carry all that matters
    resumed = _module(sharp_loader, **settings)
    resumed_reward = FirstTokenReward(EVEN_FIRST_TOKEN)
    trainer = _trainer(4, [resumed_reward])
    trainer.fit(resumed, train_dataloaders=data(), ckpt_path=after_first_epoch)
    assert trainer.global_step == 4
    assert [r.completion_ids for r in resumed_reward.seen] == [r.completion_ids for r in reward.seen[2:]]
    expected = uninterrupted.model.state_dict()
    for name, weight in resumed.model.state_dict().items():
        torch.testing.assert_close(weight, expected[name], msg=name)
    base = sharp_loader.load_model().state_dict()
    for name, weight in resumed.ref_model.state_dict().items():
        torch.testing.assert_close(weight, base[name], rtol=0, atol=0, msg=name)


def test_pad_handles_empty_rows_and_a_minimum_width():
    ids, mask = pad([[1, 2], []], 0, left=True, min_width=1)
    assert ids.tolist() == [[1, 2], [0, 0]] and mask.tolist() == [[1, 1], [0, 0]]
    ids, mask = pad([[], []], 0, min_width=1)
    assert ids.shape == (2, 1) and mask.tolist() == [[0], [0]]


def test_rejects_settings_that_cannot_work(sharp_loader):
    with pytest.raises(ValueError, match="num_generations=1"):
        _module(sharp_loader, num_generations=1)
    with pytest.raises(ValueError, match="loss_aggregation='mean'"):
        _module(sharp_loader, loss_aggregation="mean")


def test_sampling_settings_come_from_the_module_config(sharp_loader):
    module = _module(sharp_loader, sampling=dict(temperature=0.6, top_p=0.9, max_new_tokens=7))
    assert module.sampling == SamplingSettings(temperature=0.6, top_p=0.9, max_new_tokens=7)


def test_grpo_and_rollout_configs_build_what_they_name(model_loader):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from selfbudget_pl.rollout.hf import HFRolloutBackend

    configs = Path(__file__).resolve().parents[1] / "configs"
    module_cfg = OmegaConf.merge({"paths": {"output_dir": "out"}}, {"m": OmegaConf.load(configs / "module/grpo.yaml")})
    rollout = instantiate(OmegaConf.load(configs / "rollout/hf.yaml"))
    module = instantiate(module_cfg.m, model_loader=model_loader, rollout=rollout, _convert_="all")
    assert isinstance(module, GRPOModule)
    assert (module.num_generations, module.sampling.temperature, module.beta) == (5, 0.6, 0.0)  # the paper's
    assert module.sampling.max_new_tokens == 8192 and module.optimizer_factory.keywords["lr"] == 1e-6
    module.configure_model()
    assert isinstance(module.rollout_backend, HFRolloutBackend)
    vllm_partial = instantiate(OmegaConf.load(configs / "rollout/vllm.yaml"))
    assert vllm_partial.func.__name__ == "VLLMRolloutBackend" and vllm_partial.keywords["gpu_memory_utilization"] == 0.3


def test_mask_truncated_completions_leaves_them_out_of_the_loss(sharp_loader, prompt_ids):
    rollouts = Rollouts(
        prompt_ids=[prompt_ids[0]] * 3, completion_ids=[[11, 12], [13], [14, 15]], completions=["a"] * 3,
        finish_reasons=["length", "eos", "stop"], group_index=[0] * 3, stop_token_ids=[None, 2, None],
    )  # fmt: skip
    kept = _module(sharp_loader).make_experience(rollouts, torch.tensor([1.0, -1.0, 0.0]))
    masked = _module(sharp_loader, mask_truncated_completions=True).make_experience(rollouts, torch.tensor([1.0, -1.0, 0.0]))
    assert kept.completion_mask.tolist() == [[1, 1], [1, 1], [1, 1]]
    assert masked.completion_mask.tolist() == [[0, 0], [1, 1], [1, 1]]


def test_mask_truncated_completions_trains_and_counts_them(sharp_loader, prompt_ids):
    module = _module(sharp_loader, mask_truncated_completions=True, sampling=dict(temperature=1.0, max_new_tokens=2))
    reward = FirstTokenReward(EVEN_FIRST_TOKEN)
    trainer = _trainer(2, [reward])
    trainer.fit(module, train_dataloaders=_loader(prompt_ids, batch_size=2))
    truncated = sum(reward.seen[-1].truncated)  # masked: completions/clipped_ratio counts them
    assert truncated > 0
    assert float(trainer.callback_metrics["completions/clipped_ratio"]) == truncated / len(reward.seen[-1])


class StepRecorder(RewardScorer):
    """The learning rate at every optimizer step, and the reward's training progress at every batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.progress: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def score(self, rollouts, pl_module) -> Scores:
        self.progress.append(rollouts.progress)
        return Scores(rewards=torch.zeros(len(rollouts)))


def test_schedules_span_the_optimizer_steps_with_mini_batches_and_iterations(sharp_loader, prompt_ids):
    # 5 prompts in batches of 2, 2, 1; G = 4; mini-batches of 4 completions, 2 iterations:
    # 4 + 4 + 2 = 10 optimizer steps per epoch, 20 in 2 epochs, while Lightning counts 6 batches.
    module = _module(sharp_loader, num_iterations=2, mini_batch_size=4, min_lr_ratio=0.1)
    recorder = StepRecorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=_loader(prompt_ids + prompt_ids[:1], batch_size=2))
    assert trainer.estimated_stepping_batches == 6
    assert trainer.global_step == len(recorder.lrs) == module.total_optimizer_steps() == 20
    # the cosine runs over all 20 steps: halfway at step 10, near its end (0.1) only at the last step
    base = 3e-3
    assert recorder.lrs[0] == pytest.approx(base)
    assert recorder.lrs[10] == pytest.approx(base * 0.55)
    assert recorder.lrs == sorted(recorder.lrs, reverse=True)
    assert recorder.lrs[-2] > base * 0.11 and recorder.lrs[-1] == pytest.approx(base * (0.1 + 0.45 * (1 + math.cos(math.pi * 19 / 20))))
    # annealed rewards, scored before each batch's steps (at steps 0, 4, 8, 10, 14, 18; 4, 4, 2 steps each): step /
    # (20 - the batch's own steps), so 0 at the first batch and 1 at the last; counted in batches it ended at step 6
    assert recorder.progress == pytest.approx([0.0, 4 / 16, 8 / 18, 10 / 16, 14 / 16, 1.0])


def test_unfinished_completions_are_scored_malformed_and_counted(sharp_loader, prompt_ids):
    from selfbudget_pl.rewards.budget import BudgetGuidedReward

    class Recorder(RolloutHook):  # sees what the scorer returned
        seen: list[tuple[Rollouts, Scores]] = []

        def on_rollouts(self, trainer, pl_module, rollouts, scores):
            self.seen.append((rollouts, scores))

    module = _module(sharp_loader, grader=MathGrader(workers=0), sampling=dict(temperature=1.0, max_new_tokens=2))
    recorder = Recorder()
    trainer = _trainer(1, [RewardCallback({"budget_guided": BudgetGuidedReward()}), recorder])
    trainer.fit(module, train_dataloaders=_loader(prompt_ids[:2], batch_size=2))
    ((rollouts, scores),) = recorder.seen
    assert not any(scores.annotations.finished)  # two tokens cannot close a solution block
    assert scores.rewards.tolist() == [-1.0] * len(rollouts)
    assert float(trainer.callback_metrics["rollout/unfinished"]) == len(rollouts)
