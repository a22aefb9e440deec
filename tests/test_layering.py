"""The architecture holds: sidecar/core imports nothing that does I/O or sits above it."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "sidecar" / "core"
ALLOWED = {"__future__", "numpy", "scipy", "sidecar.core"}
STDLIB_BANNED = {"asyncio", "socket", "logging", "threading", "subprocess", "selectors", "ssl"}


def test_core_is_pure():
    """No module in sidecar/core imports asyncio, aiohttp, prometheus, logging or upper layers."""
    bad = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                upper = mod.startswith("sidecar.") and not mod.startswith("sidecar.core")
                if upper or top in STDLIB_BANNED or top in {"aiohttp", "prometheus_client", "uvloop", "yaml"} \
                        or top == "pydantic":
                    bad.append(f"{path.name}: {mod}")
    assert not bad, bad


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
