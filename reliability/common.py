"""What every reliability run shares: how a client's answer is classified, and how a real
`sidecar run` process is started and observed (RSS, open fds, tasks from /metrics).

An answer is classified once, as (status, kind):
    (status, "backend")     the backend's answer (it carries x-sidecar-backend)
    (status, <error.type>)  an error the sidecar made (docs/reference/http.md#errors, no x-sidecar-backend)
    (status, "cut")         the head arrived, the body was cut (a broken stream, docs/reference/http.md)
    (0, "conn:<Exception>") no answer at all: the only kind that can count as lost
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml

Outcome = tuple[int, str]


async def send(session: aiohttp.ClientSession, method: str, url: str, *, data: bytes | None = None,
               headers: dict[str, str] | None = None, expect_body: bytes | None = None) -> Outcome:
    """One request, its answer read to the end and classified."""
    try:
        async with session.request(method, url, data=data, headers=headers) as r:
            try:
                body = await r.read()
            except aiohttp.ClientPayloadError:
                return r.status, "cut"
            if "x-sidecar-backend" in r.headers:
                if expect_body is not None and body != expect_body:
                    return r.status, "backend:altered"
                return r.status, "backend"
            try:
                return r.status, str(json.loads(body)["error"]["type"])
            except (ValueError, KeyError, TypeError):
                return r.status, "unclassified"
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        return 0, f"conn:{type(e).__name__}"


def describe(counts: Counter[Outcome]) -> str:
    """`48 x 200 backend, 2 x 502 upstream_error`, most frequent first."""
    return ", ".join(f"{n} x {s} {k}" if s else f"{n} x {k}" for (s, k), n in counts.most_common())


# --- a real `sidecar run` process ------------------------------------------------------------


async def start_process(config: dict[str, Any], path: Path,
                        env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, int, int]:
    """Write `config` to `path`, run `python -m sidecar run -c path`, wait until it serves."""
    path.write_text(yaml.safe_dump(config))  # noqa: ASYNC240 - a few bytes, before the run starts
    # the log goes to a file next to the config: an unread pipe would fill up and block the
    # sidecar's log thread (and its exit, which flushes it)
    log_path = path.with_suffix(".log")
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "-c", str(path), "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    admin = int(config["admin"]["listen"].rsplit(":", 1)[1])
    port = int(config["listen"].rsplit(":", 1)[1])
    async with asyncio.timeout(20), aiohttp.ClientSession() as s:
        while True:
            if proc.returncode is not None:
                raise RuntimeError("sidecar exited: " + log_path.read_text()[-2000:])
            try:
                async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                    if r.status == 200:
                        return proc, port, admin
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stop_process_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group still running, then SIGKILL any that is not gone in 10 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose label text contains `labels`."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total
