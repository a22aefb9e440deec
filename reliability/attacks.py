"""Attacks on the data path against a real `sidecar run` process, with figures.

    python -m reliability.attacks                      # every attack, the documented sizes
    python -m reliability.attacks desync --requests 10000
    python -m reliability.attacks chunks stalled
    python -m reliability.attacks --sidecar-path /path/to/other/checkout   # price another build

Attacks (the misbehaving peers run in this process, the sidecar alone in its own):

- `desync`: 16 keep-alive clients through a backend pool of one connection to an upstream
  that echoes each request's token, with a share of misbehaving answers mixed in (HEAD and
  204 answers followed by late bytes that are a whole foreign answer, extra answers in the
  same write, short Content-Length, bytes after the last chunk; tests/desync.py). Counted:
  own answers, sidecar errors, and foreign answers, which must be 0.
- `chunks`: an upstream streams its answer in 1-, 8- and 64-byte chunks as fast as the
  sidecar reads; meanwhile `/healthz` is polled every 10 ms. Reported: the longest
  `/healthz` round trip (the event loop's worst stall, as a user sees it), the stream's
  time, the sidecar's RSS before and at the end.
- `stalled`: 100 clients each ask for a 1 MB answer (read whole by the sidecar first), then
  100 for an 8 MiB one (streamed), and read nothing (`stream_idle_timeout: 2s`). Reported:
  RSS while they hang and 6 s later, how many of their connections are still open then,
  and whether another client still gets answers meanwhile.

Exit code 0 when: no foreign answer, every `/healthz` within 500 ms, and every stalled
client cut. Only loopback addresses are used; each attack is bounded in count and time.

Imports: stdlib, aiohttp, reliability.common, tests.upstreams, tests.desync.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp

from reliability.common import metric, rss_mib, start_process
from tests import desync
from tests import upstreams as u
from tests.harness import free_port

ATTACKS = ["desync", "chunks", "stalled"]
HERE = str(Path(__file__).resolve().parents[1])  # this checkout



def _config(backend_url: str, **limits: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}", "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "access_log": False, "drain": {"delay": 0, "grace": 2}, "limits": limits,
        "backends": {"b": {"url": backend_url, "max_connections": 1}},
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "split": {"b": 100}, "timeout": "10s"}],
    }


class Sidecar:
    """A `sidecar run` process for one attack; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, config: dict[str, Any], workdir: Path, pythonpath: str | None) -> None:
        self.config, self.workdir, self.pythonpath = config, workdir, pythonpath

    async def __aenter__(self) -> Sidecar:
        # the sidecar's code comes from PYTHONPATH only (PYTHONSAFEPATH: not from the cwd)
        env = {"PYTHONPATH": self.pythonpath or HERE, "PYTHONSAFEPATH": "1"}
        self.proc, self.port, self.admin = await start_process(self.config, self.workdir / "sidecar.yaml", env)
        self.url, self.admin_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.admin}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def rss(self) -> float:
        return rss_mib(self.proc.pid)


async def attack_desync(workdir: Path, pythonpath: str | None, requests: int) -> dict[str, Any]:
    async with desync.MisbehavingEcho() as echo, Sidecar(_config(echo.url), workdir, pythonpath) as sc:
        t0 = perf_counter()
        tally = await desync.drive(sc.url, requests=requests, clients=16, bad_share=0.1, seed=7)
        return {"attack": "desync", "requests": tally.total, "own": tally.own, "errors": dict(tally.errors),
                "foreign": len(tally.foreign), "first_foreign": tally.foreign[:3],
                "misbehaving_served": sum(echo.served[k] for k in desync.DETECTABLE),
                "seconds": round(perf_counter() - t0, 1), "passed": not tally.foreign}


def _piece(chunk: int) -> bytes:
    return b"%x\r\n%s\r\n" % (chunk, b"X" * chunk)


def _plan(chunk: int, payload: int) -> tuple[int, int]:
    """(chunks per write, writes): whole writes of about 64 KiB on the wire."""
    per_write = max(1, 65536 // len(_piece(chunk)))
    return per_write, payload // (chunk * per_write)


def _chunks(chunk: int, payload: int) -> u.RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await u.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        per_write, writes = _plan(chunk, payload)
        block = _piece(chunk) * per_write
        for _ in range(writes):
            writer.write(block)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return handler


async def attack_chunks(workdir: Path, pythonpath: str | None, chunk: int, payload: int) -> dict[str, Any]:
    raw = await u.start_raw(_chunks(chunk, payload))
    try:
        async with Sidecar(_config(raw.url), workdir, pythonpath) as sc, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            rss0 = sc.rss()
            worst = 0.0
            done = asyncio.Event()

            async def poll() -> None:
                nonlocal worst
                while not done.is_set():
                    t = perf_counter()
                    async with session.get(f"{sc.admin_url}/healthz") as r:
                        await r.read()
                    worst = max(worst, perf_counter() - t)
                    await asyncio.sleep(0.01)

            poller = asyncio.ensure_future(poll())
            t0 = perf_counter()
            try:
                async with session.get(f"{sc.url}/stream") as r:
                    got = len(await r.read())
            finally:
                seconds = perf_counter() - t0
                rss1 = sc.rss()
                done.set()
                await poller
        return {"attack": f"chunks of {chunk} B, {payload >> 20} MiB", "received": got,
                "healthz_worst_ms": round(worst * 1000, 1), "stream_s": round(seconds, 2),
                "rss_mib": [round(rss0, 1), round(rss1, 1)], "passed": got == chunk * math.prod(_plan(chunk, payload))
                and worst < 0.5}
    finally:
        await raw.stop()


async def attack_stalled(workdir: Path, pythonpath: str | None, clients: int, size: int) -> dict[str, Any]:
    """`clients` clients each ask for a `size` answer and read nothing; default limits but
    `stream_idle_timeout: 2s` (so 1 MB answers are read whole first, 8 MiB ones streamed)."""
    big = await u.start_upstream(u.big(size))
    socks: list[socket.socket] = []
    try:
        config = _config(big.url, stream_idle_timeout="2s")
        config["backends"]["b"]["max_connections"] = clients + 4
        async with Sidecar(config, workdir, pythonpath) as sc, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            rss0 = sc.rss()
            loop = asyncio.get_running_loop()
            for _ in range(clients):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setblocking(False)
                await loop.sock_connect(s, ("127.0.0.1", sc.port))
                await loop.sock_sendall(s, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            await asyncio.sleep(1.0)
            rss_hanging = sc.rss()
            t = perf_counter()
            async with session.get(f"{sc.url}/other") as r:
                other_ok = r.status == 200 and len(await r.read()) == size
            other_s = perf_counter() - t
            await asyncio.sleep(5.0)
            async with session.get(f"{sc.admin_url}/metrics") as r:
                text = await r.text()
            # open client connections, less this session's keep-alive one
            still_open = int(metric(text, "sidecar_open_connections")) - 1
            cut = int(metric(text, "sidecar_client_timeouts_total", 'phase="write"'))
            rss_after = sc.rss()
        return {"attack": f"{clients} clients not reading {size / 2**20:g} MiB answers",
                "rss_mib_before": round(rss0, 1), "rss_mib_hanging": round(rss_hanging, 1),
                "rss_mib_after_6s": round(rss_after, 1), "still_open_after_6s": max(still_open, 0), "cut": cut,
                "other_client": f"{'200' if other_ok else 'failed'} in {other_s:.2f} s",
                "passed": other_ok and still_open <= 0}
    finally:
        for s in socks:
            s.close()
        await big.stop()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("attacks", nargs="*", metavar="ATTACK", help=f"any of {', '.join(ATTACKS)} (default: all)")
    ap.add_argument("--requests", type=int, default=10_000, help="desync: requests in all (16 clients)")
    ap.add_argument("--clients", type=int, default=100, help="stalled: clients that read nothing")
    ap.add_argument("--sidecar-path", help="run the sidecar from this checkout (PYTHONPATH) instead")
    args = ap.parse_args()
    args.attacks = args.attacks or ATTACKS
    if unknown := set(args.attacks) - set(ATTACKS):
        ap.error(f"unknown attack {', '.join(sorted(unknown))}: choose from {', '.join(ATTACKS)}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "desync" in args.attacks:
            results.append(await attack_desync(workdir, args.sidecar_path, args.requests))
            print(results[-1], flush=True)
        if "chunks" in args.attacks:
            for chunk, payload in ((1, 1 << 20), (8, 1 << 20), (64, 4 << 20)):
                results.append(await attack_chunks(workdir, args.sidecar_path, chunk, payload))
                print(results[-1], flush=True)
        if "stalled" in args.attacks:
            for size in (1_000_000, 8 * 1024 * 1024):
                results.append(await attack_stalled(workdir, args.sidecar_path, args.clients, size))
                print(results[-1], flush=True)
    passed = all(r["passed"] for r in results)
    print("passed" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main()))
    os._exit(130)
