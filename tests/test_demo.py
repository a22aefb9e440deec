"""`sidecar demo` works as a new user runs it: two rollouts decided, traffic on every backend, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from sidecar.config.load import parse_config
from sidecar.demo.run import DemoError, _sidecar
from sidecar.demo.scenario import MODELS, Timeline, initial_config, reloaded_config

DEMO = [sys.executable, "-m", "sidecar", "demo"]


def _urls() -> dict[str, list[str]]:
    return {name: [f"http://127.0.0.1:{9000 + i}" for i in range(len(specs))] for name, specs in MODELS.items()}


@pytest.mark.parametrize("build", [initial_config, reloaded_config])
def test_demo_configs_are_valid(build):
    """Both config files the demo writes (at the start and half-way) pass the sidecar's validation."""
    parse_config(yaml.safe_dump(build(_urls(), Timeline(20))), env={})


def _find(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    found = re.search(pattern, text, flags)
    assert found, f"{pattern!r} not in:\n{text}"
    return found


def _pid_and_ports(out: str) -> tuple[int, list[int]]:
    pid = int(_find(r"\(pid (\d+)\)", out)[1])
    sidecar = _find(r"sidecar: proxy http://127\.0\.0\.1:(\d+), admin http://127\.0\.0\.1:(\d+)", out)
    models = _find(r"model servers: (.*)", out)[1]
    ports = [int(sidecar[1]), int(sidecar[2]), *map(int, re.findall(r"127\.0\.0\.1:(\d+)", models))]
    assert len(ports) == 2 + sum(len(specs) for specs in MODELS.values())
    return pid, ports


def _assert_nothing_left(pid: int, ports: list[int]) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    for port in ports:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


def test_demo_shows_both_rollouts_and_leaves_nothing_behind():
    """`sidecar demo --duration 20` exits 0, promotes v2, rolls v3 back by a gate, and every backend had traffic."""
    res = subprocess.run([*DEMO, "--duration", "20"], capture_output=True, text=True, timeout=180)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "fraud: fraud-v2 PROMOTED" in out, out
    _find(r"fraud-eu: fraud-v3 ROLLED BACK, caught by gate \w+", out)
    assert "POST /admin/reload -> ok" in out
    for name in MODELS:
        assert int(_find(rf"^  {name} .* model saw +(\d+)$", out, re.M)[1]) > 0, f"{name} got no traffic"
        if name != "fraud-shadow":
            assert int(_find(rf"^  {name} +answered +(\d+)", out, re.M)[1]) > 0
    assert int(_find(r"mirror copies +(\d+)", out)[1]) > 0
    # Not a terminal: the legend once, then plain periodic lines.
    assert "Each line below is one look at the sidecar's admin API" in out
    assert len(re.findall(r"^\[ *\d+\.\d s\] req/s: ", out, re.M)) >= 5
    _assert_nothing_left(*_pid_and_ports(out))


def test_demo_keep_serves_the_cli_until_ctrl_c():
    """With --keep, `sidecar status` reads the kept sidecar; Ctrl-C then ends it all with exit 0."""
    proc = subprocess.Popen([*DEMO, "--duration", "10", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 150
        assert proc.stdout is not None
        for line in proc.stdout:  # the demo prints a line at least every 2 s
            lines.append(line)
            if line.startswith("Still serving") or time.monotonic() > deadline:
                break
        out = "".join(lines)
        assert lines and lines[-1].startswith("Still serving"), out
        admin = _find(r"admin (http://127\.0\.0\.1:\d+) \(pid", out)[1]
        status = subprocess.run([sys.executable, "-m", "sidecar", "status", "--admin", admin],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "fraud-eu" in status.stdout and "fraud-v2" in status.stdout
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _assert_nothing_left(*_pid_and_ports(out))


def test_ctrl_c_mid_run_stops_everything():
    """Ctrl-C while the demo runs stops the clients, the sidecar and the models at once (exit 130)."""
    proc = subprocess.Popen([*DEMO, "--duration", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"\[ *\d+\.\d s\] req/s: ", line):
                break
        out = "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, out + rest + err
        assert "Summary" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _assert_nothing_left(*_pid_and_ports(out))


async def test_a_sidecar_that_cannot_start_is_reported_with_its_log(tmp_path):
    """A sidecar that exits at start-up ends the demo's start with its last log lines, and no process left."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("listen: 127.0.0.1:0\nbackends: {}\nroutes: []\nnot_a_key: 1\n")
    with pytest.raises(DemoError, match=r"(?s)did not start.*not_a_key"):
        async with _sidecar(config, tmp_path / "sidecar.log"):
            raise AssertionError("started")
