#!/usr/bin/env python3
"""A fleet of 20 replicas on one real Redis: the store's command rate, and how long a weight change
takes to reach every replica (docs/fleet.md#what-it-costs).

    python3 bench/fleet_sim.py                          # 20 replicas, sync_every 1s, 10 s windows
    python3 bench/fleet_sim.py --replicas 20 --sync-every 0.2
    python3 bench/fleet_sim.py --feedback --rps 200 --changes 0   # feedback shared across replicas

Starts a `redis-server` on a free loopback port (persistence off), one fake model, and
`--replicas` in-process sidecars (tests/harness.py) in one fleet, each with its own replica id,
a route with a rollout (its interval long enough not to finish) and a plain route. Then:

1. Commands: `INFO commandstats` before and after a window with no traffic, then a window with
   `--rps` requests per second spread over the replicas: Redis commands per second in all and
   per replica, by command. The two windows show that the rate follows the replicas, not the traffic.
   With `--feedback`, route `r` has `feedback` (keep 10 min) and the traffic window also posts
   labels: every 0.5 s, for every other answer older than 3 x sync_every, one POST to the
   NEXT replica than the one that answered (so every join goes through the store). It prints
   the outcomes, the store's hashes and fields, and their Redis memory (MEMORY USAGE) per prediction.
2. Propagation: `--changes` times, a `PUT .../weights` on one replica (alternating), and the time
   until every replica's split routes by the new weights (each replica's runtime polled every
   10 ms in-process): median and max.

All replicas share one process and its event loop (and 2 cores with Redis here), so a slow round
of one delays the others: read the propagation times as upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import redis.asyncio as ra  # noqa: E402
import uvloop  # noqa: E402

from sidecar.shell.server import Sidecar  # noqa: E402
from tests.harness import SidecarFactory, until  # noqa: E402
from tests.upstreams import UpstreamFactory, answer  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def commandstats(store: ra.Redis) -> dict[str, int]:
    info = await store.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    d = {k: after[k] - before.get(k, 0) for k in after}
    d.pop("info", None)     # our own INFO calls
    return {k: v for k, v in d.items() if v}


async def window(store: ra.Redis, seconds: float, n: int, label: str) -> None:
    before = await commandstats(store)
    await asyncio.sleep(seconds)
    d = delta(before, await commandstats(store))
    total = sum(d.values()) / seconds
    print(f"{label}: {total:.1f} commands/s, {total / n:.2f} per replica and second")
    print("   by command: " + ", ".join(f"{k} {v / seconds:.1f}/s" for k, v in sorted(d.items(), key=lambda x: -x[1])))


async def main(args: argparse.Namespace) -> None:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    redis_proc = await asyncio.create_subprocess_exec(
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    store = ra.Redis.from_url(url, decode_responses=True)
    ups, sidecars = UpstreamFactory(), SidecarFactory()
    try:
        async def up() -> bool:
            try:
                return bool(await store.ping())
            except ra.ConnectionError:
                return False

        await until(up, 10, "redis-server")
        model = await ups.start(answer({"predictions": [0.5]}))
        cfg: dict[str, Any] = {
            "fleet": {"redis": url, "name": "sim", "lease": f"{max(3 * args.sync_every, 2.0)}s",
                      "sync_every": f"{args.sync_every}s"},
            "backends": {"stable": {"url": model.url}, "canary": {"url": model.url, "timeout": "3s"}},
            "routes": [
                {"name": "r", "match": {"path_prefix": "/r"}, "split": {"stable": 100, "canary": 0},
                 "rollout": {"canary": "canary", "baseline": "stable", "steps": [10, 100], "interval": "1h",
                             "min_requests": 10, "gates": {"max_error_rate": 0.1}}},
                {"name": "plain", "match": {"path_prefix": "/plain"}, "split": {"stable": 100, "canary": 0}}]}
        if args.feedback:
            cfg["routes"][0]["feedback"] = {"path": "/fb", "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                                            "metric": "accuracy", "keep": "10m"}
        replicas: list[Sidecar] = []
        for i in range(args.replicas):
            os.environ["SIDECAR_REPLICA_ID"] = f"sim-{i}"   # read when the sidecar is built
            replicas.append(await sidecars.make(cfg))
        os.environ.pop("SIDECAR_REPLICA_ID", None)
        await until(lambda: all(len(sc.services.fleet.members) == args.replicas  # type: ignore[union-attr]
                                for sc in replicas), 30, "every replica sees the whole fleet")
        print(f"{args.replicas} replicas, sync_every {args.sync_every}s, redis-server {port}")
        await window(store, args.seconds, args.replicas, "idle")
        answered: list[tuple[float, int, str]] = []      # (when, replica index, request id)
        outcomes: dict[str, int] = {}
        async with aiohttp.ClientSession() as s:

            async def traffic() -> None:
                i = 0
                while True:
                    k = i % len(replicas)
                    i += 1
                    async with s.post(replicas[k].proxy_url + "/r/x", data=b"{}") as resp:
                        await resp.read()
                        answered.append((time.monotonic(), k, resp.headers["x-request-id"]))
                    await asyncio.sleep(1 / args.rps)

            async def labels() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    ripe = time.monotonic() - 3 * args.sync_every
                    n = next((j for j, a in enumerate(answered) if a[0] > ripe), len(answered))
                    batch, answered[:n] = answered[:n:2], []
                    by: dict[int, list[dict[str, Any]]] = {}
                    for _, k, rid in batch:
                        by.setdefault((k + 1) % len(replicas), []).append({"request_id": rid, "label": 1})
                    for k, items in by.items():
                        async with s.post(replicas[k].proxy_url + "/fb", json=items) as resp:
                            for o, c in (await resp.json())["counts"].items():
                                outcomes[o] = outcomes.get(o, 0) + c

            tasks = [asyncio.ensure_future(traffic())]
            if args.feedback:
                tasks.append(asyncio.ensure_future(labels()))
            try:
                await window(store, args.seconds, args.replicas, f"with ~{args.rps} requests/s")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            if args.feedback:
                keys = [k async for k in store.scan_iter(match="sidecar:fleet:{sim}:fb:*")]
                kept = sum([await store.hlen(k) for k in keys])
                memory = sum([await store.memory_usage(k, samples=0) or 0 for k in keys])   # MEMORY USAGE, exact
                print(f"feedback: outcomes {outcomes}; the store holds {kept} predictions in {len(keys)} hashes, "
                      f"{memory / max(kept, 1):.0f} bytes of Redis memory per prediction")

            took: list[float] = []
            for k in range(args.changes):
                want = {"stable": float(k % 2 * 100), "canary": float(100 - k % 2 * 100)}
                sc0 = replicas[k % 2]
                t0 = time.perf_counter()
                async with s.put(f"{sc0.admin_url}/admin/routes/plain/weights", json=want) as resp:
                    assert resp.status == 200, await resp.text()

                def applied(want: dict[str, float] = want) -> bool:
                    for sc in replicas:
                        split = sc.proxy.runtime.splits["plain"]
                        if dict(zip(split.names, split.weights, strict=True)) != want:
                            return False
                    return True

                await until(applied, 10, "the weights on every replica")   # polls every 10 ms
                took.append(time.perf_counter() - t0)
                await asyncio.sleep(args.sync_every)
        if took:
            print(f"weight change on every replica: median {statistics.median(took) * 1000:.0f} ms, "
                  f"max {max(took) * 1000:.0f} ms over {len(took)} changes "
                  f"(sync_every {args.sync_every * 1000:.0f} ms)")
    finally:
        try:
            await sidecars.aclose()
            await ups.aclose()
            await store.aclose(close_connection_pool=True)
        finally:   # the redis-server goes whatever happened above
            redis_proc.kill()
            await redis_proc.wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=20)
    p.add_argument("--sync-every", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=10.0, help="each command-count window")
    p.add_argument("--rps", type=float, default=200.0)
    p.add_argument("--changes", type=int, default=10)
    p.add_argument("--feedback", action="store_true", help="route r with feedback, labels posted to other replicas")
    uvloop.run(main(p.parse_args()))
