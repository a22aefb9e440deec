"""`sidecar demo` works end to end on a fresh install: every section prints and no client errs."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_shows_every_capability():
    """The demo exits 0 and shows the split, retries, shadow agreement, drift, streaming and blue-green."""
    res = subprocess.run([sys.executable, "-m", "sidecar", "demo", "--seconds", "4"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for section in ("traffic: the canary split", "resilience:", "shadow:", "drift:", "streaming:", "blue-green:"):
        assert section in out
    assert "client errors: 0" in out
    assert "next 50 requests answered by: {'canary': 50}" in out
    assert "agreement" in out and "DRIFTED" in out
