"""Checking a config node against a schema: a dataclass per constructor, one field per argument.

A schema lives beside its class, which checks its own arguments with it (:func:`check_arguments`): each
rule is stated once, and the config layer checks the same rules before anything loads, naming the key.

A schema field's type says what a value may be (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``,
``list[...]``, ``dict[str, ...]``, another schema, or :class:`Target`: a node with a ``_target_`` checked
against that target's own schema), and :func:`spec` adds the rest: bounds, choices, a custom rule, and a
rule for values that are legal but surprising (logged once as a warning). Every finding names the full
key (``module.micro_batch_size``), the value and what is allowed; :func:`check_node` collects them all
so one run reports every bad value at once.

Floats must be finite unless a field says otherwise: a NaN weight or learning rate is never what anyone
meant, and it turns every number downstream into NaN or 0 silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

# Keys Hydra reads itself; never a constructor argument.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})

Rule = Callable[[Any], Optional[str]]  # value -> what is wrong with it (None: fine)


class _Unresolved:
    """A value whose interpolation cannot be resolved where the check runs (e.g. ``${hydra:...}`` under
    the compose API); it is not checked."""

    def __repr__(self) -> str:
        return "<unresolved>"


UNRESOLVED = _Unresolved()


class ConfigError(ValueError):
    """Config values that cannot run; the message has one line per value: ``key=value: what is allowed``."""


class Target:
    """Type marker: a node built with ``hydra.utils.instantiate``; checked against the schema registered
    for its ``_target_`` (a target with no schema, e.g. a user's own class, is left to its constructor)."""


class Schema:
    """Base of every schema dataclass.

    ``TARGETS``: the dotted paths of the callables it describes (what ``_target_`` says).
    ``INJECTED``: constructor arguments that the entry point passes in code, never from config.
    ``OPEN``: other keys pass through to the target unchecked (``**kwargs`` forwarded elsewhere).
    """

    TARGETS: ClassVar[tuple[str, ...]] = ()
    INJECTED: ClassVar[tuple[str, ...]] = ()
    OPEN: ClassVar[bool] = False

    @classmethod
    def check_together(cls, node: Mapping[str, Any], key: str, findings: "Findings") -> None:
        """Rules that involve several fields of one node (e.g. ``min <= max``); the default has none."""


def spec(
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    choices: Optional[Sequence[Any]] = None,
    rule: Optional[Rule] = None,
    warn: Optional[Rule] = None,
    finite: bool = True,
    note: str = "",
) -> Any:
    """A schema field: bounds (``ge``/``gt``/``le``/``lt``), ``choices``, an extra ``rule``, a ``warn`` rule
    for surprising values, whether floats must be ``finite``, and a ``note`` appended to the allowed text
    (e.g. what null means). The default is None: defaults live in the constructors and configs."""
    metadata = dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, rule=rule, warn=warn, finite=finite, note=note)
    return dataclasses.field(default=None, metadata=metadata)


@dataclasses.dataclass
class Finding:
    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.key}={_show(self.value)}: {self.message}"


class Findings:
    """Errors and warnings gathered over a whole config."""

    _warned: ClassVar[set[str]] = set()  # each warning is logged once per process

    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, key: str, value: Any, message: str) -> None:
        self.errors.append(Finding(key, value, message))

    def warning(self, key: str, value: Any, message: str) -> None:
        self.warnings.append(Finding(key, value, message))

    def raise_or_warn(self, what: str = "config") -> None:
        """Log the warnings (once each); raise :class:`ConfigError` listing every error."""
        for finding in self.warnings:
            text = str(finding)
            if text not in self._warned:
                self._warned.add(text)
                log.warning("%s", text)
        if len(self.errors) == 1:
            raise ConfigError(f"bad {what} value: {self.errors[0]}")
        if self.errors:
            lines = "\n".join(f"  {finding}" for finding in self.errors)
            raise ConfigError(f"{len(self.errors)} bad {what} values:\n{lines}")


REGISTRY: dict[str, type[Schema]] = {}


def register(*schemas: type[Schema]) -> None:
    """Make ``schemas`` the ones that nodes with their ``_target_`` are checked against."""
    for schema in schemas:
        for target in schema.TARGETS:
            REGISTRY[target] = schema


def schema_for(node: Mapping[str, Any]) -> Optional[type[Schema]]:
    target = node.get("_target_")
    return REGISTRY.get(target) if isinstance(target, str) else None


def check_target(node: Any, key: str, findings: Findings) -> None:
    """Check a node built by ``instantiate`` against its target's schema, if one is registered."""
    if not isinstance(node, Mapping):
        findings.error(key, node, "must be a config node with a `_target_`")
        return
    schema = schema_for(node)
    if schema is not None:
        check_node(node, schema, key, findings)


def check_node(node: Mapping[str, Any], schema: type[Schema], key: str, findings: Findings) -> None:
    """Check every key of ``node`` (a plain, resolved mapping) against ``schema``; ``key`` is its full key."""
    fields = {field.name: field for field in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for name, value in node.items():
        if name in HYDRA_KEYS:
            continue
        full = _joined(key, str(name))
        if name not in fields:
            if not schema.OPEN:
                findings.error(full, value, _unknown_key(str(name), list(fields), _described(node, schema)))
            continue
        check_value(value, hints[name], fields[name].metadata, full, findings)
    schema.check_together(node, key, findings)


def check_arguments(schema: type[Schema], arguments: Mapping[str, Any], owner: str) -> None:
    """A constructor's check of its own ``arguments`` (its ``locals()``; names outside ``schema`` are ignored)
    against ``schema``: raises ValueError naming every bad argument, ``owner: name=value: what is allowed``."""
    hints = typing.get_type_hints(schema)
    names = {field.name for field in dataclasses.fields(schema)}
    checked = {
        name: os.fspath(value) if isinstance(value, os.PathLike) else value  # a path object is a path
        for name, value in arguments.items()
        if (name in names and not _built_in_code(value, hints[name])) or (name not in names and schema.OPEN)
    }  # fmt: skip
    findings = Findings()
    check_node(checked, schema, "", findings)
    if findings.errors:
        raise ValueError(f"{owner}: " + "; ".join(str(finding) for finding in findings.errors))


def not_blank(value: str) -> Optional[str]:
    """A :func:`spec` rule: the string holds more than whitespace."""
    return None if value.strip() else "is empty"


def _built_in_code(value: Any, kind: Any) -> bool:
    """Whether a nested part was passed as the object it builds rather than as its config node (or a list
    of them): its own constructor checked it."""
    inner, _ = _unwrap_optional(kind)
    if typing.get_origin(inner) is list and isinstance(value, (list, tuple)):
        return any(_built_in_code(item, typing.get_args(inner)[0]) for item in value)
    node_kind = inner is Target or (isinstance(inner, type) and issubclass(inner, Schema))
    return node_kind and value is not None and not isinstance(value, Mapping)


def check_ordered(node: Mapping[str, Any], key: str, findings: Findings, low: str, high: str) -> None:
    """For :meth:`Schema.check_together`: ``node[low] <= node[high]`` when both are numbers."""
    a, b = node.get(low), node.get(high)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
        findings.error(_joined(key, low), a, f"must be <= {_joined(key, high)}={b}")


def _joined(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def check_value(value: Any, kind: Any, meta: Mapping[str, Any], key: str, findings: Findings) -> None:
    """Check one value against a field's type and :func:`spec` settings."""
    if value is UNRESOLVED:
        return
    allowed = describe(kind, meta)
    problem = _type_problem(value, kind, meta, key, findings)
    if problem is not None:
        findings.error(key, value, f"{problem}; must be {allowed}")
        return
    if value is None:
        return
    if _bounds_problem(value, meta):
        findings.error(key, value, f"must be {allowed}")
        return
    problem = meta.get("rule") and meta["rule"](value)
    if problem:
        findings.error(key, value, problem)
        return
    surprise = meta.get("warn") and meta["warn"](value)
    if surprise:
        findings.warning(key, value, surprise)


def describe(kind: Any, meta: Mapping[str, Any]) -> str:
    """What a field allows, in words: ``an integer >= 1, or null (null: the whole batch)``."""
    inner, nullable = _unwrap_optional(kind)
    text = _kind_words(inner)
    if inner is float and meta.get("finite", True):
        text = "a finite number"
    if meta.get("choices") is not None:
        text = "one of " + ", ".join(_show(choice) for choice in meta["choices"])
    bounds = [f"{op} {_show(meta[name])}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta.get(name) is not None]
    if bounds:
        text += " " + " and ".join(bounds)
    if nullable:
        text += ", or null"
    if meta.get("note"):
        text += f" ({meta['note']})"
    return text


# -- helpers -----------------------------------------------------------------------------------


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        nullable = len(args) < len(typing.get_args(kind))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), nullable
    return kind, kind is Any


def _kind_words(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin is list:
        return f"a list of {_plural(typing.get_args(kind)[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(typing.get_args(kind)[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_kind_words(arg) for arg in typing.get_args(kind))
    return {
        int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "any value",
        Target: "a config node with a `_target_`",
    }.get(kind, f"a config node ({getattr(kind, '__name__', kind)})")


def _plural(kind: Any) -> str:
    return {int: "integers", float: "numbers", bool: "booleans", str: "strings",
            Target: "config nodes with a `_target_`"}.get(kind, _kind_words(kind))


def _type_problem(value: Any, kind: Any, meta: Mapping[str, Any], key: str, findings: Findings) -> Optional[str]:
    """Why ``value`` is not of ``kind`` (None when it is; nested nodes are checked, reporting themselves)."""
    inner, nullable = _unwrap_optional(kind)
    if value is None:
        return None if nullable else "null is not allowed"
    if inner is Any:
        return None
    origin = typing.get_origin(inner)
    if origin in (Union, types.UnionType):
        fits = [arg for arg in typing.get_args(inner) if _type_problem(value, arg, meta, key, Findings()) is None]
        if not fits:
            return f"is {_kind_name(value)}"
        return _type_problem(value, fits[0], meta, key, findings)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return f"is {_kind_name(value)}, not a list"
        (item_kind,) = typing.get_args(inner)
        for index, item in enumerate(value):
            check_value(item, item_kind, _item_meta(meta), f"{key}[{index}]", findings)
        return None
    if origin is dict:
        if not isinstance(value, Mapping):
            return f"is {_kind_name(value)}, not a mapping"
        item_kind = typing.get_args(inner)[1]
        for name, item in value.items():
            check_value(item, item_kind, _item_meta(meta), f"{key}.{name}", findings)
        return None
    if inner is Target:
        check_target(value, key, findings)
        return None
    if isinstance(inner, type) and issubclass(inner, Schema):
        if not isinstance(value, Mapping):
            return f"is {_kind_name(value)}, not a config node"
        nested = schema_for(value) or inner
        check_node(value, nested, key, findings)
        return None
    if inner is bool:
        return None if isinstance(value, bool) else f"is {_kind_name(value)}"
    if inner is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"is {_kind_name(value)}"
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"is {_kind_name(value)}"
        if meta.get("finite", True) and not math.isfinite(value):
            return "is not a finite number"
        return None
    if inner is str:
        return None if isinstance(value, str) else f"is {_kind_name(value)}"
    raise TypeError(f"schema type {inner!r} at {key} is not supported")


def _item_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Bounds, choices and finiteness apply to each item of a list or mapping; whole-value rules do not."""
    return {**meta, "rule": None, "warn": None, "note": ""}


def _bounds_problem(value: Any, meta: Mapping[str, Any]) -> Optional[str]:
    if meta.get("choices") is not None:
        return None if value in meta["choices"] else "is not a known choice"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for name, fails, op in (
            ("ge", lambda v, b: v < b, ">="), ("gt", lambda v, b: v <= b, ">"),
            ("le", lambda v, b: v > b, "<="), ("lt", lambda v, b: v >= b, "<"),
        ):  # fmt: skip
            bound = meta.get(name)
            if bound is not None and fails(value, bound):
                return f"must be {op} {_show(bound)}"
    return None


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list",
            dict: "a mapping"}.get(type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__)


def _unknown_key(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"is not an argument of {what}{hint} (it takes: {', '.join(sorted(known))})"


def _described(node: Mapping[str, Any], schema: type[Schema]) -> str:
    target = node.get("_target_")
    return str(target) if target else schema.__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 80 else text[:77] + "..."
