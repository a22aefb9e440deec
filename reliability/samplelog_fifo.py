#!/usr/bin/env python3
"""Memory of `sidecar run` while its sample log's writer is stalled: the log path is a FIFO
that nobody reads, so the writer blocks in open() and every sampled line has to wait or be
dropped. Sends `--requests` sampled POSTs of `--body-mib` MiB to a fast local model and
prints the sidecar's RSS before, at its peak and after, and the sample log's counters.

    python -m reliability.samplelog_fifo --requests 120 --body-mib 2.1 --shape numbers
    python -m reliability.samplelog_fifo --max-queue-bytes 16MiB --shape string

At the end the FIFO is read to its end (the writer finishes) and the sidecar is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from reliability.common import metric, rss_mib, start_process
from tests.harness import free_port


def drain(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(1 << 20):
            pass


async def run(args: argparse.Namespace) -> None:
    async def model(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"predictions": [0.5]})

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/{tail:.*}", model)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    work = Path(tempfile.mkdtemp(prefix="sidecar-fifo-"))
    fifo = work / "samples.jsonl"
    os.mkfifo(fifo)
    log: dict[str, Any] = {"path": str(fifo)}
    if args.max_queue_bytes:
        log["max_queue_bytes"] = args.max_queue_bytes
    port, admin = free_port(), free_port()
    config = {"listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin}"}, "access_log": False,
              "limits": {"max_body_bytes": "64MiB"},
              "backends": {"m": {"url": f"http://127.0.0.1:{up_port}"}},
              "routes": [{"name": "r", "split": {"m": 1}, "monitor": {"sample": 1.0, "log": log}}]}
    proc, port, admin = await start_process(config, work / "sidecar.yaml")
    peak = before = rss_mib(proc.pid)
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    size = int(args.body_mib * 1024**2)
    if args.shape == "numbers":   # a feature matrix: parsed, each number is a Python float (~6x the text)
        row = [round(0.1 + i / 1000, 6) for i in range(100)]
        body = orjson.dumps({"instances": [row] * (size // len(orjson.dumps(row)))})
    else:                         # one long string: parsed, about its own size
        body = orjson.dumps({"instances": [{"x": "a" * (size - 20)}]})
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            for _ in range(args.requests):
                async with s.post(f"http://127.0.0.1:{port}/v1/predict", data=body) as r:
                    assert r.status == 200, r.status
                    await r.read()
            await asyncio.sleep(3)   # the monitor hands every sample to the log (TICK_S 0.1 s)
            after = rss_mib(proc.pid)
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        stop.set()
        watcher.join()
        print(f"{args.requests} sampled requests of {len(body) / 1024**2:.1f} MiB ({args.shape}), sample log a FIFO "
              f"nobody reads, max_queue_bytes {args.max_queue_bytes or 'default'}")
        print(f"RSS MiB: before {before:.0f}, peak {peak:.0f}, after {after:.0f}")
        for name in ("sample_log_lines_total", "sample_log_dropped_total", "sample_log_queue_bytes",
                     "monitor_dropped_total"):
            rows = [line for line in text.splitlines() if line.startswith("sidecar_" + name)]
            print(f"  {name}: {', '.join(rows) or metric(text, 'sidecar_' + name)}")
    finally:
        stop.set()
        threading.Thread(target=drain, args=(fifo,), daemon=True).start()
        proc.terminate()
        await proc.wait()
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--body-mib", type=float, default=2.1)
    ap.add_argument("--shape", choices=["numbers", "string"], default="numbers", help="what the bodies hold")
    ap.add_argument("--max-queue-bytes", default="", help="monitor.log.max_queue_bytes (default: the sidecar's)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
