"""The package's import graph: no circle among vitscale's modules, and no package imports one above it.

Every import counts, at module top or inside a function (an import inside a function still ties the two modules
together; it only hides the tie). Importing ``a.b.c`` also runs ``a/b/__init__.py``, so that edge counts too.
Pure AST reading: nothing is imported, so the test takes well under a second.
"""
from __future__ import annotations

import ast
from pathlib import Path
import subprocess
import sys

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitscale"

# Bottom to top: a module may import only from its own layer's package or from the layers below. The longest
# matching prefix decides (config.schema is a plain list of dataclasses every layer may read; config.load composes
# the owners' checks, so it sits above them).
LAYERS = [
    ["vitscale.errors", "vitscale.faults", "vitscale.pixels", "vitscale.config.schema"],
    ["vitscale.models", "vitscale.optim", "vitscale.logging"],
    ["vitscale.objectives"],
    ["vitscale.config"],
    ["vitscale.distributed"],
    ["vitscale.data"],
    ["vitscale.weights"],
    ["vitscale.train"],
    ["vitscale.analysis", "vitscale.eval"],  # the CNN baseline trains through Trainer.step
    ["vitscale.bench", "vitscale.sweep"],
    ["vitscale.cli"],
    ["vitscale.__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vitscale modules ``module`` imports (a name imported from a module counts as that module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names] + [base]
    targets = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name.startswith("vitscale."):
            targets.add(name)
        name = name.rpartition(".")[0]
        while name.startswith("vitscale."):  # the packages above it, whose __init__ importing it runs
            if _imports_anything(modules[name]):
                targets.add(name)
            name = name.rpartition(".")[0]
    return {t for t in targets if t != module and not module.startswith(t + ".")}


def _imports_anything(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) and not (isinstance(n, ast.ImportFrom)
               and n.module == "__future__") for n in ast.walk(ast.parse(path.read_text())))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def layer_of(module: str) -> tuple[int, str]:
    best = (-1, "")
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (level, prefix)
    return best


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_circle_finder_finds_a_circle():
    # The checker itself: a planted a -> b -> c -> a circle (and an innocent d) is reported as exactly that.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if m != "vitscale" and layer_of(m)[0] < 0]
    assert not unplaced, f"modules in no layer of tests/test_architecture.py:LAYERS: {unplaced}"


def test_nothing_imports_upward():
    upward = []
    for module, targets in import_graph().items():
        if module == "vitscale":
            continue
        level, home = layer_of(module)
        for target in targets:
            t_level, t_home = layer_of(target)
            if target != "vitscale" and t_level > level or (t_level == level and t_home != home
                                                              and not _same_layer_ok(home, t_home)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


def _same_layer_ok(home: str, target_home: str) -> bool:
    # Packages of one layer are siblings: they do not import each other (bottom layer excepted: small leaves).
    return layer_of(home)[0] == 0


@pytest.mark.parametrize("module", ["vitscale.logging"])
def test_logging_needs_neither_data_nor_objectives(module):
    graph = import_graph()
    reach, todo = set(), [m for m in graph if m == module or m.startswith(module + ".")]
    while todo:
        m = todo.pop()
        for t in graph[m]:
            if t not in reach:
                reach.add(t)
                todo.append(t)
    assert not {m for m in reach if m.startswith(("vitscale.data", "vitscale.objectives"))}


def test_the_command_line_parses_before_torch_loads():
    """Every `vitscale` call registers all subcommands first: none of their parsers may import torch, numpy or
    PIL (1.2-2.6 s here), or `vitscale --help`, a mistyped option and the train command's 'loading PyTorch' line
    all wait for it. Run in a fresh interpreter: this test process has imported torch long ago."""
    code = ("import sys; from vitscale.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
