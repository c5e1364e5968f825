"""``selfbudget_pl.internals``, the one place the package reaches into other libraries' private APIs: the
installed library versions are ones its accessors were checked on (this FAILS, never skips, on any other),
no other module of the package touches a private name of another library, and every accessor does what its
caller relies on, on the real object (FSDP1/FSDP2 units on two gloo ranks, a Lightning Trainer run, a
TensorBoard writer, a transformers model)."""

from __future__ import annotations

import ast
import inspect
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import transformers
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfbudget_pl import internals

from .conftest import REPO_ROOT
from .test_distributed import torchrun

PACKAGE = REPO_ROOT / "src" / "selfbudget_pl"
VERSION_HELPERS = {"installed_version", "is_known_version", "unknown_version_message", "unknown_versions",
                   "warn_unknown_versions"}


# -- versions ------------------------------------------------------------------------------------------------


def test_installed_library_versions_are_ones_the_accessors_were_checked_on():
    problems = internals.unknown_versions()
    assert not problems, "\n".join(problems)


def test_an_unknown_version_names_library_version_accessors_and_tests(monkeypatch):
    assert internals.is_known_version("torch", "2.13.0+cpu") and internals.is_known_version("torch", "2.13.0+cu128")
    assert not internals.is_known_version("torch", "2.13.1") and not internals.is_known_version("torch", "2.14.0")
    assert not internals.is_known_version("lightning", "2.7.0") and not internals.is_known_version("lightning", "2.6.5")
    assert internals.is_known_version("transformers", "5.25.0") and internals.is_known_version("transformers", "5.19.0")
    assert not internals.is_known_version("transformers", "5.25.1")
    assert not internals.is_known_version("transformers", "5.16.0")
    monkeypatch.setattr(internals, "installed_version", lambda library: "99.0" if library == "transformers" else "2.13.0")
    monkeypatch.setitem(internals.KNOWN_VERSIONS, "lightning", "==2.13.*")
    (message,) = internals.unknown_versions()
    assert message.startswith("transformers 99.0 is not a version")
    for expected in ("transformers>=5.16.1,<=5.25.0", "requirements/main.txt", "scripts/refresh_lock.sh",
                     "set_attention_implementation", "no_split_modules", "fused_decode",
                     "tests/test_internals.py", "tests/test_fused_decode.py", "tests/test_packing.py"):  # fmt: skip
        assert expected in message, expected


def test_untested_versions_are_logged_one_sentence_each(monkeypatch, caplog):
    monkeypatch.setattr(internals, "installed_version", lambda library: {"transformers": "5.26.0"}.get(library, "2.13.0"))
    monkeypatch.setitem(internals.KNOWN_VERSIONS, "lightning", "==2.13.0")
    with caplog.at_level("WARNING", logger="selfbudget_pl.internals"):
        internals.warn_unknown_versions()
    assert [record.getMessage() for record in caplog.records] == [internals.unknown_version_message("transformers", "5.26.0")]


def test_every_accessor_is_registered_with_its_library():
    """An accessor added without ``@_reaches_into`` would escape the version check."""
    accessors = {
        name for name, function in inspect.getmembers(internals, inspect.isfunction)
        if function.__module__ == internals.__name__ and not name.startswith("_") and name not in VERSION_HELPERS
    }  # fmt: skip
    registered = {name for entries in internals.PINNED.values() for name, _ in entries}
    assert accessors and accessors <= registered, sorted(accessors - registered)
    assert set(internals.PINNED) == set(internals.KNOWN_VERSIONS)
    for entries in internals.PINNED.values():
        for name, tests in entries:
            assert tests and all((REPO_ROOT / test).is_file() for test in tests), (name, tests)


def _private_uses(source: str) -> list[str]:
    """Private names of other objects or libraries in ``source``: ``x._name`` (x not self/cls), imports from
    ``_modules`` or of ``_names`` outside the package, and ``getattr/hasattr/setattr(x, "_name")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith(("selfbudget_pl", "__")):
            names = [alias.name for alias in node.names]
            if any(part.startswith("_") for part in node.module.split(".")) or any(n.startswith("_") for n in names):
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names)}")
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
            and isinstance(node.args[0], ast.Name) and node.args[0].id not in ("self", "cls")
            and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")
            and not str(node.args[1].value).startswith("__")
        ):  # fmt: skip
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_but_internals_touches_a_private_name():
    offenders = {
        str(path.relative_to(PACKAGE)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "internals.py" and (uses := _private_uses(path.read_text()))
    }
    assert not offenders, f"move these into selfbudget_pl/internals.py: {json.dumps(offenders, indent=1)}"


def test_the_private_use_scan_sees_each_kind_of_access():
    source = (
        "from torch.distributed.fsdp._runtime_utils import _reshard\n"
        "from lightning.fabric.utilities.logger import _flatten_dict\n"
        "x = trainer._logger_connector\n"
        "y = getattr(unit, '_handle', None)\n"
        "z = self._mine, cls._also_mine, getattr(self, '_rng', None), obj.__dict__\n"
    )
    assert [use.split(":")[0] for use in _private_uses(source)] == ["1", "2", "3", "4"]


# -- torch ---------------------------------------------------------------------------------------------------


def test_fsdp_accessors_on_real_fsdp1_and_fsdp2_units(tmp_path, tiny_cache):
    torchrun("internals_run", str(tmp_path))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(report) == ["fsdp1", "fsdp1_flat", "fsdp2"]
        for case, checks in report.items():
            assert checks and all(checks.values()), f"rank {rank} {case}: {checks}"


def test_every_private_import_resolves_so_no_fallback_is_silently_taken():
    """A moved name becomes None (the package still imports; _reshard's caller then skips resharding)."""
    for name in ("_convert_params", "_flatten_dict", "_apply_activation_checkpointing", "_FlatParameter", "_reshard"):
        assert callable(getattr(internals, name)), name


def test_a_moved_private_import_fails_in_its_accessor_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(internals, "_flatten_dict", None)
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    with pytest.raises(internals.InternalsChanged, match=r"tensorboard_hparams: lightning\.fabric\.utilities\.logger\._flatten_dict is no longer importable \(lightning 2\.6"):
        internals.tensorboard_hparams(logger)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))
        self.register_parameter("absent", None)
        self.register_buffer("persistent", torch.arange(4.0))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)
        self.block = _Block()
        self.shared = self.block  # one child under two names, as tied modules are
        self.register_module("empty", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x * self.scale + self.persistent)


def test_own_state_is_the_modules_own_state_dict_entries():
    holder = _Holder()
    own = internals.own_state(holder)
    assert [name for name, _ in own] == [key for key in holder.state_dict() if "." not in key] == ["scale", "persistent"]
    assert own[0][1] is holder.scale and own[1][1] is holder.persistent


def test_child_modules_keeps_every_name_of_a_shared_child_and_empty_slots():
    holder = _Holder()
    assert list(internals.child_modules(holder).items()) == [("block", holder.block), ("shared", holder.block), ("empty", None)]


def test_wrapper_names_are_transparent():
    """The names torch's checkpoint wrapper and torch.compile hold the wrapped module under (FSDP1's is
    checked on a real unit in tests/internals_run.py); a gradient flows through the checkpointed blocks."""
    holder = _Holder()
    reference = _Holder()
    reference.load_state_dict(holder.state_dict())
    internals.apply_activation_checkpointing(holder, check_fn=lambda module: isinstance(module, _Block))
    wrapper = holder.block
    assert type(wrapper) is not _Block
    (name,) = [name for name, child in internals.child_modules(wrapper).items() if isinstance(child, _Block)]
    assert name in internals.TRANSPARENT_CHILDREN
    x = torch.randn(3, 4)
    holder(x).sum().backward()
    reference(x).sum().backward()
    assert torch.allclose(holder.scale.grad, reference.scale.grad)

    compiled = torch.compile(_Block())
    (name,) = [name for name, child in internals.child_modules(compiled).items() if isinstance(child, _Block)]
    assert name in internals.TRANSPARENT_CHILDREN


def test_tensorboard_file_writer_writes_into_the_writers_event_file(tmp_path):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    file_writer = internals.tensorboard_file_writer(writer)
    file_writer.add_summary(Summary(value=[Summary.Value(tag="probe", simple_value=2.5)]), 7)
    writer.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    reader = EventAccumulator(str(events))
    reader.Reload()
    assert [(event.step, event.value) for event in reader.Scalars("probe")] == [(7, 2.5)]


# -- Lightning -----------------------------------------------------------------------------------------------


class _Probe(pl.LightningModule):
    """Logs its batch index each step and records what the logging accessors say at that moment; two
    optimizer steps per batch (manual optimisation, as GRPO's micro-batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, bool, int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        trainer = self.trainer
        self.seen.append((batch_idx, internals.logs_this_step(trainer), internals.logging_step(trainer)))
        self.log("probe", float(batch_idx), on_step=True, on_epoch=False)
        optimizer = self.optimizers()
        for half in batch.chunk(2):
            optimizer.zero_grad()
            self.manual_backward(self.layer(half).sum())
            optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logging_accessors_match_the_steps_lightning_writes_scalars_at(tmp_path):
    module = _Probe()
    data = torch.utils.data.DataLoader(torch.randn(14, 2), batch_size=2)
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    trainer = pl.Trainer(
        max_epochs=2, log_every_n_steps=3, logger=logger, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    reader = EventAccumulator(str(tmp_path))
    reader.Reload()
    written = [(int(event.value), event.step) for event in reader.Scalars("probe")]
    # Per epoch, batch_idx restarts at 0: match the records in order.
    logged = [(batch_idx, step) for batch_idx, logs, step in module.seen if logs]
    assert logged == written and 0 < len(written) < len(module.seen)
    # The x-axis counts batches, not optimizer steps (two per batch here).
    assert trainer.global_step == 2 * len(module.seen) and written[-1][1] < len(module.seen)


def test_fsdp_activation_checkpointing_is_read_from_lightnings_strategy():
    assert internals.fsdp_activation_checkpointing(FSDPStrategy(activation_checkpointing_policy={_Block}))
    assert not internals.fsdp_activation_checkpointing(FSDPStrategy())
    assert not internals.fsdp_activation_checkpointing(DDPStrategy())
    assert not internals.fsdp_activation_checkpointing(None)


def test_tensorboard_hparams_are_flattened_and_sanitised_as_lightning_logs_them(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="", version="")
    logger.log_hyperparams({"module": {"lr": 1e-5, "nested": {"G": 5}}, "matrix": np.ones((2, 2)), "names": ["a", "b"]})
    params = internals.tensorboard_hparams(logger)
    assert params["module/lr"] == 1e-5 and params["module/nested/G"] == 5
    assert params["matrix"] == str(np.ones((2, 2)))  # arrays of 2+ dimensions become strings
    assert params["names"] == str(["a", "b"])


# -- transformers --------------------------------------------------------------------------------------------


def _tiny_qwen2() -> torch.nn.Module:
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_no_split_modules_names_the_decoder_layer():
    assert internals.no_split_modules(_tiny_qwen2()) == ["Qwen2DecoderLayer"]
    assert internals.no_split_modules(torch.nn.Linear(2, 2)) == []


def test_attention_implementation_selects_a_registered_function():
    model = _tiny_qwen2()
    ids = torch.tensor([[3, 9, 27, 5, 11]])
    with torch.no_grad():
        expected = model(ids).logits
    assert internals.attention_implementation(model.config) == "sdpa"
    calls = []
    sdpa = transformers.AttentionInterface()["sdpa"]

    def counted(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    transformers.AttentionInterface.register("test_internals_counted", counted)
    transformers.AttentionMaskInterface.register(
        "test_internals_counted", transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    )
    internals.set_attention_implementation(model.config, "test_internals_counted")
    assert internals.attention_implementation(model.config) == "test_internals_counted"
    with torch.no_grad():
        logits = model(ids).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(logits, expected)


def test_a_moved_attribute_names_the_accessor_and_the_library_version():
    with pytest.raises(AttributeError, match=r"internals\.logging_step: .* \(lightning 2\.6\.\d+; checked on lightning==2\.6\.6; bash scripts/refresh_lock\.sh re-locks"):
        internals.logging_step(object())
    with pytest.raises(internals.InternalsChanged, match="attention_implementation"):
        internals.attention_implementation(object())
