"""The core proxy over real sockets: forwarding, headers, split, errors, streaming, shedding."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from tests import upstreams as u
from tests.conftest import MakeSidecar


def two_backends(stable: str, canary: str, **route: object) -> dict[str, Any]:
    return {
        "backends": {"stable": {"url": stable}, "canary": {"url": canary}},
        "routes": [{"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"},
                    "split": {"stable": 90, "canary": 10}, **route}],
    }


async def test_forwards_method_path_query_body_and_base_path(upstreams, make_sidecar: MakeSidecar, client):
    """The backend sees the client's method, raw path, query and body, under its base path."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar({"backends": {"m": {"url": up.url + "/base/"}},
                             "routes": [{"name": "r", "split": {"m": 1}}]})
    url = URL(sc.proxy_url + "/v1/models/fraud:predict?x=%2F1&y=2", encoded=True)
    async with client.put(url, data=b'{"instances": [1]}',
                          headers={"content-type": "application/json"}) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["method"] == "PUT"
    assert seen["path_qs"] == "/base/v1/models/fraud:predict?x=%2F1&y=2"
    assert seen["body"] == '{"instances": [1]}'
    assert seen["headers"]["content-type"] == ["application/json"]


async def test_headers_both_ways(upstreams, make_sidecar: MakeSidecar, client):
    """Hop-by-hop headers are dropped both ways; X-Forwarded-* appended; Host is the backend's."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(two_backends(up.url, up.url))
    headers = {"x-forwarded-for": "10.0.0.1", "keep-alive": "timeout=5", "x-drop-me": "1",
               "connection": "keep-alive, x-drop-me", "te": "trailers", "x-user-id": "u1",
               "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"}
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}", headers=headers) as r:
        seen = await r.json()
        assert r.headers["x-sidecar-backend"] in ("stable", "canary")
        assert r.headers["x-sidecar-attempts"] == "1"
        rid = r.headers["x-request-id"]
    h = seen["headers"]
    assert h["host"] == [f"127.0.0.1:{up.port}"]
    assert h["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [f"127.0.0.1:{sc.proxy_port}"]
    assert h["x-request-id"] == [rid]
    assert h["x-user-id"] == ["u1"]
    assert h["traceparent"] == [headers["traceparent"]] and h["tracestate"] == ["k=v"]
    for gone in ("keep-alive", "x-drop-me", "te"):
        assert gone not in h


async def test_response_hop_by_hop_dropped_and_backend_headers_kept(upstreams, make_sidecar, client):
    """The backend's own headers reach the client; its hop-by-hop ones do not."""
    up = await upstreams.start(u.answer(json={"ok": 1}, headers={
        "x-model-version": "7", "keep-alive": "timeout=9", "proxy-authenticate": "Basic", "x-dropme": "1",
        "connection": "x-dropme"}))
    sc = await make_sidecar(two_backends(up.url, up.url))
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert await r.json() == {"ok": 1}
        assert r.headers["x-model-version"] == "7"
        assert "proxy-authenticate" not in r.headers and "x-dropme" not in r.headers
        assert "timeout=9" not in r.headers.get("keep-alive", "")


async def test_request_id_kept_and_generated(upstreams, make_sidecar, client):
    """A client's x-request-id is kept; without one the sidecar makes a unique one."""
    up = await upstreams.start(u.echo())
    sc = await make_sidecar(two_backends(up.url, up.url))
    async with client.post(sc.proxy_url + "/v1/models/fraud", headers={"x-request-id": "abc-1"}) as r:
        assert r.headers["x-request-id"] == "abc-1"
        assert (await r.json())["headers"]["x-request-id"] == ["abc-1"]
    ids = set()
    for _ in range(20):
        async with client.post(sc.proxy_url + "/v1/models/fraud") as r:
            ids.add(r.headers["x-request-id"])
    assert len(ids) == 20


async def test_weighted_split_over_real_traffic(upstreams, make_sidecar, client):
    """A 90/10 split sends about 10% of 600 requests to the canary."""
    stable, canary = await upstreams.start(name="stable"), await upstreams.start(name="canary")
    sc = await make_sidecar(two_backends(stable.url, canary.url))
    got: Counter[str] = Counter()
    for _ in range(600):
        async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
            got[r.headers["x-sidecar-backend"]] += 1
    assert got["stable"] + got["canary"] == 600
    assert 25 <= got["canary"] <= 100  # 60 expected; bound is > 4 sigma
    assert canary.hits == got["canary"]


async def test_sticky_key_stays_and_missing_key_is_random(upstreams, make_sidecar, client):
    """With sticky: each user id always lands on the same backend; keys spread over both."""
    stable, canary = await upstreams.start(name="stable"), await upstreams.start(name="canary")
    cfg = two_backends(stable.url, canary.url, sticky={"header": "x-user-id"})
    cfg["routes"][0]["split"] = {"stable": 50, "canary": 50}
    sc = await make_sidecar(cfg)
    placed: dict[str, set[str]] = {}
    for i in range(40):
        for _ in range(3):
            async with client.post(sc.proxy_url + "/v1/models/fraud", headers={"x-user-id": f"user-{i}"}) as r:
                placed.setdefault(f"user-{i}", set()).add(r.headers["x-sidecar-backend"])
    assert all(len(b) == 1 for b in placed.values())
    assert {next(iter(b)) for b in placed.values()} == {"stable", "canary"}


async def test_override_header_names_weight_zero_backend(upstreams, make_sidecar, client):
    """The override header reaches a weight-0 backend; an unknown name is ignored and counted."""
    stable, canary = await upstreams.start(name="stable"), await upstreams.start(name="canary")
    cfg = two_backends(stable.url, canary.url, override_header="x-sidecar-backend")
    cfg["routes"][0]["split"] = {"stable": 100, "canary": 0}
    sc = await make_sidecar(cfg)
    for _ in range(5):
        async with client.post(sc.proxy_url + "/v1/models/fraud", headers={"x-sidecar-backend": "canary"}) as r:
            assert r.headers["x-sidecar-backend"] == "canary"
    async with client.post(sc.proxy_url + "/v1/models/fraud", headers={"x-sidecar-backend": "nope"}) as r:
        assert r.headers["x-sidecar-backend"] == "stable"
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_override_ignored_total{route="fraud"} 1.0' in text
    assert canary.hits == 5


@pytest.mark.parametrize(("path", "method", "status", "etype"), [
    ("/nothing", "POST", 404, "no_route"),
    ("/v1/models/fraud:predict", "DELETE", 405, "method_not_allowed"),
])
async def test_sidecar_errors_are_json(upstreams, make_sidecar, client, path, method, status, etype):
    """No route gives 404 and a wrong method 405 with Allow, as JSON with the request id."""
    up = await upstreams.start()
    cfg = two_backends(up.url, up.url)
    cfg["routes"][0]["match"]["methods"] = ["POST", "GET"]
    sc = await make_sidecar(cfg)
    async with client.request(method, sc.proxy_url + path, headers={"x-request-id": "rid-9"}) as r:
        assert r.status == status
        err = (await r.json())["error"]
    assert err["type"] == etype and err["request_id"] == "rid-9" and err["message"]
    if status == 405:
        assert r.headers["allow"] == "GET, POST"
    assert up.hits == 0


async def test_body_too_large_by_length_and_chunked(upstreams, make_sidecar, client):
    """Bodies past max_body_bytes get 413, declared or chunked, and never reach the backend."""
    up = await upstreams.start(u.echo())
    cfg = two_backends(up.url, up.url)
    cfg["limits"] = {"max_body_bytes": "1KiB"}
    sc = await make_sidecar(cfg)
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"x" * 1025) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "body_too_large"

    async def gen() -> Any:
        for _ in range(64):
            yield b"y" * 512

    async with client.post(sc.proxy_url + "/v1/models/fraud", data=gen()) as r:
        assert r.status == 413
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"z" * 1024) as r:
        assert r.status == 200
        assert len((await r.json())["body"]) == 1024
    assert up.hits == 1


@pytest.mark.parametrize("fault", ["reset", "refused", "garbage", "wrong_length", "reset_mid_body"])
async def test_broken_backend_gives_502(upstreams, make_sidecar, client, fault):
    """A backend that resets, refuses or sends garbage gives 502 upstream_error."""
    if fault == "reset":
        url = (await upstreams.start(u.reset())).url
    elif fault == "reset_mid_body":
        url = (await upstreams.start(u.reset_mid_body(declared=1000, sent=10))).url
    elif fault == "refused":
        url = u.refused_url()
    elif fault == "garbage":
        url = (await upstreams.raw(u.garbage())).url
    else:
        url = (await upstreams.raw(u.wrong_content_length())).url
    sc = await make_sidecar(two_backends(url, url))
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["type"] == "upstream_error" and err["route"] == "fraud"


async def test_backend_past_deadline_gives_504(upstreams, make_sidecar, client):
    """A backend that hangs past the route's timeout gives 504 upstream_timeout, on time."""
    up = await upstreams.start(u.hang())
    sc = await make_sidecar(two_backends(up.url, up.url, timeout="300ms"))
    t0 = time.perf_counter()
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.status == 504
        assert (await r.json())["error"]["type"] == "upstream_timeout"
    assert 0.25 < time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("code", [500, 503, 429, 418])
async def test_backend_error_answer_passes_unchanged(upstreams, make_sidecar, client, code):
    """A backend's own error answer reaches the client as it was."""
    up = await upstreams.start(u.status(code, b'{"detail": "model says no"}', {"x-why": "because"}))
    sc = await make_sidecar(two_backends(up.url, up.url))
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.status == code
        assert await r.read() == b'{"detail": "model says no"}'
        assert r.headers["x-why"] == "because"


async def test_sse_events_arrive_as_they_are_made(upstreams, make_sidecar, client):
    """An LLM's event stream reaches the client event by event, not at the end."""
    up = await upstreams.start(u.sse([f"tok{i}" for i in range(5)], delay=0.15))
    sc = await make_sidecar(two_backends(up.url, up.url))
    arrivals = []
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        t0 = time.perf_counter()
        async for chunk in r.content.iter_any():
            arrivals.append((time.perf_counter() - t0, chunk))
    text = b"".join(c for _, c in arrivals).decode()
    assert [line for line in text.split("\n") if line] == [f"data: tok{i}" for i in range(5)]
    assert len(arrivals) >= 4
    assert arrivals[0][0] < 0.1 and arrivals[-1][0] > 0.45


async def test_large_and_chunked_answers_stream_through(upstreams, make_sidecar, client):
    """Answers past buffer_response_bytes and chunked ones arrive whole and intact."""
    big = await upstreams.start(u.big(3_000_000))
    chunked = await upstreams.start(u.chunked([b"a" * 1000, b"b" * 5000, b"c"], delay=0.01))
    sc = await make_sidecar({"backends": {"big": {"url": big.url}, "ch": {"url": chunked.url}},
                             "routes": [{"name": "big", "match": {"path_prefix": "/big"}, "split": {"big": 1}},
                                        {"name": "ch", "split": {"ch": 1}}]})
    async with client.get(sc.proxy_url + "/big") as r:
        body = await r.read()
        assert r.headers["content-length"] == "3000000"
    assert body == u.big_body(3_000_000)
    async with client.get(sc.proxy_url + "/x") as r:
        assert await r.read() == b"a" * 1000 + b"b" * 5000 + b"c"


async def test_stream_broken_midway_is_cut_towards_client(upstreams, make_sidecar, client):
    """A stream that breaks after it started ends the client's response incomplete, counted."""
    up = await upstreams.start(u.sse(["a", "b", "c", "d"], delay=0.02, break_after=2))
    sc = await make_sidecar(two_backends(up.url, up.url))
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert "sidecar_streams_broken_total" in text and 'route="fraud"} 1.0' in text


async def test_load_shedding_at_max_inflight(upstreams, make_sidecar, client):
    """Past limits.max_inflight new requests get 503 overloaded with Retry-After, counted."""
    release = asyncio.Event()
    up = await upstreams.start(u.hang(release))
    cfg = two_backends(up.url, up.url)
    cfg["limits"] = {"max_inflight": 2}
    sc = await make_sidecar(cfg)
    held = [asyncio.ensure_future(client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}")) for _ in range(2)]
    await up.wait_in_flight(2)
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}") as r:
        assert r.status == 503
        assert r.headers["retry-after"] == "1"
        assert (await r.json())["error"]["type"] == "overloaded"
    release.set()
    for h in held:
        resp = await h
        assert resp.status == 200
        resp.release()
    async with client.get(sc.admin_url + "/metrics") as r:
        assert 'sidecar_shed_requests_total{reason="max_inflight"} 1.0' in await r.text()


async def test_metrics_families_and_labels_from_config_only(upstreams, make_sidecar, client):
    """/metrics has the core families, labelled by config names; request paths never appear."""
    up = await upstreams.start()
    sc = await make_sidecar(two_backends(up.url, up.url))
    for i in range(5):
        async with client.post(sc.proxy_url + f"/v1/models/fraud/secret-{i}", data=b"{}",
                               headers={"x-user-id": f"leak-{i}"}) as r:
            assert r.status == 200
    async with client.post(sc.proxy_url + "/elsewhere-leak") as r:
        assert r.status == 404
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    for family in ("sidecar_requests_total", "sidecar_request_duration_seconds_bucket", "sidecar_inflight_requests",
                   "sidecar_route_weight", "sidecar_config_info", "sidecar_time_to_first_byte_seconds_bucket"):
        assert family in text
    assert 'sidecar_route_weight{backend="canary",route="fraud"} 0.1' in text
    assert 'route="(no_route)"' in text and 'code="404"' in text
    assert "leak" not in text and "secret" not in text


async def test_health_and_readiness(upstreams, make_sidecar, client):
    """/healthz and /readyz answer 200 while serving, whatever the backends do."""
    sc = await make_sidecar(two_backends(u.refused_url(), u.refused_url()))
    for path in ("/healthz", "/readyz"):
        async with client.get(sc.admin_url + path) as r:
            assert r.status == 200


async def test_access_log_line_per_request_with_trace_id(upstreams, make_sidecar, client, tmp_path):
    """One JSON access-log line per request carries ids, route, backend, status and trace id."""
    up = await upstreams.start()
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        cfg = two_backends(up.url, up.url)
        cfg["access_log"] = True
        sc = await make_sidecar(cfg, access_log_fd=fd)
        async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}", headers={
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "x-request-id": "log-me"}) as r:
            assert r.status == 200
        for _ in range(50):
            if path.read_bytes():
                break
            await asyncio.sleep(0.05)
        lines = path.read_bytes().splitlines()
    finally:
        os.close(fd)
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    assert rec["request_id"] == "log-me" and rec["route"] == "fraud" and rec["status"] == 200
    assert rec["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert rec["backend"] in ("stable", "canary") and rec["attempts"] == 1 and rec["bytes_in"] == 2
