"""Count config rules stated twice: a bound, choice list or rule that a schema in ``config/groups.py`` checks
for an argument, and that the constructor it describes checks again (an ``if`` on that argument whose body
raises). A heuristic over the AST, for before/after comparisons of the config layer's design: a lower bound,
since it misses rules checked in functions the constructor calls and rules over several fields.

    python benchmarks/count_rules.py            # the total, then one line per rule stated twice
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap

import selfbudget_pl.config.groups  # noqa: F401  (registers every schema)
from selfbudget_pl.schema import Schema


def _schemas() -> list[type[Schema]]:
    found, todo = [], list(Schema.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _resolve(path: str) -> object:
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _target_sources(obj: object) -> list[str]:
    functions = [obj.__dict__.get("__init__"), obj.__dict__.get("__post_init__")] if inspect.isclass(obj) else [obj]
    sources = []
    for fn in functions:
        try:
            sources.append(textwrap.dedent(inspect.getsource(fn)))
        except (TypeError, OSError):  # absent, or a dataclass's generated __init__ (no checks of its own)
            continue
    return sources


def _checked_arguments(source: str) -> set[str]:
    """Names tested by an ``if`` whose body raises."""
    checked = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in ast.walk(node) if s is not node.test):
            checked |= {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
    return checked


def main() -> None:
    twice = []
    for schema in _schemas():
        constrained = [
            f.name for f in dataclasses.fields(schema)
            if any(f.metadata.get(k) is not None for k in ("ge", "gt", "le", "lt", "choices", "rule"))
        ]  # fmt: skip
        for obj in {id(o): o for o in map(_resolve, schema.TARGETS)}.values():  # one class may have two paths
            checked = set().union(*(_checked_arguments(s) for s in _target_sources(obj)))
            where = f"{obj.__module__}.{obj.__qualname__}"
            twice += [f"{where}: {name} ({schema.__name__})" for name in constrained if name in checked]
    print(f"rules stated twice (schema and constructor): {len(twice)}")
    for line in sorted(set(twice)):
        print("  " + line)


if __name__ == "__main__":
    main()
