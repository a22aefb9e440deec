"""The proxy handler, in phases (as pingora names them):

    admit      load shedding at limits.max_inflight                 -> 503 overloaded
    match      the request target checked once (core/target.py)     -> 400 / 404 (OPTIONS *)
               an Expect other than 100-continue                    -> 417
               a route's `feedback.path`, before any route: the sidecar's own endpoint,
               never forwarded (`_feedback`; shell/feedback.py)      -> 200 / 400 / 405 / 413 / 503
               first route by prefix, method, headers               -> 404 / 405
               routes match the target's decoded `path`; every try and mirror sends its
               `forward` (origin-form, raw): the same checked target, never request.raw_path
    read       the request body, up to limits.max_body_bytes        -> 413 / 408 / 400
               `Expect: 100-continue`: "100 Continue" goes out just before the body is
               read, so only once the request passed the checks above
    forward    carry out what core/attempts.py decides, one command at a time (`_forward`):
      pick       override header, sticky hash or weighted random, over the backends that are
                 available (breaker, health, bulkhead; shell/backend.py)
      try        one endpoint of the picked backend (shell/upstream.py); a hedge beside it
                 after `hedge_after` (`_round`)
      backoff    sleep the delay the machine chose, then pick again
      fallback   the route's chain: a backend (one try) or a static response
    respond    buffered answers whole, streams chunk by chunk (committed: never retried);
               a route with `feedback` hands the answer to the feedback worker first
    log        metrics cells and one access log record

Deciding is core/attempts.py's (which try, when, what passes); this module only does: it
picks, tries, sleeps and counts, and turns the end the machine reached into an answer.

Each request captures the live `Runtime` once, so a reload never changes the config under a
request in flight. Everything the request carries (its request, runtime, route and route
state, headers, body, attempts) lives once, on its slotted `Exchange`.

Imports: stdlib, aiohttp (server side), multidict, orjson, sidecar.*.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from itertools import count
from time import perf_counter
from typing import Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config.plan import FeedbackPlan, RoutePlan, TryTimeouts
from sidecar.core.attempts import (
    Attempts,
    Backoff,
    Command,
    Fail,
    Fallback,
    FallbackTry,
    Hedge,
    Pick,
    PickFallback,
    PickHedge,
    Respond,
    Static,
    Try,
    Wait,
)
from sidecar.core.outcome import Outcome, classify_status
from sidecar.core.retry import NoRetry
from sidecar.core.split import Split, key_hash
from sidecar.core.target import Target, TargetError, parse_target
from sidecar.core.throttle import Throttle
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ExpectationFailed,
    InternalError,
    MethodNotAllowed,
    NoBackendAvailable,
    NoRoute,
    Overloaded,
    RequestTimeout,
    SidecarError,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.shell.backend import Backend
from sidecar.shell.feedback import BadFeedback
from sidecar.shell.listener import WATCH_UNSENT_BYTES, GuardedHandler
from sidecar.shell.metrics import Cell, HistCell, Metrics
from sidecar.shell.mirror import MirrorTicket
from sidecar.shell.runtime import RouteState, Runtime
from sidecar.shell.services import Services
from sidecar.shell.upstream import Answer, UpstreamFailure, header_block

log = logging.getLogger("sidecar.proxy")

# RFC 9110 7.6.1 hop-by-hop fields, plus framing the server and client set themselves.
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# request: Host is the backend's; the body is re-framed; Expect was answered by our server;
# the X-Forwarded-* and x-request-id fields are rewritten below
DROP_REQUEST: Final = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for",
                                    "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
DROP_RESPONSE: Final = HOP_BY_HOP | {"content-length"}
# response: what the sidecar sets itself replaces what a backend sent under these names
_NOT_RELAYED: Final = DROP_RESPONSE | {"x-request-id", "x-sidecar-backend", "x-sidecar-attempts"}
NO_ROUTE: Final = "(no_route)"
FEEDBACK_ROUTE: Final = "(feedback)"   # the route label of feedback POSTs (metrics, access log)
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BACKEND: Final = ""
LOG_EVERY_S: Final = 10.0


class _Cells:
    """Metric cells of one (route, backend), looked up once per request or try."""

    __slots__ = ("_retries", "attempts", "codes", "duration", "labels", "metrics", "ttfb")

    def __init__(self, metrics: Metrics, route: str, backend: str) -> None:
        self.metrics, self.labels = metrics, (route, backend)
        self.codes: dict[int, Cell] = {}
        self.duration: HistCell = metrics.request_duration.labels(route, backend)
        self.ttfb: HistCell = metrics.ttfb.labels(route, backend)
        self.attempts: dict[Outcome, Cell] = {}
        self._retries: Cell | None = None  # made on first use: no zero samples for pairs never tried

    @property
    def retries(self) -> Cell:
        if self._retries is None:
            self._retries = self.metrics.retries.labels(*self.labels)
        return self._retries

    def attempt(self, outcome: Outcome) -> Cell:
        cell = self.attempts.get(outcome)
        if cell is None:
            cell = self.attempts[outcome] = self.metrics.upstream_attempts.labels(*self.labels, str(outcome))
        return cell

    def code(self, status: int) -> Cell:
        cell = self.codes.get(status)
        if cell is None:
            cell = self.codes[status] = self.metrics.requests.labels(*self.labels, str(status))
        return cell


class Exchange:
    """One request, from arrival to the log line: its context, set once, and what it came to.

    The context (`request`, `rt`, then `route`, `rs`, `body`, `headers`, `steps`) is set by the
    phase that learns it and read by the later ones, never passed around beside it.
    """

    __slots__ = ("attempts", "backend", "body", "buffer_limit", "bytes_in", "bytes_out", "cells", "continued",
                 "deadline", "draw", "endpoints", "error", "feedback", "headers", "mirror", "outcome", "request",
                 "request_id", "results", "route", "rs", "rt", "steps", "t0", "target", "ttfb_s", "upstream_s")

    def __init__(self, request: web.BaseRequest, rt: Runtime, request_id: str, t0: float) -> None:
        self.request = request
        self.rt = rt                # captured once: a reload never changes a request's config
        self.request_id = request_id
        self.t0 = t0  # perf_counter: uvloop's loop.time() has only millisecond resolution
        self.route: RoutePlan | None = None
        # the checked request target (match phase); still None after it: refused (or shed)
        self.target: Target | None = None
        self.continued = False  # "100 Continue" was sent: the client now sends its body
        self.feedback = False   # a feedback POST (`feedback.path`), answered by the sidecar itself
        self.rs: RouteState                          # the route's live state (match)
        self.body = b""                              # read whole (read); retries and mirrors share it
        self.headers: bytes    # the header lines every try and mirror sends, framed once (read; header_block)
        self.steps: Attempts                         # the retry/hedge/fallback decisions (forward)
        self.deadline = 0.0  # loop time, what asyncio.timeout_at wants
        # per try, by its number - 1: the endpoint it went to, and its answer or failure once ended
        self.endpoints: list[int]
        self.results: list[Answer | UpstreamFailure | None]
        self.backend = NO_BACKEND
        self.attempts = 0
        self.cells: _Cells | None = None             # the metric cells of the latest try
        # set only for mirrored or sampled requests (shell/mirror.py, shell/monitor.py):
        self.mirror: MirrorTicket | None = None   # sent exactly once, when the final answer is known
        self.draw: float | None = None            # the monitor's sampling draw
        self.buffer_limit: int | None = None      # read answers whole up to this (compare, features)
        self.bytes_in = self.bytes_out = 0
        # What it came to, classified once (core/outcome.py): a backend's answer by its status as it
        # is passed on, STREAM_BROKEN when it broke on the way, a sidecar error by its status; None
        # for a static fallback (no backend answered, nothing failed). Monitors and logs ask it.
        self.outcome: Outcome | None = None
        # the sidecar error that answered, or ClientDisconnected when the client left mid-answer
        self.error: type[SidecarError] | None = None
        self.upstream_s: float | None = None
        self.ttfb_s: float | None = None

    @property
    def error_label(self) -> str | None:
        """The access log's `error`: the sidecar error's type, else a failed outcome's value."""
        if self.error is not None:
            return self.error.type
        outcome = self.outcome
        return str(outcome) if outcome is not None and outcome.failed else None

    @property
    def forward(self) -> str:
        """What every try and mirror sends after the backend's base path: the checked target."""
        assert self.target is not None, "forwarding a request whose target was not checked"
        return self.target.forward


class BufferedAnswer(web.Response):
    """A backend's answer read whole, which lets go of its body once written.

    aiohttp's connection loop keeps the last response alive until the next request on that
    connection: an idle keep-alive client would hold a whole answer (up to
    `buffer_response_bytes`) for `idle_timeout`. Once the body is in the kernel's socket
    buffer, the process keeps nothing of it.
    """

    __slots__ = ()

    async def write_eof(self, data: bytes = b"") -> None:
        body, protocol = self._body, self._req.protocol if self._req is not None else None  # gone after
        try:
            await super().write_eof(data)
            if isinstance(body, bytes) and len(body) >= WATCH_UNSENT_BYTES and isinstance(protocol, GuardedHandler):
                protocol.watch_unsent()  # the kernel may hold much of it: the client must read it
        finally:
            self._body = None


def error_response(err: SidecarError, ex: Exchange) -> web.Response:
    """docs/reference/http.md#errors: a JSON error the sidecar made, with the request id."""
    body = orjson.dumps({"error": {
        "type": err.type, "message": err.message,
        "route": ex.route.name if ex.route else None, "request_id": ex.request_id,
    }})
    headers = {"content-type": "application/json", "x-request-id": ex.request_id}
    if err.retry_after_s is not None:
        headers["retry-after"] = str(err.retry_after_s)
    if ex.attempts:
        headers["x-sidecar-attempts"] = str(ex.attempts)
    if (allow := getattr(err, "allow", None)) is not None:
        headers["allow"] = ", ".join(allow)
    ex.error = type(err)
    ex.outcome = classify_status(err.status)
    ex.bytes_out = len(body)
    return web.Response(status=err.status, body=body, headers=headers)


def _body_may_follow(request: web.BaseRequest, ex: Exchange) -> bool:
    """An answer made before the body was read, to a client that announced it with Expect and
    was not told to go on (no 100 Continue): it may still send the body, or never. Where its
    next request would start cannot be known, so the connection must close after the answer
    (RFC 9110 10.1.1); aiohttp then reads and drops what arrives for `lingering_time`, so a
    body that comes anyway does not turn the close into a reset that loses the answer."""
    return (not ex.continued and "expect" in request.headers and request.body_exists
            and not request.content.is_eof())


def _expects_continue(request: web.BaseRequest) -> bool:
    """True when the client waits for 100 Continue before it sends its body (RFC 9110 10.1.1).

    An Expect with any other member is refused (417); HTTP/1.0 expectations are ignored, as
    the RFC says. The backend never sees Expect (DROP_REQUEST): it gets the body, framed.
    """
    values = request.headers.getall("expect", None)
    if values is None or request.version < (1, 1):
        return False
    members = {m.strip().lower() for v in values for m in v.split(",")} - {""}
    if members - {"100-continue"}:
        raise ExpectationFailed("only the expectation 100-continue is supported")
    return bool(members) and request.body_exists


def _shown(raw_target: str) -> str:
    """A target as the access log shows one that was not checked (refused or shed): ASCII."""
    return raw_target.encode("ascii", "backslashreplace").decode("ascii")


def _connection_tokens(value: str | None) -> frozenset[str]:
    """Fields the Connection header names are hop-by-hop too (RFC 9110 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(","))


class Proxy:
    """The request handler of the main listener (an aiohttp low-level `web.Server` handler)."""

    def __init__(self, runtime: Runtime, services: Services, rng: Callable[[], float]) -> None:
        self.runtime = runtime          # the serving config; Sidecar.adopt swaps it
        # the long-lived objects it uses; shell/services.py owns them
        self.metrics = services.metrics
        self.mirrors = services.mirrors
        self.monitor = services.monitor
        self.feedback = services.feedback
        self.rollouts = services.rollouts
        self.access_log = services.access_log
        self.inflight = 0
        self.closing = False            # set after drain.delay: answers carry Connection: close
        self._idle: asyncio.Event | None = None  # created only while someone waits for idle
        self._rng = rng
        self._cells: dict[tuple[str, str], _Cells] = {}
        self._id_prefix = os.urandom(8).hex()
        self._ids = count(1)
        self._shed = self.metrics.shed.labels("max_inflight")
        self._log_every = Throttle(LOG_EVERY_S)  # per-request log lines, by (route, what)

    # -- bookkeeping ------------------------------------------------------------------------

    def cells(self, route: str, backend: str) -> _Cells:
        c = self._cells.get((route, backend))
        if c is None:
            c = self._cells[(route, backend)] = _Cells(self.metrics, route, backend)
        return c

    async def wait_idle(self) -> None:
        """Return once no request is in flight (used by the drain); any number may wait."""
        if self.inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def _log_sometimes(self, key: tuple[str, str], msg: str, *args: object) -> None:
        """Log a per-request event at most every LOG_EVERY_S per key (the metrics count each one)."""
        if self._log_every.try_pass(perf_counter(), key):
            log.info(msg, *args)

    # -- the handler --------------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = perf_counter()
        rt = self.runtime  # captured once: a reload never changes a request's config
        ex = Exchange(request, rt, request.headers.get("x-request-id") or f"{self._id_prefix}{next(self._ids):016x}",
                      t0)
        if self.inflight >= rt.plan.limits.max_inflight:
            self._shed.value += 1
            resp: web.StreamResponse = error_response(Overloaded("too many requests in flight"), ex)
            if _body_may_follow(request, ex):
                resp.force_close()
            return self._finish(request, resp, ex, rt, perf_counter())
        self.inflight += 1
        try:
            try:
                resp = await self._handle(ex)
            except SidecarError as err:
                resp = error_response(err, ex)
                if isinstance(err, ClientDisconnected):
                    self.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
            except Exception:  # a bug: answer like any sidecar error, log it with context
                log.exception("internal error on request %s", ex.request_id)
                resp = error_response(InternalError("internal error in the sidecar"), ex)
            # a refused target (ex.target None): the client is broken or hostile, and after
            # CONNECT aiohttp no longer parses the connection; close it
            if self.closing or ex.target is None or _body_may_follow(request, ex):
                resp.force_close()
            return self._finish(request, resp, ex, rt, perf_counter())
        finally:
            self.inflight -= 1
            if self._idle is not None and not self.inflight:
                self._idle.set()
                self._idle = None

    async def _handle(self, ex: Exchange) -> web.StreamResponse:
        request, rt = ex.request, ex.rt
        try:
            target = parse_target(request.method, request.raw_path)
        except TargetError as e:
            raise (NoRoute if e.status_hint == 404 else BadRequest)(e.reason) from None
        ex.target = target
        expect_continue = _expects_continue(request)
        if rt.plan.feedback_by_path and (fb := rt.plan.feedback_by_path.get(target.path)) is not None:
            return await self._feedback(ex, fb, expect_continue)
        route = ex.route = rt.plan.match(request.method, target.path, request.headers)
        # the route's backends get `target.forward`, which a backend's decoding reads as
        # `target.path` (core/target.py): never a path outside the prefix that matched
        assert target.path.startswith(route.path_prefix) and target.forward[0] == "/"
        ex.rs = rt.route_states[route.name]
        body = ex.body = await self._read_body(request, rt, ex, expect_continue)
        ex.bytes_in = len(body)
        headers = ex.headers = header_block(request.method, self._upstream_headers(request, ex), body)
        # decided once per request, before the first try: which shadows get a copy, whether the
        # payloads are sampled; both need the answer read whole (up to max_body_bytes)
        if route.mirrors:
            ex.mirror = self.mirrors.select(route, rt, request, ex.request_id, headers, body, path=target.forward)
            if ex.mirror is not None:
                ex.buffer_limit = ex.mirror.buffer_limit
        if route.monitor is not None and (draw := self.monitor.draw(route)) is not None:
            ex.draw = draw
            if route.monitor.needs_response:
                ex.buffer_limit = max(rt.plan.limits.max_body_bytes, rt.plan.limits.buffer_response_bytes)
        if route.feedback is not None:  # every answer's prediction is captured (docs/feedback.md)
            ex.buffer_limit = max(ex.buffer_limit or 0, rt.plan.limits.max_body_bytes)
        if ex.mirror is None:
            return await self._forward(ex, route)
        try:
            return await self._forward(ex, route)
        finally:
            if ex.mirror is not None:  # no backend answer reached the client: mirror, compare nothing
                ex.mirror.send(None)
                ex.mirror = None

    # -- forward: the executor of core/attempts.py ---------------------------------------------

    async def _forward(self, ex: Exchange, route: RoutePlan) -> web.StreamResponse:
        """Carry out the commands of the request's `Attempts` until one ends it (docs/resilience.md).

        Each case does what its command says and feeds back the event that follows; the
        machine's docstring (core/attempts.py) lists both. Tries that may overlap (a hedge)
        run in `_round`.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        ex.deadline = now - (perf_counter() - ex.t0) + route.timeout_s
        rs = ex.rs
        steps = ex.steps = Attempts(route.retry, rs.budget, ex.deadline, self._rng, route.fallback_kinds)
        ex.endpoints, ex.results = [], []
        cmd = steps.start(now)
        while True:
            if cmd.skipped is not None or cmd.release:
                self._note(ex, cmd)
            match cmd:
                case Pick():
                    cmd = steps.picked(self._pick(ex, now, cmd.avoid), now)
                case Try(hedge_at=None):
                    no, backend = cmd.no, rs.backends[cmd.index]
                    ep = self._start(ex, now, no, backend, cmd.avoid_endpoint_of, no > 1)
                    got = await self._try(ex, backend, ep, route.timeouts[cmd.index])
                    now = loop.time()
                    ex.results[no - 1] = got
                    if isinstance(got, Answer):  # `_ended`, inline: every request passes here
                        cmd = steps.ended(no, got.outcome, got.status, got.body is None, now)
                    else:
                        cmd = steps.ended(no, got.outcome, None, False, now)
                case Respond():
                    if cmd.fallback is not None:
                        self.metrics.fallbacks.labels(route.name, cmd.fallback).value += 1
                    answer = ex.results[cmd.no - 1]
                    assert isinstance(answer, Answer), "Respond names an answer"
                    return await self._respond(ex.request, answer, ex, ex.rt)
                case Try():
                    cmd = await self._round(ex, route, cmd)
                    now = loop.time()
                case Backoff():
                    await asyncio.sleep(cmd.delay_s)
                    now = loop.time()
                    cmd = steps.woke(now)
                case PickFallback():
                    backend_or_none = rs.fallback[cmd.step]
                    assert backend_or_none is not None, "PickFallback names a backend step"
                    cmd = steps.picked(cmd.step if backend_or_none.available(now) else None, now)
                case FallbackTry():
                    backend_or_none, timeouts = rs.fallback[cmd.step], route.fallback[cmd.step].timeouts
                    assert backend_or_none is not None and timeouts is not None
                    ep = self._start(ex, now, cmd.no, backend_or_none, 0, False)
                    got = await self._try(ex, backend_or_none, ep, timeouts)
                    now = loop.time()
                    cmd = self._ended(ex, cmd.no, got, now)
                case Static():
                    return self._static(ex, route, cmd.step)
                case Fail():
                    raise self._failure(ex, route, cmd.no)
                case _:
                    raise AssertionError(f"no command {cmd!r} outside a round")

    async def _round(self, ex: Exchange, route: RoutePlan, first: Try) -> Command:
        """A try that a hedge may join after `hedge_after` (docs/resilience.md); returns the first command
        after the round, for `_forward` to carry out. Both tries are tasks of this TaskGroup, so
        nothing outlives the round: when the machine moves on, the tries still running are
        cancelled (their connections closed by upstream.py) and awaited."""
        steps, rs = ex.steps, ex.rs
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Task[Answer | UpstreamFailure], int] = {}
        ended: list[asyncio.Task[Answer | UpstreamFailure]] = []   # done, not yet told to the machine
        cmd: Command = first
        async with asyncio.TaskGroup() as tg:
            while True:
                timeout: float | None = None
                match cmd:
                    case Try() | Hedge():
                        backend = rs.backends[cmd.index]
                        ep = self._start(ex, loop.time(), cmd.no, backend, cmd.avoid_endpoint_of, cmd.no > 1)
                        running[tg.create_task(self._try(ex, backend, ep, route.timeouts[cmd.index]))] = cmd.no
                        if isinstance(cmd, Try) and cmd.hedge_at is not None:
                            timeout = max(0.0, cmd.hedge_at - loop.time())
                    case PickHedge():
                        now = loop.time()
                        cmd = steps.picked(self._pick(ex, now, cmd.avoid), now)
                        continue
                    case Wait():
                        if cmd.skipped is not None or cmd.release:
                            self._note(ex, cmd)
                    case _:
                        break                               # the round is over
                if not ended:
                    done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if not done:                            # hedge_after passed
                        cmd = steps.woke(loop.time())
                        continue
                    ended.extend(done)
                task = ended.pop()
                cmd = self._ended(ex, running.pop(task), task.result(), loop.time())
            for task in ended:                              # ended in the same instant as the winner
                running.pop(task)
                if isinstance(got := task.result(), Answer):
                    got.close()
            for task in running:
                task.cancel()                               # the losers; the TaskGroup awaits them
        return cmd

    def _ended(self, ex: Exchange, no: int, got: Answer | UpstreamFailure, now: float) -> Command:
        """Try `no` ended: keep its result and tell the machine."""
        ex.results[no - 1] = got
        if isinstance(got, Answer):
            return ex.steps.ended(no, got.outcome, got.status, got.streaming, now)
        return ex.steps.ended(no, got.outcome, None, False, now)

    def _note(self, ex: Exchange, cmd: Command) -> None:
        """What a command may carry besides its own action: a retry not made (counted, docs/resilience.md:
        never silent), and streamed answers no longer kept (closed; one named later stands as a
        failure, so that the backend that gave it is still named)."""
        if cmd.skipped is not None:
            assert ex.route is not None
            self._skipped(ex.route.name, *cmd.skipped)
        for no in cmd.release:
            got = ex.results[no - 1]
            if isinstance(got, Answer):
                got.close()
                failure = ex.results[no - 1] = UpstreamFailure(got.outcome, f"answered {got.status}")
                failure.backend = got.backend

    def _start(self, ex: Exchange, now: float, no: int, backend: Backend, avoid_endpoint_of: int, retry: bool) -> int:
        """Try `no` starts on `backend`: its endpoint (another than try `avoid_endpoint_of`'s
        while one is usable), counted in `x-sidecar-attempts` and, for a retry or hedge, in
        `retries_total`."""
        assert ex.route is not None and len(ex.endpoints) == no - 1, (no, ex.endpoints)
        ep = backend.pick(now, self._rng, ex.endpoints[avoid_endpoint_of - 1] if avoid_endpoint_of else None)
        assert ep is not None, "an available backend has a usable endpoint"
        ex.endpoints.append(ep)
        ex.results.append(None)
        ex.attempts = no
        ex.backend = backend.name
        if retry:
            self.cells(ex.route.name, backend.name).retries.value += 1
        return ep

    async def _try(self, ex: Exchange, backend: Backend, ep: int, timeouts: TryTimeouts) -> Answer | UpstreamFailure:
        """One try on endpoint `ep` of `backend`, counted; its answer, or how it failed."""
        assert ex.route is not None
        now = asyncio.get_running_loop().time()
        deadline = ex.deadline
        headers_deadline = now + timeouts.first_byte_s
        try_deadline = now + timeouts.per_try_s
        if headers_deadline > deadline:
            headers_deadline = deadline
        if try_deadline > deadline:
            try_deadline = deadline
        cells = ex.cells = self.cells(ex.route.name, backend.name)
        request = ex.request
        t_try = perf_counter()
        try:
            answer = await backend.try_(ep, request.method, ex.forward, ex.headers, ex.body,
                                        headers_deadline, try_deadline, ex.buffer_limit)
        except UpstreamFailure as f:
            ex.upstream_s = perf_counter() - t_try
            cells.attempt(f.outcome).value += 1
            return f
        except asyncio.CancelledError:
            cells.attempt(Outcome.CANCELLED).value += 1
            raise
        ttfb = ex.upstream_s = ex.ttfb_s = perf_counter() - t_try
        cells.ttfb.observe(ttfb)
        cells.attempt(answer.outcome).value += 1
        return answer

    def _static(self, ex: Exchange, route: RoutePlan, step: int) -> web.Response:
        """The chain's static response (docs/resilience.md), named `fallback:response`."""
        plan = route.fallback[step]
        self.metrics.fallbacks.labels(route.name, Fallback.RESPONSE).value += 1
        ex.backend = plan.label
        hdrs = CIMultiDict(plan.headers)
        hdrs["x-request-id"] = ex.request_id
        hdrs["x-sidecar-backend"] = plan.label
        hdrs["x-sidecar-attempts"] = str(ex.attempts)
        if plan.status == 503 and "retry-after" not in hdrs:
            hdrs["retry-after"] = "1"
        ex.bytes_out = len(plan.body)
        return web.Response(status=plan.status, body=plan.body, headers=hdrs)

    def _failure(self, ex: Exchange, route: RoutePlan, no: int) -> SidecarError:
        """No answer passes: the failure of try `no` as 502 or 504, or 503 when nothing was tried."""
        if not no:
            ex.backend = NO_BACKEND
            return NoBackendAvailable(f"no backend of route {route.name!r} can take a request now")
        last = ex.results[no - 1]
        assert isinstance(last, UpstreamFailure), "Fail names a failure"
        ex.backend = last.backend or ex.backend
        if last.timed_out:
            return UpstreamTimeout(f"backend {ex.backend!r} did not answer in time")
        return UpstreamError(f"backend {ex.backend!r} failed: {last.detail}")

    def _skipped(self, route: str, reason: NoRetry, outcome: Outcome) -> None:
        """Count a retry not made (docs/resilience.md: never silent)."""
        metrics = self.metrics
        metrics.retries_skipped.labels(route, str(reason)).value += 1
        if reason is NoRetry.BUDGET:
            metrics.retry_budget_exhausted.labels(route).value += 1
            self._log_sometimes((route, "budget"), "route %s: retry budget spent; %s not retried "
                                "(counted in sidecar_retry_budget_exhausted_total)", route, outcome)

    async def _read_body(self, request: web.BaseRequest, rt: Runtime, ex: Exchange, expect_continue: bool) -> bytes:
        """The whole request body, refusing more than max_body_bytes without reading it all.

        `expect_continue`: the client waits for "100 Continue" before it sends the body; it
        is sent here, after every check that can refuse the request from its head alone.
        """
        limit = rt.plan.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limit}")
        if not request.body_exists:
            return b""
        content = request.content
        parts: list[bytes] = []
        size = 0
        try:
            # fast path: a small body usually arrives with the headers; no timer needed
            first = content.read_nowait(-1)
            if first:
                if len(first) == length:
                    return first
                size = len(first)
                if size > limit:  # chunked: more may have arrived than the limit
                    raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
                parts.append(first)
            elif expect_continue and not content.is_eof():
                # an interim answer (RFC 9110 15.2.1), written as aiohttp's _default_expect_handler
                # does; output_size back to 0: the final answer has not started
                await request.writer.write(CONTINUE)
                request.writer.output_size = 0
                ex.continued = True
            async with asyncio.timeout(rt.plan.limits.body_timeout):
                while chunk := await content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
                    parts.append(chunk)
        except TimeoutError:
            raise RequestTimeout("the request body did not arrive in time") from None
        except HttpProcessingError as e:
            raise BadRequest(f"malformed request body: {e.message}") from None
        except ConnectionError:
            raise ClientDisconnected("the client went away while sending its body") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pick(self, ex: Exchange, now: float, avoid: int | None) -> int | None:
        """Index of the split's backend for the next try; None when none can take it (docs/reference/http.md#the-split).

        `avoid` (a retry with `other_backend`, a hedge): another available backend is
        preferred; only when none is left does the try go to `avoid` again.
        """
        route, rs, headers = ex.route, ex.rs, ex.request.headers
        assert route is not None
        if route.override_header is not None and (name := headers.get(route.override_header)):
            index = route.backend_index(name)
            if index is not None:
                return index if rs.backends[index].available(now) else None
            if avoid is None:
                self.metrics.override_ignored.labels(route.name).value += 1
                self._log_sometimes((route.name, "override"), "override header names no backend of route %s; "
                                    "normal split used (counted in sidecar_override_ignored_total)", route.name)
        split = ex.rt.splits[route.name]
        available = rs.available(now)
        if avoid is not None:
            others = [True] * len(rs.backends) if available is None else list(available)
            others[avoid] = False
            picked = self._pick_split(route, split, headers, others)
            if picked is not None:
                return picked
        return self._pick_split(route, split, headers, available)

    def _pick_split(self, route: RoutePlan, split: Split, headers: CIMultiDictProxy[str],
                    available: list[bool] | None) -> int | None:
        if route.sticky_header is not None and (key := headers.get(route.sticky_header)):
            return split.pick_sticky(key_hash(key), available)
        return split.pick_random(self._rng(), available)

    def _upstream_headers(self, request: web.BaseRequest, ex: Exchange) -> list[tuple[str, str]]:
        src = request.headers
        connection = src.get("connection")
        drop = DROP_REQUEST | _connection_tokens(connection) if connection else DROP_REQUEST
        out = [(k, v) for k, v in src.items() if k.lower() not in drop]
        remote = request.remote or ""
        xff = src.get("x-forwarded-for")
        out.append(("X-Forwarded-For", f"{xff}, {remote}" if xff else remote))
        proto = src.get("x-forwarded-proto")
        out.append(("X-Forwarded-Proto", f"{proto}, {request.scheme}" if proto else request.scheme))
        # RFC 9112 3.2.2: the authority of an absolute-form target is the host, not Host
        if host := (ex.target.authority if ex.target is not None else None) or src.get("host"):
            fwd_host = src.get("x-forwarded-host")
            out.append(("X-Forwarded-Host", f"{fwd_host}, {host}" if fwd_host else host))
        out.append(("x-request-id", ex.request_id))
        return out

    def _response_headers(self, answer: Answer, ex: Exchange, keep_length: bool = False) -> list[tuple[str, str]]:
        """The answer's headers as the client gets them, in one pass (aiohttp makes its one
        CIMultiDict of the list): hop-by-hop ones and those the Connection header names dropped,
        the sidecar's own three set."""
        kept: list[tuple[str, str]] = []
        named: frozenset[str] | None = None
        for k, v in answer.headers:
            lk = k.lower()
            if lk not in _NOT_RELAYED or (keep_length and lk == "content-length"):
                kept.append((k, v))
            elif lk == "connection":
                named = _connection_tokens(v)
        if named:  # rare: drop what the (last) Connection header names
            drop = named - {"content-length"} if keep_length else named
            kept = [(k, v) for k, v in kept if k.lower() not in drop]
        kept.append(("x-request-id", ex.request_id))
        kept.append(("x-sidecar-backend", ex.backend))
        kept.append(("x-sidecar-attempts", str(ex.attempts)))
        return kept

    async def _respond(self, request: web.BaseRequest, answer: Answer, ex: Exchange,
                       rt: Runtime) -> web.StreamResponse:
        if answer.backend:  # the answer that passes may be an earlier try's (docs/reference/http.md#errors)
            ex.backend = answer.backend
        ex.outcome = answer.outcome
        if ex.mirror is not None:  # the answer is final: start the shadows (docs/shadow.md#what-happens-to-a-request)
            ex.mirror.send(answer.body)
            ex.mirror = None
        if ex.draw is not None and ex.route is not None:  # sampled: parsed by the monitor, off the loop
            self.monitor.offer(ex.route, ex.backend, ex.request_id, ex.body, answer.status, answer.body, ex.draw)
        if ex.route is not None and (fb := ex.route.feedback) is not None:
            # before the answer goes out: the capture is offered before the client can post
            # feedback for this id (shell/feedback.py, the ordering invariant)
            if answer.body is None:
                self.feedback.miss(fb.route, "streamed")
            elif answer.status >= 400:
                self.feedback.miss(fb.route, "error_status")
            else:
                self.feedback.offer(fb, ex.backend, ex.request_id, ex.body, answer.body)
        if answer.body is not None:
            ex.bytes_out = len(answer.body)
            if request.method == "HEAD":  # the backend's Content-Length describes the GET
                return web.Response(status=answer.status, headers=self._response_headers(answer, ex, True))
            return BufferedAnswer(status=answer.status, headers=self._response_headers(answer, ex),
                                  body=answer.body)
        # streamed: chunked, large, or an event stream; relayed as each piece arrives
        resp = web.StreamResponse(status=answer.status, headers=self._response_headers(answer, ex))
        if answer.content_length is not None:
            resp.content_length = answer.content_length
        if self.closing:  # draining: say so before the headers go out
            resp.force_close()
        idle = rt.plan.limits.stream_idle_timeout
        # a client gone mid-stream closes the answer at once, which frees the backend's
        # connection now rather than when the stalled stream's idle timeout passes
        protocol = request.protocol
        if isinstance(protocol, GuardedHandler):
            protocol.on_lost = answer.close
        try:
            await resp.prepare(request)
            while chunk := await answer.next_chunk(idle):
                ex.bytes_out += len(chunk)
                await resp.write(chunk)
        except UpstreamFailure as f:
            if request.transport is None or request.transport.is_closing():
                # the client left (on_lost closed the answer): not the backend's failure
                ex.error = ClientDisconnected
                self.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
                return resp
            # docs/reference/http.md: cut towards the client, no terminating chunk, so it sees it incomplete
            ex.outcome = Outcome.STREAM_BROKEN
            route_name = ex.route.name if ex.route else NO_ROUTE
            self.metrics.stream_broken.labels(route_name, ex.backend).value += 1
            self.cells(route_name, ex.backend).attempt(Outcome.STREAM_BROKEN).value += 1
            if (skip := ex.steps.stream_broke()) is not None:
                self._skipped(route_name, skip, Outcome.STREAM_BROKEN)  # never replayed
            self._log_sometimes((route_name, "stream"), "stream from %s broke after %d bytes: %s",
                                ex.backend, ex.bytes_out, f.detail)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            ex.error = ClientDisconnected
            self.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
        finally:
            if isinstance(protocol, GuardedHandler):
                protocol.on_lost = None
                if ex.bytes_out >= WATCH_UNSENT_BYTES:
                    protocol.watch_unsent()
            answer.close()  # no-op when the stream ended normally
        return resp

    async def _feedback(self, ex: Exchange, fb: FeedbackPlan, expect_continue: bool) -> web.StreamResponse:
        """`POST {feedback.path}` (docs/feedback.md#posting-feedback): joined on the feedback
        worker, answered per item; never forwarded."""
        request = ex.request
        ex.feedback = True
        if request.method != "POST":
            raise MethodNotAllowed(f"{fb.path} takes POST (feedback)", allow=["POST"])
        if not self.feedback.would_accept_join():
            raise Overloaded("too many feedback posts being joined")
        body = ex.body = await self._read_body(request, ex.rt, ex, expect_continue)
        ex.bytes_in = len(body)
        try:
            doc = await self.feedback.join(fb, body)
        except BadFeedback as e:
            raise BadRequest(str(e)) from None
        out = orjson.dumps(doc)
        ex.bytes_out = len(out)
        return web.Response(status=200, body=out, headers={"content-type": "application/json",
                                                            "x-request-id": ex.request_id})

    def _finish(self, request: web.BaseRequest, resp: web.StreamResponse, ex: Exchange, rt: Runtime,
                now: float) -> web.StreamResponse:
        route = ex.route.name if ex.route else FEEDBACK_ROUTE if ex.feedback else NO_ROUTE
        cells = ex.cells  # the latest try's, unless another backend (or none) answered
        if cells is None or cells.labels[1] != ex.backend:
            cells = self.cells(route, ex.backend)
        cells.code(resp.status).value += 1
        duration = now - ex.t0
        cells.duration.observe(duration)
        if ex.backend and ex.outcome is not None:  # rolling latency and errors (shell/monitor.py)
            self.monitor.record(route, ex.backend, duration, ex.outcome)
            self.rollouts.record(route, ex.backend, duration)   # a rolled-out step's latencies
        if rt.plan.access_log:
            # the path routes matched; a target that was not checked (refused, shed) as received
            path = ex.target.path if ex.target is not None else _shown(request.raw_path)
            self.access_log.add((
                time.time(), ex.request_id, request.method, path, route, ex.backend, resp.status,
                ex.attempts, duration, ex.upstream_s, ex.ttfb_s, ex.bytes_in,
                ex.bytes_out, ex.error_label, request.headers.get("traceparent"),
            ))
        return resp

