"""VLLMRolloutBackend without vLLM installed: lazy import, the install hint, request building, output
conversion and what the weight sync hands the engine, against a stand-in ``vllm`` module that records what
it is asked (the default suite runs where vLLM is absent). The same against a real engine is
tests/test_vllm_engine.py (`pytest -m vllm`); the sync under FSDP (two processes) is in
tests/test_distributed.py."""

from __future__ import annotations

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from selfbudget_pl.models import LoraSettings, apply_lora
from selfbudget_pl.rollout.base import SamplingSettings, engine_limits
from selfbudget_pl.rollout.vllm import rollouts_from_outputs, sampling_params_kwargs
from selfbudget_pl.weights import iter_full_weights

from .conftest import randomize_lora_b
from .vllm_stand_in import install_stand_in_vllm


def test_importing_the_module_does_not_import_vllm():
    code = "import sys, selfbudget_pl.rollout.vllm; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_without_vllm_names_the_install_command(monkeypatch, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail as if it were absent
    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\]"):
        VLLMRolloutBackend(torch.nn.Linear(1, 1), tokenizer)


class _BrokenTorchvision:
    """A meta-path finder under which `import vllm` fails as it does beside a mismatched torchvision."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm":
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_a_mismatched_torchvision_is_named_with_the_fix(monkeypatch, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTorchvision(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"pip uninstall -y torchvision torchaudio torchcodec"):
        VLLMRolloutBackend(torch.nn.Linear(1, 1), tokenizer)


def test_sampling_params_carry_no_seed_and_ask_for_the_sampled_log_prob():
    sampling = SamplingSettings(temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=32, stop=["</solution>"], seed=7)
    # No per-request seed: vLLM samples seeded requests row by row in Python; the call reseeds the engine.
    assert sampling_params_kwargs(sampling, [1, 2]) == {
        "n": 1, "temperature": 0.6, "top_p": 0.9, "top_k": 0, "max_tokens": 32, "stop": ["</solution>"],
        "stop_token_ids": [1, 2], "include_stop_str_in_output": True, "skip_special_tokens": False,
        "spaces_between_special_tokens": False, "logprobs": 0, "flat_logprobs": True,
    }


def _request(token_ids, finish_reason, stop_reason=None, logprobs=None):
    completion = SimpleNamespace(
        token_ids=token_ids, finish_reason=finish_reason, stop_reason=stop_reason, text="ignored", logprobs=logprobs
    )
    return SimpleNamespace(outputs=[completion])


def test_outputs_become_rollouts_with_eos_stripped(tokenizer):
    eos = tokenizer.eos_token_id
    hello = tokenizer.encode("the sum", add_special_tokens=False)
    outputs = [
        _request(hello + [eos], "stop"), _request(hello, "length"), _request(hello[:1], "stop"), _request([], "stop")
    ]
    rollouts = rollouts_from_outputs(outputs, [[5], [5], [6], [6]], 2, tokenizer, [eos])
    assert rollouts.completion_ids == [hello, hello, hello[:1], []]
    assert rollouts.truncated == [False, True, False, False]
    assert rollouts.finish_reasons == ["eos", "length", "eos", "eos"]
    assert rollouts.stop_token_ids == [eos, None, None, None]
    assert rollouts.group_index == [0, 0, 1, 1]
    assert rollouts.completions[0] == "the sum"  # decoded from the ids; a pre-filled prefix is RolloutBackend's
    assert rollouts.completions[3] == ""
    assert rollouts.sampler_logprobs == []  # vLLM returned none


def test_each_sampled_tokens_log_prob_is_kept_stop_token_included(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [7, 9, eos]
    positions = [{7: SimpleNamespace(logprob=-0.5)}, {9: SimpleNamespace(logprob=-1.5)}, {eos: SimpleNamespace(logprob=-0.25)}]
    rollouts = rollouts_from_outputs([_request(ids, "stop", logprobs=positions)], [[5]], 1, tokenizer, [eos])
    assert rollouts.completion_ids == [[7, 9]] and rollouts.stop_token_ids == [eos]
    assert rollouts.sampler_logprobs == [[-0.5, -1.5, -0.25]]


class _FakeLLM:
    """Records calls; its worker's in-place reload consumes the weights iterator as vLLM's does."""

    instances: list["_FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        # vLLM takes the model config's positions when max_model_len is None (the tiny model's 2,048 here).
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"] or 2048))
        self.calls: list[str] = []
        self.requests = None
        self.reloads: list[list[tuple[str, torch.Tensor]]] = []
        _FakeLLM.instances.append(self)

    def collective_rpc(self, method, kwargs):
        self.calls.append(method)
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        # Copied, as vLLM copies into its own parameters; every call's pairs are kept, in order.
        self.reloads.append([(name, tensor.detach().clone()) for name, tensor in kwargs["weights_iterator"]])

    @property
    def loaded(self) -> dict[str, torch.Tensor]:
        pairs = self.reloads[-1]
        assert len({name for name, _ in pairs}) == len(pairs), "a weight was sent twice"
        return dict(pairs)

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append("generate")
        self.requests = list(zip(prompts, sampling_params))
        return [_request(request["prompt_token_ids"][-1:] * 2, "length") for request in prompts]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake_up" + "".join(f"_{tag}" for tag in tags or []))
        return tags != ["weights"]  # fully awake once the KV cache is


@pytest.fixture
def fake_vllm(monkeypatch):
    modules: dict = {}
    module = install_stand_in_vllm(_FakeLLM, modules)
    for name, value in modules.items():
        monkeypatch.setitem(sys.modules, name, value)
    _FakeLLM.instances.clear()
    return module


def test_generate_builds_one_request_per_completion(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    backend = VLLMRolloutBackend(model, tokenizer, gpu_memory_utilization=0.4, enforce_eager=True)
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["model"] == model.name_or_path
    assert llm.kwargs["gpu_memory_utilization"] == 0.4 and llm.kwargs["enforce_eager"] is True
    prefill_ids = tokenizer.encode("<budget>9</budget>", add_special_tokens=False)
    rollouts = backend.generate(
        [[11, 12], [13]], 2, SamplingSettings(temperature=1.0, seed=3), prefill="<budget>9</budget>",
        columns={"id": ["a", "b"]},
    )
    assert [request["prompt_token_ids"] for request, _ in llm.requests] == [
        [11, 12] + prefill_ids, [11, 12] + prefill_ids, [13] + prefill_ids, [13] + prefill_ids
    ]
    assert all("seed" not in params for _, params in llm.requests)
    assert rollouts.columns == {"id": ["a", "a", "b", "b"], "prefilled": [True] * 4}
    assert rollouts.truncated == [True] * 4 and rollouts.group_index == [0, 0, 1, 1]


def test_sleep_mode_releases_memory_between_rollouts(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    backend = VLLMRolloutBackend(model, tokenizer, enable_sleep_mode=True)
    llm = _FakeLLM.instances[-1]
    backend.generate([[1]], 1, SamplingSettings())  # before any sync: the checkpoint's weights stay on the host
    backend.mark_stale(model)
    backend.generate([[1]], 1, SamplingSettings())
    backend.generate([[1]], 1, SamplingSettings())  # no step between: level 2 discarded them, so they are reloaded
    # TRL's order: wake the weights, sync, wake the KV cache, generate, sleep at level 2.
    one_rollout = ["wake_up_weights", "reload_weights", "reset_prefix_cache", "wake_up_kv_cache", "generate", "sleep2"]
    assert llm.calls == ["generate", "sleep1", *one_rollout, *one_rollout]
    assert backend.num_syncs == 2


def test_steps_between_rollouts_cost_one_sync_before_the_next_generate(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    backend = VLLMRolloutBackend(model, tokenizer)
    llm = _FakeLLM.instances[-1]
    for _ in range(3):  # three optimizer steps
        backend.mark_stale(model)
    assert llm.calls == []
    backend.generate([[1]], 1, SamplingSettings())
    backend.generate([[1]], 1, SamplingSettings())
    assert llm.calls == ["reload_weights", "reset_prefix_cache", "generate", "generate"]
    assert backend.num_syncs == 1


def test_a_cpu_engine_gets_a_bounded_kv_cache(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    VLLMRolloutBackend(model, tokenizer)
    assert "kv_cache_memory_bytes" not in _FakeLLM.instances[-1].kwargs  # GPU: gpu_memory_utilization decides
    fake_vllm.platforms.current_platform.is_cpu = lambda: True
    VLLMRolloutBackend(model, tokenizer, cpu_kv_cache_gb=0.5)
    assert _FakeLLM.instances[-1].kwargs["kv_cache_memory_bytes"] == 2**29
    VLLMRolloutBackend(model, tokenizer, kv_cache_gb=2)
    assert _FakeLLM.instances[-1].kwargs["kv_cache_memory_bytes"] == 2 * 2**30


def test_the_engine_is_sized_for_the_run_unless_the_config_says_otherwise(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    # 4 prompts per step x G = 5 beside a validation batch of 16: 20 at once; 100-token prompts + 300 new tokens.
    limits = engine_limits(100, "data.max_prompt_length", [(16, 200), (4 * 5, 300)])
    VLLMRolloutBackend(model, tokenizer, limits=limits)
    assert {key: _FakeLLM.instances[-1].kwargs[key] for key in ("max_model_len", "max_num_seqs")} == {
        "max_model_len": 400, "max_num_seqs": 20}
    VLLMRolloutBackend(model, tokenizer, limits=limits, max_model_len=1024, max_num_seqs=8)  # explicit values win
    assert {key: _FakeLLM.instances[-1].kwargs[key] for key in ("max_model_len", "max_num_seqs")} == {
        "max_model_len": 1024, "max_num_seqs": 8}
    VLLMRolloutBackend(model, tokenizer)  # no limits: vLLM's own defaults (the model config's length)
    assert _FakeLLM.instances[-1].kwargs["max_model_len"] is None
    assert "max_num_seqs" not in _FakeLLM.instances[-1].kwargs


def test_a_prompt_that_does_not_fit_the_engine_is_refused_naming_the_keys(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    limits = engine_limits(10, "data.max_prompt_length", [(4, 6)])
    backend = VLLMRolloutBackend(model_loader.load_model(), tokenizer, limits=limits)
    backend.generate([[1] * 10], 1, SamplingSettings(max_new_tokens=6))  # 16 positions: fits exactly
    keys = r"data\.max_prompt_length or module\.sampling\.max_new_tokens.*rollout\.max_model_len"
    with pytest.raises(ValueError, match=keys):
        backend.generate([[1] * 11], 1, SamplingSettings(max_new_tokens=6))
    with pytest.raises(ValueError, match="17 positions, more than the engine's max_model_len=16"):
        backend.generate([[1] * 10], 1, SamplingSettings(max_new_tokens=7))
    assert _FakeLLM.instances[-1].calls == ["generate"]  # refused before the engine saw them


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys(), set(loaded) ^ set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_sync_weights_reloads_the_plain_model_state_dict_in_one_call(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    model = model_loader.load_model()
    assert next(model.parameters()).dtype == torch.float32
    # A GPU engine runs bfloat16 whatever the checkpoint's dtype, and the sync sends what it runs.
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    backend = VLLMRolloutBackend(model, tokenizer)
    backend.sync_weights(model)
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["dtype"] == "bfloat16"
    assert len(llm.reloads) == 1  # layerwise reload needs every weight of a layer within one call
    assert_same(llm.loaded, expected)
    VLLMRolloutBackend(model, tokenizer, dtype="float32")
    assert _FakeLLM.instances[-1].kwargs["dtype"] == "float32"


def test_sync_weights_sends_lora_merged_weights_under_checkpoint_names(fake_vllm, model_loader, tokenizer):
    from selfbudget_pl.rollout.vllm import VLLMRolloutBackend

    torch.manual_seed(0)
    policy = randomize_lora_b(apply_lora(model_loader.load_model(), LoraSettings(enabled=True, r=4)), 0.1)
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    before = {name: weight.clone() for name, weight in policy.state_dict().items()}

    backend = VLLMRolloutBackend(policy, tokenizer, dtype="float32")
    backend.sync_weights(policy)
    llm = _FakeLLM.instances[-1]
    assert_same(llm.loaded, expected)  # exactly peft's merge, under the HF checkpoint's names
    # The adapters were never merged into the training weights.
    for name, weight in policy.state_dict().items():
        assert torch.equal(weight, before[name]), name
    assert not any(layer.merged for layer in policy.modules() if hasattr(layer, "merged_adapters"))


class _Holder(torch.nn.Module):
    """The LightningModule's layout: the policy at ``model``, a frozen reference beside it."""

    def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.ref_model = ref_model


def test_full_weights_strip_wrapper_names_and_stay_inside_the_prefix(model_loader):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from selfbudget_pl.strategies import decoder_layer_classes

    torch.manual_seed(0)
    policy = randomize_lora_b(apply_lora(model_loader.load_model(), LoraSettings(enabled=True, r=4)), 0.1)
    raw = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    reference = model_loader.load_model()
    with torch.no_grad():
        for weight in reference.parameters():
            weight.add_(1.0)  # different values under the same names: a leak from it would show
    root = _Holder(policy, reference)
    # What Lightning's activation checkpointing does: decoder layers wrapped in CheckpointWrapper.
    layers = tuple(decoder_layer_classes(model_loader))
    apply_activation_checkpointing(root, check_fn=lambda module: isinstance(module, layers))
    assert any("_checkpoint_wrapped_module" in name for name, _ in root.named_parameters())

    streamed = {}
    for name, tensor in iter_full_weights(root, "model."):
        assert torch.is_grad_enabled(), "the walk's grad mode leaked into the caller"
        streamed[name] = tensor.clone()
    assert_same(streamed, expected)
    # Unmerged: the peft model's own state dict (what the export loads into a fresh copy).
    assert_same({name: t.clone() for name, t in iter_full_weights(root, "model.", merge_lora=False)}, raw)
