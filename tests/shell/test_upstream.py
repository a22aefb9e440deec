"""Answers a backend must not get away with, over real sockets: malformed ones are a clean 502,
and bytes after an answer never reach the next client on the connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests import upstreams as u
from tests.conftest import MakeSidecar

EVIL = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\r\nevil"


def route(url: str) -> dict[str, Any]:
    return {"backends": {"m": {"url": url}}, "routes": [{"name": "r", "split": {"m": 1}}]}


def keep_alive_server(answer: bytes, extra: bytes, closed: asyncio.Event,
                      send_extra: asyncio.Event | None = None) -> u.RawHandler:
    """Answers every request on a keep-alive connection with `answer`, the first one followed
    by `extra`: in the same write, or once `send_extra` is set. Sets `closed` when the first
    connection ends."""
    first = True

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal first
        mine, first = first, False
        try:
            while await u.read_request(reader):
                if not mine:
                    writer.write(answer)
                elif send_extra is None:
                    writer.write(answer + extra)
                else:
                    writer.write(answer)
                    await writer.drain()
                    await send_extra.wait()
                    writer.write(extra)
                mine = False
                await writer.drain()
        finally:
            if not closed.is_set():
                closed.set()

    return handler


def status_of(answer: bytes) -> int:
    return int(answer[9:12])


async def get(client: Any, url: str, method: str = "GET") -> tuple[int, bytes]:
    async with client.request(method, url) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(("answer", "body"), [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", id="200"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok", id="chunked"),
    pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="204"),
])
async def test_second_answer_in_the_same_read_is_a_502(upstreams, make_sidecar: MakeSidecar, client, answer, body):
    """A backend that sends an extra answer with its own gets a 502; the next client gets its own answer."""
    closed = asyncio.Event()
    raw = await upstreams.raw(keep_alive_server(answer, EVIL, closed))
    sc = await make_sidecar(route(raw.url))
    async with asyncio.timeout(10):
        status, got = await get(client, sc.proxy_url + "/x")
        assert status == 502 and b"upstream_error" in got
        await closed.wait()  # the sidecar dropped that connection
        assert await get(client, sc.proxy_url + "/x") == (status_of(answer), body)


@pytest.mark.parametrize(("method", "answer"), [
    pytest.param("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", id="GET-200"),
    pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n", id="GET-204"),
    pytest.param("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", id="HEAD"),
])
async def test_bytes_after_an_answer_never_reach_the_next_client(upstreams, make_sidecar: MakeSidecar, client,
                                                                 method, answer):
    """Sent after the answer went out, a smuggled answer closes the connection instead of being
    read as the next request's answer (after HEAD and 204 the connection is not reused at all)."""
    closed, send_extra = asyncio.Event(), asyncio.Event()
    raw = await upstreams.raw(keep_alive_server(answer, EVIL, closed, send_extra))
    sc = await make_sidecar(route(raw.url))
    async with asyncio.timeout(10):
        status, body = await get(client, sc.proxy_url + "/x", method)
        assert (status, body) == (status_of(answer), b"ok" if answer.endswith(b"ok") else b"")
        send_extra.set()
        await closed.wait()  # the sidecar dropped that connection: nothing else is read on it
        assert await get(client, sc.proxy_url + "/x", method) == (status, body)
    assert raw.connections == 2


@pytest.mark.parametrize("answer", [
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", id="gzip-chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", id="CL-5000-digits"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="CL-conflicting"),
    pytest.param(b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="HTTP/2.0"),
    pytest.param(b"HTTP/1.1 999 OK\r\nContent-Length: 2\r\n\r\nok", id="status-999"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok", id="NUL-in-value"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 2 \r\nok\r\n0\r\n\r\n",
                 id="chunk-size-spaces"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", id="head-70-KiB"),
])
async def test_malformed_answer_is_a_clean_502(upstreams, make_sidecar: MakeSidecar, client, answer):
    """Each answer the parser refuses is a 502 upstream_error, and the sidecar serves on."""
    raw = await upstreams.raw(u.raw_reply(answer))
    ok = await upstreams.start(u.status(200, b"fine"))
    sc = await make_sidecar({"backends": {"m": {"url": raw.url}, "ok": {"url": ok.url}},
                             "routes": [{"name": "r", "match": {"path_prefix": "/bad"}, "split": {"m": 1}},
                                        {"name": "ok", "split": {"ok": 1}}]})
    async with asyncio.timeout(10):
        async with client.post(sc.proxy_url + "/bad", data=b"{}") as r:
            assert r.status == 502
            assert (await r.json())["error"]["type"] == "upstream_error"
        assert await get(client, sc.proxy_url + "/fine") == (200, b"fine")
