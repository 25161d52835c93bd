"""Imports run one way (ARCHITECTURE.md): no module of the package sits in an import circle, and the numeric
methods in onnxshrink/algorithms/ know nothing of ONNX (issue 15, "Where the code goes").

prune -> dead_units -> prune_channels -> prune was such a circle: the three shared private helpers, which now
live in passes/prune_common.py and passes/channel_chains.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxshrink"


def _modules(package: Path) -> dict[str, Path]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path) -> set[str]:
    """Every module name the file imports, function-local imports included; relative ones made absolute."""
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> modules of the package it imports (function-local imports included: they tie modules together too)."""
    modules = _modules(package)
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target in imported(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != package.name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def reaches(graph, start, goal) -> bool:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        for nxt in graph[current]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def circular(graph) -> list[str]:
    return sorted(m for m in graph if reaches(graph, m, m))


def test_no_module_of_the_package_sits_in_an_import_circle():
    graph = import_graph()
    assert "onnxshrink.passes.prune" in graph and "onnxshrink.algorithms.gptq" in graph
    assert circular(graph) == [], {m: sorted(graph[m]) for m in circular(graph)}


def test_the_circle_check_finds_a_circle_through_a_function_local_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (package / "sub" / "c.py").write_text("import pkg.a\n")
    (package / "low.py").write_text("import numpy\n")
    graph = import_graph(package)
    assert circular(graph) == ["pkg.a", "pkg.sub.b", "pkg.sub.c"]


def test_the_numeric_methods_import_no_onnx_and_no_other_part_of_the_package():
    modules = {name: path for name, path in _modules(PACKAGE).items() if name.startswith("onnxshrink.algorithms")}
    assert {"onnxshrink.algorithms.codebook", "onnxshrink.algorithms.gptq", "onnxshrink.algorithms.reconstruct"} <= set(modules)
    for name, path in modules.items():
        outside = {m for m in imported(name, path)
                   if m.split(".")[0] in ("onnx", "onnxruntime", "onnx_ir")
                   or m.startswith("onnxshrink") and not m.startswith("onnxshrink.algorithms")}
        assert outside == set(), name
