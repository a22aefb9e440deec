"""The backend fault matrix: each fault, what the client got, requests lost, the command.

One table (`FAULTS`) drives both `tests/reliability/test_backend_faults.py` and
`python -m reliability.faults --report` (the markdown rows of docs/reliability.md#backend-faults), so the
docs and the tests cannot disagree. For each fault, `n` requests are sent concurrently to a
route whose only backend has that fault, then:

- every request got exactly one answer, and each answer is one the fault allows: the
  backend's own, or a documented sidecar error (status + error.type, docs/reference/http.md#errors);
- the sidecar's `requests_total` for the route grew by exactly `n` (its accounting agrees
  with the clients': nothing double-answered or dropped), and the backend saw each request
  at most once (no hidden duplicates: the core proxy does not retry);
- `/healthz` is 200 and a request to a healthy route is served normally afterwards.

The same machinery runs the faults of the other capabilities; a fault's `role` says where
the faulty server (or disk) sits and what else is checked (`Result.problems`):

- `shadow`: the faulty server is a mirror's shadow (percent 100, compare); the primary is
  healthy. Every client gets the primary's answer byte for byte, the batch takes less than
  the mirror timeout (no client waited for the shadow), and each request's mirror ends in
  exactly one counted outcome (`mirror_requests_total`).
- `health`: the faulty server is endpoint 0 of a two-endpoint backend with a health check
  (it fails on every path, the health path included). Once the check has taken it out,
  every client gets 200 from endpoint 1 and the sick endpoint sees no model request.
- `retry`: the faulty server and a healthy one share a split (1:1) on a route with
  `retry` (attempts 2, on connect-error, reset, 5xx): every client gets 200, the healthy
  backend answered each request exactly once, and retries were made.
- `sample_log`: the route's sample log (sample 1.0) is on a read-only or full disk
  (reliability/disks.py): every client gets 200, every line is counted as dropped,
  `sample_log_errors_total` counts the failures.
- `state_dir`: `state_dir` is on such a disk; a weights PUT still answers 200 with
  `"persisted": false` and the new weights serve every request.

To add a fault: one `Fault(...)` line (and, if no fake backend does it yet, a behaviour in
tests/upstreams.py or a raw handler here). Faults whose shape is not "n requests at once"
(a backend restarting under load) have their own `run` function.

Imports: stdlib, aiohttp, sidecar, reliability.common, reliability.disks, tests.upstreams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web

from reliability.common import Outcome, describe, metric, send
from reliability.disks import DiskKind, bad_disk
from tests import upstreams as u
from tests.harness import SidecarFactory

OK: Outcome = (200, "backend")
E502: Outcome = (502, "upstream_error")
E504: Outcome = (504, "upstream_timeout")
BROKEN_JSON = b'{"predictions": [0.5, '
MakeSidecar = Callable[..., Awaitable[Any]]   # conftest's make_sidecar: config dict -> running Sidecar
Role = Literal["backend", "shadow", "health", "retry", "sample_log", "state_dir"]
MIRROR_TIMEOUT_S = 1.0


@dataclass
class Result:
    fault: str
    counts: Counter[Outcome]
    lost: int
    upstream_hits: int | None
    sidecar_counted: int
    healthy_after: bool
    normal_after: Outcome
    seconds: float
    side: dict[str, int] = field(default_factory=dict)    # what else was counted (mirrors, retries, ...)
    problems: list[str] = field(default_factory=list)     # the role's own checks that failed
    how: str = ""                                         # how the fault was made, when it varies (disks)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.healthy_after and self.normal_after == OK \
            and self.sidecar_counted == sum(self.counts.values()) and not self.problems


async def _answer_then_close(reader: Any, writer: Any) -> None:
    """Answer one request as keep-alive (no Connection: close), then close the connection."""
    if await u.read_request(reader):
        body = b'{"predictions": [0.5]}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()


@dataclass(frozen=True)
class Fault:
    name: str
    what: str                                         # the fault, for the table
    start: Callable[[u.UpstreamFactory], Awaitable[u.Upstream | u.RawServer | str]]
    allowed: frozenset[Outcome]
    must_see: frozenset[Outcome] = frozenset()        # outcomes that must occur at least once
    route: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    n: int = 50
    sequential: bool = False                          # one after another (keep-alive reuse faults)
    note: str = ""
    role: Role = "backend"
    mirror: dict[str, Any] = field(default_factory=dict)        # shadow: mirror settings over the defaults
    shadow_allowed: frozenset[str] = frozenset()                # shadow: mirror outcomes allowed
    shadow_must_see: frozenset[str] = frozenset()               # shadow: mirror outcomes that must occur
    disk: DiskKind | None = None                                # sample_log, state_dir: the bad disk


def _up(behaviour: u.Behaviour) -> Callable[[u.UpstreamFactory], Awaitable[u.Upstream]]:
    return lambda f: f.start(behaviour)


def _raw(handler: Callable[[], u.RawHandler]) -> Callable[[u.UpstreamFactory], Awaitable[u.RawServer]]:
    return lambda f: f.raw(handler())


async def _refused(f: u.UpstreamFactory) -> str:
    return u.refused_url()


FAULTS: list[Fault] = [
    Fault("refuse", "connection refused", _refused, frozenset({E502}), frozenset({E502})),
    Fault("reset", "reset before answering", _up(u.reset()), frozenset({E502}), frozenset({E502})),
    Fault("reset_rst", "TCP RST before answering", _up(u.reset(rst=True)), frozenset({E502}), frozenset({E502})),
    Fault("reset_mid_body", "reset mid-body (buffered answer, 10 of 1000 bytes)",
          _up(u.reset_mid_body(declared=1000, sent=10)), frozenset({E502}), frozenset({E502})),
    Fault("reset_mid_stream", "reset mid-body (streamed answer, 100 KB of 2 MB)",
          _up(u.reset_mid_body(declared=2_000_000, sent=100_000)), frozenset({(200, "cut")}),
          frozenset({(200, "cut")}), note="head sent, body cut: the client sees it incomplete"),
    Fault("sse_break", "event stream breaks after 2 events", _up(u.sse(["a", "b", "c"], delay=0.01, break_after=2)),
          frozenset({(200, "cut")}), frozenset({(200, "cut")}), note="counted in streams_broken_total"),
    Fault("hang", "hangs (route timeout 300ms)", _up(u.hang()), frozenset({E504}), frozenset({E504}),
          route={"timeout": "300ms"}),
    Fault("slow", "answers after 200ms (timeout 2s)", _up(u.slow(0.2)), frozenset({OK}), frozenset({OK}),
          route={"timeout": "2s"}),
    Fault("slow_stream_idle", "stream stalls after 1 event (stream_idle_timeout 300ms)",
          _up(u.sse(["a", "b"], delay=0.01, stall_after=1)), frozenset({(200, "cut")}), frozenset({(200, "cut")}),
          limits={"stream_idle_timeout": "300ms"}),
    Fault("broken_json", "answers 200 with broken JSON", _up(u.status(200, BROKEN_JSON,
                                                                           {"content-type": "application/json"})),
          frozenset({OK}), frozenset({OK}), note="passed through byte for byte, not parsed"),
    Fault("status_500", "answers 500", _up(u.status(500, b'{"detail": "boom"}')), frozenset({(500, "backend")}),
          frozenset({(500, "backend")}), note="the model's own error passes unchanged"),
    Fault("wrong_content_length", "Content-Length 100, 5 bytes, close", _raw(u.wrong_content_length),
          frozenset({E502}), frozenset({E502})),
    Fault("garbage", "answers bytes that are not HTTP", _raw(u.garbage), frozenset({E502}), frozenset({E502})),
    Fault("close_immediately", "accepts and closes at once", _raw(u.close_immediately), frozenset({E502}),
          frozenset({E502})),
    Fault("keepalive_close", "closes each keep-alive connection after one answer",
          _raw(lambda: _answer_then_close), frozenset({OK, E502}), frozenset({OK}), sequential=True,
          note="pooled connection seen closed before reuse; a close racing a new request would be a 502"),
]


SHADOW_ERR = frozenset({"shadow_error"})
SHADOW_OK = frozenset({OK})
ALL_OK = frozenset({OK})
RETRY_ON = ["connect-error", "reset", "5xx"]


def _shadow(name: str, what: str, start: Callable[[u.UpstreamFactory], Awaitable[u.Upstream | u.RawServer | str]],
            outcomes: frozenset[str], must_see: frozenset[str] | None = None, **kw: Any) -> Fault:
    return Fault(f"shadow_{name}", what, start, ALL_OK, ALL_OK, role="shadow", shadow_allowed=outcomes,
                 shadow_must_see=outcomes if must_see is None else must_see, **kw)


def _sick(behaviour: u.Behaviour) -> Callable[[u.UpstreamFactory], Awaitable[u.Upstream]]:
    return lambda f: f.start(behaviour, name="sick")


# Shadows failing the ways backends fail (role "shadow"): the client never notices.
SHADOW_FAULTS: list[Fault] = [
    _shadow("refuse", "shadow refuses connections", _refused, SHADOW_ERR),
    _shadow("reset", "shadow resets before answering", _up(u.reset()), SHADOW_ERR),
    _shadow("reset_mid_body", "shadow resets mid-body (10 of 1000 bytes)",
            _up(u.reset_mid_body(declared=1000, sent=10)), SHADOW_ERR),
    _shadow("hang", f"shadow hangs (mirror timeout {MIRROR_TIMEOUT_S:g}s, max_inflight 10)", _up(u.hang()),
            frozenset({"shadow_timeout", "dropped"}), mirror={"max_inflight": 10},
            note="the 10 mirrors in flight time out, the other 40 are dropped at max_inflight"),
    _shadow("status_500", "shadow answers 500", _up(u.status(500, b'{"detail": "boom"}')), SHADOW_ERR),
    _shadow("broken_json", "shadow answers 200 with broken JSON",
            _up(u.status(200, BROKEN_JSON, {"content-type": "application/json"})), frozenset({"disagree"}),
            note="the comparison finds no value in the shadow's answer"),
    _shadow("garbage", "shadow answers bytes that are not HTTP", _raw(u.garbage), SHADOW_ERR),
    _shadow("wrong_content_length", "shadow: Content-Length 100, 5 bytes, close", _raw(u.wrong_content_length),
            SHADOW_ERR),
]

# A health-check path failing on endpoint 0 of two (role "health"); endpoint 0 fails every path.
HEALTH_FAULTS: list[Fault] = [
    Fault("health_500", "health check answers 500 on one of two endpoints", _sick(u.status(500)), ALL_OK,
          ALL_OK, role="health"),
    Fault("health_hang", "health check hangs past its timeout (150ms) on one of two endpoints",
          _sick(u.hang()), ALL_OK, ALL_OK, role="health"),
    Fault("health_reset", "health check connection reset on one of two endpoints", _sick(u.reset()), ALL_OK,
          ALL_OK, role="health"),
    Fault("health_refuse", "one of two endpoints refuses connections (health check included)", _refused,
          ALL_OK, ALL_OK, role="health"),
]

# The first backend rows again, with `retry` on a split of the faulty backend and a healthy one.
RETRY_FAULTS: list[Fault] = [
    Fault("retry_refuse", "connection refused", _refused, ALL_OK, ALL_OK, role="retry"),
    Fault("retry_reset", "reset before answering", _up(u.reset()), ALL_OK, ALL_OK, role="retry"),
    Fault("retry_reset_mid_body", "reset mid-body (buffered answer, 10 of 1000 bytes)",
          _up(u.reset_mid_body(declared=1000, sent=10)), ALL_OK, ALL_OK, role="retry"),
    Fault("retry_status_503", "answers 503", _up(u.status(503, b'{"detail": "busy"}')), ALL_OK, ALL_OK,
          role="retry"),
]


async def _answers(f: u.UpstreamFactory) -> u.Upstream:
    return await f.start(u.answer(), name="faulty")


# Disks under the sample log and the state dir (roles "sample_log" and "state_dir").
DISK_FAULTS: list[Fault] = [
    Fault("sample_log_readonly", "sample log on a read-only disk", _answers, ALL_OK, ALL_OK, role="sample_log",
          disk="readonly"),
    Fault("sample_log_full", "sample log on a full disk", _answers, ALL_OK, ALL_OK, role="sample_log",
          disk="full"),
    Fault("state_dir_readonly", "state_dir on a read-only disk, weights PUT", _answers, ALL_OK, ALL_OK,
          role="state_dir", disk="readonly"),
    Fault("state_dir_full", "state_dir on a full disk, weights PUT", _answers, ALL_OK, ALL_OK, role="state_dir",
          disk="full"),
]

ALL_FAULTS: list[Fault] = FAULTS + SHADOW_FAULTS + HEALTH_FAULTS + RETRY_FAULTS + DISK_FAULTS
TABLES: dict[Role, str] = {
    "backend": "backend fault", "shadow": "shadow fault (mirror percent 100, compare; the primary is healthy)",
    "health": "health-check fault (endpoint 0 of 2; checks every 50ms, 2 failures take it out)",
    "retry": "backend fault, with retry (attempts 2, on connect-error/reset/5xx) on a 1:1 split with a healthy "
             "backend",
    "sample_log": "sample log or state_dir disk fault",
}


def config_for(fault: Fault, url: str, healthy_url: str, *, extra_url: str = "", disk_file: str = "",
               disk_folder: str = "") -> dict[str, Any]:
    route: dict[str, Any] = {"name": "faulty", "match": {"path_prefix": "/faulty"}, "split": {"faulty": 1},
                             **fault.route}
    backends: dict[str, Any] = {"faulty": {"url": url, "timeout": "5s"}, "healthy": {"url": healthy_url}}
    config: dict[str, Any] = {"limits": fault.limits}
    if fault.role == "shadow":
        route["split"] = {"healthy": 1}
        route["mirror"] = [{"backend": "faulty", "percent": 100, "timeout": f"{MIRROR_TIMEOUT_S:g}s",
                            "compare": {"path": "$.predictions[*]"}, **fault.mirror}]
    elif fault.role == "health":
        backends["faulty"] = {"endpoints": [url, extra_url], "timeout": "5s", "health_check": {
            "path": "/health", "interval": "50ms", "timeout": "150ms", "unhealthy_after": 2, "healthy_after": 2}}
    elif fault.role == "retry":
        route["split"] = {"faulty": 1, "healthy": 1}
        route["retry"] = {"attempts": 2, "on": RETRY_ON}
    elif fault.role == "sample_log":
        route["monitor"] = {"sample": 1.0, "log": {"path": disk_file}}
    elif fault.role == "state_dir":
        backends["canary"] = {"url": extra_url}
        route["split"] = {"faulty": 1, "canary": 0}
        config["state_dir"] = disk_folder
    return {**config, "backends": backends, "routes": [route, {"name": "healthy", "split": {"healthy": 1}}]}


async def _after(session: aiohttp.ClientSession, sc: Any) -> tuple[bool, Outcome, str]:
    async with session.get(sc.admin_url + "/healthz") as r:
        healthy = r.status == 200
    normal = await send(session, "POST", sc.proxy_url + "/predict", data=b"{}")
    async with session.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    return healthy, normal, text


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll `check` every 20 ms until it holds or `timeout_s` passes (for state only visible by asking)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


async def _metrics(session: aiohttp.ClientSession, sc: Any) -> str:
    async with session.get(sc.admin_url + "/metrics") as r:
        return await r.text()


def _model_hits(up: u.Upstream) -> int:
    return sum(1 for seen in up.requests if not seen.path_qs.startswith("/health"))


async def run_fault(fault: Fault, factory: u.UpstreamFactory, make_sidecar: MakeSidecar,
                    session: aiohttp.ClientSession) -> Result:
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(bad_disk(fault.disk)) if fault.disk else None
        return await _run_fault(fault, factory, make_sidecar, session, disk)
    raise AssertionError("unreachable")  # mypy: ExitStack may swallow exceptions


async def _run_fault(fault: Fault, factory: u.UpstreamFactory, make_sidecar: MakeSidecar,
                     session: aiohttp.ClientSession, disk: Any) -> Result:
    started = await fault.start(factory)
    url = started if isinstance(started, str) else started.url
    healthy = await factory.start(u.answer(), name="healthy")
    extra = await factory.start(u.answer(), name="extra") if fault.role in ("health", "state_dir") else None
    sc = await make_sidecar(config_for(fault, url, healthy.url, extra_url=extra.url if extra else "",
                                       disk_file=str(disk.file) if disk else "",
                                       disk_folder=str(disk.folder) if disk else ""))
    target = sc.proxy_url + "/faulty/v1/models/m:predict"
    expect = BROKEN_JSON if fault.name == "broken_json" else None
    if fault.role == "shadow":   # the primary's answer, byte for byte
        expect = orjson.dumps({"predictions": [0.5], "model": healthy.name})
    side: dict[str, int] = {}
    problems: list[str] = []

    if fault.role == "health":   # wait until the health check has taken endpoint 0 out
        async def ejected() -> bool:
            async with session.get(sc.admin_url + "/admin/status") as r:
                doc = await r.json()
            backend = next(b for b in doc["backends"] if b["name"] == "faulty")
            return not backend["endpoints"][0]["healthy"]
        if not await _until(ejected, 5.0):
            problems.append("the sick endpoint was never taken out")
    if fault.role == "state_dir":   # switch all traffic to `canary`; the state file cannot be written
        async with session.put(sc.admin_url + "/admin/routes/faulty/weights", json={"faulty": 0, "canary": 1}) as r:
            doc = await r.json()
            side[f'weights PUT answered {r.status}, "persisted": {orjson.dumps(doc.get("persisted")).decode()}'] = 1
        if r.status != 200 or doc.get("persisted") is not False:
            problems.append(f"weights PUT answered {r.status} {doc}")

    took: list[float] = []   # each request's own time: a busy machine slows a batch, not the fastest request

    async def timed() -> Outcome:
        t = time.perf_counter()
        try:
            return await send(session, "POST", target, data=b"{}", expect_body=expect)
        finally:
            took.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    if fault.sequential:
        outcomes = [await timed() for _ in range(fault.n)]
    else:
        outcomes = list(await asyncio.gather(*(timed() for _ in range(fault.n))))
    seconds = time.perf_counter() - t0
    counts = Counter(outcomes)
    lost = sum(n for o, n in counts.items() if o not in fault.allowed)
    lost += sum(1 for o in fault.must_see if o not in counts)  # a fault that never showed is a failed run
    hits = started.hits if isinstance(started, u.Upstream) else None

    if fault.role == "shadow":
        await asyncio.wait_for(sc.services.mirrors.wait_idle(), MIRROR_TIMEOUT_S + 5)
        text = await _metrics(session, sc)
        mirrored = {o: int(v) for o in ("agree", "disagree", "missing", "sent", "primary_unreadable", "shadow_error",
                                        "shadow_timeout", "dropped", "cancelled", "internal_error")
                    if (v := metric(text, "sidecar_mirror_requests_total",
                                    f'backend="faulty",outcome="{o}",route="faulty"'))}
        side.update({f"mirror {o}": v for o, v in mirrored.items()})
        if sum(mirrored.values()) != fault.n:
            problems.append(f"mirror outcomes {mirrored} do not add up to the {fault.n} requests")
        if set(mirrored) - fault.shadow_allowed or fault.shadow_must_see - set(mirrored):
            problems.append(f"mirror outcomes {mirrored}, expected {sorted(fault.shadow_allowed)}")
        if min(took) >= MIRROR_TIMEOUT_S:   # a client that waits for its mirror waits for the shadow's timeout
            problems.append(f"the fastest request took {min(took):.2f}s: clients waited for the shadow")
        if healthy.hits != fault.n:
            problems.append(f"the primary saw {healthy.hits} requests, not {fault.n}")
    elif fault.role == "health":
        assert extra is not None
        hits = _model_hits(started) if isinstance(started, u.Upstream) else None
        side["answered by the healthy endpoint"] = _model_hits(extra)
        if hits:
            problems.append(f"the sick endpoint got {hits} model requests")
        if _model_hits(extra) != fault.n:
            problems.append(f"the healthy endpoint answered {_model_hits(extra)}, not {fault.n}")
    elif fault.role == "retry":
        text = await _metrics(session, sc)
        side["retries"] = int(metric(text, "sidecar_retries_total", 'route="faulty"'))
        if not side["retries"]:
            problems.append("no retry was made: the fault never showed")
        if healthy.hits != fault.n:
            problems.append(f"the healthy backend answered {healthy.hits} times for {fault.n} requests")
    elif fault.role == "sample_log":
        async def all_dropped() -> bool:
            return metric(await _metrics(session, sc), "sidecar_sample_log_dropped_total", 'route="faulty"') \
                >= fault.n
        if not await _until(all_dropped, 5.0):
            problems.append("the sample log's lost lines were not all counted")
        text = await _metrics(session, sc)
        for name in ("sample_log_errors_total", "sample_log_dropped_total", "sample_log_lines_total"):
            side[name] = int(metric(text, "sidecar_" + name, 'route="faulty"'))
        if not side["sample_log_errors_total"] or side["sample_log_lines_total"]:
            problems.append(f"sample log counters {side}")
    elif fault.role == "state_dir":
        assert extra is not None
        side["answered by the new weights"] = extra.hits
        if extra.hits != fault.n or hits:
            problems.append(f"the new weights were not used: {extra.hits} of {fault.n} to the new backend")

    ok_after, normal, text = await _after(session, sc)
    return Result(fault.name, counts, lost, hits, int(metric(text, "sidecar_requests_total", 'route="faulty"')),
                  ok_after, normal, seconds, side, problems, disk.how if disk else "")


# --- a backend restarting under load -------------------------------------------------------------


class RestartableBackend:
    """A model server on a fixed port that can stop and start again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.hits = 0
        self._runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        await request.read()
        self.hits += 1
        await asyncio.sleep(0.005)
        return web.Response(body=orjson.dumps({"predictions": [0.5]}), content_type="application/json")

    async def start(self) -> None:
        runner = web.ServerRunner(web.Server(self._handle, access_log=None), shutdown_timeout=0.2)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


RESTART_ALLOWED = frozenset({OK, E502})


async def run_restart(factory: u.UpstreamFactory, make_sidecar: MakeSidecar, session: aiohttp.ClientSession,
                      *, concurrency: int = 16, down_s: float = 0.3) -> Result:
    """Traffic for ~1.5 s; the backend stops at 0.4 s and a new one starts on the same port."""
    port = int(u.refused_url().rsplit(":", 1)[1])
    backend = RestartableBackend(port)
    await backend.start()
    healthy = await factory.start(u.answer())
    sc = await make_sidecar(config_for(FAULTS[0], backend.url, healthy.url))
    target = sc.proxy_url + "/faulty/v1/models/m:predict"
    outcomes: list[tuple[float, Outcome]] = []
    t0 = time.perf_counter()
    stop_at = t0 + 1.5

    async def client() -> None:
        while time.perf_counter() < stop_at:
            outcomes.append((time.perf_counter() - t0, await send(session, "POST", target, data=b"{}")))

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(client())
            await asyncio.sleep(0.4)
            await backend.stop()
            await asyncio.sleep(down_s)
            await backend.start()
        # recovery: once restarted, requests succeed again
        tail = [await send(session, "POST", target, data=b"{}") for _ in range(10)]
    finally:
        await backend.stop()
    seconds = time.perf_counter() - t0
    counts = Counter(o for _, o in outcomes) + Counter(tail)
    lost = sum(n for o, n in counts.items() if o not in RESTART_ALLOWED) + sum(1 for o in tail if o != OK)
    ok_after, normal, text = await _after(session, sc)
    return Result("restart", counts, lost, None, int(metric(text, "sidecar_requests_total", 'route="faulty"')),
                  ok_after, normal, seconds)


# --- the report --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _sidecars() -> Any:
    """The conftest's make_sidecar, for use outside pytest."""
    factory = SidecarFactory()
    try:
        yield factory.make
    finally:
        await factory.aclose()


def row(fault_name: str, what: str, result: Result, note: str = "") -> str:
    extras = [f"{v} {k}" for k, v in result.side.items()]
    saw = describe(result.counts) + (f"; {', '.join(extras)}" if extras else "") + (f" ({note})" if note else "")
    if result.how:
        what = f"{what} ({result.how})"
    if result.problems:
        saw += " **FAILED: " + "; ".join(result.problems) + "**"
    cmd = f"`python -m reliability.faults --only {fault_name}`"
    return f"| {what} | {saw} | {result.lost} | {cmd} |"


async def report(only: str | None) -> int:
    failed = 0
    role: Role | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        for fault in ALL_FAULTS:
            if only and fault.name != only:
                continue
            table = "sample_log" if fault.role == "state_dir" else fault.role
            if table != role:
                role = table
                print(f"\n| {TABLES[table]} | what the clients got | lost | reproduce |\n|---|---|---|---|")
            async with u.UpstreamFactory() as factory, _sidecars() as make:
                result = await run_fault(fault, factory, make, session)
            failed += not result.passed
            print(row(fault.name, fault.what, result, fault.note), flush=True)
            if fault is FAULTS[-1] and not only:
                failed += await _restart_row(session)
        if only == "restart":
            failed += await _restart_row(session)
    return 1 if failed else 0


async def _restart_row(session: aiohttp.ClientSession) -> int:
    async with u.UpstreamFactory() as factory, _sidecars() as make:
        result = await run_restart(factory, make, session)
    print(row("restart", "restarts under load (down 300 ms, same port)", result,
              "refused/reset while down, then served again"), flush=True)
    return int(not result.passed)


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the backend fault matrix and print its markdown table.")
    ap.add_argument("--report", action="store_true", help="print the table (default)")
    ap.add_argument("--only", help="one fault by name")
    args = ap.parse_args()
    import logging

    import uvloop

    logging.disable(logging.CRITICAL)  # the sidecar's warnings about the faults we inject are expected
    return uvloop.run(report(args.only))


if __name__ == "__main__":
    sys.exit(main())
