"""The proxy handler, in phases (as pingora names them):

    admit      load shedding at limits.max_inflight                 -> 503 overloaded
    match      the request target checked once (core/target.py)     -> 400 / 404 (OPTIONS *)
               an Expect other than 100-continue                    -> 417
               first route by prefix, method, headers               -> 404 / 405
               routes match the target's decoded `path`; every try and mirror sends its
               `forward` (origin-form, raw): the same checked target, never request.raw_path
    read       the request body, up to limits.max_body_bytes        -> 413 / 408 / 400
               `Expect: 100-continue`: "100 Continue" goes out just before the body is
               read, so only once the request passed the checks above
    pick       override header, sticky hash or weighted random, over the backends that are
               available (breaker, health, bulkhead; shell/backend.py)
    forward    a try on one endpoint (shell/upstream.py); a hedge after `hedge_after`
    classify   core/outcome.py; an answer below 400 (or a 4xx not in `retry.on`) is the answer
    retry      core/retry.RetryState.decide -> backoff within the deadline -> pick again,
               preferring another backend (`other_backend`); a retry not made is counted
    fallback   the route's chain: backends, one try each, then a static response;
               else the last answer as it was, else 502/504, or 503 when nothing was tried
    respond    buffered answers whole, streams chunk by chunk (committed: never retried)
    log        metrics cells and one access log record

Each request captures the live `Runtime` once (`self.runtime`), so a reload never changes
the config under a request in flight. Per-request state lives in a slotted `Exchange`.

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

from sidecar.config.plan import RoutePlan, TryTimeouts
from sidecar.core.outcome import Outcome, classify_status
from sidecar.core.retry import MIN_TRY_S, NoRetry, RetryState
from sidecar.core.split import Split, key_hash
from sidecar.core.target import Target, TargetError, parse_target
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ExpectationFailed,
    InternalError,
    NoBackendAvailable,
    NoRoute,
    Overloaded,
    RequestTimeout,
    SidecarError,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.shell.accesslog import AccessLog
from sidecar.shell.backend import Backend
from sidecar.shell.listener import WATCH_UNSENT_BYTES, GuardedHandler
from sidecar.shell.metrics import Cell, HistCell, Metrics
from sidecar.shell.mirror import Mirrors, MirrorTicket
from sidecar.shell.runtime import RouteState, Runtime
from sidecar.shell.upstream import Answer, UpstreamFailure

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
NO_ROUTE: Final = "(no_route)"
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
    """Per-request state, from arrival to the log line."""

    __slots__ = ("attempts", "backend", "body", "buffer_limit", "bytes_in", "bytes_out", "continued", "deadline",
                 "draw", "error", "mirror", "request_id", "route", "t0", "target", "ttfb_s", "upstream_s")

    def __init__(self, request_id: str, t0: float) -> None:
        self.request_id = request_id
        self.t0 = t0  # perf_counter: uvloop's loop.time() has only millisecond resolution
        self.deadline = 0.0  # loop time, what asyncio.timeout_at wants
        self.route: RoutePlan | None = None
        # the checked request target (match phase); still None after it: refused (or shed)
        self.target: Target | None = None
        self.continued = False  # "100 Continue" was sent: the client now sends its body
        self.backend = NO_BACKEND
        self.attempts = 0
        self.body = b""
        # set only for mirrored or sampled requests (shell/mirror.py, shell/monitor.py):
        self.mirror: MirrorTicket | None = None   # sent exactly once, when the final answer is known
        self.draw: float | None = None            # the monitor's sampling draw
        self.buffer_limit: int | None = None      # read answers whole up to this (compare, features)
        self.bytes_in = self.bytes_out = 0
        self.error: str | None = None
        self.upstream_s: float | None = None
        self.ttfb_s: float | None = None

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
    ex.error = err.type
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

    def __init__(self, runtime: Runtime, access_log: AccessLog, rng: Callable[[], float],
                 mirrors: Mirrors | None = None) -> None:
        self.runtime = runtime
        self.mirrors = mirrors if mirrors is not None else Mirrors(runtime.metrics, rng, runtime.plan)
        self.access_log = access_log
        self.inflight = 0
        self.closing = False            # set after drain.delay: answers carry Connection: close
        self._idle: asyncio.Event | None = None  # created only while someone waits for idle
        self._rng = rng
        self._cells: dict[tuple[str, str], _Cells] = {}
        self._id_prefix = os.urandom(8).hex()
        self._ids = count(1)
        self._shed = runtime.metrics.shed.labels("max_inflight")
        self._logged_at: dict[tuple[str, str], float] = {}  # rate limit of per-request log lines

    # -- bookkeeping ------------------------------------------------------------------------

    def cells(self, route: str, backend: str) -> _Cells:
        c = self._cells.get((route, backend))
        if c is None:
            c = self._cells[(route, backend)] = _Cells(self.runtime.metrics, route, backend)
        return c

    async def wait_idle(self) -> None:
        """Return once no request is in flight (used by the drain); any number may wait."""
        if self.inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def _log_sometimes(self, key: tuple[str, str], msg: str, *args: object) -> None:
        """Log a per-request event at most every LOG_EVERY_S per key (the metrics count each one)."""
        now = perf_counter()
        if now - self._logged_at.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged_at[key] = now
            log.info(msg, *args)

    # -- the handler --------------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = perf_counter()
        rt = self.runtime  # captured once: a reload never changes a request's config
        ex = Exchange(request.headers.get("x-request-id") or f"{self._id_prefix}{next(self._ids):016x}", t0)
        if self.inflight >= rt.plan.limits.max_inflight:
            self._shed.value += 1
            resp: web.StreamResponse = error_response(Overloaded("too many requests in flight"), ex)
            if _body_may_follow(request, ex):
                resp.force_close()
            return self._finish(request, resp, ex, rt, perf_counter())
        self.inflight += 1
        try:
            try:
                resp = await self._handle(request, ex, rt)
            except SidecarError as err:
                resp = error_response(err, ex)
                if isinstance(err, ClientDisconnected):
                    rt.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
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

    async def _handle(self, request: web.BaseRequest, ex: Exchange, rt: Runtime) -> web.StreamResponse:
        try:
            target = parse_target(request.method, request.raw_path)
        except TargetError as e:
            raise (NoRoute if e.status_hint == 404 else BadRequest)(e.reason) from None
        ex.target = target
        expect_continue = _expects_continue(request)
        route = ex.route = rt.plan.match(request.method, target.path, request.headers)
        # the route's backends get `target.forward`, which a backend's decoding reads as
        # `target.path` (core/target.py): never a path outside the prefix that matched
        assert target.path.startswith(route.path_prefix) and target.forward[0] == "/"
        body = ex.body = await self._read_body(request, rt, ex, expect_continue)
        ex.bytes_in = len(body)
        headers = self._upstream_headers(request, ex)
        # decided once per request, before the first try: which shadows get a copy, whether the
        # payloads are sampled; both need the answer read whole (up to max_body_bytes)
        if route.mirrors:
            ex.mirror = self.mirrors.select(route, rt, request, ex.request_id, headers, body, path=target.forward)
            if ex.mirror is not None:
                ex.buffer_limit = ex.mirror.buffer_limit
        if route.monitor is not None and (draw := rt.monitor.draw(route)) is not None:
            ex.draw = draw
            if route.monitor.needs_response:
                ex.buffer_limit = max(rt.plan.limits.max_body_bytes, rt.plan.limits.buffer_response_bytes)
        if ex.mirror is None:
            return await self._forward(request, ex, rt, route, headers, body)
        try:
            return await self._forward(request, ex, rt, route, headers, body)
        finally:
            if ex.mirror is not None:  # no backend answer reached the client: mirror, compare nothing
                ex.mirror.send(None)
                ex.mirror = None

    async def _forward(self, request: web.BaseRequest, ex: Exchange, rt: Runtime, route: RoutePlan,
                       headers: list[tuple[str, str]], body: bytes) -> web.StreamResponse:
        """Pick, try, retry, hedge, fall back: until an answer goes to the client (docs/resilience.md)."""
        rs = rt.route_states[route.name]
        loop = asyncio.get_running_loop()
        now = loop.time()
        ex.deadline = now - (perf_counter() - ex.t0) + route.timeout_s
        policy = route.retry
        budget = rs.budget
        if budget is not None:
            budget.record_request(now)
        state = RetryState(policy, budget, ex.deadline)
        index = self._pick(route, rs, request.headers, rt, now, None)
        # The answer or failure of the latest try that failed: what passes when nothing better comes.
        last: Answer | UpstreamFailure | None = None
        endpoint: int | None = None
        while index is not None:
            backend = rs.backends[index]
            ep = backend.pick(now, self._rng, endpoint)
            assert ep is not None, "an available backend has a usable endpoint"
            state.record_try()
            ex.attempts += 1
            if state.tries > 1:
                self.cells(route.name, backend.name).retries.value += 1
            ex.backend = backend.name
            if policy.hedge_after_s is None:
                got = await self._try(request, ex, route.name, backend, ep, route.timeouts[index], headers, body)
            else:
                index, ep, got = await self._hedged(request, ex, rt, rs, state, index, ep, headers, body)
                backend = rs.backends[index]
                ex.backend = backend.name
            if isinstance(got, Answer):
                status: int | None = got.status
                if got.status < 400 or (got.status < 500 and got.status not in policy.on_statuses):
                    return await self._respond(request, got, ex, rt)  # the fast path ends here
                outcome = classify_status(got.status)
            else:
                status, outcome = None, got.outcome
            last = _keep(last, got)
            now = loop.time()
            decision = state.decide(outcome, status, now, self._rng)
            if isinstance(decision, NoRetry):
                self._skipped(route.name, decision, outcome)
                break
            if isinstance(got, Answer) and got.streaming:
                got.close()  # a streamed answer cannot be kept while we retry
                last = UpstreamFailure(outcome, f"answered {got.status}")
                last.backend = got.backend
            await asyncio.sleep(decision)
            now = loop.time()
            previous = index
            index = self._pick(route, rs, request.headers, rt, now, index if policy.other_backend else None)
            endpoint = ep if index == previous else None
        return await self._fallback(request, ex, rt, rs, state, last, headers, body)

    async def _try(self, request: web.BaseRequest, ex: Exchange, route: str, backend: Backend, ep: int,
                   timeouts: TryTimeouts, headers: list[tuple[str, str]], body: bytes) -> Answer | UpstreamFailure:
        """One try on endpoint `ep` of `backend`, counted; its answer, or how it failed."""
        now = asyncio.get_running_loop().time()
        deadline = ex.deadline
        headers_deadline = now + timeouts.first_byte_s
        try_deadline = now + timeouts.per_try_s
        if headers_deadline > deadline:
            headers_deadline = deadline
        if try_deadline > deadline:
            try_deadline = deadline
        cells = self.cells(route, backend.name)
        t_try = perf_counter()
        try:
            answer = await backend.try_(ep, request.method, ex.forward, headers, body,
                                        headers_deadline, try_deadline, ex.buffer_limit)
        except UpstreamFailure as f:
            ex.upstream_s = perf_counter() - t_try
            ex.error = str(f.outcome)
            cells.attempt(f.outcome).value += 1
            return f
        except asyncio.CancelledError:
            cells.attempt(Outcome.CANCELLED).value += 1
            raise
        ttfb = ex.upstream_s = ex.ttfb_s = perf_counter() - t_try
        cells.ttfb.observe(ttfb)
        if answer.status < 400:
            cells.attempt(Outcome.OK).value += 1
            ex.error = None  # an earlier try's failure is not this answer's
        else:
            outcome = classify_status(answer.status)
            cells.attempt(outcome).value += 1
            ex.error = "5xx" if outcome is Outcome.SERVER_ERROR else None
        return answer

    async def _hedged(self, request: web.BaseRequest, ex: Exchange, rt: Runtime, rs: RouteState,
                      state: RetryState, index: int, ep: int, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, int, Answer | UpstreamFailure]:
        """A try that sends a hedge elsewhere when it has not answered after `hedge_after`.

        The first good answer (below 500) wins and the other try is cancelled (its connection
        is closed by upstream.py); when both fail, the latest failure is the round's result.
        Both tasks live in this TaskGroup, so nothing outlives the round.
        """
        route = rs.plan
        hedge_after = route.retry.hedge_after_s
        assert hedge_after is not None
        loop = asyncio.get_running_loop()
        first_backend = rs.backends[index]
        async with asyncio.TaskGroup() as tg:
            first = tg.create_task(self._try(request, ex, route.name, first_backend, ep, route.timeouts[index],
                                             headers, body))
            tries: dict[asyncio.Task[Answer | UpstreamFailure], tuple[int, int]] = {first: (index, ep)}
            done, _ = await asyncio.wait((first,), timeout=hedge_after)
            if done:
                return index, ep, first.result()
            now = loop.time()
            h_index = self._pick(route, rs, request.headers, rt, now, index)
            h_ep = rs.backends[h_index].pick(now, self._rng, ep if h_index == index else None) \
                if h_index is not None else None
            if h_index is not None and h_ep is not None:
                if state.try_hedge(now):
                    h_backend = rs.backends[h_index]
                    state.record_try()
                    ex.attempts += 1
                    self.cells(route.name, h_backend.name).retries.value += 1
                    second = tg.create_task(self._try(request, ex, route.name, h_backend, h_ep,
                                                      route.timeouts[h_index], headers, body))
                    tries[second] = (h_index, h_ep)
                elif state.tries < route.retry.attempts and now + MIN_TRY_S < state.deadline:
                    # try_hedge refused for the one reason left: the budget
                    self._skipped(route.name, NoRetry.BUDGET, Outcome.TIMEOUT)
            pending: set[asyncio.Task[Answer | UpstreamFailure]] = set(tries)
            result: tuple[int, int, Answer | UpstreamFailure] | None = None
            while pending and (result is None or _failed(result[2])):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    got = task.result()
                    if result is None or (_failed(result[2]) and not _failed(got)) or \
                            (isinstance(got, Answer) and not isinstance(result[2], Answer)):
                        if result is not None and isinstance(result[2], Answer):
                            result[2].close()
                        result = (*tries[task], got)
                    elif isinstance(got, Answer):
                        got.close()  # a loser that finished in the same instant
            for task in pending:
                task.cancel()  # the loser; the TaskGroup awaits it
        assert result is not None
        return result

    async def _fallback(self, request: web.BaseRequest, ex: Exchange, rt: Runtime, rs: RouteState,
                        state: RetryState, last: Answer | UpstreamFailure | None,
                        headers: list[tuple[str, str]], body: bytes) -> web.StreamResponse:
        """The split gave no good answer: the fallback chain, then the last answer, then 502/503/504.

        A fallback backend gets one try with the time left; when tries were already made it
        spends retry budget like a retry, so a fallback cannot make a retry storm either.
        """
        route = rs.plan
        loop = asyncio.get_running_loop()
        tried = state.tries > 0
        for step, backend in zip(route.fallback, rs.fallback, strict=True):
            if backend is None:
                if isinstance(last, Answer):
                    last.close()
                self.runtime.metrics.fallbacks.labels(route.name, "response").value += 1
                ex.backend = step.label
                ex.error = None
                hdrs = CIMultiDict(step.headers)
                hdrs["x-request-id"] = ex.request_id
                hdrs["x-sidecar-backend"] = step.label
                hdrs["x-sidecar-attempts"] = str(ex.attempts)
                if step.status == 503 and "retry-after" not in hdrs:
                    hdrs["retry-after"] = "1"
                ex.bytes_out = len(step.body)
                return web.Response(status=step.status, body=step.body, headers=hdrs)
            now = loop.time()
            if not backend.available(now) or now + MIN_TRY_S >= ex.deadline:
                continue
            if tried and state.budget is not None and not state.budget.try_spend(now):
                self._skipped(route.name, NoRetry.BUDGET, Outcome.SERVER_ERROR)
                continue
            ep = backend.pick(now, self._rng)
            assert ep is not None and step.timeouts is not None
            state.record_try()
            ex.attempts += 1
            ex.backend = backend.name
            got = await self._try(request, ex, route.name, backend, ep, step.timeouts, headers, body)
            if not _failed(got):
                assert isinstance(got, Answer)
                if isinstance(last, Answer):
                    last.close()
                self.runtime.metrics.fallbacks.labels(route.name, "backend").value += 1
                return await self._respond(request, got, ex, rt)
            last = _keep(last, got)
        if isinstance(last, Answer):
            return await self._respond(request, last, ex, rt)  # docs/resilience.md#fallback-chain: passes as it was
        if last is None:
            ex.backend = NO_BACKEND
            raise NoBackendAvailable(f"no backend of route {route.name!r} can take a request now")
        ex.backend = last.backend or ex.backend
        ex.error = str(last.outcome)
        if last.timed_out:
            raise UpstreamTimeout(f"backend {ex.backend!r} did not answer in time")
        raise UpstreamError(f"backend {ex.backend!r} failed: {last.detail}")

    def _skipped(self, route: str, reason: NoRetry, outcome: Outcome) -> None:
        """Count a retry not made (docs/resilience.md: never silent); a not-retryable 4xx is no skipped retry."""
        if reason is NoRetry.NOT_RETRYABLE:
            return
        metrics = self.runtime.metrics
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

    def _pick(self, route: RoutePlan, rs: RouteState, headers: CIMultiDictProxy[str], rt: Runtime, now: float,
              avoid: int | None) -> int | None:
        """Index of the split's backend for the next try; None when none can take it (docs/reference/http.md#the-split).

        `avoid` (a retry with `other_backend`, a hedge): another available backend is
        preferred; only when none is left does the try go to `avoid` again.
        """
        if route.override_header is not None and (name := headers.get(route.override_header)):
            index = route.backend_index(name)
            if index is not None:
                return index if rs.backends[index].available(now) else None
            if avoid is None:
                self.runtime.metrics.override_ignored.labels(route.name).value += 1
                self._log_sometimes((route.name, "override"), "override header names no backend of route %s; "
                                    "normal split used (counted in sidecar_override_ignored_total)", route.name)
        split = rt.splits[route.name]
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
        extra = _connection_tokens(src.get("connection"))
        drop = DROP_REQUEST | extra if extra else DROP_REQUEST
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

    def _response_headers(self, answer: Answer, ex: Exchange, keep_length: bool = False) -> CIMultiDict[str]:
        extra = None
        for k, v in answer.headers:
            if k.lower() == "connection":
                extra = _connection_tokens(v)
        drop = DROP_RESPONSE | extra if extra else DROP_RESPONSE
        if keep_length:
            drop = drop - {"content-length"}
        headers = CIMultiDict((k, v) for k, v in answer.headers if k.lower() not in drop)
        headers["x-request-id"] = ex.request_id
        headers["x-sidecar-backend"] = ex.backend
        headers["x-sidecar-attempts"] = str(ex.attempts)
        return headers

    async def _respond(self, request: web.BaseRequest, answer: Answer, ex: Exchange,
                       rt: Runtime) -> web.StreamResponse:
        if answer.backend:  # the answer that passes may be an earlier try's (docs/reference/http.md#errors)
            ex.backend = answer.backend
        if ex.mirror is not None:  # the answer is final: start the shadows (docs/shadow.md#what-happens-to-a-request)
            ex.mirror.send(answer.body)
            ex.mirror = None
        if ex.draw is not None and ex.route is not None:  # sampled: parsed by the monitor, off the loop
            rt.monitor.offer(ex.route, ex.backend, ex.request_id, ex.body, answer.status, answer.body, ex.draw)
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
                ex.error = "client_disconnected"
                self.runtime.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
                return resp
            # docs/reference/http.md: cut towards the client, no terminating chunk, so it sees it incomplete
            ex.error = str(Outcome.STREAM_BROKEN)
            route_name = ex.route.name if ex.route else NO_ROUTE
            self.runtime.metrics.stream_broken.labels(route_name, ex.backend).value += 1
            self.cells(route_name, ex.backend).attempt(Outcome.STREAM_BROKEN).value += 1
            if ex.route is not None and ex.attempts < ex.route.retry.attempts:
                self._skipped(route_name, NoRetry.STARTED, Outcome.STREAM_BROKEN)  # never replayed
            self._log_sometimes((route_name, "stream"), "stream from %s broke after %d bytes: %s",
                                ex.backend, ex.bytes_out, f.detail)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            ex.error = "client_disconnected"
            self.runtime.metrics.client_disconnects.labels(ex.route.name if ex.route else NO_ROUTE).value += 1
        finally:
            if isinstance(protocol, GuardedHandler):
                protocol.on_lost = None
                if ex.bytes_out >= WATCH_UNSENT_BYTES:
                    protocol.watch_unsent()
            answer.close()  # no-op when the stream ended normally
        return resp

    def _finish(self, request: web.BaseRequest, resp: web.StreamResponse, ex: Exchange, rt: Runtime,
                now: float) -> web.StreamResponse:
        route = ex.route.name if ex.route else NO_ROUTE
        cells = self.cells(route, ex.backend)
        cells.code(resp.status).value += 1
        duration = now - ex.t0
        cells.duration.observe(duration)
        if ex.backend:  # rolling latency and errors (shell/monitor.py), every request that reached a backend
            rt.monitor.record(route, ex.backend, duration, resp.status, ex.error)
        if rt.plan.access_log:
            # the path routes matched; a target that was not checked (refused, shed) as received
            path = ex.target.path if ex.target is not None else _shown(request.raw_path)
            self.access_log.add((
                time.time(), ex.request_id, request.method, path, route, ex.backend, resp.status,
                ex.attempts, duration, ex.upstream_s, ex.ttfb_s, ex.bytes_in,
                ex.bytes_out, ex.error, request.headers.get("traceparent"),
            ))
        return resp


def _keep(last: Answer | UpstreamFailure | None, got: Answer | UpstreamFailure) -> Answer | UpstreamFailure:
    """Of two failed tries, the one whose result passes when nothing better comes (docs/reference/http.md#errors):
    the latest backend answer, else the latest failure. The answer left behind is closed."""
    if isinstance(got, Answer):
        if isinstance(last, Answer) and last is not got:
            last.close()
        return got
    return last if isinstance(last, Answer) else got


def _failed(got: Answer | UpstreamFailure) -> bool:
    return not isinstance(got, Answer) or classify_status(got.status).failed

