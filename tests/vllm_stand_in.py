"""A stand-in ``vllm`` module for tests that run where vLLM is not installed: what VLLMRolloutBackend reads
from it besides ``LLM`` (the engine class each test supplies)."""

from __future__ import annotations

import sys
from types import SimpleNamespace


def install_stand_in_vllm(llm_class: type, modules: dict = sys.modules) -> SimpleNamespace:
    """Put a stand-in ``vllm`` (a GPU platform that knows Qwen2) into ``modules``; returns it."""
    platforms = SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: False))
    module = SimpleNamespace(
        LLM=llm_class, SamplingParams=lambda **kwargs: kwargs, __version__="stand-in", platforms=platforms,
        ModelRegistry=SimpleNamespace(get_supported_archs=lambda: ["Qwen2ForCausalLM"]),
    )  # fmt: skip
    modules["vllm"] = module
    modules["vllm.platforms"] = platforms
    return module
