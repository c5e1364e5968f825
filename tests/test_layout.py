"""The package's layering (docs/architecture.md), checked on the source: every module has a layer and
an opening docstring, no import runs upward, none hides inside a function, and imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "selfbudget_pl"

# Lowest first; a module may import from its own layer or below. Keep in step with docs/architecture.md.
LAYERS: dict[str, int] = {
    # 0: the output format and the data
    "format": 0, "data": 0, "tensors": 0, "schema": 0, "plots": 0, "internals": 0,
    # 1: models and their weights
    "tiny_model": 1, "checkpoints": 1, "models": 1, "weights": 1,
    # 2: producing completions, then judging them
    "rollout": 2, "rewards": 3, "metrics": 3,
    # 5: training
    "config": 5, "memory": 5, "strategies": 5, "launcher_env": 5, "callbacks": 5, "loggers": 5, "modules": 6,
    # 7: entry points
    "train": 7, "plan": 8, "lightning_cli": 8, "eval_report": 7, "pipeline_progress": 7, "evaluate": 8, "reproduce": 9, "labelling": 8, "generate": 8, "cli": 9,
}
# Entry points whose imports are lazy on purpose: `selfbudget --help` answers without loading torch.
LAZY_IMPORTS_ALLOWED = {"cli"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    if top not in LAYERS:
        raise KeyError(top)
    return LAYERS[top]


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of the package in ``path``."""
    tree = ast.parse(path.read_text())
    top_level: set[int] = set()

    def executed_on_import(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # runs when called, not when imported
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only: never executed
            top_level.add(id(node))
            for field in ("body", "orelse", "finalbody", "handlers"):
                executed_on_import(getattr(node, field, []))

    executed_on_import(tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfbudget_pl"):
            names = [node.module] if node.module != "selfbudget_pl" else [f"selfbudget_pl.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("selfbudget_pl")]
        else:
            continue
        for name in names:
            if name != "selfbudget_pl":
                found.append((name.removeprefix("selfbudget_pl."), node.lineno, id(node) in top_level))
    return found


def test_every_module_has_a_layer_and_a_docstring():
    for name, path in modules().items():
        if name:
            assert name.split(".")[0] in LAYERS, f"{path}: place it in a layer (tests/test_layout.py, docs/architecture.md)"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path}: open with a docstring stating its one job"


@pytest.mark.parametrize("name", [name for name in modules() if name])
def test_imports_run_down_and_at_module_level(name):
    path = modules()[name]
    for target, line, at_top in package_imports(path):
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        assert at_top or name in LAZY_IMPORTS_ALLOWED, f"{where} inside a function"
        assert layer_of(target) <= layer_of(name), f"{where}, a layer above it (docs/architecture.md)"


def test_imports_form_no_cycle():
    known = modules()
    graph = {
        name: {target for target, _, at_top in package_imports(path) if at_top and target in known and target != name}
        for name, path in known.items()
    }
    # A package's __init__ runs before its modules: a module importing its own package is no cycle.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
