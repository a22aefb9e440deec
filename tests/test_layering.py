"""The architecture holds: sidecar/core imports nothing that does I/O or sits above it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "sidecar" / "core"
ALLOWED = {"__future__", "numpy", "scipy", "sidecar"}
# httptools is llhttp, a C parser with no I/O (what aiohttp and uvicorn parse with); only the
# sans-IO answer parser wraps it (see its docstring)
ALLOWED_IN = {"http1.py": {"httptools"}}
STDLIB_BANNED = {"asyncio", "socket", "logging", "threading", "subprocess", "selectors", "ssl"}


def impure_imports(path: Path) -> list[str]:
    """The imports of one core module that the allow-list does not admit."""
    allowed = ALLOWED | ALLOWED_IN.get(path.name, set())
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        for mod in mods:
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
        "other.py: httptools", "other.py: aiohttp", "other.py: asyncio", "other.py: sidecar.shell"]
    assert impure_imports(tmp_path / "http1.py") == [
        "http1.py: aiohttp", "http1.py: asyncio", "http1.py: sidecar.shell"]


def test_layers_flow_one_way():
    """config never imports shell, cli or demo; shell never imports cli or demo."""
    root = CORE.parent
    rules = {"config": ("sidecar.shell", "sidecar.cli", "sidecar.demo"), "shell": ("sidecar.cli", "sidecar.demo")}
    bad = []
    for layer, banned in rules.items():
        for path in (root / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(banned):
                    bad.append(f"{layer}/{path.name}: {node.module}")
    assert not bad, bad
