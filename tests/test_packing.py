"""Packed completion logits (:mod:`selfbudget_pl.modules.packing`) against the padded forward they
replace: the same logits, the same gradients (full weights, LoRA, activation checkpointing), the same
GRPO update and the same SFT loss, on Qwen2, Llama with grouped-query attention and Qwen3; the layout
``pack`` builds; unpacked calls unchanged after the switch; and the padded path for models packing does
not support."""

from __future__ import annotations

import functools
import itertools

import lightning as L
import pytest
import torch
import transformers

from selfbudget_pl.data.collate import SFTCollator
from selfbudget_pl.models import LoraSettings, apply_lora
from selfbudget_pl.modules import packing
from selfbudget_pl.modules.experience import Experience
from selfbudget_pl.modules.grpo import GRPOModule
from selfbudget_pl.modules.logprobs import packed_sequence_nll
from selfbudget_pl.modules.losses import group_advantages
from selfbudget_pl.modules.sft import SFTModule
from selfbudget_pl.tensors import pad

from .conftest import randomize_lora_b, sharpen

PAD = 0
EOS = 2  # only a token here: the forward treats it like any other, but it sits inside completions too
KINDS = ["qwen2", "llama_gqa", "qwen3"]

# Prompts of different lengths, so left padding differs from group to group; D is a single token.
A, B, C, D = [5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19]
BATCHES = {
    # Groups of G = 3 identical, consecutive prompts; completions of lengths 0 to 8, one of length 1,
    # EOS at the end and in the middle.
    "groups": (
        [A] * 3 + [B] * 3 + [C] * 3,
        [[20, 21, EOS, 22], [23], [], [24, 25, 26, 27, 28, EOS], [29, EOS], [30, 31], [32], [33, 34, 35],
         [36, 37, 38, 39, 40, 41, 42, 43]],
    ),
    # Identical prompts that are not neighbours: each keeps its own copy, and must not borrow another's.
    "interleaved": (
        [A, B, A, C, B, A, D],
        [[44, 45, EOS], [46], [47, 48], [], [49, 50, 51, 52], [EOS], [53, 54]],
    ),
    # A micro-batch boundary through groups: the tail of one group, then the head of the next.
    "split_groups": (
        [A] * 3 + [B] * 2,
        [[20, EOS], [21, 22, 23], [24], [25, 26], []],
    ),
    "all_empty": ([B, B], [[], []]),
    # Left padding with the pad id and a real pad-id token give the same ids: only the masks differ.
    "pad_id_in_prompt": ([[PAD, 5], [5], [5]], [[6, 7], [8], [9, EOS]]),
}


# -- models and references ----------------------------------------------------------------------
def _small(kind: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    configs = {
        "llama_gqa": lambda: transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen3": lambda: transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind](), attn_implementation="sdpa")
    return sharpen(model)


def _model(kind: str, model_loader) -> torch.nn.Module:
    """The tiny Qwen2 (the project's default model) or a small Llama / Qwen3, with sharp random weights,
    in train mode (dropout would make packed and padded differ: there is none)."""
    model = sharpen(model_loader.load_model()) if kind == "qwen2" else _small(kind)
    model.train()
    assert model.config.attention_dropout == 0.0
    assert all(module.p == 0.0 for module in model.modules() if isinstance(module, torch.nn.Dropout))
    assert model.config._attn_implementation == "sdpa"
    return model


def _tensors(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    prompts, completions = BATCHES[name]
    prompt_ids, prompt_mask = pad(prompts, PAD, left=True)
    completion_ids, completion_mask = pad(completions, PAD, min_width=1)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _padded_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The reference: one padded forward, positions as generation counts them, rows of real tokens."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        logits_to_keep=completion_ids.shape[1] + 1, use_cache=False,
    ).logits[:, :-1]  # fmt: skip
    return logits[completion_mask.bool()]


def _packed_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    batch = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask)
    return packing.completion_rows(packing.packed_forward(model, batch))


def _gradients(model, logits_fn, tensors) -> dict[str, torch.Tensor]:
    """Parameter gradients of a policy-gradient-like loss on the completion log-probs."""
    model.zero_grad(set_to_none=True)
    completion_ids, completion_mask = tensors[2], tensors[3]
    logits = logits_fn(model, *tensors)
    logprobs = torch.log_softmax(logits, -1).gather(-1, completion_ids[completion_mask.bool()][:, None])[:, 0]
    # Back to [n, T] through unpack, as GRPO does; weights of both signs, different for every token.
    weights = torch.linspace(-1.0, 1.5, completion_mask.numel()).view(completion_mask.shape)
    (-(weights * packing.unpack(logprobs, completion_mask)).sum()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def _assert_same_gradients(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys() and reference
    for name, expected in reference.items():
        scale = float(expected.abs().max())
        assert scale > 0, f"{name} got no gradient: the comparison would mean nothing"
        torch.testing.assert_close(ours[name], expected, rtol=1e-4, atol=1e-4 * scale, msg=name)


def _greedy(model, prompts: list[list[int]], max_new_tokens: int = 8) -> list[list[int]]:
    input_ids, mask = pad(prompts, PAD, left=True)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=model.config.vocab_size - 1, pad_token_id=PAD,
        )  # fmt: skip
    return output[:, input_ids.shape[1] :].tolist()


# -- 1. logits -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_the_padded_forward(kind, batch, model_loader):
    # In float64 the two forwards' different summation orders round at about 1e-15 of the logits' size, so
    # the tolerance sits far below any layout error (> 1.0, checked below) and far above rounding, on any
    # transformers version or thread count; in float32 their rounding differences reach 1e-5.
    model = _model(kind, model_loader).double()
    assert packing.unsupported_reason(model) is None
    tensors = _tensors(batch)
    with torch.no_grad():
        expected = _padded_logits(model, *tensors)
        logits = _packed_logits(model, *tensors)
    assert logits.dtype == expected.dtype == torch.float64
    assert logits.shape == expected.shape == (int(tensors[3].sum()), model.config.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-9, rtol=0)
    if logits.numel():  # the logits depend on their context: a wrong layout would not pass by luck
        assert float((expected[1:] - expected[:-1]).abs().amax()) > 1.0


# -- 2. gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_the_padded_forward(kind, model_loader):
    model = _model(kind, model_loader)
    for batch in ("groups", "interleaved"):
        tensors = _tensors(batch)
        expected = _gradients(model, _padded_logits, tensors)
        _assert_same_gradients(_gradients(model, _packed_logits, tensors), expected)


# -- 3. the packed layout ------------------------------------------------------------------------
def _expected_layout(prompts, completions) -> tuple[list[int], list[int], list[int]]:
    """Packed tokens, their positions, and the token predicting each completion token, by hand."""
    ids: list[int] = []
    positions: list[int] = []
    predictor: list[int] = []
    previous = None
    for prompt, completion in zip(prompts, completions):
        if prompt != previous:
            last_prompt_token = len(ids) + len(prompt) - 1
            ids += prompt
            positions += range(len(prompt))
        previous = prompt
        inputs = []
        for k, token in enumerate(completion[:-1]):  # the last token is only a target
            inputs.append(len(ids))
            ids.append(token)
            positions.append(len(prompt) + k)
        predictor += ([last_prompt_token] + inputs)[: len(completion)]
    return ids, positions, predictor


@pytest.mark.parametrize("batch", list(BATCHES))
def test_pack_lays_out_each_prompt_run_once_and_completions_without_their_last_token(batch):
    prompts, completions = BATCHES[batch]
    tensors = _tensors(batch)
    packed = packing.pack(*tensors)
    runs = [prompt for prompt, _ in itertools.groupby(prompts)]
    count = sum(len(prompt) for prompt in runs) + sum(max(len(completion) - 1, 0) for completion in completions)
    assert packed.input_ids.shape == packed.position_ids.shape == (1, count)
    ids, positions, predictor = _expected_layout(prompts, completions)
    assert packed.input_ids[0].tolist() == ids
    # Generation's positions: left padding does not advance them, each sequence starts at 0.
    assert packed.position_ids[0].tolist() == positions
    assert packed.predictor.tolist() == predictor
    assert len(predictor) == int(tensors[3].sum()) == sum(map(len, completions))
    # The padded attention layout: one row per completion, wide enough for its prompt and inputs, and
    # every packed token computed by exactly one slot that holds it.
    assert packed.rows == len(prompts)
    assert packed.width == max(len(p) + max(len(c) - 1, 0) for p, c in zip(prompts, completions))
    assert packed.slot_token.shape == (packed.rows * packed.width,)
    assert packed.slot_token[packed.token_slot].tolist() == list(range(count))


def test_unpack_puts_values_back_where_the_mask_has_tokens():
    _, _, completion_ids, completion_mask = _tensors("groups")
    values = torch.arange(1, int(completion_mask.sum()) + 1, dtype=torch.float32)
    out = packing.unpack(values, completion_mask)
    assert out.shape == completion_mask.shape
    assert (out[completion_mask == 0] == 0).all()
    assert out[completion_mask.bool()].tolist() == values.tolist()  # row by row, left to right
    assert out[1].tolist()[:2] == [5.0, 0.0]  # row 0 has 4 tokens, row 1 one


def test_pack_rejects_a_row_without_prompt_tokens():
    prompt_ids, prompt_mask = pad([[5, 6], []], PAD, left=True)
    completion_ids, completion_mask = pad([[7], [8]], PAD)
    with pytest.raises(ValueError, match="at least one prompt token"):
        packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask)


# -- 4. LoRA -------------------------------------------------------------------------------------
def test_lora_logits_and_adapter_gradients_equal_the_padded_forward_and_can_be_disabled(model_loader):
    model = _model("qwen2", model_loader)
    tensors = _tensors("groups")
    with torch.no_grad():
        base = _padded_logits(model, *tensors)
    settings = LoraSettings(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    assert settings.dropout == 0.0
    peft_model = apply_lora(model, settings)
    torch.manual_seed(2)
    randomize_lora_b(peft_model, 0.5)
    peft_model.train()
    assert packing.unsupported_reason(peft_model) is None

    with torch.no_grad():
        expected = _padded_logits(peft_model, *tensors)
        logits = _packed_logits(peft_model, *tensors)
    assert float((expected - base).abs().amax()) > 0.1  # the adapters change the logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    gradients = _gradients(peft_model, _packed_logits, tensors)
    assert gradients and all("lora_" in name for name in gradients)  # the base weights stay frozen
    _assert_same_gradients(gradients, _gradients(peft_model, _padded_logits, tensors))

    with peft_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(_packed_logits(peft_model, *tensors), base, atol=1e-5, rtol=0)
    with torch.no_grad():  # and the adapters are back after the block
        torch.testing.assert_close(_packed_logits(peft_model, *tensors), expected, atol=1e-5, rtol=0)


# -- 5. unpacked calls after the switch ---------------------------------------------------------
def test_the_switched_attention_leaves_padded_forwards_and_generate_unchanged(model_loader):
    """packed_forward leaves the model on packed_attention (checkpointed layers recompute in backward);
    calls without ``packing`` must then compute exactly what SDPA did."""
    model = _model("qwen2", model_loader).eval()
    prompts = [A, B, C]
    tensors = _tensors("groups")
    greedy = _greedy(model, prompts)
    with torch.no_grad():
        padded = _padded_logits(model, *tensors)

    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: seen.append(model.config._attn_implementation))
    with torch.no_grad():
        packed = _packed_logits(model, *tensors)
    hook.remove()
    assert seen == [packing.ATTENTION_NAME]
    assert model.config._attn_implementation == packing.ATTENTION_NAME
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    assert _greedy(model, prompts) == greedy
    with torch.no_grad():
        assert torch.equal(_padded_logits(model, *tensors), padded)


def test_models_on_other_attention_implementations_are_refused(model_loader):
    model = _model("qwen2", model_loader)
    model.set_attn_implementation("eager")
    assert "attn_implementation 'eager'" in packing.unsupported_reason(model)
    with pytest.raises(ValueError, match="packed forward cannot run this model: attn_implementation 'eager'"):
        _packed_logits(model, *_tensors("groups"))


# -- 6. GRPOModule: the fallback, and the same update either way -------------------------------
def _settings(model_loader, **overrides) -> dict:
    settings = dict(
        model_loader=model_loader,
        optimizer=functools.partial(torch.optim.SGD, lr=0.2),  # Adam's first step hides gradient errors
        num_generations=3,
        sampling=dict(temperature=0.7, max_new_tokens=8),
        warmup_steps=0,
        min_lr_ratio=1.0,
        max_grad_norm=None,
    )
    return {**settings, **overrides}


def _experience(batch: str) -> Experience:
    prompt_ids, prompt_mask, completion_ids, completion_mask = _tensors(batch)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2, 1.0])[: len(prompt_ids)]
    return Experience(prompt_ids, prompt_mask, completion_ids, completion_mask, group_advantages(rewards, 3))


def test_unsupported_models_run_the_padded_forward(model_loader, monkeypatch, caplog):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1)
    gpt2 = sharpen(transformers.GPT2LMHeadModel(config)).eval()  # eval: GPT-2 has dropout
    reason = packing.unsupported_reason(gpt2)
    assert isinstance(reason, str) and "gpt2" in reason

    def no_packing(*args, **kwargs):
        raise AssertionError("packed_forward ran on a model packing does not support")

    monkeypatch.setattr(packing, "packed_forward", no_packing)
    module = GRPOModule(**_settings(model_loader, packed_forward=True))
    micro = _experience("groups")
    with torch.no_grad(), caplog.at_level("WARNING", logger="selfbudget_pl.modules.base"):
        logprobs, entropy = module.completion_logprobs(gpt2, micro)
        module.completion_logprobs(gpt2, micro)
        expected = _padded_logits(gpt2, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask)
    mask = micro.completion_mask.bool()
    expected = torch.log_softmax(expected / 0.7, dim=-1)  # scored at the sampling temperature
    torch.testing.assert_close(logprobs[mask], expected.gather(1, micro.completion_ids[mask][:, None])[:, 0])
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1))
    # Said once, with the reason, not on every micro-batch.
    told = [record.getMessage() for record in caplog.records if "packed_forward" in record.getMessage()]
    assert len(told) == 1 and "gpt2" in told[0]


class _FixedExperience(GRPOModule):
    """One training step that updates the policy on a given Experience (no sampling, no reward)."""

    def __init__(self, experience: Experience, **kwargs) -> None:
        super().__init__(**kwargs)
        self.experience = experience
        self.stats: dict[str, float] = {}

    def training_step(self, batch, batch_idx) -> None:
        self.stats = self.update_policy(self.experience)


def _update(model_loader, packed_forward: bool) -> tuple[dict, dict, dict]:
    """Weights before and after two optimizer steps on the same Experience, and the step's stats."""
    # 9 completions: mini-batches of 6 and 3 (two optimizer steps, so old log-probs are scored first),
    # micro-batches of 4 that cut through groups; beta > 0 scores a frozen reference too.
    module = _FixedExperience(
        _experience("groups"),
        **_settings(model_loader, mini_batch_size=6, micro_batch_size=4, beta=0.05, packed_forward=packed_forward),
    )
    module.configure_model()
    sharpen(module.model)
    sharpen(module.ref_model)  # the same weights: the KL starts at 0 and grows in the second step
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([0]))
    assert trainer.global_step == 2
    after = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    return before, after, module.stats


def test_update_policy_is_the_same_with_and_without_packing(model_loader, monkeypatch):
    calls = []
    original = packing.packed_forward
    monkeypatch.setattr(packing, "packed_forward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    before, packed, packed_stats = _update(model_loader, packed_forward=True)
    # Scoring old and reference log-probs (3 micro-batches each) and 3 training micro-batches.
    assert len(calls) == 9
    _, padded, padded_stats = _update(model_loader, packed_forward=False)
    assert len(calls) == 9
    for name, start in before.items():
        expected = padded[name] - start
        scale = float(expected.abs().max())
        assert scale > 1e-3, f"{name} hardly moved: the comparison would mean nothing"
        torch.testing.assert_close(packed[name] - start, expected, rtol=1e-4, atol=1e-4 * scale, msg=name)
    assert packed_stats.keys() == padded_stats.keys() and {"loss", "entropy", "kl"} <= packed_stats.keys()
    assert padded_stats["kl"] > 1e-4  # the policy left the reference in the first step
    for name, value in padded_stats.items():
        assert packed_stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# -- 7. activation checkpointing -----------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradients_with_activation_checkpointing_equal_the_padded_forward(use_reentrant, model_loader):
    """Checkpointed layers recompute their forward during backward, after packed_forward has returned:
    the recompute must still attend within rows."""
    model = _model("qwen2", model_loader)
    tensors = _tensors("groups")
    expected = _gradients(model, _padded_logits, tensors)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    _assert_same_gradients(_gradients(model, _packed_logits, tensors), expected)


# -- 8. the SFT loss -----------------------------------------------------------------------------
def _sft_batch() -> dict:
    """Prompt + response rows of different lengths, right-padded; the loss covers the responses only."""
    prompts, responses = BATCHES["groups"]
    examples = [
        {"prompt_ids": prompt, "response_ids": response + [EOS], "budget": 1}
        for prompt, response in zip(prompts, responses)
    ]
    return SFTCollator(pad_token_id=PAD)(examples)


def _sft_gradients(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), gradients


@pytest.mark.parametrize("kind", KINDS)
def test_the_packed_sft_loss_and_its_gradients_equal_the_models_own(kind, model_loader):
    model = _model(kind, model_loader)
    batch = _sft_batch()
    assert float(batch["attention_mask"].float().mean()) < 0.8  # padding the packed loss must skip
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    expected_loss, expected = _sft_gradients(model, lambda: model(**inputs).loss)
    loss, gradients = _sft_gradients(
        model, lambda: packed_sequence_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 7)
    )
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    _assert_same_gradients(gradients, expected)


@pytest.mark.parametrize("packed_forward", [True, False])
def test_the_sft_module_takes_its_loss_on_packed_tokens_when_asked(packed_forward, model_loader, monkeypatch):
    calls = []
    original = packing.packed_forward
    monkeypatch.setattr(packing, "packed_forward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    settings = {key: value for key, value in _settings(model_loader).items() if key not in ("num_generations", "sampling")}
    module = SFTModule(**settings, packed_forward=packed_forward)
    module.configure_model()
    batch = _sft_batch()
    loss = module.lm_loss(batch)
    expected = module.model(**{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}).loss
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert len(calls) == (1 if packed_forward else 0)
