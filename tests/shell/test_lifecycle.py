"""The real `sidecar run` process: SIGTERM drains, in-flight requests finish, exit code 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests import upstreams as u


async def start_process(config: dict[str, object], tmp_path: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "sidecar exited before serving"
            if m := re.search(r"serving on [^:]+:(\d+), admin on [^:]+:(\d+)", json.loads(line)["message"]):
                return proc, int(m.group(1)), int(m.group(2))


async def test_sigterm_drains_in_flight_request_and_exits_0(upstreams, tmp_path):
    """SIGTERM: readiness 503 at once, the slow in-flight request completes, new connections stop, exit 0."""
    up = await upstreams.start(u.slow(1.5))
    cfg = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "access_log": False,
           "drain": {"delay": "300ms", "grace": "10s"},
           "backends": {"m": {"url": up.url}}, "routes": [{"name": "r", "split": {"m": 1}}]}
    proc, port, admin = await start_process(cfg, tmp_path)
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.post(f"http://127.0.0.1:{port}/x", data=b"{}"))
        await up.wait_in_flight(1)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
            assert r.status == 503
        async with s.get(f"http://127.0.0.1:{admin}/healthz") as r:
            assert r.status == 200
        resp = await slow
        assert resp.status == 200
        assert (await resp.json())["predictions"] == [0.5]
        assert resp.headers.get("connection", "").lower() == "close"
        resp.release()
    code = await asyncio.wait_for(proc.wait(), 15)
    assert code == 0
    assert 1.2 < time.perf_counter() - t0 < 8
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        raise AssertionError("the listener still accepts after exit")
    except OSError:
        pass


async def test_drain_that_must_cut_requests_exits_1(upstreams, tmp_path):
    """A request still running when drain.grace ends is cut, and the exit code says so."""
    up = await upstreams.start(u.hang())
    cfg = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "access_log": False,
           "drain": {"delay": 0, "grace": "300ms"},
           "backends": {"m": {"url": up.url}}, "routes": [{"name": "r", "split": {"m": 1}, "timeout": "30s"}]}
    proc, port, _ = await start_process(cfg, tmp_path)
    async with aiohttp.ClientSession() as s:
        stuck = asyncio.ensure_future(s.post(f"http://127.0.0.1:{port}/x", data=b"{}"))
        await up.wait_in_flight(1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 1
        try:
            resp = await stuck
            resp.release()
        except aiohttp.ClientError:
            pass
