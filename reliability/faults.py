"""The backend fault matrix: each fault, what the client got, requests lost, the command.

One table (`FAULTS`) drives both `tests/reliability/test_backend_faults.py` and
`python -m reliability.faults --report` (the markdown rows of docs/reliability.md), so the
docs and the tests cannot disagree. For each fault, `n` requests are sent concurrently to a
route whose only backend has that fault, then:

- every request got exactly one answer, and each answer is one the fault allows: the
  backend's own, or a documented sidecar error (status + error.type, SPEC 3.4);
- the sidecar's `requests_total` for the route grew by exactly `n` (its accounting agrees
  with the clients': nothing double-answered or dropped), and the backend saw each request
  at most once (no hidden duplicates: the core proxy does not retry);
- `/healthz` is 200 and a request to a healthy route is served normally afterwards.

To add a fault: one `Fault(...)` line (and, if no fake backend does it yet, a behaviour in
tests/upstreams.py or a raw handler here). Faults whose shape is not "n requests at once"
(a backend restarting under load) have their own `run` function.

Imports: stdlib, aiohttp, sidecar, reliability.common, tests.upstreams.
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
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from reliability.common import Outcome, describe, metric, send
from tests import upstreams as u

OK: Outcome = (200, "backend")
E502: Outcome = (502, "upstream_error")
E504: Outcome = (504, "upstream_timeout")
BROKEN_JSON = b'{"predictions": [0.5, '
MakeSidecar = Callable[..., Awaitable[Any]]   # conftest's make_sidecar: config dict -> running Sidecar


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

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.healthy_after and self.normal_after == OK \
            and self.sidecar_counted == sum(self.counts.values())


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


def config_for(fault: Fault, url: str, healthy_url: str) -> dict[str, Any]:
    return {
        "limits": fault.limits,
        "backends": {"faulty": {"url": url, "timeout": "5s"}, "healthy": {"url": healthy_url}},
        "routes": [{"name": "faulty", "match": {"path_prefix": "/faulty"}, "split": {"faulty": 1}, **fault.route},
                   {"name": "healthy", "split": {"healthy": 1}}],
    }


async def _after(session: aiohttp.ClientSession, sc: Any) -> tuple[bool, Outcome, str]:
    async with session.get(sc.admin_url + "/healthz") as r:
        healthy = r.status == 200
    normal = await send(session, "POST", sc.proxy_url + "/predict", data=b"{}")
    async with session.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    return healthy, normal, text


async def run_fault(fault: Fault, factory: u.UpstreamFactory, make_sidecar: MakeSidecar,
                    session: aiohttp.ClientSession) -> Result:
    started = await fault.start(factory)
    url = started if isinstance(started, str) else started.url
    healthy = await factory.start(u.answer())
    sc = await make_sidecar(config_for(fault, url, healthy.url))
    target = sc.proxy_url + "/faulty/v1/models/m:predict"
    expect = BROKEN_JSON if fault.name == "broken_json" else None
    t0 = time.perf_counter()
    if fault.sequential:
        outcomes = [await send(session, "POST", target, data=b"{}", expect_body=expect) for _ in range(fault.n)]
    else:
        outcomes = list(await asyncio.gather(*(send(session, "POST", target, data=b"{}", expect_body=expect)
                                               for _ in range(fault.n))))
    seconds = time.perf_counter() - t0
    counts = Counter(outcomes)
    lost = sum(n for o, n in counts.items() if o not in fault.allowed)
    lost += sum(1 for o in fault.must_see if o not in counts)  # a fault that never showed is a failed run
    ok_after, normal, text = await _after(session, sc)
    hits = started.hits if isinstance(started, u.Upstream) else None
    return Result(fault.name, counts, lost, hits, int(metric(text, "sidecar_requests_total", 'route="faulty"')),
                  ok_after, normal, seconds)


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
    import os

    import yaml

    from sidecar.config.load import LoadedConfig, config_version, parse_config
    from sidecar.shell.server import Sidecar
    from tests.conftest import sidecar_config

    running: list[tuple[Any, asyncio.Future[int]]] = []

    async def make(config: dict[str, Any]) -> Any:
        cfg, secrets = parse_config(yaml.safe_dump(sidecar_config(config)), env=os.environ)
        sc = Sidecar(LoadedConfig(cfg, config_version(cfg), None, secrets))
        task = asyncio.ensure_future(sc.run())
        await asyncio.wait_for(sc.ready.wait(), 10)
        running.append((sc, task))
        return sc

    try:
        yield make
    finally:
        for sc, task in running:
            sc.request_stop()
            await asyncio.wait_for(task, 15)


def row(fault_name: str, what: str, result: Result, note: str = "") -> str:
    saw = describe(result.counts) + (f" ({note})" if note else "")
    cmd = f"`python -m reliability.faults --only {fault_name}`"
    return f"| {what} | {saw} | {result.lost} | {cmd} |"


async def report(only: str | None) -> int:
    print("| backend fault | what the clients got | lost | reproduce |")
    print("|---|---|---|---|")
    failed = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        for fault in FAULTS:
            if only and fault.name != only:
                continue
            async with u.UpstreamFactory() as factory, _sidecars() as make:
                result = await run_fault(fault, factory, make, session)
            failed += not result.passed
            print(row(fault.name, fault.what, result, fault.note), flush=True)
        if not only or only == "restart":
            async with u.UpstreamFactory() as factory, _sidecars() as make:
                result = await run_restart(factory, make, session)
            failed += not result.passed
            print(row("restart", "restarts under load (down 300 ms, same port)", result,
                      "refused/reset while down, then served again"), flush=True)
    return 1 if failed else 0


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
