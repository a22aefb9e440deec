"""The fake upstreams in tests/upstreams.py do what they say, seen from a real aiohttp client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from yarl import URL

from tests.upstreams import (
    RawServer,
    Upstream,
    UpstreamFactory,
    answer,
    big,
    big_body,
    chunked,
    close_immediately,
    echo,
    fail_n,
    garbage,
    hang,
    refused_url,
    reset,
    reset_mid_body,
    sequence,
    slow,
    sse,
    start_raw,
    start_upstream,
    status,
    wrong_content_length,
)

TIMEOUT = aiohttp.ClientTimeout(total=5)


@pytest.fixture
async def upstreams() -> AsyncIterator[UpstreamFactory]:
    async with UpstreamFactory() as factory:
        yield factory


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


async def test_answer_records_what_arrived(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """A default upstream answers model JSON and records method, raw path, headers and body."""
    up = await upstreams.start(name="stable")
    assert up.port > 0
    assert up.url == f"http://127.0.0.1:{up.port}"
    raw_target = URL(up.url + "/v1/models/fraud:predict?a=1&a=2&b=%2F", encoded=True)  # yarl keeps %2F
    async with session.post(raw_target, data=b'{"x":1}', headers={"X-Req": "r1"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"predictions": [0.5], "model": "stable"}
    assert up.hits == 1
    assert up.got_request.is_set()
    seen = up.last
    assert seen.method == "POST"
    assert seen.path_qs == "/v1/models/fraud:predict?a=1&a=2&b=%2F"
    assert seen.headers["x-req"] == "r1"
    assert seen.body == b'{"x":1}'
    assert seen.json() == {"x": 1}
    assert seen.arrived_at <= time.monotonic()
    await up.wait_hits(1)
    await up.wait_in_flight(0)


async def test_answer_custom_and_async_with(session: aiohttp.ClientSession) -> None:
    """answer() sends the given JSON, status and headers; Upstream works as a context manager."""
    up = Upstream(answer({"ok": True}, status=201, headers={"X-Model": "v2"}))
    async with up, session.get(up.url + "/x") as resp:
        assert resp.status == 201
        assert resp.headers["X-Model"] == "v2"
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.json() == {"ok": True}
    assert up.url  # still readable after stop


async def test_echo_reflects_the_request(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """echo() shows exactly what was forwarded."""
    up = await upstreams.start(echo(status=202))
    async with session.put(
        up.url + "/p?q=1&q=2", data="héllo", headers=[("X-Dup", "a"), ("X-Dup", "b")]
    ) as resp:
        assert resp.status == 202
        got = await resp.json()
    assert got["method"] == "PUT"
    assert got["path_qs"] == "/p?q=1&q=2"
    assert got["query"] == {"q": ["1", "2"]}
    assert got["headers"]["x-dup"] == ["a", "b"]
    assert got["body"] == "héllo"
    assert got["upstream"] == up.name


async def test_slow_waits_before_answering(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """slow(d) answers no sooner than d seconds."""
    up = await upstreams.start(slow(0.05, then=answer({"late": 1})))
    started = time.monotonic()
    async with session.get(up.url) as resp:
        assert await resp.json() == {"late": 1}
    assert time.monotonic() - started >= 0.05


async def test_fail_n_then_recovers(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """fail_n(2) fails twice with the status, then answers."""
    up = await upstreams.start(fail_n(2, status=502))
    codes = []
    for _ in range(3):
        async with session.get(up.url) as resp:
            codes.append(resp.status)
            await resp.read()
    assert codes == [502, 502, 200]


async def test_fail_n_reset_kind(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """fail_n(1, kind="reset") drops the first connection, then answers."""
    up = await upstreams.start(fail_n(1, kind="reset"))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await session.post(up.url)  # POST: aiohttp would silently retry a GET (next test)
    async with session.post(up.url) as resp:
        assert resp.status == 200
    assert up.hits == 2


async def test_aiohttp_client_retries_idempotent_methods_once(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """An aiohttp ClientSession resends a GET once after a disconnect: the upstream sees two hits.

    Documents a pitfall for code under test: ClientSession retries GET/HEAD/OPTIONS/TRACE/PUT/
    DELETE once on ServerDisconnectedError/ClientOSError, with no public switch (only the
    private `_retry_connection`, which aiohttp's own TestClient turns off).
    """
    up = await upstreams.start(reset())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await session.get(up.url)
    assert up.hits == 2


async def test_reset_disconnects(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """reset() closes without an answer; reset(rst=True) sends a TCP RST."""
    up = await upstreams.start(reset())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await session.post(up.url, data=b"body")
    up.behaviour = reset(rst=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await session.post(up.url, data=b"body")
    assert up.hits == 2


async def test_reset_mid_body(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """reset_mid_body() sends a 200 with Content-Length, part of the body, then drops."""
    up = await upstreams.start(reset_mid_body(declared=1000, sent=10))
    async with session.get(up.url) as resp:
        assert resp.status == 200
        assert resp.content_length == 1000
        first = await resp.content.readexactly(10)
        assert first == b"x" * 10
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_reset_mid_body_sends_exactly_what_it_says(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """Even a large partial body reaches the client whole before the connection drops."""
    up = await upstreams.start(reset_mid_body(declared=4_000_000, sent=3_000_000))
    received = 0

    async def read_all(resp: aiohttp.ClientResponse) -> None:
        nonlocal received
        while chunk := await resp.content.read(65536):
            received += len(chunk)

    async with session.get(up.url) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(resp)
    assert received == 3_000_000


async def test_hang_until_released(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """hang(release) answers once the event is set."""
    release = asyncio.Event()
    up = await upstreams.start(hang(release, then=answer({"released": True})))
    async with asyncio.TaskGroup() as tg:
        call = tg.create_task(session.get(up.url))
        await up.wait_in_flight(1)
        assert not call.done()
        release.set()
    async with call.result() as resp:
        assert await resp.json() == {"released": True}
    await up.wait_in_flight(0)


async def test_hang_ends_when_client_leaves(upstreams: UpstreamFactory) -> None:
    """A hanging handler is cancelled when its client disconnects (what a proxy timeout causes)."""
    up = await upstreams.start(hang())
    async with aiohttp.ClientSession(timeout=TIMEOUT) as client, asyncio.TaskGroup() as tg:
        call = tg.create_task(client.get(up.url))
        await up.wait_in_flight(1)
        call.cancel()
    await up.wait_in_flight(0)
    assert up.cancelled == 1


async def test_hang_ends_on_stop(session: aiohttp.ClientSession) -> None:
    """Stopping an upstream with a hanging request is quick and the client sees a disconnect."""
    up = await start_upstream(hang())

    async def call() -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(up.url)  # POST: no silent client retry

    async with asyncio.TaskGroup() as tg:
        tg.create_task(call())
        await up.wait_in_flight(1)
        started = time.monotonic()
        await up.stop()
        assert time.monotonic() - started < 1.0
    assert up.in_flight == 0


async def test_sse_events_arrive_one_by_one(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """sse() delivers each event separately in time, then ends the stream."""
    up = await upstreams.start(sse(["a", "b", "c"], delay=0.05))
    arrivals: list[tuple[float, bytes]] = []
    async with session.get(up.url) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "Content-Length" not in resp.headers
        while line := await resp.content.readuntil(b"\n\n"):
            arrivals.append((time.monotonic(), line))
    assert [data for _, data in arrivals] == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"]
    assert arrivals[2][0] - arrivals[0][0] >= 0.08


async def test_sse_break_after(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """sse(break_after=2) sends two events, then the stream breaks."""
    up = await upstreams.start(sse(["1", "2", "3", "4"], delay=0.0, break_after=2))
    async with session.get(up.url) as resp:
        assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        assert await resp.content.readuntil(b"\n\n") == b"data: 2\n\n"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()


async def test_sse_stall_after(session: aiohttp.ClientSession) -> None:
    """sse(stall_after=1) goes quiet after one event until the server stops."""
    up = await start_upstream(sse(["1", "2"], delay=0.0, stall_after=1))
    async with session.get(up.url) as resp:
        assert await resp.content.readuntil(b"\n\n") == b"data: 1\n\n"
        assert resp.content.at_eof() is False
        assert up.in_flight == 1
        await up.stop()
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()


async def test_chunked(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """chunked() uses Transfer-Encoding: chunked and sends every chunk."""
    up = await upstreams.start(chunked([b"ab", b"", b"cd", b"ef"], delay=0.01))
    async with session.get(up.url) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"abcdef"


async def test_big(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """big(n) sends n bytes with Content-Length n."""
    n = 3 * 1024 * 1024 + 7
    up = await upstreams.start(big(n))
    async with session.get(up.url) as resp:
        assert resp.content_length == n
        assert await resp.read() == big_body(n)


async def test_status_passthrough(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """status() answers exactly the given code, body and headers."""
    up = await upstreams.start(status(429, b"slow down", {"Retry-After": "3"}))
    async with session.get(up.url) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "3"
        assert await resp.read() == b"slow down"
    up.behaviour = status(418, "teapot", {"Content-Type": "text/plain"})
    async with session.get(up.url) as resp:
        assert (resp.status, resp.reason, await resp.text()) == (418, "I'm a Teapot", "teapot")


async def test_sequence_and_runtime_switch(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """sequence() plays behaviours in order and repeats the last; behaviour can change mid-test."""
    up = await upstreams.start(sequence([status(500), status(503), answer()]))
    codes = []
    for _ in range(4):
        async with session.get(up.url) as resp:
            codes.append(resp.status)
    assert codes == [500, 503, 200, 200]
    up.behaviour = status(404)
    async with session.get(up.url) as resp:
        assert resp.status == 404
    assert up.hits == 5
    up.clear()
    assert (up.hits, up.requests, up.got_request.is_set()) == (0, [], False)


async def test_keep_alive_reuses_one_connection(
    upstreams: UpstreamFactory, session: aiohttp.ClientSession
) -> None:
    """Sequential requests from one pooled client arrive on one connection."""
    up = await upstreams.start()
    for _ in range(3):
        async with session.get(up.url) as resp:
            await resp.read()
    assert len(up.peers) == 1


async def test_raw_garbage(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """A server that answers non-HTTP makes the client fail with a response error."""
    server = await upstreams.raw(garbage())
    with pytest.raises(aiohttp.ClientResponseError):
        await session.post(server.url, data=b"x" * 100)
    assert server.connections == 1


async def test_raw_wrong_content_length(upstreams: UpstreamFactory, session: aiohttp.ClientSession) -> None:
    """A body shorter than its Content-Length fails while reading."""
    server = await upstreams.raw(wrong_content_length())
    async with session.get(server.url) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_raw_close_immediately(session: aiohttp.ClientSession) -> None:
    """A server that closes on accept makes the client see a broken connection."""
    async with await start_raw(close_immediately()) as server:
        assert isinstance(server, RawServer)
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(server.url)
        assert server.got_connection.is_set()


async def test_refused_url(session: aiohttp.ClientSession) -> None:
    """Nothing listens on refused_url()."""
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.get(refused_url())
