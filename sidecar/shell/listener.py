"""The proxy listener: its accept loop, and its connection guards (a cap on open connections
and a deadline for request heads, slowloris) as a minimal subclass of aiohttp's low-level server.

Accepting (`FairSite`): the sidecar accepts on its listening socket itself, taking every
connection that waits (up to ACCEPT_BATCH) each time the socket turns readable. libuv, under
uvloop, accepts one connection per turn of the event loop (libuv 1.45, "don't accept()
connections in a loop"); under load a turn takes as long as the work of every ready
connection, so a burst of new connections waited for as many turns: measured at 128 new
connections on a saturated sidecar, the last ones were accepted 0.5-5 s after the client
connected, which was the p99 of the bench (docs/performance.md#the-tail). Out of file
descriptors (EMFILE and kin), accepting pauses for ACCEPT_RETRY_S, as asyncio's own loop does.

aiohttp bounds the size of a request head (max_line_size, max_field_size, max_headers) and
closes idle keep-alive connections (keepalive_timeout), but it has no deadline for a head
that trickles in byte by byte (its idle timer only fires at `idle_timeout`, 75 s by default)
and no cap on connections. This module adds both:

    limits.max_connections   at this many open connections a new one is closed at once,
                             before a byte is read; counted in
                             shed_requests_total{reason="max_connections"}
    malformed heads          aiohttp's parser refuses them (400, connection closed); we answer
                             in the JSON shape of docs/reference/http.md#errors (`bad_request`) instead of aiohttp's
                             text, without echoing the client's bytes, count them in
                             malformed_requests_total and log at most one warning per 10 s
                             (aiohttp logs each with a traceback: a flood would be a log flood)
    limits.header_timeout    a connection must deliver a complete request head within this
                             of opening, and within this of the first byte of each later
                             head on a keep-alive connection; else it is closed, counted in
                             client_timeouts_total{phase="header"}
    limits.stream_idle_timeout  a client that reads nothing of its answer for this long (its
                             transport's write buffer stays over the high-water mark) is
                             cut: counted in client_timeouts_total{phase="write"}. Cutting
                             it ends the handler's write with a ConnectionError, which
                             releases the backend's connection; buffered answers too. An
                             answer of 64 KiB or more that the kernel's socket buffer took
                             whole (up to 4 MiB with Linux's defaults) is watched the same
                             way through the kernel's unacknowledged byte count (SIOCOUTQ):
                             a client that reads none of it for this long is cut, so it
                             does not idle on until `idle_timeout` holding kernel memory.
    client gone              when a client's connection is lost while its answer streams,
                             the streamed answer is closed at once (`on_lost`), so a stalled
                             backend stream does not hold its pool slot until
                             stream_idle_timeout.

Cost: one timer per connection, re-armed every `header_timeout` (not per request), and one
integer comparison per `data_received` call; a write timer only while the client's write
buffer is full. Nothing is created per request.

NOTE (approximations, as Envoy's resource_manager_impl.h states its own):
- A head's clock starts at the first read that finds the connection idle (waiting for a
  request), not at the end of the previous answer; an idle keep-alive connection that sends
  nothing is left to `idle_timeout`.
- A partial head that arrives pipelined behind a request still being handled is not timed;
  `idle_timeout` bounds it.
- The deadline is checked when the connection's timer fires, so a head is cut at
  `header_timeout` after it started, give or take the loop's timer resolution (1 ms).
- Open connections are counted from accept to close; connections still finishing their
  last answer during a drain count until they close.

Imports: stdlib, aiohttp, sidecar.shell.metrics.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import re
import socket
import sys
import termios
from array import array
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar.shell.metrics import Cell, Metrics

log = logging.getLogger("sidecar.listener")
WARN_EVERY_S = 10.0  # at most one warning per this many seconds per kind of refusal
# aiohttp's parser messages quote the offending bytes after a colon; we keep only the words
_QUOTED = re.compile(r":\s*(?:\n|b'|b\"|bytearray\().*", re.S)


# Linux's SIOCOUTQ (= TIOCOUTQ): bytes in a socket's send queue not yet acknowledged
_OUTQ: Final = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
# answers below this are not watched once the kernel has them: they cost no memory worth a syscall
WATCH_UNSENT_BYTES: Final = 64 * 1024
ACCEPT_BATCH: Final = 256       # connections taken per wake of the listening socket, at most
ACCEPT_RETRY_S: Final = 1.0     # out of descriptors or buffers: accepting pauses this long
_ACCEPT_PAUSE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes of this connection the kernel still holds unacknowledged (0 where unknown)."""
    sock = transport.get_extra_info("socket")
    if _OUTQ is None or sock is None:
        return 0
    buf = array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _OUTQ, buf)
    except OSError:
        return 0
    return buf[0]


class Listener(web.Server):
    """`web.Server` whose connections are capped and whose request heads have a deadline."""

    def __init__(self, handler: Any, *, metrics: Metrics, max_connections: int, header_timeout_s: float,
                 write_timeout_s: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.write_timeout_s = write_timeout_s  # read when a client's writes stall: follows reloads
        self.write_timeouts: Cell = metrics.client_timeouts.labels("write")
        self.open_connections = 0
        self.shed_connections: Cell = metrics.shed.labels("max_connections")
        self.header_timeouts: Cell = metrics.client_timeouts.labels("header")
        self.malformed: Cell = metrics.malformed_requests.labels()
        self._warned_at = {"max_connections": -WARN_EVERY_S, "header": -WARN_EVERY_S, "malformed": -WARN_EVERY_S,
                           "write": -WARN_EVERY_S}
        metrics.open_connections.read = lambda: [((), float(self.open_connections))]

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log a refusal at most once per WARN_EVERY_S: a flood is counted, not logged line by line."""
        now = self._loop.time()
        if now - self._warned_at[kind] >= WARN_EVERY_S:
            self._warned_at[kind] = now
            log.warning(message, *args)


class GuardedHandler(RequestHandler):
    __slots__ = ("_admitted", "_head_since", "_head_timer", "_listener", "_unsent", "_write_timer", "on_lost")

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        self._listener = listener
        self._admitted = False
        self._head_since = 0.0    # loop time a still-incomplete head started; 0.0: none pending
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0          # bytes the kernel held at the last look (watch_unsent)
        # set by the proxy while an answer streams: called once if the client goes away
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        if listener.open_connections >= listener.max_connections:
            listener.shed_connections.value += 1
            listener.warn("max_connections", "at limits.max_connections (%d): closing new connections",
                          listener.max_connections)
            self._manager = None  # RequestHandler.connection_lost then does nothing
            transport.close()
            return
        self._admitted = True
        listener.open_connections += 1
        super().connection_made(transport)
        now = self._loop.time()
        self._head_since = now    # the first head's clock starts at accept
        self._head_timer = self._loop.call_at(now + listener.header_timeout_s, self._check_head)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._listener.open_connections -= 1
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._admitted and self._write_timer is None:
            self._write_timer = self._loop.call_later(self._listener.write_timeout_s(), self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:  # the client read something: its clock starts again
            self._write_timer.cancel()
            self._write_timer = None

    def watch_unsent(self) -> None:
        """A large answer was handed to the kernel whole: cut the client if it reads none of
        what the kernel still holds within the write timeout (see the module docstring)."""
        transport = self.transport
        if not self._admitted or transport is None or self._write_timer is not None:
            return
        unsent = kernel_unsent(transport)
        if unsent:
            self._unsent = unsent
            self._write_timer = self._loop.call_later(self._listener.write_timeout_s(), self._check_unsent)

    def _check_unsent(self) -> None:
        self._write_timer = None
        transport = self.transport
        if not self._admitted or transport is None:
            return
        unsent = kernel_unsent(transport)
        if not unsent:
            return
        if unsent < self._unsent:  # the client reads, slowly: its clock starts again
            self._unsent = unsent
            self._write_timer = self._loop.call_later(self._listener.write_timeout_s(), self._check_unsent)
            return
        self._write_stalled()

    def _write_stalled(self) -> None:
        self._write_timer = None
        if not self._admitted or self.transport is None:
            return
        listener = self._listener
        listener.write_timeouts.value += 1
        listener.warn("write", "closing a connection whose client read nothing of its answer in %.1fs "
                      "(limits.stream_idle_timeout; further ones are counted in sidecar_client_timeouts_total)",
                      listener.write_timeout_s())
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._head_since = 0.0                 # a head completed
        elif not self._head_since and self._waiter is not None:
            self._head_since = self._loop.time()   # first bytes of a head on an idle connection

    def _check_head(self) -> None:
        self._head_timer = None
        if not self._admitted or self._force_close or self.transport is None:
            return
        timeout_s = self._listener.header_timeout_s
        now = self._loop.time()
        since = self._head_since
        if since and now - since >= timeout_s:
            self._listener.header_timeouts.value += 1
            self._listener.warn("header", "closing a connection that sent no complete request head in %.1fs "
                                "(limits.header_timeout; further ones are counted in "
                                "sidecar_client_timeouts_total)", timeout_s)
            self.force_close()
            return
        self._head_timer = self._loop.call_at((since + timeout_s) if since else (now + timeout_s), self._check_head)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400:  # not a parse error: aiohttp's own handling (logs with traceback)
            return super().handle_error(request, status, exc, message)
        listener = self._listener
        listener.malformed.value += 1
        reason = _QUOTED.sub("", message or "malformed request")[:200] or "malformed request"
        listener.warn("malformed", "malformed request refused with 400: %s (further ones are counted in "
                      "sidecar_malformed_requests_total)", reason)
        if request.writer.output_size > 0:
            raise ConnectionError("malformed request after the answer started")
        body = orjson.dumps({"error": {"type": "bad_request", "message": reason, "route": None,
                                       "request_id": None}})
        resp = web.Response(status=400, body=body, content_type="application/json")
        resp.force_close()
        return resp


class FairSite(web.BaseSite):
    """The proxy's listening socket with the sidecar's own accept loop (module docstring):
    every waiting connection is taken per wake, handed to the runner's server (the `Listener`)
    as a transport of the running loop. `stop` stops accepting and closes the socket;
    connections already accepted are the server's, as with aiohttp's own sites."""

    __slots__ = ("_accepting", "_connecting", "_loop", "_name", "_retry", "_sock")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, backlog: int = 128) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        # connections accepted, their transport being made (one loop turn each); owned here
        self._connecting: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self._loop = asyncio.get_running_loop()
        self._sock.listen(self._backlog)
        self._resume()

    def _resume(self) -> None:
        self._retry = None
        assert self._loop is not None
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._accepting = True

    def _accept(self) -> None:
        loop, server = self._loop, self._runner.server
        assert loop is not None and server is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in _ACCEPT_PAUSE_ERRNOS:
                    log.error("cannot accept connections (%s); pausing accepting for %.0fs",
                              e.strerror or e, ACCEPT_RETRY_S)
                    loop.remove_reader(self._sock.fileno())
                    self._accepting = False
                    self._retry = loop.call_later(ACCEPT_RETRY_S, self._resume)
                    return
                log.warning("accept failed: %s", e.strerror or e)
                continue
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(server, conn))
            self._connecting.add(task)
            task.add_done_callback(partial(self._connected, conn))

    def _connected(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:
            conn.close()  # no transport was made for it (the client may have gone already)

    async def stop(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._sock.close()
        if self._connecting:  # each ends within a loop turn or two; bounded all the same
            pending = set(self._connecting)
            _, late = await asyncio.wait(pending, timeout=1.0)
            for task in late:
                task.cancel()
        self._runner._unreg_site(self)
