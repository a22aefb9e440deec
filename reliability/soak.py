"""Soak: N minutes of mixed traffic with injected faults against a real `sidecar run`.

    python -m reliability.soak --minutes 10            # the documented run
    pytest tests/reliability/test_soak_short.py        # the CI-sized one (~20 s)

Traffic (weights in MIX): model POSTs on a two-backend split, SSE streams, 2 MB answers,
slow answers, requests on fresh connections (`Connection: close`), and a share sent to
faulty backends (refused, reset, reset mid-body, hang past the route timeout, a stream cut
midway, bytes that are not HTTP) and to no route. The fake backends run in this process
(tests/upstreams.py); the sidecar runs alone in its own process, so its RSS, open fds
(/proc/PID/fd) and asyncio tasks (`sidecar_event_loop_tasks`) are its own. They are sampled
every `--sample-every` seconds.

Every `--reload-every` seconds the config file is rewritten with a changed canary weight
and, if the sidecar has `POST /admin/reload` (issue 7), reloaded through it; without that
endpoint the rewrite is a file change nothing reads yet (reported as `reloads: skipped`).

Pass criteria (exit code 0): every request got one of the answers its kind allows (lost =
0), the sidecar's own `requests_total` grew by exactly the number of requests sent, RSS grew
less than 5% between the end of warm-up (first 20% of the run) and the end, and open fds and
tasks did not grow (last third vs first third after warm-up, within a small slack for
connections in flight).

To add an ingredient: a backend in `_start_backends`, a route in `_config`, a line in MIX.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from reliability.common import Outcome, describe, metric, open_fds, rss_mib, send, start_process
from tests import upstreams as u

BIG_BYTES = 2_000_000
SSE_EVENTS = [f"tok{i}" for i in range(5)]
SSE_BODY = b"".join(f"data: {e}\n\n".encode() for e in SSE_EVENTS)
OK = (200, "backend")


@dataclass(frozen=True)
class Kind:
    """One kind of request: where it goes and which answers it may get."""

    name: str
    weight: int
    method: str
    path: str
    allowed: frozenset[Outcome]
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = b'{"instances": [{"amount": 12.5}]}'
    expect_body: bytes | None = None


MIX: list[Kind] = [
    Kind("predict", 40, "POST", "/v1/models/fraud:predict", frozenset({OK})),
    Kind("predict_new_conn", 5, "POST", "/v1/models/fraud:predict", frozenset({OK}), {"connection": "close"}),
    Kind("sse", 8, "POST", "/sse", frozenset({OK}), expect_body=SSE_BODY),
    Kind("big", 4, "GET", "/big", frozenset({OK}), body=None, expect_body=u.big_body(BIG_BYTES)),
    Kind("slow", 8, "POST", "/slow", frozenset({OK})),
    Kind("refused", 5, "POST", "/refused", frozenset({(502, "upstream_error")})),
    Kind("reset", 5, "POST", "/reset", frozenset({(502, "upstream_error")})),
    Kind("reset_mid_body", 5, "POST", "/midbody", frozenset({(502, "upstream_error")})),
    Kind("hang", 4, "POST", "/hang", frozenset({(504, "upstream_timeout")})),
    Kind("stream_cut", 4, "POST", "/cut", frozenset({(200, "cut")})),
    Kind("garbage", 3, "POST", "/garbage", frozenset({(502, "upstream_error")})),
    Kind("no_route", 2, "POST", "/nowhere", frozenset({(404, "no_route")})),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _start_backends(f: u.UpstreamFactory) -> dict[str, str]:
    return {
        "stable": (await f.start(u.answer(), name="stable")).url,
        "canary": (await f.start(u.answer(), name="canary")).url,
        "sse": (await f.start(u.sse(SSE_EVENTS, delay=0.01))).url,
        "big": (await f.start(u.big(BIG_BYTES))).url,
        "slow": (await f.start(u.slow(0.05))).url,
        "refused": u.refused_url(),
        "reset": (await f.start(u.reset())).url,
        "midbody": (await f.start(u.reset_mid_body(declared=1000, sent=10))).url,
        "hang": (await f.start(u.hang())).url,
        "cut": (await f.start(u.sse(["a", "b", "c", "d"], delay=0.01, break_after=2))).url,
        "garbage": (await f.raw(u.garbage())).url,
    }


def _config(urls: dict[str, str], port: int, admin: int, canary_weight: float) -> dict[str, Any]:
    def route(name: str, prefix: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "match": {"path_prefix": prefix}, "split": {name: 1}, **kw}

    return {
        "listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin}"},
        "access_log": False, "drain": {"delay": 0, "grace": "5s"},
        "backends": {name: {"url": url, "timeout": "5s"} for name, url in urls.items()},
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"},
             "split": {"stable": 100 - canary_weight, "canary": canary_weight}},
            route("sse", "/sse"), route("big", "/big"), route("slow", "/slow"), route("refused", "/refused"),
            route("reset", "/reset"), route("midbody", "/midbody"), route("hang", "/hang", timeout="200ms"),
            route("cut", "/cut"), route("garbage", "/garbage"),
        ],
    }


@dataclass
class Sample:
    t_s: float
    requests: int
    rss_mib: float
    fds: int
    tasks: float
    connections: float


async def run_soak(*, seconds: float, concurrency: int = 24, sample_every_s: float = 10.0,
                   reload_every_s: float = 30.0, seed: int = 1, workdir: Path | None = None,
                   log: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = MIX
    weights = [k.weight for k in kinds]
    issued: Counter[str] = Counter()
    outcomes: dict[str, Counter[Outcome]] = {k.name: Counter() for k in kinds}
    samples: list[Sample] = []
    reloads = Counter[str]()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="sidecar-soak-"))  # config and sidecar.log stay there
    if log:
        print(f"workdir {tmp}", flush=True)
    port, admin = free_port(), free_port()
    async with u.UpstreamFactory() as factory:
        urls = await _start_backends(factory)
        cfg_path = tmp / "sidecar.yaml"
        proc, port, admin = await start_process(_config(urls, port, admin, 10), cfg_path)
        base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
        t0 = time.monotonic()
        deadline = t0 + seconds
        try:
            conn = aiohttp.TCPConnector(limit=concurrency * 2)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=15)) as session:
                async with session.get(admin_url + "/metrics") as r:
                    requests_before = metric(await r.text(), "sidecar_requests_total")

                async def worker() -> None:
                    while time.monotonic() < deadline:
                        kind = rng.choices(kinds, weights)[0]
                        issued[kind.name] += 1
                        outcomes[kind.name][await send(session, kind.method, base + kind.path, data=kind.body,
                                                       headers=kind.headers, expect_body=kind.expect_body)] += 1

                async def sampler() -> None:
                    while True:
                        await asyncio.sleep(sample_every_s)
                        async with session.get(admin_url + "/metrics") as r:
                            text = await r.text()
                        s = Sample(time.monotonic() - t0, sum(issued.values()), rss_mib(proc.pid), open_fds(proc.pid),
                                   metric(text, "sidecar_event_loop_tasks"), metric(text, "sidecar_open_connections"))
                        samples.append(s)
                        if log:
                            print(f"{s.t_s:6.0f}s {s.requests:8d} requests  RSS {s.rss_mib:6.2f} MiB  fds {s.fds:4d}  "
                                  f"tasks {s.tasks:4.0f}  conns {s.connections:4.0f}", flush=True)

                async def reloader() -> None:
                    weight = 10.0
                    while True:
                        await asyncio.sleep(reload_every_s)
                        weight = 20.0 if weight == 10.0 else 10.0
                        cfg_path.write_text(json.dumps(_config(urls, port, admin, weight)))  # JSON is YAML
                        try:
                            async with session.post(admin_url + "/admin/reload") as r:
                                reloads["ok" if r.status == 200 else "skipped" if r.status in (404, 405)
                                        else f"failed:{r.status}"] += 1
                        except aiohttp.ClientError as e:
                            reloads[f"failed:{type(e).__name__}"] += 1

                async with asyncio.TaskGroup() as tg:
                    background = [tg.create_task(sampler()), tg.create_task(reloader())]
                    workers = [tg.create_task(worker()) for _ in range(concurrency)]
                    await asyncio.gather(*workers)
                    for task in background:
                        task.cancel()
                await asyncio.sleep(0.5)  # let the last answers' accounting settle
                async with session.get(admin_url + "/metrics") as r:
                    text = await r.text()
                requests_after = metric(text, "sidecar_requests_total")
                async with session.get(admin_url + "/healthz") as r:
                    healthy = r.status == 200
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            code = await asyncio.wait_for(proc.wait(), 30)
    return _summary(kinds, issued, outcomes, samples, int(requests_after - requests_before), healthy,
                    code, reloads, seconds)


def _summary(kinds: list[Kind], issued: Counter[str], outcomes: dict[str, Counter[Outcome]], samples: list[Sample],
             sidecar_counted: int, healthy: bool, exit_code: int | None, reloads: Counter[str],
             seconds: float) -> dict[str, Any]:
    lost = {k.name: sum(n for o, n in outcomes[k.name].items() if o not in k.allowed) for k in kinds}
    total = sum(issued.values())
    after = [s for s in samples if s.t_s >= 0.2 * seconds] or samples
    third = max(1, len(after) // 3)
    first, last = after[:third], after[-third:]

    def avg(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    rss0, rss1 = avg([s.rss_mib for s in first]), avg([s.rss_mib for s in last])
    out: dict[str, Any] = {
        "seconds": seconds, "requests": total, "req_per_s": round(total / seconds, 1),
        "lost": sum(lost.values()), "lost_by_kind": {k: v for k, v in lost.items() if v},
        "sidecar_counted": sidecar_counted, "accounted": sidecar_counted == total,
        "by_kind": {k.name: describe(outcomes[k.name]) for k in kinds},
        "rss_mib_after_warmup": round(rss0, 2), "rss_mib_end": round(rss1, 2),
        "rss_growth_pct": round((rss1 - rss0) / rss0 * 100, 2) if rss0 else None,
        "fds_after_warmup_max": max((s.fds for s in first), default=0),
        "fds_end_max": max((s.fds for s in last), default=0),
        "tasks_after_warmup_max": max((s.tasks for s in first), default=0),
        "tasks_end_max": max((s.tasks for s in last), default=0),
        "healthy_at_end": healthy, "exit_code": exit_code, "reloads": dict(reloads) or {"none": 0},
        "samples": len(samples),
    }
    slack_fds = 16  # connections in flight at the moment of sampling
    out["passed"] = bool(
        out["lost"] == 0 and out["accounted"] and healthy and exit_code == 0
        and (out["rss_growth_pct"] is None or out["rss_growth_pct"] < 5.0)
        and out["fds_end_max"] <= out["fds_after_warmup_max"] + slack_fds
        and out["tasks_end_max"] <= out["tasks_after_warmup_max"] + slack_fds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--reload-every", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    import uvloop

    summary = uvloop.run(run_soak(seconds=args.minutes * 60, concurrency=args.concurrency,
                                  sample_every_s=args.sample_every, reload_every_s=args.reload_every, seed=args.seed))
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
