"""Bad input from clients, written by hand on raw sockets: the sidecar answers 400/408/413 or
closes, never forwards what it refused, never crashes, and serves the next normal request."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvloop
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability.common import metric
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config

LIMITS = {"max_body_bytes": "1KiB", "max_header_bytes": 1024, "max_headers": 16, "header_timeout": "500ms",
          "body_timeout": "500ms", "max_connections": 20}
NORMAL = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def config(url: str, **limits: Any) -> dict[str, Any]:
    return {"limits": {**LIMITS, **limits},
            "backends": {"stable": {"url": url}, "canary": {"url": url}, "other": {"url": url}},
            "routes": [{"name": "r", "split": {"stable": 1, "canary": 0}, "override_header": "x-backend"}]}


async def exchange(port: int, data: bytes, *, wait_s: float = 2.0) -> tuple[bytes, bool]:
    """Send raw bytes, read until the sidecar closes (True) or `wait_s` passes (False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = b""
        try:
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(65536):
                    out += chunk
            return out, True
        except TimeoutError:
            return out, False
        except ConnectionError:
            return out, True
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.") else 0


def error_type(raw: bytes) -> str:
    return str(orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["error"]["type"])


async def serves_normally(port: int) -> None:
    raw, _ = await exchange(port, NORMAL.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n"))
    assert status_of(raw) == 200, raw[:200]


async def metrics_text(sc: Any) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.admin_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % sc.admin_port)
    text = (await reader.read(-1)).decode()
    writer.close()
    return text


MALFORMED = {
    "request_line_garbage": b"GARBAGE\r\n\r\n",
    "request_line_too_long": b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header_no_colon": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "header_space_before_colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "header_too_long": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 2000 + b"\r\n\r\n",
    "too_many_headers": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n",
    "smuggle_cl_te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "smuggle_te_cl": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
                     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate_content_length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "negative_content_length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "invalid_chunk_size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
    "crlf_obs_fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Injected: yes\r\n\r\n",
    "bare_lf_in_value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\nInjected: yes\r\n\r\n",
    "bare_cr_in_value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rInjected: yes\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_request_gets_400_and_never_reaches_backend(name, upstreams, make_sidecar: MakeSidecar):
    """A malformed or ambiguous request gets 400 bad_request, the connection closes, the backend sees nothing."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    raw, closed = await exchange(sc.proxy_port, MALFORMED[name])
    assert status_of(raw) == 400, raw[:300]
    assert error_type(raw) == "bad_request"
    assert closed
    assert raw.count(b"HTTP/1.") == 1, "one answer, and no second (smuggled) one"
    assert up.hits == 0
    await serves_normally(sc.proxy_port)
    assert up.hits == 1 and all("smuggled" not in s.path_qs for s in up.requests)
    assert metric(await metrics_text(sc), "sidecar_malformed_requests_total") == 1


async def test_request_shaped_bytes_in_a_chunked_body_stay_body(upstreams, make_sidecar: MakeSidecar):
    """A request hidden in a valid chunked body reaches the backend as body bytes of one request."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    inner = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    data = (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n")
    raw, _ = await exchange(sc.proxy_port, data)
    assert status_of(raw) == 200
    assert up.hits == 1 and up.last.path_qs == "/a" and up.last.body == inner


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
async def test_oversized_body_gets_413(chunked, upstreams, make_sidecar: MakeSidecar):
    """A body past max_body_bytes gets 413 body_too_large, declared or chunked, never forwarded."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    if chunked:
        data = (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"200\r\n" + b"a" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n")
    else:
        data = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000
    raw, _ = await exchange(sc.proxy_port, data)
    assert status_of(raw) == 413 and error_type(raw) == "body_too_large"
    assert up.hits == 0
    await serves_normally(sc.proxy_port)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return head + await reader.readexactly(length)


@pytest.mark.parametrize("when", ["new_connection", "keepalive"])
async def test_slowloris_head_is_closed_after_header_timeout(when, upstreams, make_sidecar: MakeSidecar):
    """A head trickled byte by byte is closed after limits.header_timeout and counted; others are served."""
    up = await upstreams.start()
    sc = await make_sidecar(config(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    if when == "keepalive":  # a first request is served, then the next head trickles
        writer.write(NORMAL)
        assert status_of(await read_answer(reader)) == 200
        await asyncio.sleep(0.7)  # idle longer than header_timeout first: that alone must not count
    t0 = time.perf_counter()
    closed_after = None
    for byte in b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            closed_after = time.perf_counter() - t0
            break
        if reader.at_eof() or writer.is_closing():
            closed_after = time.perf_counter() - t0
            break
        try:
            async with asyncio.timeout(0.05):
                if await reader.read(1) == b"":
                    closed_after = time.perf_counter() - t0
                    break
        except TimeoutError:
            pass
        except ConnectionError:
            closed_after = time.perf_counter() - t0
            break
    writer.close()
    assert closed_after is not None, "the trickled head was never cut"
    assert 0.4 < closed_after < 1.5
    assert up.hits == (1 if when == "keepalive" else 0)
    assert 'sidecar_client_timeouts_total{phase="header"} 1.0' in await metrics_text(sc)
    await serves_normally(sc.proxy_port)


async def test_silent_new_connection_closed_but_idle_keepalive_kept(upstreams, make_sidecar: MakeSidecar):
    """A connection that never sends a head is closed after header_timeout; an idle keep-alive one is not."""
    up = await upstreams.start()
    sc = await make_sidecar(config(up.url))
    silent, _ = await exchange(sc.proxy_port, b"", wait_s=1.5)
    assert silent == b""  # closed without an answer (exchange returned before wait_s or with nothing)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(NORMAL)
    assert status_of(await read_answer(reader)) == 200
    await asyncio.sleep(1.2)  # idle between requests: idle_timeout (75 s) applies, not header_timeout
    writer.write(NORMAL)
    assert status_of(await reader.readuntil(b"\r\n\r\n")) == 200
    writer.close()


async def test_slow_body_gets_408(upstreams, make_sidecar: MakeSidecar):
    """A body that does not arrive within limits.body_timeout gets 408 request_timeout, not forwarded."""
    up = await upstreams.start()
    sc = await make_sidecar(config(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
    t0 = time.perf_counter()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert status_of(head) == 408 and 0.4 < time.perf_counter() - t0 < 2
    writer.close()
    assert up.hits == 0
    await serves_normally(sc.proxy_port)


async def test_idle_connection_flood_past_max_connections(upstreams, make_sidecar: MakeSidecar):
    """Past limits.max_connections new connections are closed at once and counted; open ones are still served."""
    up = await upstreams.start()
    sc = await make_sidecar(config(up.url, header_timeout="3s"))
    flood = [await asyncio.open_connection("127.0.0.1", sc.proxy_port) for _ in range(20)]
    await asyncio.sleep(0.1)
    extra, closed = await exchange(sc.proxy_port, b"", wait_s=1.0)
    assert extra == b"" and closed, "the connection past the limit was not closed at once"
    reader, writer = flood[0]  # an admitted connection is still served
    writer.write(NORMAL)
    assert status_of(await reader.readuntil(b"\r\n\r\n")) == 200
    text = await metrics_text(sc)
    assert 'sidecar_shed_requests_total{reason="max_connections"} 1.0' in text
    assert metric(text, "sidecar_open_connections") == 20
    for _, w in flood:
        w.close()
    await asyncio.sleep(0.2)
    await serves_normally(sc.proxy_port)


async def test_crlf_cannot_reach_the_backend_as_a_header(upstreams, make_sidecar: MakeSidecar):
    """Header values with odd bytes reach the backend as exactly one header, unchanged; CR/LF never pass (400)."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(config(up.url))
    data = (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Odd: a\tb%0d%0aInjected: 1 \xc3\xa9\r\n"
            b"Content-Length: 0\r\n\r\n")
    raw, _ = await exchange(sc.proxy_port, data)
    assert status_of(raw) == 200
    seen = up.last.headers
    assert "injected" not in {k.lower() for k in seen}
    (value,) = seen.getall("X-Odd")
    assert value.startswith("a\tb%0d%0aInjected: 1 ")  # stayed inside the one value, bytes unchanged
    for name in ("bare_lf_in_value", "bare_cr_in_value", "crlf_obs_fold"):
        raw, _ = await exchange(sc.proxy_port, MALFORMED[name])
        assert status_of(raw) == 400
    assert up.hits == 1


async def test_override_naming_a_backend_outside_the_route(upstreams, make_sidecar: MakeSidecar, client):
    """An override header naming a backend not in the route's split is ignored (normal split) and counted."""
    stable, other = await upstreams.start(name="stable"), await upstreams.start(name="other")
    sc = await make_sidecar({"backends": {"stable": {"url": stable.url}, "other": {"url": other.url}},
                             "routes": [{"name": "r", "split": {"stable": 1}, "override_header": "x-backend"}]})
    for name in ("other", "nope", "../stable", "stable\t"):
        async with client.post(sc.proxy_url + "/x", data=b"{}", headers={"x-backend": name}) as r:
            assert r.status == 200 and r.headers["x-sidecar-backend"] == "stable"
    assert other.hits == 0
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert metric(text, "sidecar_override_ignored_total", 'route="r"') >= 3


# --- random bytes (hypothesis): a sidecar in its own thread, plain blocking sockets -----------------


@pytest.fixture(scope="module")
def threaded_sidecar() -> Iterator[int]:
    """A sidecar and an upstream on a uvloop in a thread, so hypothesis can drive it synchronously."""
    from sidecar.config.load import LoadedConfig, config_version, parse_config
    from sidecar.shell.server import Sidecar

    ready = threading.Event()
    port: list[int] = []
    loop = uvloop.new_event_loop()
    stop: list[Any] = []

    async def main() -> None:
        up = await u.start_upstream(u.echo())
        text = yaml.safe_dump(sidecar_config(config(up.url, header_timeout="1s")))
        cfg, secrets = parse_config(text, env={})
        sc = Sidecar(LoadedConfig(cfg, config_version(cfg), None, secrets))
        stop.append(sc.request_stop)
        task = asyncio.ensure_future(sc.run())
        await sc.ready.wait()
        port.append(sc.proxy_port)
        ready.set()
        try:
            assert await task == 0
        finally:
            await up.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop[0])
        thread.join(15)
        loop.close()


def blocking_exchange(port: int, data: bytes, timeout_s: float = 3.0, *, half_close: bool = False) -> bytes:
    """Send, read until closed. `half_close`: also end our side (then the sidecar sees EOF and closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        except (ConnectionError, TimeoutError):
            return b""


PREFIXES = [b"", b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from(PREFIXES), noise=st.binary(max_size=400))
def test_random_bytes_never_crash_the_sidecar(threaded_sidecar: int, prefix: bytes, noise: bytes):
    """Any bytes get an HTTP answer or a close; the sidecar keeps serving normal requests."""
    raw = blocking_exchange(threaded_sidecar, prefix + noise, half_close=True)
    assert raw == b"" or raw.startswith(b"HTTP/"), raw[:100]
    if raw:
        assert status_of(raw) in (200, 400, 404, 405, 408, 413) or raw.startswith(b"HTTP/0.9"), raw[:100]
    normal = blocking_exchange(threaded_sidecar, NORMAL.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n"))
    assert status_of(normal) == 200


async def test_header_timeout_never_cuts_a_slow_answer_or_body(upstreams, make_sidecar: MakeSidecar):
    """header_timeout bounds heads only: a slow answer and a body trickled within body_timeout are served."""
    up = await upstreams.start(u.slow(1.2))
    sc = await make_sidecar(config(up.url, body_timeout="3s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
    for byte in b"{}  ":
        await asyncio.sleep(0.3)  # 1.2 s of body, past header_timeout (0.5 s)
        writer.write(bytes([byte]))
    async with asyncio.timeout(5):
        assert status_of(await read_answer(reader)) == 200
    writer.close()
