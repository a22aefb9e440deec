"""Fake model servers for proxy tests: real sockets on 127.0.0.1, ephemeral ports, no mocks.

What this module owns:

- `Upstream`: one aiohttp low-level `web.Server` on 127.0.0.1:0 that records what it saw
  (`hits`, `requests`, `in_flight`, `cancelled`) and answers through a `behaviour` that a
  test may swap at any time.
- Behaviours: async callables `(request, upstream) -> response`, built by the small
  factories below (`answer`, `echo`, `slow`, `fail_n`, `reset`, `reset_mid_body`, `hang`,
  `sse`, `chunked`, `big`, `status`, `sequence`). `slow`, `fail_n`, `hang` and `sequence`
  wrap other behaviours.
- `RawServer`: a plain asyncio TCP server for faults HTTP servers cannot make (`garbage`,
  `wrong_content_length`, `close_immediately`, `raw_reply`), and `refused_url()`.
- `UpstreamFactory`: starts any number of the above and stops them all; a conftest can
  wrap it in a three-line fixture.

Invariants (why stopping is always quick and leaks nothing):

- Every wait inside a behaviour (`delay`, `hang`, a stalled stream) also ends when the
  server stops: `Upstream.pause` and `Upstream.until_released` watch a stopping event, and
  a behaviour that was interrupted aborts its connection. The server runs with aiohttp's
  `handler_cancellation=True`, so a handler also ends when its client goes away, which is
  what lets a test see a proxy cancel its upstream call (`cancelled`, `in_flight`).
- Tasks: aiohttp and asyncio own the per-connection tasks; the only tasks created here
  live inside a `TaskGroup` (`_first_of`) or in `RawServer._tasks`, which `stop()` cancels
  and awaits.
- Bounded: request bodies (`max_body_bytes`), the `requests` log (`max_recorded`, oldest
  dropped), raw-server reads and every wait (timeouts on `wait_*`).

How a connection is dropped mid-answer (aiohttp has no API for it): `abort()` calls
`transport.abort()` and hands aiohttp back a plain `web.Response`; aiohttp's attempt to
send that fails with a `ConnectionError`, which it treats as "client disconnected" and
drops quietly. Bytes still in the transport's buffer are discarded by `abort()`, so the
partial-answer behaviours set the transport's high-water mark to 0 and `drain()` (bounded)
before aborting: then exactly the bytes written reach the client.

Imports: stdlib, aiohttp, multidict, orjson. Nothing from `sidecar`: the fakes must not
share code (or bugs) with what they test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

__all__ = [
    "Behaviour",
    "RawHandler",
    "RawServer",
    "Seen",
    "Upstream",
    "UpstreamFactory",
    "abort",
    "answer",
    "big",
    "big_body",
    "chunked",
    "close_immediately",
    "echo",
    "fail_n",
    "garbage",
    "hang",
    "raw_reply",
    "read_request",
    "refused_url",
    "reset",
    "reset_mid_body",
    "sequence",
    "slow",
    "sse",
    "start_raw",
    "start_upstream",
    "status",
    "wrong_content_length",
]

LOOPBACK = "127.0.0.1"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_RECORDED = 10_000
SHUTDOWN_TIMEOUT_S = 2.0  # handlers wake on stop; this only bounds a custom behaviour that ignores it
FLUSH_TIMEOUT_S = 2.0  # how long a partial answer waits for its bytes to leave before aborting

Behaviour: TypeAlias = Callable[[web.BaseRequest, "Upstream"], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str  # the request target exactly as received (raw, not decoded or normalised)
    headers: CIMultiDict[str]  # a copy; keys keep the case they arrived with
    body: bytes
    arrived_at: float  # time.monotonic() when the handler started
    peer: tuple[str, int] | None = None  # client address: same peer = same (pooled) connection

    def json(self) -> Any:
        return orjson.loads(self.body)


# ---------------------------------------------------------------------------------------
# Upstream
# ---------------------------------------------------------------------------------------


class Upstream:
    """One fake model server. Start with `await start_upstream(...)` or `async with Upstream(...)`."""

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        name: str = "up",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_recorded: int = DEFAULT_MAX_RECORDED,
    ) -> None:
        self.name = name
        self.behaviour: Behaviour = behaviour if behaviour is not None else answer()
        self.max_body_bytes = max_body_bytes
        self.max_recorded = max_recorded
        self.url = ""
        self.port = 0
        self.hits = 0
        self.in_flight = 0
        self.cancelled = 0  # handlers ended early because the client went away
        self.requests: list[Seen] = []
        self.got_request = asyncio.Event()  # set on every request; tests may clear it
        self._changed = asyncio.Event()  # private: wakes wait_hits / wait_in_flight
        self._stopping = asyncio.Event()
        self._runner: web.ServerRunner | None = None

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.name} {self.url or 'stopped'} hits={self.hits} "
            f"in_flight={self.in_flight} behaviour={self.behaviour!r}>"
        )

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> Self:
        if self._runner is not None:
            return self
        self._stopping.clear()
        server = web.Server(
            self._handle,
            request_factory=self._make_request,
            handler_cancellation=True,
            access_log=None,
        )
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, LOOPBACK, 0)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        return self

    async def stop(self) -> None:
        """Stop listening, wake every waiting behaviour, close every connection. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()
        await runner.cleanup()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # what tests look at ----------------------------------------------------------------

    @property
    def last(self) -> Seen:
        assert self.requests, f"{self!r} has seen no request"
        return self.requests[-1]

    @property
    def peers(self) -> set[tuple[str, int] | None]:
        """Distinct client connections among the recorded requests (keep-alive reuse shows here)."""
        return {seen.peer for seen in self.requests}

    def clear(self) -> None:
        """Forget what was seen (not what is in flight)."""
        self.hits = 0
        self.cancelled = 0
        self.requests.clear()
        self.got_request.clear()

    # ASYNC109: `timeout=` is the agreed test-facing API; it is applied with asyncio.timeout inside.
    async def wait_hits(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        await self._wait_until(lambda: self.hits >= n, timeout, f"hits >= {n}")

    async def wait_in_flight(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until exactly `n` handlers are running (0: all finished or cancelled)."""
        await self._wait_until(lambda: self.in_flight == n, timeout, f"in_flight == {n}")

    async def _wait_until(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not cond():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{self!r}: no {what} within {timeout_s}s") from None

    # helpers for behaviours --------------------------------------------------------------

    async def pause(self, delay_s: float) -> bool:
        """Wait `delay_s`; False if the server began stopping first (then abort, don't answer)."""
        if delay_s <= 0:
            return not self.stopping
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            return True
        return False

    async def until_released(self, release: asyncio.Event | None) -> bool:
        """Wait for `release` (None: never); False if the server began stopping first."""
        if release is None:
            await self._stopping.wait()
        else:
            await _first_of(release, self._stopping)
        return release is not None and release.is_set() and not self.stopping

    # the one handler ---------------------------------------------------------------------

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # The low-level server has no client_max_size knob; its request factory has.
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            asyncio.get_running_loop(),
            client_max_size=self.max_body_bytes,
        )

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived_at = time.monotonic()
        behaviour = self.behaviour  # captured once: a switch mid-request affects the next one
        self.in_flight += 1
        self._changed.set()
        try:
            body = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self._record(
                Seen(
                    method=request.method,
                    path_qs=request.raw_path,
                    headers=CIMultiDict(request.headers),
                    body=body,
                    arrived_at=arrived_at,
                    peer=tuple(peer) if peer else None,
                )
            )
            return await behaviour(request, self)
        except asyncio.CancelledError:
            self.cancelled += 1  # the client went away (handler_cancellation) or we stop
            raise
        except ConnectionResetError:
            # A write found the connection gone before the cancellation arrived.
            self.cancelled += 1
            return web.Response()  # aiohttp cannot send it either and drops the connection quietly
        finally:
            self.in_flight -= 1
            self._changed.set()

    def _record(self, seen: Seen) -> None:
        self.hits += 1
        self.requests.append(seen)
        if len(self.requests) > self.max_recorded:
            del self.requests[0]
        self.got_request.set()
        self._changed.set()


async def start_upstream(
    behaviour: Behaviour | None = None,
    *,
    name: str = "up",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_recorded: int = DEFAULT_MAX_RECORDED,
) -> Upstream:
    """Start a fake model server on 127.0.0.1:<ephemeral>; default behaviour `answer()`."""
    return await Upstream(
        behaviour, name=name, max_body_bytes=max_body_bytes, max_recorded=max_recorded
    ).start()


async def _first_of(*events: asyncio.Event) -> None:
    """Return once any event is set. The watchers live and die inside one TaskGroup."""
    if any(event.is_set() for event in events):
        return
    async with asyncio.TaskGroup() as tg:
        watchers = [tg.create_task(event.wait()) for event in events]

        def _cancel_rest(_: asyncio.Task[Literal[True]]) -> None:
            for watcher in watchers:
                watcher.cancel()  # no-op on the one that finished

        for watcher in watchers:
            watcher.add_done_callback(_cancel_rest)


# ---------------------------------------------------------------------------------------
# Behaviours
# ---------------------------------------------------------------------------------------


def abort(request: web.BaseRequest, *, rst: bool = False) -> web.StreamResponse:
    """Drop the connection now; return what the handler should return.

    With `rst`, SO_LINGER 0 makes the close a TCP RST instead of a FIN, so the client's read
    fails with ECONNRESET rather than seeing a clean end of stream.
    """
    transport = request.transport
    if transport is not None and not transport.is_closing():
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp will try to send this, hit the closed transport (ConnectionError) and treat it
    # as a client disconnect: no log line, no 500.
    return web.Response()


def _exact_writes(request: web.BaseRequest) -> None:
    """Make `request.writer.drain()` wait until every written byte has left the transport.

    With a high-water mark of 0 the protocol is paused whenever the transport buffers
    anything and resumed when it is empty, which is the event `drain()` waits for.
    """
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=0)


async def _flush_then_abort(request: web.BaseRequest, *, rst: bool = False) -> web.StreamResponse:
    """Abort after the bytes already written have reached the kernel (bounded wait).

    `transport.abort()` discards the transport's own buffer; on loopback that buffer is
    almost always empty already, but a large partial body could still be sitting in it.
    Needs `_exact_writes(request)` before the first write.
    """
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(FLUSH_TIMEOUT_S):
            await request.writer.drain()
    return abort(request, rst=rst)


def _headers(headers: dict[str, str] | None, content_type: str | None = None) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(headers or {})
    if content_type is not None and "Content-Type" not in out:
        out["Content-Type"] = content_type
    return out


_MODEL_ANSWER: Any = object()  # sentinel: answer()'s default body


@dataclass(slots=True)
class Answer:
    json: Any = _MODEL_ANSWER
    status: int = 200
    headers: dict[str, str] | None = None
    delay: float = 0.0

    def __repr__(self) -> str:
        body = "model-answer" if self.json is _MODEL_ANSWER else repr(self.json)
        return f"answer({body}, status={self.status}, delay={self.delay})"

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        if not await up.pause(self.delay):
            return abort(request)
        payload = {"predictions": [0.5], "model": up.name} if self.json is _MODEL_ANSWER else self.json
        return web.Response(
            status=self.status,
            body=orjson.dumps(payload),
            headers=_headers(self.headers, "application/json"),
        )


def answer(
    json: Any = _MODEL_ANSWER,
    status: int = 200,
    headers: dict[str, str] | None = None,
    delay: float = 0.0,
) -> Answer:
    """A JSON answer; by default `{"predictions": [0.5], "model": <upstream name>}`."""
    return Answer(json, status, headers, delay)


@dataclass(slots=True)
class Echo:
    status: int = 200

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for key, value in request.headers.items():
            headers.setdefault(key.lower(), []).append(value)
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key, []).append(value)
        body = await request.read()  # cached by aiohttp: the handler already read it
        payload = {
            "method": request.method,
            "path_qs": request.raw_path,
            "query": query,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
            "upstream": up.name,
        }
        return web.Response(status=self.status, body=orjson.dumps(payload), content_type="application/json")


def echo(status: int = 200) -> Echo:
    """JSON of what arrived: method, path_qs, query and headers (lower-case keys, lists of values),
    body (text), upstream (name)."""
    return Echo(status)


@dataclass(slots=True)
class Slow:
    delay: float
    then: Behaviour

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        if not await up.pause(self.delay):
            return abort(request)
        return await self.then(request, up)


def slow(delay: float, then: Behaviour | None = None) -> Slow:
    """Wait `delay` seconds before behaving as `then` (default `answer()`)."""
    return Slow(delay, then if then is not None else answer())


@dataclass(slots=True)
class FailN:
    n: int
    status: int
    kind: Literal["status", "reset"]
    then: Behaviour
    seen: int = 0

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        self.seen += 1
        if self.seen > self.n:
            return await self.then(request, up)
        if self.kind == "reset":
            return abort(request)
        return web.Response(
            status=self.status,
            body=orjson.dumps({"error": "injected failure", "upstream": up.name, "try": self.seen}),
            content_type="application/json",
        )


def fail_n(
    n: int,
    status: int = 503,
    then: Behaviour | None = None,
    *,
    kind: Literal["status", "reset"] = "status",
) -> FailN:
    """The first `n` requests fail (`status` with a JSON error, or a `reset`); then `then`."""
    return FailN(n, status, kind, then if then is not None else answer())


@dataclass(slots=True)
class Reset:
    rst: bool = False

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        return abort(request, rst=self.rst)


def reset(*, rst: bool = False) -> Reset:
    """Close the connection without answering (client: ServerDisconnectedError; with `rst`, a
    TCP RST, usually ClientOSError ECONNRESET)."""
    return Reset(rst)


@dataclass(slots=True)
class ResetMidBody:
    declared: int
    sent: int
    rst: bool = False

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = self.declared
        _exact_writes(request)
        await resp.prepare(request)  # StreamResponse sends status + headers at once
        if self.sent:
            await resp.write(b"x" * self.sent)
        return await _flush_then_abort(request, rst=self.rst)


def reset_mid_body(declared: int = 1000, sent: int = 10, *, rst: bool = False) -> ResetMidBody:
    """Status and headers with Content-Length `declared`, `sent` bytes, then the connection drops
    (client: ClientPayloadError while reading the body)."""
    if not 0 <= sent < declared:
        raise ValueError(f"need 0 <= sent < declared, got sent={sent} declared={declared}")
    return ResetMidBody(declared, sent, rst)


@dataclass(slots=True)
class Hang:
    release: asyncio.Event | None
    then: Behaviour

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        if not await up.until_released(self.release):
            return abort(request)
        return await self.then(request, up)


def hang(release: asyncio.Event | None = None, then: Behaviour | None = None) -> Hang:
    """Answer nothing until `release` is set (then behave as `then`, default `answer()`), the
    server stops (the connection is dropped) or the client goes away (the handler is cancelled)."""
    return Hang(release, then if then is not None else answer())


def _sse_event(event: str) -> bytes:
    lines = event.split("\n")
    return ("".join(f"data: {line}\n" for line in lines) + "\n").encode()


@dataclass(slots=True)
class Sse:
    events: list[str]
    delay: float
    break_after: int | None
    stall_after: int | None

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if self.break_after is not None:
            _exact_writes(request)
        await resp.prepare(request)  # chunked: no Content-Length on an HTTP/1.1 stream
        for i, event in enumerate(self.events):
            if i == self.break_after:
                return await _flush_then_abort(request)
            if i == self.stall_after:
                await up.until_released(None)  # until stop; or cancelled when the client leaves
                return abort(request)
            if i and not await up.pause(self.delay):
                return abort(request)
            await resp.write(_sse_event(event))
        if self.break_after is not None and self.break_after >= len(self.events):
            return await _flush_then_abort(request)
        await resp.write_eof()
        return resp


def sse(
    events: Sequence[str],
    delay: float = 0.05,
    break_after: int | None = None,
    *,
    stall_after: int | None = None,
) -> Sse:
    """A `text/event-stream` answer, one `data: ...` event every `delay` seconds (the first at
    once). `break_after=N`: the connection drops after N events (client: ClientPayloadError).
    `stall_after=N`: after N events nothing more is sent until the server stops (idle timeouts).
    A multi-line event becomes several `data:` lines."""
    return Sse(list(events), delay, break_after, stall_after)


@dataclass(slots=True)
class Chunked:
    chunks: list[bytes]
    delay: float
    content_type: str

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": self.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, chunk in enumerate(self.chunks):
            if i and not await up.pause(self.delay):
                return abort(request)
            if chunk:  # an empty chunk would end the body early on the wire
                await resp.write(chunk)
        await resp.write_eof()
        return resp


def chunked(
    chunks: Sequence[bytes], delay: float = 0.0, *, content_type: str = "application/octet-stream"
) -> Chunked:
    """A body in Transfer-Encoding: chunked, one write per chunk, `delay` seconds apart."""
    return Chunked(list(chunks), delay, content_type)


_PATTERN = bytes(range(256)) * 256  # 64 KiB


def big_body(n_bytes: int) -> bytes:
    """The exact body `big(n_bytes)` sends, for comparisons."""
    reps, rest = divmod(n_bytes, len(_PATTERN))
    return _PATTERN * reps + _PATTERN[:rest]


@dataclass(slots=True)
class Big:
    n_bytes: int
    content_type: str

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": self.content_type})
        resp.content_length = self.n_bytes
        await resp.prepare(request)
        left = self.n_bytes
        while left:  # written in 64 KiB pieces: aiohttp drains between them, memory stays flat
            piece = _PATTERN[: min(left, len(_PATTERN))]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp


def big(n_bytes: int, *, content_type: str = "application/octet-stream") -> Big:
    """A large body with Content-Length, equal to `big_body(n_bytes)`."""
    return Big(n_bytes, content_type)


@dataclass(slots=True)
class Status:
    code: int
    body: bytes
    headers: dict[str, str] | None

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        return web.Response(status=self.code, body=self.body, headers=_headers(self.headers))


def status(code: int, body: bytes | str = b"", headers: dict[str, str] | None = None) -> Status:
    """Exactly this status, body and headers (aiohttp adds Date, Server, Content-Length, and
    Content-Type application/octet-stream when a body has none)."""
    return Status(code, body.encode() if isinstance(body, str) else body, headers)


@dataclass(slots=True)
class SequenceOf:
    behaviours: list[Behaviour]
    seen: int = 0

    async def __call__(self, request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
        i = min(self.seen, len(self.behaviours) - 1)
        self.seen += 1
        return await self.behaviours[i](request, up)


def sequence(behaviours: Sequence[Behaviour]) -> SequenceOf:
    """Behaviour i for request i (counted from when this behaviour was installed); the last repeats."""
    if not behaviours:
        raise ValueError("sequence needs at least one behaviour")
    return SequenceOf(list(behaviours))


# ---------------------------------------------------------------------------------------
# Raw TCP servers and refused ports
# ---------------------------------------------------------------------------------------

RawHandler: TypeAlias = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

RAW_READ_TIMEOUT_S = 2.0
RAW_MAX_BODY_BYTES = 1024 * 1024


@dataclass(eq=False)
class RawServer:
    """A TCP server on 127.0.0.1:0 whose `handler` owns each connection (closed afterwards)."""

    handler: RawHandler
    url: str = ""
    port: int = 0
    connections: int = 0
    got_connection: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Self:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])
            self.url = f"http://{LOOPBACK}:{self.port}"
        return self

    async def stop(self) -> None:
        """Stop listening, cancel and await every connection handler. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # close the connections first: a handler blocked in a read then ends by itself
        # (asyncio's start_server reports a cancelled handler as an unhandled exception)
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        _, pending = await asyncio.wait(tasks, timeout=RAW_READ_TIMEOUT_S) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # asyncio made this task; we own its end (stop ends it)
        self._writers.add(writer)
        self.connections += 1
        self.got_connection.set()
        try:
            await self.handler(reader, writer)
        except ConnectionError:
            pass  # the client left first: that is fine for a fault server
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


async def start_raw(handler: RawHandler) -> RawServer:
    return await RawServer(handler).start()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request head and its Content-Length body (bounded); b"" if the client left."""
    try:
        async with asyncio.timeout(RAW_READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    length = min(int(value), RAW_MAX_BODY_BYTES)
            body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        return b""
    return head + body


async def _reply_and_linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write, half-close, then read until the client closes (bounded).

    Closing while the client's bytes sit unread makes the kernel send a RST, which can
    overtake our reply; lingering keeps the client's error about what we sent.
    """
    writer.write(data)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(RAW_READ_TIMEOUT_S):
            while await reader.read(65536):
                pass


def raw_reply(data: bytes) -> RawHandler:
    """Read the request, send `data` verbatim, close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await _reply_and_linger(reader, writer, data)

    return handler


def garbage() -> RawHandler:
    """Not HTTP at all (aiohttp client: ClientResponseError 400 "Invalid response status")."""
    return raw_reply(b"NOT HTTP AT ALL\r\n\r\n")


def wrong_content_length() -> RawHandler:
    """Valid headers announcing 100 bytes, 5 bytes, then close (client: ClientPayloadError)."""
    return raw_reply(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"a":'
    )


def close_immediately() -> RawHandler:
    """Accept and close at once, reading nothing (client: ServerDisconnectedError, or
    ClientOSError ECONNRESET when its request reached the closed socket first)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None  # RawServer closes the connection

    return handler


def refused_url() -> str:
    """A loopback URL nobody listens on (connect: ClientConnectorError, ECONNREFUSED).

    NOTE: the port was free a moment ago; another socket could take it later. Ports from
    bind(0) are spread over the ephemeral range, so within one test this does not happen.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port = int(sock.getsockname()[1])
    return f"http://{LOOPBACK}:{port}"


# ---------------------------------------------------------------------------------------
# Many at once
# ---------------------------------------------------------------------------------------


class UpstreamFactory:
    """Starts upstreams and raw servers for one test and stops them all in `aclose()`.

    conftest usage:
        @pytest.fixture
        async def upstreams():
            async with UpstreamFactory() as factory:
                yield factory
    """

    def __init__(self) -> None:
        self._started: list[Upstream | RawServer] = []
        self._names = itertools.count()

    async def start(self, behaviour: Behaviour | None = None, *, name: str | None = None) -> Upstream:
        up = await start_upstream(behaviour, name=name or f"up{next(self._names)}")
        self._started.append(up)
        return up

    async def raw(self, handler: RawHandler) -> RawServer:
        server = await start_raw(handler)
        self._started.append(server)
        return server

    async def aclose(self) -> None:
        started, self._started = self._started, []
        for server in reversed(started):
            await server.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
