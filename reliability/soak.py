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

The merged capabilities are in the mix too:
- the model route (`fraud`) is mirrored (percent 100, compare `$.predictions[*]`, mirror
  timeout 200 ms) to a shadow that hangs on 10% of requests, and monitored (sample 0.1, a
  feature, the sample log with `$.instances[*].email` redacted, written to the workdir);
- a `retry` route splits 3:1 between a healthy backend and one that resets every
  connection, with `retry` (attempts 2, on connect-error/reset/5xx, budget 0.5) and a
  circuit breaker on the faulty one: its clients must all get 200;
- `state_dir` is set, and every `--weights-every` seconds `PUT /admin/routes/fraud/weights`
  sets a new canary weight (persisted);
- every `--reload-every` seconds the config file is replaced (written aside, renamed over)
  with a changed canary weight and `POST /admin/reload` is called: each reload changes the
  route (and so clears the weights override). The file watcher is on as in production, so
  either the POST or the watcher applies a rewrite ("ok") and the other finds it
  "unchanged"; `config_reloads_total{result="ok"}` must grow by exactly the number of
  rewrites, and no reload may fail.

Pass criteria (exit code 0): every request got one of the answers its kind allows (lost =
0), the sidecar's own `requests_total` grew by exactly the number of requests sent, RSS grew
less than 5% between the end of warm-up (first 20% of the run) and the end, open fds and
tasks did not grow (last third vs first third after warm-up, within a small slack for
connections in flight), every rewrite was reloaded, every weights PUT answered 200, and the
sample log has lines and none of them holds the redacted value.

To add an ingredient: a backend in `_start_backends`, a route in `_config`, a line in MIX.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from reliability.common import Outcome, describe, metric, open_fds, rss_mib, send, start_process
from tests import upstreams as u
from tests.harness import free_port

BIG_BYTES = 2_000_000
SSE_EVENTS = [f"tok{i}" for i in range(5)]
SSE_BODY = b"".join(f"data: {e}\n\n".encode() for e in SSE_EVENTS)
OK = (200, "backend")
SECRET_EMAIL = "soak-secret@example.com"   # redacted by the sample log: must never appear in it
PREDICT_BODY = b'{"instances": [{"amount": 12.5, "email": "%s"}]}' % SECRET_EMAIL.encode()
SHADOW_HANG_SHARE = 0.1


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
    Kind("predict", 40, "POST", "/v1/models/fraud:predict", frozenset({OK}), body=PREDICT_BODY),
    Kind("predict_new_conn", 5, "POST", "/v1/models/fraud:predict", frozenset({OK}), {"connection": "close"},
         body=PREDICT_BODY),
    Kind("retried", 5, "POST", "/retry", frozenset({OK})),
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



async def _start_on_free_ports(urls: dict[str, str], tmp: Path,
                               cfg_path: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    """The sidecar on two free ports; new ones when another process took one before the sidecar bound it."""
    for chance in range(3):
        try:
            return await start_process(_config(urls, free_port(), free_port(), 10, tmp), cfg_path)
        except RuntimeError as e:
            if "address already in use" not in str(e).lower() or chance == 2:
                raise
    raise AssertionError("unreachable")


class SometimesHang:
    """A shadow that hangs on `share` of its requests (until the mirror gives up) and answers the rest."""

    def __init__(self, share: float, seed: int) -> None:
        self.share = share
        self.rng = random.Random(seed)
        self.hang, self.answer = u.hang(), u.answer()

    async def __call__(self, request: web.BaseRequest, up: u.Upstream) -> web.StreamResponse:
        behaviour = self.hang if self.rng.random() < self.share else self.answer
        return await behaviour(request, up)


async def _start_backends(f: u.UpstreamFactory) -> dict[str, str]:
    return {
        "stable": (await f.start(u.answer(), name="stable")).url,
        "canary": (await f.start(u.answer(), name="canary")).url,
        "shadow": (await f.start(SometimesHang(SHADOW_HANG_SHARE, 7), name="shadow")).url,
        "flaky": (await f.start(u.reset(), name="flaky")).url,
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


def _config(urls: dict[str, str], port: int, admin: int, canary_weight: float, workdir: Path) -> dict[str, Any]:
    def route(name: str, prefix: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "match": {"path_prefix": prefix}, "split": {name: 1}, **kw}

    backends: dict[str, Any] = {name: {"url": url, "timeout": "5s"} for name, url in urls.items()}
    backends["flaky"]["circuit_breaker"] = {"consecutive_failures": 5, "open_for": "1s"}
    return {
        "listen": f"127.0.0.1:{port}", "admin": {"listen": f"127.0.0.1:{admin}"},
        "access_log": False, "drain": {"delay": 0, "grace": "5s"},
        "state_dir": str(workdir / "state"),
        "backends": backends,
        "routes": [
            {"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"},
             "split": {"stable": 100 - canary_weight, "canary": canary_weight},
             "mirror": [{"backend": "shadow", "percent": 100, "timeout": "200ms",
                         "compare": {"path": "$.predictions[*]"}}],
             "monitor": {"sample": 0.1, "features": {"amount": {"from": "request", "path": "$.instances[*].amount"}},
                         "log": {"path": str(workdir / "samples.jsonl"), "redact": ["$.instances[*].email"],
                                 "max_bytes": "1MiB", "keep": 2}}},
            {"name": "retry", "match": {"path_prefix": "/retry"}, "split": {"stable": 3, "flaky": 1},
             "retry": {"attempts": 2, "on": ["connect-error", "reset", "5xx"], "budget": 0.5}},
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
                   reload_every_s: float = 30.0, weights_every_s: float = 7.0, seed: int = 1,
                   workdir: Path | None = None, log: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = MIX
    weights = [k.weight for k in kinds]
    issued: Counter[str] = Counter()
    outcomes: dict[str, Counter[Outcome]] = {k.name: Counter() for k in kinds}
    samples: list[Sample] = []
    reloads = Counter[str]()       # what POST /admin/reload answered: ok, unchanged, failed:...
    weight_puts = Counter[str]()   # what PUT .../weights answered: 200 persisted, ...
    rewrites = 0
    tmp = Path(workdir or tempfile.mkdtemp(prefix="sidecar-soak-"))  # config, logs and state stay there
    if log:
        print(f"workdir {tmp}", flush=True)
    async with u.UpstreamFactory() as factory:
        urls = await _start_backends(factory)
        cfg_path = tmp / "sidecar.yaml"
        proc, port, admin = await _start_on_free_ports(urls, tmp, cfg_path)
        base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
        t0 = time.monotonic()
        deadline = t0 + seconds
        try:
            conn = aiohttp.TCPConnector(limit=concurrency * 2)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=15)) as session:
                async with session.get(admin_url + "/metrics") as r:
                    before = await r.text()
                requests_before = metric(before, "sidecar_requests_total")
                reloads_ok_before = metric(before, "sidecar_config_reloads_total", 'result="ok"')

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
                    nonlocal rewrites
                    weight = 10.0
                    while True:
                        await asyncio.sleep(reload_every_s)
                        weight = 20.0 if weight == 10.0 else 10.0
                        # aside, then renamed over: the file watcher never sees a half-written file
                        aside = cfg_path.with_name(cfg_path.name + ".new")
                        aside.write_text(json.dumps(_config(urls, port, admin, weight, tmp)))  # JSON is YAML
                        aside.replace(cfg_path)
                        rewrites += 1
                        try:
                            async with session.post(admin_url + "/admin/reload") as r:
                                doc = await r.json(content_type=None)
                                reloads[str(doc.get("result")) if r.status == 200 else f"failed:{r.status}"] += 1
                        except (aiohttp.ClientError, ValueError) as e:
                            reloads[f"failed:{type(e).__name__}"] += 1

                async def weights_setter() -> None:
                    while True:
                        await asyncio.sleep(weights_every_s)
                        canary = rng.choice([5, 15, 25, 50])
                        try:
                            async with session.put(admin_url + "/admin/routes/fraud/weights",
                                                   json={"stable": 100 - canary, "canary": canary}) as r:
                                doc = await r.json(content_type=None)
                                weight_puts[f"{r.status} persisted" if r.status == 200 and doc.get("persisted")
                                            else f"{r.status} {doc.get('persisted', doc.get('error'))}"] += 1
                        except (aiohttp.ClientError, ValueError) as e:
                            weight_puts[f"failed:{type(e).__name__}"] += 1

                async with asyncio.TaskGroup() as tg:
                    background = [tg.create_task(sampler()), tg.create_task(reloader()),
                                  tg.create_task(weights_setter())]
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
                extra: dict[str, Any] = {
                    "reloads": dict(reloads) or {"none": 0},
                    "config_rewrites": rewrites,
                    "reloads_applied": int(metric(text, "sidecar_config_reloads_total", 'result="ok"')
                                           - reloads_ok_before),
                    "reloads_rejected": int(metric(text, "sidecar_config_reloads_total", 'result="error"')),
                    "weight_puts": dict(weight_puts) or {"none": 0},
                    "mirror_outcomes": {o: int(metric(text, "sidecar_mirror_requests_total", f'outcome="{o}"'))
                                        for o in ("agree", "disagree", "missing", "shadow_error", "shadow_timeout",
                                                  "dropped", "cancelled", "internal_error")},
                    "retries": int(metric(text, "sidecar_retries_total", 'route="retry"')),
                    "retry_budget_exhausted": int(metric(text, "sidecar_retry_budget_exhausted_total")),
                    "sample_log_lines_metric": int(metric(text, "sidecar_sample_log_lines_total")),
                    "sample_log_errors": int(metric(text, "sidecar_sample_log_errors_total")),
                }
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            code = await asyncio.wait_for(proc.wait(), 30)
    extra.update(_sample_log_check(tmp))
    return _summary(kinds, issued, outcomes, samples, int(requests_after - requests_before), healthy,
                    code, extra, seconds)


def _sample_log_check(workdir: Path) -> dict[str, Any]:
    """Lines in the sample log files (current and rotated), and whether the redacted value shows."""
    lines, leaked = 0, 0
    for path in workdir.glob("samples.jsonl*"):
        data = path.read_bytes()
        lines += data.count(b"\n")
        leaked += data.count(SECRET_EMAIL.encode())
    return {"sample_log_lines_in_files": lines, "sample_log_redacted_value_seen": leaked}


def _summary(kinds: list[Kind], issued: Counter[str], outcomes: dict[str, Counter[Outcome]], samples: list[Sample],
             sidecar_counted: int, healthy: bool, exit_code: int | None, extra: dict[str, Any],
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
        "healthy_at_end": healthy, "exit_code": exit_code, **extra,
        "samples": len(samples),
    }
    slack_fds = 16  # connections in flight at the moment of sampling
    reloads_ok = (out["reloads_applied"] == out["config_rewrites"] and out["reloads_rejected"] == 0
                  and not any(k.startswith("failed") for k in out["reloads"]))
    weights_ok = all(k == "200 persisted" for k in out["weight_puts"] if k != "none")
    sample_log_ok = out["sample_log_lines_in_files"] > 0 and out["sample_log_redacted_value_seen"] == 0
    out["checks"] = {"reloads": reloads_ok, "weights": weights_ok, "sample_log": sample_log_ok}
    out["passed"] = bool(
        out["lost"] == 0 and out["accounted"] and healthy and exit_code == 0
        and (out["rss_growth_pct"] is None or out["rss_growth_pct"] < 5.0)
        and out["fds_end_max"] <= out["fds_after_warmup_max"] + slack_fds
        and out["tasks_end_max"] <= out["tasks_after_warmup_max"] + slack_fds
        and reloads_ok and weights_ok and sample_log_ok)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--reload-every", type=float, default=30.0)
    ap.add_argument("--weights-every", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    import uvloop

    summary = uvloop.run(run_soak(seconds=args.minutes * 60, concurrency=args.concurrency,
                                  sample_every_s=args.sample_every, reload_every_s=args.reload_every,
                                  weights_every_s=args.weights_every, seed=args.seed))
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
