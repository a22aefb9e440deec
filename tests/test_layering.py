"""The architecture holds: sidecar/core imports nothing that does I/O or sits above it; the
layers import one way; only the CLI and the demo import the server; no module imports
itself through others."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sidecar"
CORE = ROOT / "core"
ALLOWED = {"__future__", "numpy", "scipy", "sidecar"}
# httptools is llhttp, a C parser with no I/O (what aiohttp and uvicorn parse with); only the
# sans-IO answer parser wraps it (see its docstring)
ALLOWED_IN = {"http1.py": {"httptools"}}
STDLIB_BANNED = {"asyncio", "socket", "logging", "threading", "subprocess", "selectors", "ssl"}
SERVER = "sidecar.shell.server"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, at any depth of its code (TYPE_CHECKING blocks and
    function bodies included): `from a.b import c` names `a.b.c` when that is a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` steps up
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            yield base
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}"


def impure_imports(path: Path) -> list[str]:
    """The imports of one core module that the allow-list does not admit."""
    allowed = ALLOWED | ALLOWED_IN.get(path.name, set())
    bad = []
    for mod in imports(path):
        top = mod.split(".")[0]
        upper = mod.startswith("sidecar.") and not mod.startswith("sidecar.core")
        stdlib = top in sys.stdlib_module_names and top not in STDLIB_BANNED
        if upper or not (stdlib or top in allowed):
            bad.append(f"{path.name}: {mod}")
    return bad


def test_core_is_pure():
    """sidecar/core imports only I/O-free stdlib, numpy, scipy, itself, and httptools in http1.py."""
    bad = [b for path in sorted(CORE.glob("*.py")) for b in impure_imports(path)]
    assert not bad, bad


def test_purity_check_is_an_allow_list(tmp_path):
    """httptools outside http1.py, aiohttp, asyncio or an upper layer in core would be caught."""
    src = "import httptools\nimport aiohttp\nimport asyncio\nfrom sidecar.shell import proxy\nimport math\n"
    (tmp_path / "other.py").write_text(src)
    (tmp_path / "http1.py").write_text(src)
    assert impure_imports(tmp_path / "other.py") == [
        "other.py: httptools", "other.py: aiohttp", "other.py: asyncio", "other.py: sidecar.shell",
        "other.py: sidecar.shell.proxy"]
    assert impure_imports(tmp_path / "http1.py") == [
        "http1.py: aiohttp", "http1.py: asyncio", "http1.py: sidecar.shell", "http1.py: sidecar.shell.proxy"]


def test_layers_flow_one_way():
    """config never imports shell, cli or demo; shell never imports cli or demo."""
    rules = {"config": ("sidecar.shell", "sidecar.cli", "sidecar.demo"), "shell": ("sidecar.cli", "sidecar.demo")}
    bad = [f"{layer}/{path.name}: {mod}"
           for layer, banned in rules.items() for path in (ROOT / layer).rglob("*.py")
           for mod in imports(path) if mod.startswith(banned)]
    assert not bad, bad


def test_only_the_cli_and_the_demo_import_the_server():
    """Inside the shell the server owns everything and nothing reaches back for it: admin and
    reload see it through their Protocols (AdminHost, ReloadHost)."""
    allowed = ("sidecar.cli", "sidecar.demo")
    bad = [name for name, path in MODULES.items()
           if SERVER in set(imports(path)) and not name.startswith(allowed) and name != SERVER]
    assert not bad, bad


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_finds_a_cycle():
    """The cycle finder itself: a ring of three is one cycle, a chain none."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_import_cycles():
    """No sidecar module imports itself through others, not even for type checking."""
    graph = {name: {m for m in imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    assert find_cycles(graph) == []
