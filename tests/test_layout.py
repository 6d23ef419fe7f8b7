"""The tree keeps the shape the house style asks for: small files, data flowing one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def module_name(path: Path, root: Path) -> str:
    """The name a file is imported under: kernels/ is fastcog.kernels, bench/throughput_lib is top level."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "kernels":
        parts[:1] = ["fastcog", "kernels"]
    elif parts[0] == "bench":
        parts = parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of `known` that `path` imports anywhere (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_cycles(files: list[Path], root: Path = ROOT) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    names = {module_name(p, root): p for p in files}
    graph = {n: imports_of(p, n, set(names)) for n, p in names.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    files = [p for folder in ("fastcog", "kernels", "bench") for p in (ROOT / folder).rglob("*.py")]
    assert import_cycles(files) == []


def test_import_cycles_are_found(tmp_path):
    """Control: two modules that import each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    (tmp_path / "c.py").write_text("import a\n")
    assert import_cycles([tmp_path / n for n in ("a.py", "b.py", "c.py")], tmp_path) == [["a", "b"]]


def test_no_file_over_the_line_budget():
    long = {str(p.relative_to(ROOT)): n for folder in ("fastcog", "kernels") for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_test_modules_do_not_import_each_other():
    """Shared test helpers live in helper modules (tests/runs.py, ...), never in a test module."""
    offenders = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        name = module_name(path, ROOT)
        known = {module_name(p, ROOT) for p in (ROOT / "tests").rglob("test_*.py")}
        if found := imports_of(path, name, known):
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert offenders == {}
