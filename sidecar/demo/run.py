"""`sidecar demo`: bundled example models, the sidecar in front of them, live traffic.

Starts two fraud-scoring model servers (stable v1 and a canary v2 whose scores run a little
higher) on loopback ports, the sidecar in this process with a 90/10 canary split, then
drives traffic for a few seconds from a handful of concurrent clients (some with a sticky
user id) and prints what each backend got, what the client saw and what the sidecar's
metrics say. Needs nothing but the installed package. Imports: stdlib, aiohttp, numpy,
sidecar (public entry points).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import aiohttp
import numpy as np
import orjson
import yaml

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.demo.models import ModelSpec, make_instances, start_model_server
from sidecar.shell.server import Sidecar

CLIENTS = 8


def demo_config(stable_url: str, canary_url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "access_log": False,
        "drain": {"delay": 0, "grace": 5},
        "backends": {
            "stable": {"url": stable_url, "timeout": "2s"},
            "canary": {"url": canary_url, "timeout": "2s"},
        },
        "routes": [{
            "name": "fraud",
            "match": {"path_prefix": "/v1/models/fraud", "methods": ["POST", "GET"]},
            "split": {"stable": 90, "canary": 10},
            "sticky": {"header": "x-user-id"},
            "override_header": "x-sidecar-backend",
            "timeout": "3s",
        }],
    }


async def _drive(url: str, seconds: float, seen: Counter[str], latencies: list[float], statuses: Counter[int]) -> None:
    async def one_client(i: int) -> None:
        rng = np.random.default_rng(i)
        deadline = time.monotonic() + seconds
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                body = orjson.dumps({"instances": make_instances(4, rng)})
                headers = {"content-type": "application/json"}
                if i % 2:  # half the clients are logged-in users: sticky
                    headers["x-user-id"] = f"user-{int(rng.integers(0, 50))}"
                t0 = time.perf_counter()
                try:
                    async with session.post(url + "/v1/models/fraud:predict", data=body, headers=headers) as r:
                        await r.read()
                        statuses[r.status] += 1
                        seen[r.headers.get("x-sidecar-backend", "(sidecar)")] += 1
                except aiohttp.ClientError:
                    statuses[0] += 1
                latencies.append(time.perf_counter() - t0)

    async with asyncio.TaskGroup() as tg:
        for i in range(CLIENTS):
            tg.create_task(one_client(i))


async def run_demo(seconds: float = 8.0) -> int:
    stable = await start_model_server(ModelSpec(name="fraud", version="v1", latency_s=0.003, seed=1))
    canary = await start_model_server(ModelSpec(name="fraud", version="v2", shift=0.4, latency_s=0.004, seed=2))
    cfg, _ = parse_config(yaml.safe_dump(demo_config(stable.url, canary.url)), env={})
    sidecar = Sidecar(LoadedConfig(cfg, config_version(cfg), None))
    served = asyncio.ensure_future(sidecar.run())
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 10)
        print(f"model servers: stable {stable.url} (v1), canary {canary.url} (v2)")
        print(f"sidecar: proxy {sidecar.proxy_url}, admin {sidecar.admin_url}/metrics")
        print(f"route fraud: split stable=90 canary=10, sticky by x-user-id; {CLIENTS} clients for {seconds:g}s ...")
        seen: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        await _drive(sidecar.proxy_url, seconds, seen, latencies, statuses)
        total = sum(seen.values())
        print()
        print(f"{'backend':<10} {'answered':>9} {'share':>7} {'model saw':>10}")
        for name, model in (("stable", stable), ("canary", canary)):
            print(f"{name:<10} {seen[name]:>9} {seen[name] / max(total, 1):>7.1%} {model.requests:>10}")
        lat = np.array(latencies) * 1000
        print(f"\nclient: {total} requests, status {dict(statuses)}, "
              f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")
        async with aiohttp.ClientSession() as s, s.get(sidecar.admin_url + "/metrics") as r:
            metrics = await r.text()
        print("\nsidecar metrics (excerpt):")
        for line in metrics.splitlines():
            if line.startswith(("sidecar_requests_total", "sidecar_route_weight", "sidecar_config_info")):
                print("  " + line)
        return 0 if statuses and set(statuses) == {200} else 1
    finally:
        sidecar.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(served, 10)
        await stable.stop()
        await canary.stop()
