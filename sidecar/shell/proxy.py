"""The proxy handler, in phases (as pingora names them):

    admit      load shedding at limits.max_inflight                 -> 503 overloaded
    match      first route by prefix, method, headers               -> 404 / 405
    read       the request body, up to limits.max_body_bytes        -> 413 / 408 / 400
    pick       override header, sticky hash or weighted random
    forward    one try to the backend's pool (shell/upstream.py)    -> 502 / 504
    respond    buffered answers whole, streams chunk by chunk
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

from sidecar.config.plan import RoutePlan
from sidecar.core.outcome import Outcome, classify_status
from sidecar.core.split import key_hash
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    InternalError,
    NoBackendAvailable,
    Overloaded,
    RequestTimeout,
    SidecarError,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.shell.accesslog import AccessLog
from sidecar.shell.metrics import Cell, HistCell, Metrics
from sidecar.shell.mirror import Mirrors
from sidecar.shell.runtime import Runtime
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
NO_BACKEND: Final = ""
READ_CHUNK: Final = 64 * 1024


class _Cells:
    """Metric cells of one (route, backend), looked up once per request."""

    __slots__ = ("codes", "duration", "labels", "metrics", "ttfb")

    def __init__(self, metrics: Metrics, route: str, backend: str) -> None:
        self.metrics, self.labels = metrics, (route, backend)
        self.codes: dict[int, Cell] = {}
        self.duration: HistCell = metrics.request_duration.labels(route, backend)
        self.ttfb: HistCell = metrics.ttfb.labels(route, backend)

    def code(self, status: int) -> Cell:
        cell = self.codes.get(status)
        if cell is None:
            cell = self.codes[status] = self.metrics.requests.labels(*self.labels, str(status))
        return cell


class Exchange:
    """Per-request state, from arrival to the log line."""

    __slots__ = ("attempts", "backend", "bytes_in", "bytes_out", "deadline", "error", "request_id", "route",
                 "status", "t0", "ttfb_s", "upstream_s")

    def __init__(self, request_id: str, t0: float) -> None:
        self.request_id = request_id
        self.t0 = t0  # perf_counter: uvloop's loop.time() has only millisecond resolution
        self.deadline = 0.0  # loop time, what asyncio.timeout_at wants
        self.route: RoutePlan | None = None
        self.backend = NO_BACKEND
        self.status = 0
        self.attempts = 0
        self.bytes_in = self.bytes_out = 0
        self.error: str | None = None
        self.upstream_s: float | None = None
        self.ttfb_s: float | None = None


def error_response(err: SidecarError, ex: Exchange) -> web.Response:
    """SPEC 3.4: a JSON error the sidecar made, with the request id."""
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
    return web.Response(status=err.status, body=body, headers=headers)


def _connection_tokens(value: str | None) -> frozenset[str]:
    """Fields the Connection header names are hop-by-hop too (RFC 9110 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(","))


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), else None."""
    if traceparent and len(traceparent) >= 55 and traceparent[2] == "-" and traceparent[35] == "-":
        tid = traceparent[3:35]
        if tid != "0" * 32 and all(c in "0123456789abcdef" for c in tid):
            return tid
    return None


class Proxy:
    """The request handler of the main listener (an aiohttp low-level `web.Server` handler)."""

    def __init__(self, runtime: Runtime, access_log: AccessLog, rng: Callable[[], float],
                 mirrors: Mirrors | None = None) -> None:
        self.runtime = runtime
        self.access_log = access_log
        self.mirrors = mirrors if mirrors is not None else Mirrors(runtime.metrics, rng, runtime.plan)  # mirror
        self.inflight = 0
        self.closing = False            # set after drain.delay: answers carry Connection: close
        self._idle: asyncio.Event | None = None  # created only while someone waits for idle
        self._rng = rng
        self._cells: dict[tuple[str, str], _Cells] = {}
        self._id_prefix = os.urandom(8).hex()
        self._ids = count(1)
        m = runtime.metrics
        self._shed = m.shed.labels("max_inflight")
        self._disconnects: dict[str, Cell] = {}

    # -- bookkeeping ------------------------------------------------------------------------

    def cells(self, route: str, backend: str) -> _Cells:
        c = self._cells.get((route, backend))
        if c is None:
            c = self._cells[(route, backend)] = _Cells(self.runtime.metrics, route, backend)
        return c

    async def wait_idle(self) -> None:
        """Return once no request is in flight (used by the drain)."""
        while self.inflight:
            self._idle = asyncio.Event()
            await self._idle.wait()

    # -- the handler --------------------------------------------------------------------------

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        t0 = perf_counter()
        rt = self.runtime  # captured once: a reload never changes a request's config
        ex = Exchange(request.headers.get("x-request-id") or f"{self._id_prefix}{next(self._ids):016x}", t0)
        if self.inflight >= rt.plan.limits.max_inflight:
            self._shed.value += 1
            resp: web.StreamResponse = error_response(Overloaded("too many requests in flight"), ex)
            return self._finish(request, resp, ex, rt, perf_counter())
        self.inflight += 1
        try:
            try:
                resp = await self._handle(request, ex, rt)
            except SidecarError as err:
                resp = error_response(err, ex)
            except Exception:  # a bug: answer like any sidecar error, log it with context
                log.exception("internal error on request %s", ex.request_id)
                resp = error_response(InternalError("internal error in the sidecar"), ex)
            if self.closing:
                resp.force_close()
            return self._finish(request, resp, ex, rt, perf_counter())
        finally:
            self.inflight -= 1
            if self._idle is not None and not self.inflight:
                self._idle.set()

    async def _handle(self, request: web.BaseRequest, ex: Exchange, rt: Runtime) -> web.StreamResponse:
        route = ex.route = rt.plan.match(request.method, request.path, request.headers)
        body = await self._read_body(request, rt)
        ex.bytes_in = len(body)
        index = self._pick(route, request.headers, rt)
        backend = route.backends[index]
        ex.backend = backend
        pool = rt.pools[backend]
        headers = self._upstream_headers(request, ex)
        # mirror: which shadows get a copy; started below once the primary answer is known
        mirror = self.mirrors.select(route, rt, request, ex.request_id, headers, body) if route.mirrors else None
        now = asyncio.get_running_loop().time()
        ex.deadline = now - (perf_counter() - ex.t0) + route.timeout_s
        try_deadline = min(ex.deadline, now + pool.plan.timeout_s)
        ex.attempts += 1
        t_try = perf_counter()
        # issue 6: one draw decides sampling; a sampled answer is read whole (up to max_body_bytes)
        draw = rt.monitor.draw(route)
        buffer_limit = None if mirror is None else mirror.buffer_limit
        if draw is not None:
            buffer_limit = max(rt.plan.limits.max_body_bytes, rt.plan.limits.buffer_response_bytes)
        try:
            answer = await pool.attempt(request.method, request.raw_path, headers, body,
                                        try_deadline, try_deadline, buffer_limit)
        except UpstreamFailure as f:
            if mirror is not None:  # mirror: the shadows get the request though the primary failed
                mirror.send(None)
            ex.upstream_s = perf_counter() - t_try
            ex.error = str(f.outcome)
            if f.outcome is Outcome.TIMEOUT:
                raise UpstreamTimeout(f"backend {backend!r} did not answer in time") from None
            raise UpstreamError(f"backend {backend!r} failed: {f.detail}") from None
        ttfb = ex.upstream_s = perf_counter() - t_try
        if draw is not None:  # issue 6: hand the payloads over; the monitor parses them off the loop
            rt.monitor.offer(route, backend, ex.request_id, body, answer.status, answer.body, draw)
        ex.ttfb_s = ttfb
        self.cells(route.name, backend).ttfb.observe(ttfb)
        if classify_status(answer.status) is Outcome.SERVER_ERROR:
            ex.error = "5xx"
        if mirror is not None:  # mirror: the primary answered (body None when it is streamed)
            mirror.send(answer.body)
        return await self._respond(request, answer, ex, rt)

    async def _read_body(self, request: web.BaseRequest, rt: Runtime) -> bytes:
        """The whole request body, refusing more than max_body_bytes without reading it all."""
        limit = rt.plan.limits.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limit}")
        if not request.body_exists:
            return b""
        content = request.content
        parts: list[bytes] = []
        size = 0
        if length is not None:
            # fast path: a small body usually arrives with the headers; no timer needed
            first = content.read_nowait(-1)
            if len(first) == length:
                return first
            parts.append(first)
            size = len(first)
        try:
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
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _pick(self, route: RoutePlan, headers: CIMultiDictProxy[str], rt: Runtime) -> int:
        if route.override_header is not None and (name := headers.get(route.override_header)):
            index = route.backend_index(name)
            if index is not None:
                return index
            self.runtime.metrics.override_ignored.labels(route.name).value += 1
            log.info("override header names no backend of route %s; normal split used", route.name)
        split = rt.splits[route.name]
        available = rt.available(route.name)
        if route.sticky_header is not None and (key := headers.get(route.sticky_header)):
            picked = split.pick_sticky(key_hash(key), available)
        else:
            picked = split.pick_random(self._rng(), available)
        if picked is None:
            raise NoBackendAvailable(f"no backend of route {route.name!r} can take a request now")
        return picked

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
        if host := src.get("host"):
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
        if answer.body is not None:
            ex.bytes_out = len(answer.body)
            if request.method == "HEAD":  # the backend's Content-Length describes the GET
                return web.Response(status=answer.status, headers=self._response_headers(answer, ex, True))
            return web.Response(status=answer.status, headers=self._response_headers(answer, ex),
                                body=answer.body)
        # streamed: chunked, large, or an event stream; relayed as each piece arrives
        resp = web.StreamResponse(status=answer.status, headers=self._response_headers(answer, ex))
        if answer.content_length is not None:
            resp.content_length = answer.content_length
        idle = rt.plan.limits.stream_idle_timeout
        try:
            await resp.prepare(request)
            while chunk := await answer.next_chunk(idle):
                ex.bytes_out += len(chunk)
                await resp.write(chunk)
        except UpstreamFailure as f:
            # SPEC 8: cut towards the client, no terminating chunk, so it sees it incomplete
            ex.error = str(Outcome.STREAM_BROKEN)
            self.runtime.metrics.stream_broken.labels(ex.route.name if ex.route else NO_ROUTE,
                                                      ex.backend).value += 1
            log.warning("stream from %s broke after %d bytes: %s", ex.backend, ex.bytes_out, f.detail)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            ex.error = "client_disconnected"
        finally:
            answer.close()  # no-op when the stream ended normally
        return resp

    def _finish(self, request: web.BaseRequest, resp: web.StreamResponse, ex: Exchange, rt: Runtime,
                now: float) -> web.StreamResponse:
        route = ex.route.name if ex.route else NO_ROUTE
        cells = self.cells(route, ex.backend)
        cells.code(resp.status).value += 1
        duration = now - ex.t0
        cells.duration.observe(duration)
        if ex.backend:  # issue 6: rolling latency and errors, every request that reached a backend
            rt.monitor.record(route, ex.backend, duration, resp.status, ex.error)
        if rt.plan.access_log:
            self.access_log.add((
                time.time(), ex.request_id, request.method, request.path, route, ex.backend, resp.status,
                ex.attempts, duration, ex.upstream_s, ex.ttfb_s, ex.bytes_in,
                ex.bytes_out or (resp.body_length if resp.prepared else 0) or _body_len(resp), ex.error,
                trace_id(request.headers.get("traceparent")),
            ))
        return resp


def _body_len(resp: web.StreamResponse) -> int:
    body = getattr(resp, "body", None)
    return len(body) if isinstance(body, bytes) else 0
