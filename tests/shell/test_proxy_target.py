"""Request targets over raw sockets (aiohttp's client would normalise them): a path never leaves
its route, and the backend, its shadow and the access log all get the one checked path."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import pytest

from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import until


def tenants(a: str, b: str, *, backends: dict[str, Any] | None = None, **route_a: Any) -> dict[str, Any]:
    """Two routes to two backends; A's URL has a base path."""
    return {
        "backends": {"a": {"url": a + "/base"}, "b": {"url": b}, **(backends or {})},
        "routes": [
            {"name": "tenant-a", "match": {"path_prefix": "/tenants/a/"}, "split": {"a": 1}, **route_a},
            {"name": "tenant-b", "match": {"path_prefix": "/tenants/b/"}, "split": {"b": 1}},
        ],
    }


async def send(port: int, head: bytes, wait_s: float = 3.0) -> tuple[bytes, bool]:
    """Exact bytes out; everything the sidecar answers until it closes (True) or `wait_s` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        out = b""
        try:
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(65536):
                    out += chunk
        except TimeoutError:
            return out, False
        except ConnectionError:
            pass
        return out, True
    finally:
        writer.close()


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


ESCAPES = [
    b"GET /tenants/a/../b/predict",
    b"GET /tenants/a/%2e%2e/b/predict",
    b"GET /tenants/a/%2E%2E/b/predict",
    b"GET /tenants/a/.%2e/b/predict",
    b"GET /tenants/a/..%2Fb/predict",
    b"GET /tenants/a%2F..%2Fb/predict",
    b"GET /tenants/a/..%5Cb/predict",
    b"GET /tenants/a/..\\b/predict",
    b"GET /tenants/a/..;/b/predict",
    b"GET /tenants/a/%252e%252e/b/predict",
    b"GET /tenants/a/%00/predict",
    b"GET /tenants/a/%0d%0aX:%201/predict",
    b"GET /tenants/a/%c0%ae%c0%ae/b/predict",
    b"GET /tenants/a/x#/../../b/predict",
    b"GET http://internal/tenants/a/../b/predict",
    b"GET ftp://internal/tenants/a/x",
    b"GET internal:443",
    b"CONNECT internal:443",
    b"GET *",
]


@pytest.mark.parametrize("line", ESCAPES, ids=[x.decode() for x in ESCAPES])
async def test_target_that_could_leave_its_route_is_refused(line, upstreams, make_sidecar: MakeSidecar):
    """A target a backend could read outside its route gets 400 bad_request, closes, and reaches no backend."""
    a, b = await upstreams.start(u.echo(), name="a"), await upstreams.start(u.echo(), name="b")
    sc = await make_sidecar(tenants(a.url, b.url))
    raw, closed = await send(sc.proxy_port, line + b" HTTP/1.1\r\nHost: x\r\nx-request-id: r1\r\n\r\n")
    status, headers, body = answer(raw)
    assert status == 400, raw[:300]
    error = orjson.loads(body)["error"]
    assert error["type"] == "bad_request" and error["message"]
    assert headers["content-type"] == "application/json"
    assert closed and raw.count(b"HTTP/1.") == 1
    assert b.hits == 0 and a.hits == 0
    raw, _ = await send(sc.proxy_port, b"GET /tenants/b/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer(raw)[0] == 200 and b.hits == 1  # and the sidecar serves on


async def test_options_asterisk_is_no_route(upstreams, make_sidecar: MakeSidecar):
    """`OPTIONS *` gets 404 no_route: no route serves the server as a whole, nothing is forwarded."""
    a, b = await upstreams.start(u.echo()), await upstreams.start(u.echo())
    sc = await make_sidecar(tenants(a.url, b.url))
    raw, _ = await send(sc.proxy_port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _, body = answer(raw)
    assert status == 404 and orjson.loads(body)["error"]["type"] == "no_route"
    assert a.hits == b.hits == 0


async def test_absolute_form_reaches_its_route_in_origin_form(upstreams, make_sidecar: MakeSidecar):
    """`GET http://internal/tenants/a/x?q=1` reaches A as `/base/tenants/a/x?q=1` with A's own Host."""
    a, b = await upstreams.start(u.echo(), name="a"), await upstreams.start(u.echo(), name="b")
    sc = await make_sidecar(tenants(a.url, b.url))
    raw, _ = await send(sc.proxy_port, b"GET http://internal/tenants/a/x?q=%2e%2e/1 HTTP/1.1\r\n"
                                       b"Host: internal\r\nConnection: close\r\n\r\n")
    status, headers, body = answer(raw)
    assert status == 200 and headers["x-sidecar-backend"] == "a"
    seen = orjson.loads(body)
    assert seen["path_qs"] == "/base/tenants/a/x?q=%2e%2e/1"
    assert seen["headers"]["host"] == [f"127.0.0.1:{a.port}"]
    assert seen["headers"]["x-forwarded-host"] == ["internal"]
    assert b.hits == 0


async def test_encoding_reaches_the_backend_as_sent(upstreams, make_sidecar: MakeSidecar):
    """A path matches its route decoded (`%2F` is "/"), and the backend gets it as the client encoded it."""
    a, b = await upstreams.start(u.echo(), name="a"), await upstreams.start(u.echo(), name="b")
    sc = await make_sidecar(tenants(a.url, b.url))
    raw, _ = await send(sc.proxy_port, b"GET /tenants%2Fb/caf%C3%A9;v=1/.x?y=../z HTTP/1.1\r\n"
                                       b"Host: x\r\nConnection: close\r\n\r\n")
    status, _, body = answer(raw)
    assert status == 200
    assert orjson.loads(body)["path_qs"] == "/tenants%2Fb/caf%C3%A9;v=1/.x?y=../z"
    assert a.hits == 0 and b.hits == 1


async def test_shadow_and_access_log_get_the_checked_path(upstreams, make_sidecar: MakeSidecar, tmp_path):
    """The shadow gets the very path the primary got, and the access log shows the path routes matched."""
    a, b, shadow = [await upstreams.start(u.echo(), name=n) for n in ("a", "b", "shadow")]
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        cfg = tenants(a.url, b.url, backends={"shadow": {"url": shadow.url}},
                      mirror=[{"backend": "shadow", "percent": 100}])
        cfg["access_log"] = True
        sc = await make_sidecar(cfg, access_log_fd=fd)
        raw, _ = await send(sc.proxy_port, b"POST http://internal/tenants/a/m%3Apredict?v=1 HTTP/1.1\r\n"
                                           b"Host: internal\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert answer(raw)[0] == 200
        raw, _ = await send(sc.proxy_port, b"GET /tenants/a/%2e%2e/b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer(raw)[0] == 400
        await shadow.wait_hits(1)
        await until(lambda: len(path.read_bytes().splitlines()) == 2, what="two access log lines")
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    finally:
        os.close(fd)
    assert a.last.path_qs == "/base/tenants/a/m%3Apredict?v=1"
    assert shadow.last.path_qs == "/tenants/a/m%3Apredict?v=1"
    assert shadow.last.headers["host"] == f"127.0.0.1:{shadow.port}"
    assert [(r["path"], r["route"], r["status"]) for r in lines] == [
        ("/tenants/a/m:predict", "tenant-a", 200), ("/tenants/a/%2e%2e/b", "(no_route)", 400)]
    assert b.hits == 0
