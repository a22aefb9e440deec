#!/usr/bin/env python3
"""CPU instructions per request of sidecar configs, counted by valgrind's callgrind.

The bench harness measures throughput, which moves by 10-20 % between runs on a shared VM.
Instruction counts do not: callgrind counts what the sidecar process executes, whatever else
the machine does. This script prices one config against another by that count:

    python3 bench/instructions.py ../shared/bench/configs/sidecar.yaml \\
        bench/configs/sidecar-resilience.yaml --requests 3000

For each config: a fixed-answer upstream (two ports, "stable" and "canary", in this process)
is started, the config's `@PORT@`, `@ADMIN_PORT@`, `@STABLE_PORT@`, `@CANARY_PORT@` and
`@RUN_DIR@` placeholders are filled in, and `sidecar run` starts under callgrind with
instrumentation off. After a warm-up the counters are zeroed and instrumentation switched on, `--requests`
POSTs of the bench's payload are sent over `--connections` keep-alive connections, then the
counters are dumped. Printed: instructions per request, and each config against the first.

Everything the sidecar does in that window counts, timers included: health checks every
second are charged to the requests (conservatively: under callgrind the window lasts far
longer than the requests would take natively). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
PAYLOAD = (b'{"instances": [{"amount": 42.5, "country": "DE", "merchant": "m-1234", "hour": 13, '
           b'"device": "ios", "history": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}]}')
ANSWER = b'{"predictions": [0.0123], "model_version": "1", "explanations": {"amount": 0.4, "country": 0.1}}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_upstream(port: int) -> web.ServerRunner:
    async def handle(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def drive(url: str, n: int, connections: int) -> None:
    """`n` POSTs over `connections` keep-alive connections; every answer must be a 200."""
    left = n

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=PAYLOAD, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"instructions.py: answer {r.status} from the sidecar")

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))


async def wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.5)
    raise SystemExit(f"instructions.py: the sidecar did not open port {port} within {timeout_s:.0f}s")


async def callgrind_control(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("callgrind_control", *args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    if await asyncio.wait_for(proc.wait(), 120):
        raise SystemExit(f"instructions.py: callgrind_control {' '.join(args)} failed")


def render(config: Path, work: Path) -> tuple[Path, dict[str, int]]:
    ports = {"PORT": free_port(), "ADMIN_PORT": free_port(), "STABLE_PORT": free_port(), "CANARY_PORT": free_port()}
    names: dict[str, object] = {**ports, "RUN_DIR": work}
    text = re.sub(r"@([A-Z_]+)@", lambda m: str(names.get(m.group(1), m.group(0))), config.read_text())
    rendered = work / config.name
    rendered.write_text(text)
    return rendered, ports


def callgrind_total(prefix: str) -> int:
    """The instruction count (Ir) of the dumps callgrind wrote for one process."""
    total = 0
    for dump in glob.glob(prefix + "*"):
        with open(dump) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
    if not total:
        raise SystemExit(f"instructions.py: no callgrind totals in {prefix}*")
    return total


async def measure(rendered: Path, ports: dict[str, int], args: argparse.Namespace, out: str, log: IO[bytes]) -> int:
    """Run the sidecar under callgrind, count `args.requests` requests; returns its pid."""
    stable = await start_upstream(ports["STABLE_PORT"])
    canary = await start_upstream(ports["CANARY_PORT"])
    sidecar = shutil.which("sidecar") or sys.exit("instructions.py: no `sidecar` on PATH")
    proc = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
        sys.executable, sidecar, "run", "-c", str(rendered), stdout=asyncio.subprocess.DEVNULL, stderr=log)
    try:
        await wait_port(ports["PORT"], 300)
        url = f"http://127.0.0.1:{ports['PORT']}/v1/models/fraud:predict"
        await drive(url, args.warmup, args.connections)
        await callgrind_control("--zero", str(proc.pid))
        await callgrind_control("--instr=on", str(proc.pid))
        await drive(url, args.requests, args.connections)
        await callgrind_control("--instr=off", str(proc.pid))
        await callgrind_control("--dump", str(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await stable.cleanup()
        await canary.cleanup()
    return proc.pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", type=Path, help="sidecar configs with the bench's @VAR@ placeholders")
    ap.add_argument("--requests", type=int, default=3000, help="requests counted per config (default 3000)")
    ap.add_argument("--warmup", type=int, default=500, help="requests before counting (default 500)")
    ap.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    args = ap.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("instructions.py: needs valgrind (Debian package valgrind)")
    results = []
    with tempfile.TemporaryDirectory(prefix="sidecar-instr-") as tmp:
        for config in args.configs:
            rendered, ports = render(config, Path(tmp))
            out = f"{tmp}/{config.stem}.callgrind"
            with open(f"{tmp}/{config.stem}.log", "wb") as log:
                pid = asyncio.run(measure(rendered, ports, args, out, log))
            per_request = callgrind_total(f"{out}.{pid}") / args.requests
            print(f"{config.name:32s} {per_request:12,.0f} instructions/request ({args.requests} requests)", flush=True)
            results.append(per_request)
    for config, r in zip(args.configs, results, strict=True):
        print(f"{config.name:32s} {r / results[0]:6.3f}x the first config's instructions per request")


if __name__ == "__main__":
    main()
