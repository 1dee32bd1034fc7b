"""The package's layout is its architecture: rooms that import only the rooms before them, no import cycle between
modules, no module over 500 lines. Imports are read from the source (function-level ones included), not executed."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deepseek_vl2_lora"
# Each room may import the rooms before it (lower rank) and itself; the top-level entry points may import anything.
RANKS = {"model": 0, "policy": 1, "data": 2, "evaluation": 3, "training": 4, "plan": 5, "compare": 5}
# python -m deepseek_vl2_lora.eval / .manifest / .export; cli: the console commands (vl2-train, vl2-merge, ...)
ENTRY_POINTS = {"eval", "manifest", "export", "cli"}
BASE = {"", "_compat"}  # the package root (lazy_exports, REPO_ROOT) and the torchvision shim: imported by all
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports (a `from pkg import sub` counts as importing `pkg.sub`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("deepseek_vl2_lora"):
                    continue
                base = node.module.removeprefix("deepseek_vl2_lora").lstrip(".")
            else:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("deepseek_vl2_lora"):
                    found.add(alias.name.removeprefix("deepseek_vl2_lora").lstrip("."))
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[0]


def test_every_module_lives_in_a_room_or_is_an_entry_point(graph):
    top_level = sorted(m for m in graph if "." not in m and m not in RANKS)
    assert set(top_level) <= ENTRY_POINTS | BASE, top_level
    assert len(top_level) <= 6  # the acceptance's "at most 6 modules" at the top ("" is __init__ itself)


def _against_layering(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imported in graph.items():
        room = _room(module)
        if room in ENTRY_POINTS or module in BASE:
            continue
        for target in imported:
            to = _room(target)
            if target in BASE or to == room:
                continue
            if to in ENTRY_POINTS or RANKS[to] >= RANKS[room]:
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_rooms_import_only_the_rooms_before_them(graph):
    wrong = _against_layering(graph)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_model_imports_no_hydra_and_nothing_above_it():
    for path in (PACKAGE / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n.split(".")[0] in ("hydra", "omegaconf") for n in names), path


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The walk above must be able to fail: a planted upward import and cycle in a copy of two modules."""
    modules = {"model.a": tmp_path / "a.py", "training.b": tmp_path / "b.py"}
    modules["model.a"].write_text("from ..training.b import x\n")
    modules["training.b"].write_text("def f():\n    from ..model.a import y\n")
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"model.a": {"training.b"}, "training.b": {"model.a"}}
    assert _against_layering(graph) == ["model.a -> training.b"]
    assert _cycles(graph) == ["model.a -> training.b -> model.a"]
