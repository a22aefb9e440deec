"""`sidecar demo`: bundled example models, the sidecar in front of them, live traffic.

Starts four example model servers on loopback ports: a fraud scorer `stable` (v1), a
`canary` (v2) whose scores run higher and which fails 3% of its calls, a `candidate` (v3)
that only ever sees mirrored traffic, and an LLM-style server that streams tokens. The
sidecar runs in this process with a 90/10 sticky canary split, retries and a fallback,
a 50% shadow of the candidate with answer comparison, payload sampling with drift against
stable, and a streaming route. Clients drive traffic for a few seconds; then the demo flips
the route blue-green through the admin API and prints, section by section, what the
sidecar saw. Needs nothing but the installed package; binds only 127.0.0.1.

Imports: stdlib, aiohttp, numpy, orjson, yaml, sidecar (public entry points).
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
from sidecar.demo.models import ModelSpec, RunningModel, make_instances, start_model_server
from sidecar.shell.server import Sidecar

CLIENTS = 8
PREDICT = "/v1/models/fraud:predict"


def demo_config(stable: str, canary: str, candidate: str, llm: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "access_log": False,
        "drain": {"delay": 0, "grace": 5},
        "backends": {
            "stable": {"url": stable, "timeout": "2s",
                       "circuit_breaker": {"consecutive_failures": 5, "open_for": "10s"}},
            "canary": {"url": canary, "timeout": "2s",
                       "circuit_breaker": {"consecutive_failures": 5, "open_for": "10s"}},
            "candidate": {"url": candidate, "timeout": "2s",
                          "circuit_breaker": {"consecutive_failures": 5, "open_for": "10s"}},
            "llm": {"url": llm, "timeout": "10s"},
        },
        "routes": [
            {
                "name": "fraud",
                "match": {"path_prefix": "/v1/models/fraud", "methods": ["POST", "GET"]},
                "split": {"stable": 90, "canary": 10},
                "sticky": {"header": "x-user-id"},
                "override_header": "x-sidecar-backend",
                "timeout": "3s",
                "retry": {"attempts": 2, "per_try_timeout": "1s", "on": ["connect-error", "reset", "timeout", "5xx"],
                          "budget": 0.2},
                "fallback": [{"response": {"status": 200, "json": {"predictions": [], "fallback": True}}}],
                "mirror": [{"backend": "candidate", "percent": 50, "max_inflight": 64,
                            "compare": {"path": "$.predictions[*]", "tolerance": 0.02}}],
                "monitor": {
                    "sample": 1.0,
                    "features": {
                        "amount": {"from": "request", "path": "$.instances[*].amount"},
                        "country": {"from": "request", "path": "$.instances[*].country", "kind": "categorical"},
                        "score": {"from": "response", "path": "$.predictions[*]"},
                    },
                    "reference": {"backend": "stable"},
                    "drift": {"min_samples": 100, "every": "1s"},
                },
            },
            {"name": "llm", "match": {"path_prefix": "/v1/chat"}, "split": {"llm": 1}, "timeout": "10s"},
        ],
    }


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.backends: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.retried = 0
        self.latencies: list[float] = []


async def _drive(url: str, seconds: float, tally: Tally) -> None:
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
                    async with session.post(url + PREDICT, data=body, headers=headers) as r:
                        await r.read()
                        tally.statuses[r.status] += 1
                        tally.backends[r.headers.get("x-sidecar-backend", "(sidecar)")] += 1
                        tally.retried += r.headers.get("x-sidecar-attempts", "1") != "1"
                except aiohttp.ClientError:
                    tally.statuses[0] += 1
                tally.latencies.append(time.perf_counter() - t0)

    async with asyncio.TaskGroup() as tg:
        for i in range(CLIENTS):
            tg.create_task(one_client(i))


async def _stream_tokens(url: str) -> list[tuple[float, str]]:
    """One streamed chat completion; when each token arrived."""
    got: list[tuple[float, str]] = []
    body = {"model": "demo", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        t0 = time.perf_counter()
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("data: {"):
                delta = orjson.loads(text[6:])["choices"][0]["delta"].get("content", "")
                got.append((time.perf_counter() - t0, delta))
    return got


async def _admin(url: str, method: str = "GET", body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body) as r:
        return await r.json() if r.content_type == "application/json" else await r.text()


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:.3f}" if isinstance(value, float) else repr(value)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


async def run_demo(seconds: float = 8.0, keep: bool = False) -> int:
    specs = {
        "stable": ModelSpec(name="fraud", version="v1", latency_s=0.003, seed=1),
        "canary": ModelSpec(name="fraud", version="v2", shift=0.6, latency_s=0.004, error_rate=0.03, seed=2),
        "candidate": ModelSpec(name="fraud", version="v3", shift=0.05, latency_s=0.003, seed=3),
        "llm": ModelSpec(name="chat", version="llm-1", token_delay_s=0.05, seed=4),
    }
    models: dict[str, RunningModel] = {}
    for name, spec in specs.items():
        models[name] = await start_model_server(spec)
    cfg, _ = parse_config(yaml.safe_dump(demo_config(*(m.url for m in models.values()))), env={})
    sidecar = Sidecar(LoadedConfig(cfg, config_version(cfg), None))
    served = asyncio.ensure_future(sidecar.run())
    try:
        await asyncio.wait_for(sidecar.ready.wait(), 10)
        admin = sidecar.admin_url
        print("model servers: " + ", ".join(f"{n} {m.url}" for n, m in models.items()))
        print(f"sidecar: proxy {sidecar.proxy_url}  admin {admin}  (status page {admin}/)")
        print(f"route fraud: stable=90 canary=10 sticky by x-user-id; canary fails 3% of calls and scores higher;\n"
              f"  retries, a fallback, 50% mirrored to candidate, every payload sampled for drift.\n"
              f"{CLIENTS} clients for {seconds:g}s ...")
        tally = Tally()
        await _drive(sidecar.proxy_url, seconds, tally)
        await asyncio.sleep(1.5)  # one more drift pass and the last mirrors

        _section("traffic: the canary split")
        total = sum(tally.backends.values())
        print(f"{'backend':<12} {'answered':>9} {'share':>7} {'model saw':>10}")
        for name in ("stable", "canary"):
            print(f"{name:<12} {tally.backends[name]:>9} {tally.backends[name] / max(total, 1):>7.1%}"
                  f" {models[name].requests:>10}")
        lat = np.array(tally.latencies) * 1000
        print(f"clients: {total} requests, status {dict(tally.statuses)}, "
              f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")

        _section("resilience: the canary's 503s never reached a client")
        metrics = await _admin(admin + "/metrics")
        retries = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("sidecar_retries_total{"))
        failed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("sidecar_upstream_attempts_total{") and 'outcome="5xx"' in line)
        print(f"upstream tries that failed: {failed:.0f}; retried on another backend: {retries:.0f}; "
              f"client answers after a retry: {tally.retried}; client errors: "
              f"{sum(n for s, n in tally.statuses.items() if s >= 500 or s == 0)}")

        _section("shadow: candidate v3 compared with what clients got")
        for m in (await _admin(admin + "/admin/mirrors"))["mirrors"]:
            ratio = m["agreement"]
            print(f"{m['route']} -> {m['backend']}: sent {m['sent']}, dropped {m['dropped']}, "
                  f"agreement {'-' if ratio is None else f'{ratio:.1%}'}")
            for d in m["disagreements"][:2]:
                print(f"  disagreed on {d['request_id']}: {d['path']} "
                      f"primary={_short(d['primary'])} shadow={_short(d['shadow'])}")

        _section("drift: each backend's payloads against stable's")
        drift = await _admin(admin + "/admin/drift")
        for route in drift["routes"]:
            for f in route["features"]:
                p, psi = f["p_value"], f["psi"]
                verdict = "DRIFTED" if f["drifted"] else ("ok" if f["drifted"] is False else f["status"])
                print(f"{f['backend']:<8} {f['feature']:<8} {f.get('test') or '-':<5} "
                      f"p={'-' if p is None else f'{p:.2g}':<8} psi={'-' if psi is None else f'{psi:.3f}':<7} "
                      f"n={f['n_cur']:<5} {verdict}")

        _section("streaming: an LLM's tokens arrive as they are made")
        tokens = await _stream_tokens(sidecar.proxy_url)
        print("  " + "  ".join(f"{t * 1000:.0f}ms:{tok.strip()}" for t, tok in tokens))

        _section("blue-green: flip the route through the admin API")
        flipped = await _admin(admin + "/admin/routes/fraud/weights", "PUT", {"stable": 0, "canary": 100})
        print(f"PUT weights stable=0 canary=100 -> effective {flipped['effective']}")
        seen: Counter[str] = Counter()
        async with aiohttp.ClientSession() as s:
            for _ in range(50):
                async with s.post(sidecar.proxy_url + PREDICT, json={"instances": [{"amount": 10.0}]}) as r:
                    seen[r.headers.get("x-sidecar-backend", "?")] += 1
        print(f"next 50 requests answered by: {dict(seen)}")
        await _admin(admin + "/admin/routes/fraud/weights", "DELETE")
        print("DELETE weights -> back to the configured 90/10")

        if keep:
            print(f"\nstill serving: status page {admin}/ , proxy {sidecar.proxy_url} (Ctrl-C to stop)")
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        errors = sum(n for s, n in tally.statuses.items() if s >= 500 or s == 0)
        return 0 if total and not errors else 1
    finally:
        sidecar.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(served, 10)
        for m in models.values():
            await m.stop()
