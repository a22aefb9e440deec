"""A misbehaving echo upstream and the clients that check whose answer they got: the
desynchronisation attacks on the proxy's pooled connections (answers shifting between clients).

What this module owns:

- `MisbehavingEcho`: a raw TCP server on 127.0.0.1:0 that serves keep-alive requests one by
  one. Every answer's body is the request's own token (`/echo/{kind}/{token}`), so a client
  can tell its answer from anyone else's. `kind` picks what the server does besides:

      none        a correct answer
      head_late   (HEAD) a head with `Content-Length: N`, then 20 ms later N bytes that are
                  themselves a whole HTTP answer carrying a foreign token
      nobody_late a 204, then 20 ms later a whole foreign answer
      extra       a correct answer and a whole foreign answer in the same write
      short       `Content-Length` shorter than the body; the rest is a foreign answer
      chunk_extra a chunked answer with a foreign answer after its last chunk, same write
      stray_idle  a correct answer, then 50 ms later a foreign answer (reaches the proxy
                  while its connection is idle only when the client waits between requests)

- `drive`: N requests from C concurrent keep-alive clients through a proxy URL, a share of
  them misbehaving, and the tally: own answers, proxy errors (the JSON error shape), and
  foreign answers (any body that is not the client's own token or an error), which must be 0.

Foreign bodies start with `FOREIGN-` and carry the token of an earlier request, like the
late bytes of a real desynchronised connection would.

Imports: stdlib, aiohttp, orjson; nothing from `sidecar`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self

import aiohttp
import orjson

LOOPBACK = "127.0.0.1"
KINDS = ("none", "head_late", "nobody_late", "extra", "short", "chunk_extra", "stray_idle")
# the kinds whose foreign bytes a proxy can always catch: they arrive in the same read as the
# answer, or after an answer that must not be reused (HEAD, 204)
DETECTABLE = ("head_late", "nobody_late", "extra", "short", "chunk_extra")
READ_TIMEOUT_S = 5.0


def _answer(status: int, body: bytes, extra_headers: bytes = b"") -> bytes:
    reason = {200: b"OK", 204: b"No Content"}.get(status, b"X")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
            % (status, reason, len(body), extra_headers) + body)


def foreign(token: str) -> bytes:
    """A whole answer carrying someone else's token."""
    return _answer(200, b"FOREIGN-" + token.encode())


@dataclass(eq=False)
class MisbehavingEcho:
    url: str = ""
    port: int = 0
    connections: int = 0
    served: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)   # connection handlers
    _later: set[asyncio.Task[Any]] = field(default_factory=set)   # delayed stray writes
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _last_token: str = "nobody"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # closing the connections ends each handler's read (asyncio's start_server reports a
        # cancelled handler as an unhandled exception, so they are not cancelled)
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), READ_TIMEOUT_S)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _write_later(self, delay_s: float, writer: asyncio.StreamWriter, data: bytes) -> None:
        async def write() -> None:
            await asyncio.sleep(delay_s)
            if not writer.is_closing():
                writer.write(data)

        task = asyncio.ensure_future(write())
        self._later.add(task)  # owned: stop() cancels it
        task.add_done_callback(self._later.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if length:
                        await reader.readexactly(length)
                method, target = head.split(b" ", 2)[:2]
                parts = target.decode().split("/")  # "", "echo", kind, token
                kind, token = (parts[2], parts[3]) if len(parts) >= 4 else ("none", "?")
                self.served[kind] += 1
                other, self._last_token = self._last_token, token
                body = token.encode()
                if kind == "head_late" and method == b"HEAD":
                    stray = foreign(other)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(stray))
                    self._write_later(0.02, writer, stray)
                elif kind == "nobody_late":
                    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                    self._write_later(0.02, writer, foreign(other))
                elif kind == "extra":
                    writer.write(_answer(200, body) + foreign(other))
                elif kind == "short":
                    rest = foreign(other)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + rest)
                elif kind == "chunk_extra":
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + foreign(other))
                elif kind == "stray_idle":
                    writer.write(_answer(200, body))
                    self._write_later(0.05, writer, foreign(other))
                else:
                    writer.write(_answer(200, body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass  # the proxy closed the connection (or sent nothing more): fine
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()


@dataclass
class Tally:
    own: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    foreign: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.own + sum(self.errors.values()) + len(self.foreign)


async def _one(session: aiohttp.ClientSession, base: str, kind: str, tally: Tally) -> None:
    token = secrets.token_hex(8)
    if kind == "head_late":
        async with session.head(f"{base}/echo/{kind}/{token}") as r:
            if r.status == 200:
                tally.own += 1  # a HEAD answer carries no body: nothing foreign can be in it
            elif r.status >= 500 and r.content_type == "application/json":
                tally.errors[f"HEAD {r.status}"] += 1
            else:
                tally.foreign.append(f"{kind}: {r.status}")
        return
    async with session.post(f"{base}/echo/{kind}/{token}", data=b"x") as r:
        body = await r.read()
    if (r.status == 200 and body == token.encode()) or (r.status == 204 and body == b""):
        tally.own += 1
    elif r.status >= 500 and r.content_type == "application/json":
        tally.errors[orjson.loads(body)["error"]["type"]] += 1
    else:
        tally.foreign.append(f"{kind}: {r.status} {body[:60]!r} (expected {token})")


async def drive(base: str, *, requests: int, clients: int, bad_share: float, kinds: tuple[str, ...] = DETECTABLE,
                seed: int = 0) -> Tally:
    """`requests` requests from `clients` keep-alive clients; `bad_share` of them misbehave."""
    rng = random.Random(seed)
    plan = [rng.choice(kinds) if rng.random() < bad_share else "none" for _ in range(requests)]
    it = iter(plan)
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        async def client() -> None:
            for kind in it:
                await _one(session, base, kind, tally)

        async with asyncio.TaskGroup() as tg:
            for _ in range(clients):
                tg.create_task(client())
    return tally


async def idle_stray(base: str) -> Tally:
    """One client: an answer followed 50 ms later by stray bytes, a pause, then the next request."""
    tally = Tally()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for kind in itertools.islice(itertools.cycle(("stray_idle", "none")), 6):
            await _one(session, base, kind, tally)
            with contextlib.suppress(TimeoutError):
                await asyncio.sleep(0.1)
    return tally
