"""Connection pools to backends and one upstream try; the sole upstream error mapper.

Why our own HTTP/1.1 client instead of aiohttp's ClientSession: a model call is one small
POST on a pooled keep-alive connection, and ClientSession spends most of its per-request
cost on generality we do not use (cookie jars, redirects, tracing hooks, URL building, a
task per body write). Profiling the bench showed it at about a third of the proxy's CPU.
Here a try is: take an idle connection (LIFO), one `transport.writelines`, feed the bytes
to the sans-IO parser of core/http1.py, wake one future. The aiohttp server still serves
the clients; the aiohttp client is still used by the CLI and the tests.

Shapes:
- `UpstreamPool` (one per backend endpoint): idle connections, at most `max_connections` open;
  callers past the limit wait (bounded by their try deadline) for one to be released.
- `UpstreamPool.attempt` returns an `Answer`: buffered (`body` read whole) when the head
  declares a Content-Length up to `buffer_response_bytes` and is not an event stream, so a
  retry could still replace it; else streaming (`next_chunk` until b"").
- Every failure becomes an `UpstreamFailure` carrying an `Outcome` (core/outcome.py):
  refused/unreachable -> connect_error, deadline -> timeout, closed early -> reset, bytes
  that are not HTTP -> protocol_error. Code past this module sees nothing else.

Whose answer is this (the rule that keeps answers with their clients): HTTP/1.1 pairs an
answer with a request only by order on the connection, so a connection is reused only when
its answer ended exactly where its framing said and nothing else arrived:
- any byte after an answer's end, in the same read or later, is a protocol error
  (core/http1.py) that closes the connection; the answer it followed, if not yet handed
  on, fails with it (an error on a connection voids the events still queued there);
- answers to HEAD and 204/304 answers are never reused (an upstream that sends a body
  after them anyway would have it read as the next client's answer);
- bytes arriving on an idle connection, or on one handed to a waiting try before its
  request is written, close it, and the try takes another.
NOTE (the limit every HTTP/1.1 proxy shares): an unsolicited answer that arrives after the
next request was written cannot be told apart from that request's answer; the rules above
close the connection at the first sign of it, which bounds the damage to that one answer.

Timeouts: the caller passes absolute loop-time deadlines; one asyncio Timeout covers a try
(until the head at `headers_deadline`, then the buffered body until `try_deadline`).
Streamed chunks get `idle_timeout_s` each. A connection whose response was not read to
the end (timeout, cancel, stream abandoned) is closed, never reused.

Imports: stdlib, sidecar.core, sidecar.config.plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, cast

from sidecar.config.plan import BackendPlan
from sidecar.core.http1 import END, Event, Head, ProtocolError, ResponseParser
from sidecar.core.outcome import Outcome, classify_status

# Idle pooled connections are closed after this. Below the 5 s keep-alive of uvicorn and
# gunicorn, the servers most models run on, so we rarely send on a connection the server is
# closing (which, for a POST, is a reset we may not retry).
POOL_IDLE_S: Final = 4.0
# A streamed body buffered past this many bytes, or this many parser events, pauses reading
# from the backend until the client catches up. Events are bounded too: each one costs a
# Python object whatever its size (the parser joins a read's body pieces into one event).
STREAM_HIGH_WATER: Final = 1024 * 1024
EVENTS_HIGH_WATER: Final = 64
_BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def header_block(method: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """A request's head after its Host line: its header lines, the body's Content-Length and
    the blank line that ends the head, encoded once per request. Every try of the request,
    retries, hedges and its mirrors send these very bytes; each try writes only its own
    request line and Host before them (`UpstreamPool._request_bytes`)."""
    lines = [f"{k}: {v}\r\n" for k, v in headers]
    if body or method not in _BODYLESS_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class UpstreamFailure(Exception):
    """A try that produced no usable answer; `outcome` says how it failed.

    `timed_out`: the deadline passed (also while still connecting, which is a connect_error
    for retries, since nothing was sent, but a 504 for the client when nothing else answers).
    """

    def __init__(self, outcome: Outcome, detail: str, timed_out: bool = False) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail
        self.timed_out = timed_out or outcome is Outcome.TIMEOUT
        self.backend = ""  # set by shell/backend.py: which backend failed


def map_exception(exc: BaseException) -> UpstreamFailure:
    """Translate a transport, parser or timeout exception into an UpstreamFailure (the one place)."""
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(Outcome.TIMEOUT, "timed out")
    if isinstance(exc, ProtocolError):
        return UpstreamFailure(Outcome.PROTOCOL_ERROR, str(exc))
    if isinstance(exc, ConnectionError | OSError | EOFError):
        return UpstreamFailure(Outcome.RESET, str(exc) or type(exc).__name__)
    raise exc  # a bug, not a backend's failure: let it surface


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a backend endpoint; parses answers as bytes arrive."""

    __slots__ = ("_buffered", "_error", "_events", "_paused", "_waiter", "idle_since", "parser", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamFailure | None = None
        self._buffered = 0
        self._paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            events = self.parser.feed(data)
        except ProtocolError as e:
            self._fail(UpstreamFailure(Outcome.PROTOCOL_ERROR, str(e)))
            return
        if events:
            for ev in events:
                if isinstance(ev, bytes):
                    self._buffered += len(ev)
            self._events.extend(events)
            if (self._buffered > STREAM_HIGH_WATER or len(self._events) > EVENTS_HIGH_WATER) \
                    and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        # an idle connection closing, or a reset mid-answer: connection_lost decides
        with contextlib.suppress(ProtocolError):
            self._events.extend(self.parser.feed_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.parser.done and not self.parser.idle and (not self._events or self._events[-1] is not END):
            self._fail(UpstreamFailure(Outcome.RESET, "connection closed before the answer was complete"))
        elif not self.parser.done:
            self._fail(UpstreamFailure(Outcome.RESET, "connection closed"))
        self._wake()

    # -- used by the pool and Answer -------------------------------------------------------------

    def _fail(self, failure: UpstreamFailure) -> None:
        if self._error is None:
            self._error = failure
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def pending(self) -> bool:
        """Events not yet taken by the try (a reused connection must have none)."""
        return bool(self._events)

    @property
    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing() and self._error is None

    def start(self, data: list[bytes], head_request: bool) -> None:
        assert self.transport is not None
        assert not self._events
        self.parser.reset(head_request)
        self._buffered = 0
        self.transport.writelines(data)

    async def next_event(self) -> Event:
        # An error voids what is still queued: the bytes after an answer's end make the
        # answer itself suspect (it may be a stray one), so it is not handed on.
        if self._error is not None:
            raise self._error
        while not self._events:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        ev = self._events.popleft()
        if isinstance(ev, bytes):
            self._buffered -= len(ev)
            if self._paused and self._buffered < STREAM_HIGH_WATER // 2 and len(self._events) < EVENTS_HIGH_WATER // 2 \
                    and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
        return ev

    def expire(self) -> None:
        """The try's deadline passed (a loop timer): fail the waiting try, drop the connection."""
        self._fail(UpstreamFailure(Outcome.TIMEOUT, "timed out"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class Answer:
    """A backend's response: `body` when read whole, else streamed with `next_chunk`."""

    __slots__ = ("_conn", "_pool", "backend", "body", "content_length", "headers", "outcome", "status")

    def __init__(self, head: Head, body: bytes | None, conn: _Conn | None, pool: UpstreamPool) -> None:
        self.status = head.status
        self.outcome = classify_status(head.status)  # classified once, here, for every consumer
        self.headers = head.headers          # as received; the proxy drops hop-by-hop ones
        self.body = body
        self.content_length = head.length
        self._conn = conn                    # held while streaming
        self._pool = pool
        self.backend = ""                    # set by shell/backend.py: which backend answered

    @property
    def streaming(self) -> bool:
        return self.body is None

    async def next_chunk(self, idle_timeout_s: float) -> bytes:
        """The next piece of a streamed body as it arrives (b"" at the end)."""
        conn = self._conn
        if conn is None:
            return b""
        try:
            async with asyncio.timeout(idle_timeout_s):
                ev = await conn.next_event()
        except BaseException as e:
            self.close()
            if isinstance(e, Exception):
                raise map_exception(e) from None
            raise
        if ev is END:
            self._conn = None
            self._pool._release(conn)
            self._pool.stream_done()
            return b""
        assert isinstance(ev, bytes)
        return ev

    def close(self) -> None:
        """Abandon a stream mid-way: its connection cannot be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            self._pool._release(conn)
            self._pool.stream_done()


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context(scheme: str) -> ssl.SSLContext | None:
    """One client TLS context per process: building one reads the CA bundle (~20 ms, blocking),
    so it is made once, by the first https pool, not per pool and reload."""
    global _SSL_CONTEXT
    if scheme != "https":
        return None
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class UpstreamPool:
    """The keep-alive connections and live counters of one endpoint (origin) of a backend.

    A backend with several endpoints has one pool per endpoint (shell/backend.py); the
    bulkhead (`max_inflight`) is judged there, over all of them.
    """

    def __init__(self, plan: BackendPlan, buffer_response_bytes: int, endpoint: int = 0,
                 max_connections: int | None = None) -> None:
        self.plan = plan
        self.endpoint = plan.endpoints[endpoint]
        self.inflight = 0
        self._buffer_limit = buffer_response_bytes
        self._max_connections = plan.max_connections if max_connections is None else max_connections
        self._host = self.endpoint.host
        self._port = self.endpoint.port
        self._ssl = _ssl_context(self.endpoint.scheme)
        self._base = self.endpoint.base_path
        self._host_header = self.endpoint.host_header
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._closed = False
        # called when a streamed answer ends (shell/backend.py keeps per-endpoint counts)
        self.on_stream_done: Callable[[], None] | None = None

    # -- connections --------------------------------------------------------------------------

    def _take_idle(self, now: float) -> _Conn | None:
        """The most recently used idle connection that is still good (LIFO keeps few warm)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since < POOL_IDLE_S:
                return conn
            conn.close()
            self._open -= 1
        return None

    async def _acquire(self) -> _Conn:
        """A connection when none is idle: open one, or wait for one (bounded by the caller)."""
        loop = asyncio.get_running_loop()
        while self._open >= self._max_connections:
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append(fut)
            try:
                handed = await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    handed = fut.result()
                    # handed over just as we gave up: pass the connection, or the free slot, on
                    if handed is not None:
                        self._release(handed)
                    else:
                        self._wake_waiter()
                raise
            if handed is not None:
                if handed.usable:
                    return handed
                # bytes arrived (or it closed) after it was handed over: never write on it
                handed.close()
                self._open -= 1
        self._open += 1
        try:
            _, conn = await loop.create_connection(_Conn, self._host, self._port, ssl=self._ssl)
        except BaseException as e:
            self._open -= 1
            self._wake_waiter()
            if isinstance(e, OSError) and not isinstance(e, TimeoutError):
                raise UpstreamFailure(Outcome.CONNECT_ERROR, f"{self._host}:{self._port}: {e.strerror or e}") \
                    from None
            raise
        return conn

    def _release(self, conn: _Conn) -> None:
        """A try ended: keep the connection when its answer was complete and it may be reused."""
        head = conn.parser.head
        if not self._closed and conn.usable and conn.parser.done and head is not None and head.keep_alive \
                and not conn.pending:
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(conn)
                    return
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
            return
        conn.close()
        self._open -= 1
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        """A connection slot freed up: let the first waiter open a new connection."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    # -- one try ------------------------------------------------------------------------------

    def _request_bytes(self, method: str, raw_path: str, block: bytes, body: bytes) -> list[bytes]:
        start = f"{method} {self._base}{raw_path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
        head = start.encode("utf-8", "surrogateescape")
        return [head, block, body] if body else [head, block]

    async def attempt(self, method: str, raw_path: str, block: bytes, body: bytes,
                      headers_deadline: float, try_deadline: float, buffer_limit: int | None = None) -> Answer:
        """One try. Raises UpstreamFailure; on success the caller owns the Answer.

        `block`: the request's header lines, framed by `header_block` (made once per request).

        `buffer_limit` raises the size up to which an answer is read whole, for the requests
        whose answer must be parsed (mirrored with comparison, sampled); default
        `limits.buffer_response_bytes`.
        """
        limit = self._buffer_limit if buffer_limit is None else buffer_limit
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        timer: asyncio.TimerHandle | None = None
        self.inflight += 1
        streaming = False
        try:
            conn = self._take_idle(loop.time())
            if conn is None:  # connecting (or waiting for a slot) is bounded by the same deadline
                async with asyncio.timeout_at(headers_deadline):
                    conn = await self._acquire()
            # NOTE: a plain loop timer on the connection, not asyncio.timeout: when it fires it
            # fails the waiting try with a TIMEOUT and aborts the connection. Cheaper per try
            # (no task bookkeeping); the try never awaits anything but this connection.
            timer = loop.call_at(headers_deadline, conn.expire)
            conn.start(self._request_bytes(method, raw_path, block, body), method == "HEAD")
            head = await conn.next_event()
            assert isinstance(head, Head)
            length = head.length
            if length is not None and length <= limit and not head.event_stream:
                if try_deadline != headers_deadline:
                    timer.cancel()
                    timer = loop.call_at(try_deadline, conn.expire)
                parts = []
                while (ev := await conn.next_event()) is not END:
                    assert isinstance(ev, bytes)
                    parts.append(ev)
                timer.cancel()
                timer = None
                self._release(conn)
                conn = None
                return Answer(head, parts[0] if len(parts) == 1 else b"".join(parts), None, self)
            timer.cancel()
            timer = None
            streaming = True
            return Answer(head, None, conn, self)
        except BaseException as e:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn.close()
                self._release(conn)
            elif isinstance(e, TimeoutError):
                # no connection (or pool slot) before the deadline: nothing was sent, so it is
                # safe to retry like a refused connection
                raise UpstreamFailure(Outcome.CONNECT_ERROR, f"{self._host}:{self._port}: no connection in time",
                                      timed_out=True) from None
            if isinstance(e, Exception):
                raise map_exception(e) from None
            raise
        finally:
            if not streaming:
                self.inflight -= 1

    def stream_done(self) -> None:
        """A streamed answer ended (complete or not): it no longer counts as in flight."""
        self.inflight -= 1
        if self.on_stream_done is not None:
            self.on_stream_done()

    def set_buffer_response_bytes(self, n: int) -> None:
        """A reload changed `limits.buffer_response_bytes`: the pool (and its connections) stay."""
        self._buffer_limit = n

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
            self._open -= 1
        self._idle.clear()
        for w in self._waiters:
            if not w.done():
                w.set_result(None)  # a free slot: the waiter opens its own connection (and closes it after)
