#!/usr/bin/env python3
"""CPU instructions per request of sidecar configs, counted by valgrind's callgrind.

The bench harness measures throughput, which moves by 10-20 % between runs on a shared VM.
Instruction counts do not: callgrind counts what the sidecar process executes, whatever else
the machine does. This script prices one config against another by that count:

    python3 bench/instructions.py ../shared/bench/configs/sidecar.yaml \\
        bench/configs/sidecar-resilience.yaml --requests 3000

For each config: a fixed-answer upstream (two ports, "stable" and "canary", in this process)
is started, the config's `@PORT@`, `@ADMIN_PORT@`, `@STABLE_PORT@`, `@CANARY_PORT@`
placeholders are filled in, and `sidecar run` starts under callgrind with instrumentation
off. After a warm-up the counters are zeroed and instrumentation switched on, `--requests`
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


async def start_upstream(port: int) -> web.AppRunner:
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


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


async def measure(config: Path, args: argparse.Namespace, work: Path) -> float:
    ports = {"PORT": free_port(), "ADMIN_PORT": free_port(), "STABLE_PORT": free_port(), "CANARY_PORT": free_port()}
    text = re.sub(r"@([A-Z_]+)@", lambda m: str(ports[m.group(1)]), config.read_text())
    rendered = work / config.name
    rendered.write_text(text)
    stable = await start_upstream(ports["STABLE_PORT"])
    canary = await start_upstream(ports["CANARY_PORT"])
    out = work / f"{config.stem}.callgrind"
    sidecar = shutil.which("sidecar") or sys.exit("instructions.py: no `sidecar` on PATH")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
         sys.executable, sidecar, "run", "-c", str(rendered)],
        stdout=subprocess.DEVNULL, stderr=open(work / f"{config.stem}.log", "w"))
    try:
        await wait_port(ports["PORT"], 300)
        url = f"http://127.0.0.1:{ports['PORT']}/v1/models/fraud:predict"
        await drive(url, args.warmup, args.connections)
        callgrind_control("--zero", str(proc.pid))
        callgrind_control("--instr=on", str(proc.pid))
        t0 = time.monotonic()
        await drive(url, args.requests, args.connections)
        elapsed = time.monotonic() - t0
        callgrind_control("--instr=off", str(proc.pid))
        callgrind_control("--dump", str(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        await stable.cleanup()
        await canary.cleanup()
    total = 0
    for dump in glob.glob(f"{out}.{proc.pid}*"):
        with open(dump) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = max(total, int(line.split()[1]))
    if not total:
        raise SystemExit(f"instructions.py: no callgrind totals in {out}.{proc.pid}*")
    per_request = total / args.requests
    print(f"{config.name:32s} {per_request:12,.0f} instructions/request  "
          f"({args.requests} requests, {elapsed:.1f} s under callgrind)", flush=True)
    return per_request


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", type=Path, help="sidecar configs with the bench's @VAR@ placeholders")
    ap.add_argument("--requests", type=int, default=3000, help="requests counted per config (default 3000)")
    ap.add_argument("--warmup", type=int, default=500, help="requests before counting (default 500)")
    ap.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    args = ap.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("instructions.py: needs valgrind (Debian package valgrind)")
    with tempfile.TemporaryDirectory(prefix="sidecar-instr-") as tmp:
        results = [await measure(c, args, Path(tmp)) for c in args.configs]
    base = results[0]
    for config, r in zip(args.configs, results, strict=True):
        print(f"{config.name:32s} {r / base:6.3f}x the first config's instructions per request")


if __name__ == "__main__":
    asyncio.run(main())
