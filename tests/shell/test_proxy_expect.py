"""`Expect: 100-continue` over raw sockets: the client is told to go on at once, or refused
without it and the connection closed; the backend never sees Expect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from tests import upstreams as u
from tests.conftest import MakeSidecar

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def config(url: str) -> dict[str, Any]:
    return {"limits": {"max_body_bytes": "1KiB"},
            "backends": {"m": {"url": url}},
            "routes": [{"name": "r", "match": {"path_prefix": "/v1/"}, "split": {"m": 1}}]}


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_100_continue_arrives_before_the_body_is_sent(framing, upstreams, make_sidecar: MakeSidecar):
    """A client that waits for 100 Continue gets it at once, then its answer; the backend gets a framed body."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    try:
        if framing == "content-length":
            head, body = b"Content-Length: 13\r\n", b'{"x": [1, 2]}'
        else:
            head, body = b"Transfer-Encoding: chunked\r\n", b'5\r\n{"x":\r\n8\r\n [1, 2]}\r\n0\r\n\r\n'
        writer.write(b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + head + b"\r\n")
        t0 = time.perf_counter()
        async with asyncio.timeout(0.5):  # curl gives up waiting after 1 s
            interim = await reader.readexactly(len(CONTINUE))
        assert interim == CONTINUE and time.perf_counter() - t0 < 0.5
        assert up.hits == 0
        writer.write(body)
        async with asyncio.timeout(5):
            status, headers, answer = await read_answer(reader)
        assert status == 200 and "connection" not in headers
        seen = orjson.loads(answer)
        assert seen["body"] == '{"x": [1, 2]}'
        assert "expect" not in seen["headers"]
        assert seen["headers"]["content-length"] == [str(len(seen["body"]))]
        assert "transfer-encoding" not in seen["headers"]
        # the connection carries the next request
        writer.write(b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        async with asyncio.timeout(5):
            assert (await read_answer(reader))[0] == 200
    finally:
        writer.close()
    assert up.hits == 2


@pytest.mark.parametrize(("head", "status", "etype"), [
    (b"POST /v1/m:predict HTTP/1.1\r\nContent-Length: 5000\r\n", 413, "body_too_large"),
    (b"POST /nowhere HTTP/1.1\r\nContent-Length: 2\r\n", 404, "no_route"),
    (b"POST /v1/../x HTTP/1.1\r\nContent-Length: 2\r\n", 400, "bad_request"),
    (b"POST /v1/m:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue, x-y\r\n", 417,
     "expectation_failed"),
    (b"POST /v1/m:predict HTTP/1.1\r\nContent-Length: 2\r\nExpect: 200-ok\r\n", 417, "expectation_failed"),
], ids=["too_large", "no_route", "bad_target", "unknown_member", "other_expectation"])
async def test_refused_before_the_body_without_100_and_closed(head, status, etype, upstreams,
                                                             make_sidecar: MakeSidecar):
    """A request refused from its head alone gets its error at once, no 100 Continue, and the connection closes."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    try:
        if b"expect" not in head.lower():
            head += b"Expect: 100-continue\r\n"
        writer.write(head + b"Host: x\r\n\r\n")
        async with asyncio.timeout(0.5):
            got, headers, body = await read_answer(reader)
        assert got == status and orjson.loads(body)["error"]["type"] == etype
        assert headers["connection"] == "close"
        # a request sent now is never answered (aiohttp drops what arrives, then closes)
        writer.write(b"GET /v1/m:predict HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert up.hits == 0
