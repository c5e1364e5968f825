"""Shared fixtures: the tiny model (built once per session) and the shared math data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores: tests stay single-threaded so parallel runs do not thrash.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELFBUDGET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A per-session cache directory for tiny models, so tests never depend on ~/.cache."""
    path = tmp_path_factory.mktemp("tiny_models")
    os.environ["SELFBUDGET_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_loader(tiny_cache):
    from selfbudget_pl.models import ModelLoader

    # The default cache dir ($SELFBUDGET_CACHE/tiny_models, set by tiny_cache): the same folder the
    # subprocess runners' own ModelLoader() reads, so a model built here is never rebuilt concurrently.
    return ModelLoader()


@pytest.fixture(scope="session")
def tiny_model_dir(model_loader) -> Path:
    return Path(model_loader.path)


@pytest.fixture(scope="session")
def tokenizer(model_loader):
    return model_loader.load_tokenizer()


@pytest.fixture(scope="session")
def smollm2_dir(tiny_cache) -> Path:
    """SmolLM2-135M-Instruct as ``model=smollm2_135m`` names it: converted from its package's GGUF file into
    this session's cache on first use (about a minute), the folder every later use loads."""
    from omegaconf import OmegaConf

    import selfbudget_pl.config  # noqa: F401  (registers the packaged_checkpoint resolver)

    return Path(OmegaConf.load(REPO_ROOT / "configs" / "model" / "smollm2_135m.yaml").name_or_path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared math data not found at {SHARED_DATA} (it sits beside the repo in CI and dev machines)")
    return SHARED_DATA


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Init-scale weights give near-uniform logits and greedy repeats one token whatever the prompt;
    sharper random weights make every output depend on its context, so comparisons mean something."""
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.2)
    return model


def randomize_lora_b(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """peft starts every LoRA B at zero, which makes the adapters a no-op; random B makes them count."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, std)
    return model
