"""Fuzzing the answer side: a raw-socket upstream sends answers with random heads, framings,
malformations and splits (with pauses between the pieces) to concurrent clients through a
small pool; every client gets its own answer, a cut stream of its own bytes, or a sidecar
error: never another client's bytes.

Each request's answer is drawn by hypothesis and looked up by the request's token, which
every answer's body repeats, so a foreign answer shows. Malformed answers must come out as
a clean 502 `upstream_error` (or a cut stream, when the head had already gone out).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import aiohttp
import orjson
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import SidecarFactory
from tests.upstreams import RawServer

MUTATIONS = ("none", "none", "none", "extra", "truncate", "bad_version", "bad_status", "bare_cr", "nul",
             "huge_length", "gzip_chunked", "spaced_chunk_size", "bodiless_with_body")


@dataclass(frozen=True)
class Script:
    status: int
    framing: str            # length | chunked | close
    body_reps: int          # the body is the token repeated
    chunk_size: int
    headers: tuple[tuple[str, str], ...]
    mutation: str
    cuts: tuple[int, ...]   # split points of the wire bytes, each followed by a short pause

    def wire(self, token: str) -> tuple[list[bytes], bool]:
        """The answer's bytes in pieces, and whether the connection closes after them."""
        bodiless = self.status in (204, 304)
        body = b"" if bodiless else token.encode() * self.body_reps
        m = self.mutation
        version = b"HTTP/1.9" if m == "bad_version" else b"HTTP/1.1"
        status = 999 if m == "bad_status" else self.status
        lines = [b"%s %d Whatever" % (version, status)]
        lines += [f"{k}: {v}".encode() for k, v in self.headers]
        if m == "bare_cr":
            lines.append(b"X-Bad: a\rb")
        if m == "nul":
            lines.append(b"X-Bad: a\x00b")
        framing = self.framing
        if m == "bodiless_with_body" and bodiless:
            body, framing = token.encode(), "length"
        if framing == "chunked" and not bodiless:
            te = b"gzip, chunked" if m == "gzip_chunked" else b"chunked"
            lines.append(b"Transfer-Encoding: " + te)
            size_fmt = b" %x " if m == "spaced_chunk_size" else b"%x"
            parts = [body[i:i + self.chunk_size] for i in range(0, len(body), self.chunk_size)]
            payload = b"".join((size_fmt % len(p)) + b"\r\n" + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
        elif framing == "length" or bodiless:
            length = b"9" * 4300 if m == "huge_length" else b"%d" % len(body)
            lines.append(b"Content-Length: " + length)
            payload = body
        else:
            lines.append(b"Connection: close")
            payload = body
        data = b"\r\n".join(lines) + b"\r\n\r\n" + payload
        close = framing == "close" and not bodiless
        if m == "truncate":
            data, close = data[: max(1, len(data) * 2 // 3)], True
        pieces, last = [], 0
        for cut in sorted(c % max(len(data), 1) for c in self.cuts):
            if cut > last:
                pieces.append(data[last:cut])
                last = cut
        pieces.append(data[last:])
        if m == "extra" and not close:  # a whole second answer in the same write as the end of this one
            # (after a close-delimited body the bytes would be body: the body runs to the close)
            pieces[-1] += b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nFOREIGN-xyz"
        return pieces, close

    @property
    def valid(self) -> bool:
        return self.mutation == "none"


header = st.tuples(st.sampled_from(["X-Model", "Server", "Cache-Control", "X-A"]),
                   st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20))
scripts = st.builds(
    Script,
    status=st.sampled_from([200, 200, 201, 204, 304, 404, 500, 503]),
    framing=st.sampled_from(["length", "chunked", "close"]),
    body_reps=st.integers(1, 300),
    chunk_size=st.integers(1, 700),
    headers=st.lists(header, max_size=4).map(tuple),
    mutation=st.sampled_from(MUTATIONS),
    cuts=st.lists(st.integers(0, 10_000), max_size=4).map(tuple),
)


class Upstream:
    """Serves keep-alive requests one by one, each with the script of its token."""

    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.server = RawServer(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                                   if k.strip().lower() == b"content-length"), 0)
                    await reader.readexactly(length)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            token = head.split(b" ")[1].decode().rsplit("/", 1)[1]
            pieces, close = self.scripts[token].wire(token)
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(0.002)
                writer.write(piece)
                await writer.drain()
            if close:
                return


async def _ask(session: aiohttp.ClientSession, url: str, token: str, script: Script) -> str | None:
    """None when the answer is acceptable, else what was wrong with it."""
    got = b""
    try:
        async with session.post(f"{url}/fuzz/{token}", data=b"{}") as r:
            try:
                async for piece in r.content.iter_any():
                    got += piece
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                own = token.encode() * script.body_reps
                return None if own.startswith(got) else f"cut stream with foreign bytes {got[:80]!r}"
            status, ctype = r.status, r.content_type
    except aiohttp.ServerDisconnectedError:
        return None  # cut before the head: the client sees an error, nothing foreign
    if b"FOREIGN" in got:
        return f"foreign bytes {got[:80]!r}"
    if status in (502, 504) and ctype == "application/json":
        err = orjson.loads(got)["error"]
        return None if err["type"] in ("upstream_error", "upstream_timeout") else f"error type {err['type']}"
    bodiless = script.status in (204, 304)
    own = b"" if bodiless else token.encode() * script.body_reps
    if script.mutation == "bodiless_with_body" and bodiless:
        own = b""
    if status == script.status and got == own:
        return None
    if script.mutation == "truncate" and status == script.status and own.startswith(got):
        return None  # a close-delimited body cut short is a shorter body: the close ends it
    return f"{status} {got[:80]!r} for {script}"


async def _scenario(batch: list[Script]) -> list[str]:
    upstream = Upstream()
    await upstream.server.start()
    sidecars = SidecarFactory()
    try:
        sc = await sidecars.make({
            "backends": {"fuzz": {"url": upstream.server.url, "max_connections": 2}},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "split": {"fuzz": 100}, "timeout": "3s"}],
        })
        tokens = [secrets.token_hex(6) for _ in batch]
        upstream.scripts = dict(zip(tokens, batch, strict=True))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            problems = await asyncio.gather(*(_ask(session, sc.proxy_url, t, s) for t, s in zip(tokens, batch,
                                                                                               strict=True)))
            # afterwards the sidecar serves a plain answer on the same pool
            upstream.scripts["after"] = Script(200, "length", 1, 1, (), "none", ())
            after = await _ask(session, sc.proxy_url, "after", upstream.scripts["after"])
        return [p for p in (*problems, after) if p is not None]
    finally:
        await sidecars.aclose()
        await upstream.server.stop()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(scripts, min_size=4, max_size=12))
def test_every_client_gets_its_own_answer_or_an_error(batch: list[Script]):
    """Concurrent clients, random answers through a pool of two: nobody gets another's bytes."""
    problems = uvloop.run(_scenario(batch))
    assert problems == []
