"""Retries, budgets, deadlines, hedging, breakers, bulkheads, replicas, health checks and
fallbacks, over real sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import until

PATH = "/v1/models/m:predict"


def config(backends: dict[str, Any], **route: Any) -> dict[str, Any]:
    split = route.pop("split", None) or dict.fromkeys(backends, 1)
    return {"backends": backends, "routes": [{"name": "r", "split": split, **route}]}


async def metric(client: aiohttp.ClientSession, sc: Any, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when absent)."""
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    want = "sidecar_" + name
    for line in text.splitlines():
        if not line.startswith(want + "{") and not line.startswith(want + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def post(client: aiohttp.ClientSession, sc: Any, **kw: Any) -> tuple[int, CIMultiDict[str], bytes]:
    async with client.post(sc.proxy_url + PATH, data=b'{"instances": [1]}', **kw) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


FAST_RETRY = {"attempts": 3, "backoff": {"base": 0, "max": 0}, "on": ["connect-error", "timeout", "reset", "5xx"]}


# -- retries -----------------------------------------------------------------------------------


async def test_connect_error_without_retry_goes_to_another_backend(upstreams, make_sidecar: MakeSidecar, client):
    """A route without `retry`: a backend that refuses the connection (nothing was sent) costs the
    client nothing; the other backend of the split answers, in two tries."""
    ok = await upstreams.start(u.answer())
    sc = await make_sidecar({"backends": {"down": {"url": u.refused_url()}, "ok": {"url": ok.url}},
                             "routes": [{"name": "s", "match": {"path_prefix": "/s"},
                                         "split": {"down": 99, "ok": 1}},
                                        {"name": "r", "match": {"path_prefix": "/"}, "split": {"down": 1}}]})
    async with client.post(f"{sc.proxy_url}/s/x", data=b"{}") as r:
        assert r.status == 200 and r.headers["x-sidecar-backend"] == "ok"
        assert r.headers["x-sidecar-attempts"] == "2"
    async with client.post(f"{sc.proxy_url}/x", data=b"{}") as r:  # no other backend: one retry, then 502
        assert r.status == 502 and r.headers["x-sidecar-attempts"] == "2"


async def test_fails_twice_then_answers(upstreams, make_sidecar: MakeSidecar, client):
    """A backend that fails twice still answers the client, on the third try, and says so."""
    up = await upstreams.start(u.fail_n(2, 503))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry=FAST_RETRY))
    status, headers, _ = await post(client, sc)
    assert status == 200
    assert headers["x-sidecar-attempts"] == "3"
    assert up.hits == 3
    assert await metric(client, sc, "retries_total", route="r", backend="m") == 2
    assert await metric(client, sc, "upstream_attempts_total", backend="m", outcome="5xx") == 2
    assert await metric(client, sc, "upstream_attempts_total", backend="m", outcome="ok") == 1


async def test_method_does_not_limit_retries_the_on_list_does(upstreams, make_sidecar, client):
    """A failing POST is retried when `on` lists its failure, and not when it does not."""
    up = await upstreams.start(u.fail_n(1, 502))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry={**FAST_RETRY, "on": ["timeout"]}))
    status, headers, _ = await post(client, sc)
    assert status == 502 and headers["x-sidecar-attempts"] == "1"  # the backend's own 502 passes


async def test_per_try_timeout_retries_a_hanging_backend(upstreams, make_sidecar, client):
    """A backend that hangs on the first try is abandoned after per_try_timeout and retried."""
    up = await upstreams.start(u.sequence([u.hang(), u.answer()]))
    sc = await make_sidecar(config({"m": {"url": up.url}}, timeout=5,
                                   retry={**FAST_RETRY, "per_try_timeout": "200ms"}))
    t0 = time.monotonic()
    status, headers, _ = await post(client, sc)
    assert status == 200 and headers["x-sidecar-attempts"] == "2"
    assert 0.2 <= time.monotonic() - t0 < 2.0
    await up.wait_in_flight(0)  # the hung try was cancelled upstream: its connection closed
    assert await metric(client, sc, "upstream_attempts_total", outcome="timeout") == 1


async def test_reset_mid_body_of_a_small_answer_is_retried(upstreams, make_sidecar, client):
    """A small answer cut mid-body never reaches the client: the sidecar retries and the client gets a whole one."""
    up = await upstreams.start(u.sequence([u.reset_mid_body(1000, 10), u.answer({"ok": True})]))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry=FAST_RETRY))
    status, headers, body = await post(client, sc)
    assert status == 200 and body == b'{"ok":true}'
    assert headers["x-sidecar-attempts"] == "2"


async def test_connection_refused_is_retried_on_the_other_backend(upstreams, make_sidecar, client):
    """When one backend refuses connections, every request still succeeds on the other one."""
    good = await upstreams.start(name="good")
    sc = await make_sidecar(config({"dead": {"url": u.refused_url()}, "good": {"url": good.url}},
                                   retry={**FAST_RETRY, "attempts": 2}))
    attempts = []
    for _ in range(20):
        status, headers, _ = await post(client, sc)
        assert status == 200 and headers["x-sidecar-backend"] == "good"
        attempts.append(headers["x-sidecar-attempts"])
    assert "2" in attempts  # about half went to `dead` first
    assert await metric(client, sc, "upstream_attempts_total", backend="dead", outcome="connect_error") > 0


async def test_deadline_during_backoff_answers_504_on_time(upstreams, make_sidecar, client):
    """A retry whose backoff would outlast the route's deadline is not made: 504 comes within the deadline."""
    up = await upstreams.start(u.hang())
    sc = await make_sidecar(config({"m": {"url": up.url}}, timeout="600ms",
                                   retry={**FAST_RETRY, "per_try_timeout": "200ms",
                                          "backoff": {"base": "2s", "max": "2s"}}))
    sc.proxy._rng = lambda: 0.5  # backoff 1 s: past the deadline
    t0 = time.monotonic()
    status, _, body = await post(client, sc)
    elapsed = time.monotonic() - t0
    assert status == 504 and b"upstream_timeout" in body
    assert 0.2 <= elapsed < 0.6
    assert up.hits == 1
    assert await metric(client, sc, "retries_skipped_total", route="r", reason="deadline") == 1


async def test_route_deadline_bounds_retries(upstreams, make_sidecar, client):
    """However many attempts are allowed, the client has its answer by the route's timeout."""
    up = await upstreams.start(u.hang())
    sc = await make_sidecar(config({"m": {"url": up.url}}, timeout="500ms",
                                   retry={**FAST_RETRY, "attempts": 10, "per_try_timeout": "150ms"}))
    t0 = time.monotonic()
    status, _, _ = await post(client, sc)
    assert status == 504
    assert time.monotonic() - t0 < 0.8
    assert 2 <= up.hits <= 4


async def test_4xx_is_never_retried(upstreams, make_sidecar, client):
    """A model's 4xx answer is its answer: passed through after one try."""
    up = await upstreams.start(u.status(422, '{"error": "bad input"}'))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry=FAST_RETRY))
    status, headers, body = await post(client, sc)
    assert status == 422 and body == b'{"error": "bad input"}'
    assert headers["x-sidecar-attempts"] == "1" and up.hits == 1


async def test_listed_status_is_retried(upstreams, make_sidecar, client):
    """A status listed in `retry.on` (429 here) is retried."""
    up = await upstreams.start(u.fail_n(1, 429))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry={**FAST_RETRY, "on": [429]}))
    status, headers, _ = await post(client, sc)
    assert status == 200 and headers["x-sidecar-attempts"] == "2"


async def test_tries_spent_pass_the_last_answer(upstreams, make_sidecar, client):
    """When every try fails with a 503, the client gets the backend's last 503 as it was."""
    up = await upstreams.start(u.status(503, "busy", {"x-model": "1"}))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry=FAST_RETRY))
    status, headers, body = await post(client, sc)
    assert status == 503 and body == b"busy" and headers["x-model"] == "1"
    assert headers["x-sidecar-attempts"] == "3"
    assert await metric(client, sc, "retries_skipped_total", reason="attempts_exhausted") == 1


async def test_retry_storm_is_impossible(upstreams, make_sidecar, client):
    """With every backend failing, the backends see at most (1 + budget) x requests + the 10/s floor."""
    a, b = await upstreams.start(u.status(503)), await upstreams.start(u.status(503))
    sc = await make_sidecar(config({"a": {"url": a.url}, "b": {"url": b.url}},
                                   retry={**FAST_RETRY, "attempts": 5, "budget": 0.2}))
    n = 400
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        async with sem:
            status, _, _ = await post(client, sc)
            assert status == 503

    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(one())
    hits = a.hits + b.hits
    assert hits <= (1 + 0.2) * n + 10 * 10, hits
    assert hits > n  # some retries were made
    assert await metric(client, sc, "retry_budget_exhausted_total", route="r") > 0
    assert await metric(client, sc, "retries_skipped_total", route="r", reason="budget_exhausted") > 0


# -- hedging -----------------------------------------------------------------------------------


async def test_hedging_cuts_tail_latency(upstreams, make_sidecar, client):
    """A slow replica costs the client only hedge_after: the hedge to the fast one answers first."""
    slow = await upstreams.start(u.slow(3.0, u.answer({"who": "slow"})), name="slow")
    fast = await upstreams.start(u.answer({"who": "fast"}), name="fast")
    sc = await make_sidecar(config({"m": {"endpoints": [slow.url, fast.url], "balance": "round_robin"}},
                                   timeout=5, retry={**FAST_RETRY, "hedge_after": "150ms"}))
    t0 = time.monotonic()
    status, headers, body = await post(client, sc)
    elapsed = time.monotonic() - t0
    assert status == 200 and body == b'{"who":"fast"}'
    assert 0.15 <= elapsed < 1.0
    assert headers["x-sidecar-attempts"] == "2"
    await slow.wait_in_flight(0)  # the losing try was cancelled
    assert await metric(client, sc, "retries_total", backend="m") == 1
    assert await metric(client, sc, "upstream_attempts_total", backend="m", outcome="cancelled") == 1


async def test_fast_answer_sends_no_hedge(upstreams, make_sidecar, client):
    """When the first try answers before hedge_after, no second try is sent."""
    up = await upstreams.start()
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry={**FAST_RETRY, "hedge_after": "1s"}))
    for _ in range(5):
        status, headers, _ = await post(client, sc)
        assert status == 200 and headers["x-sidecar-attempts"] == "1"
    assert up.hits == 5


# -- streams -----------------------------------------------------------------------------------


async def test_stream_broken_after_start_is_not_retried(upstreams, make_sidecar, client):
    """An event stream that breaks after it started ends the response; it is not replayed."""
    up = await upstreams.start(u.sse(["a", "b", "c"], delay=0.01, break_after=2))
    sc = await make_sidecar(config({"m": {"url": up.url}}, retry=FAST_RETRY))
    got = bytearray()

    async def read_all() -> None:
        async with client.post(sc.proxy_url + PATH) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                got.extend(chunk)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all()
    assert b"data: a" in got and b"data: b" in got
    assert up.hits == 1
    await until(lambda: metric(client, sc, "upstream_attempts_total", outcome="stream_broken"))


async def test_first_byte_timeout_retries_a_stream_that_never_starts(upstreams, make_sidecar, client):
    """A streaming model that sends no headers in first_byte_timeout is retried; a started one runs on."""
    up = await upstreams.start(u.sequence([u.hang(), u.sse(["x", "y"], delay=0.3)]))
    sc = await make_sidecar(config({"m": {"url": up.url}}, timeout="2s",
                                   retry={**FAST_RETRY, "per_try_timeout": "200ms",
                                          "first_byte_timeout": "200ms"}))
    async with client.post(sc.proxy_url + PATH) as r:
        assert r.status == 200 and r.headers["x-sidecar-attempts"] == "2"
        body = await r.read()  # runs past per_try_timeout: a started stream is not cut
    assert b"data: x" in body and b"data: y" in body


# -- circuit breaker and bulkhead --------------------------------------------------------------


async def test_breaker_opens_half_opens_and_closes(upstreams, make_sidecar, client):
    """A failing backend's circuit opens (traffic moves elsewhere), half-opens after open_for, closes on success."""
    bad = await upstreams.start(u.status(500), name="bad")
    good = await upstreams.start(name="good")
    sc = await make_sidecar(config(
        {"bad": {"url": bad.url, "circuit_breaker": {"consecutive_failures": 3, "failure_rate": None,
                                                      "open_for": "400ms"}},
         "good": {"url": good.url}}))
    for _ in range(200):
        await post(client, sc)
        if bad.hits >= 3:
            break
    assert await metric(client, sc, "circuit_state", backend="bad") == 2
    hits = bad.hits
    for _ in range(20):
        status, headers, _ = await post(client, sc)
        assert status == 200 and headers["x-sidecar-backend"] == "good"
    assert bad.hits == hits
    bad.behaviour = u.answer()
    await until(lambda: _eq(metric(client, sc, "circuit_state", backend="bad"), 1), what="half-open")
    for _ in range(200):
        await post(client, sc)
        if bad.hits > hits:
            break
    assert await metric(client, sc, "circuit_state", backend="bad") == 0


async def _eq(value: Any, want: float) -> bool:
    return bool(await value == want)


async def test_failure_rate_opens_the_circuit(upstreams, make_sidecar, client):
    """Half the calls failing over the window opens the circuit, even without failures in a row."""
    up = await upstreams.start(u.sequence([u.status(500), u.answer()] * 10))
    sc = await make_sidecar(config({"m": {"url": up.url, "circuit_breaker": {
        "consecutive_failures": None, "failure_rate": 0.5, "window": 10, "open_for": "30s"}}}))
    for _ in range(10):
        await post(client, sc)
    assert await metric(client, sc, "circuit_state", backend="m") == 2
    status, headers, body = await post(client, sc)
    assert status == 503 and headers["retry-after"] == "1" and b"no_backend_available" in body


async def test_bulkhead_sends_new_requests_elsewhere(upstreams, make_sidecar, client):
    """A backend at max_inflight takes no new requests; they go to the other backend."""
    release = asyncio.Event()
    busy = await upstreams.start(u.hang(release), name="busy")
    other = await upstreams.start(name="other")
    sc = await make_sidecar(config({"busy": {"url": busy.url, "max_inflight": 1}, "other": {"url": other.url}},
                                   split={"busy": 100, "other": 1}, override_header="x-backend"))
    async with asyncio.TaskGroup() as tg:
        first = tg.create_task(post(client, sc, headers={"x-backend": "busy"}))
        await busy.wait_in_flight(1)
        for _ in range(10):
            status, headers, _ = await post(client, sc)
            assert status == 200 and headers["x-sidecar-backend"] == "other"
        release.set()
    assert first.result()[0] == 200


# -- replicas ----------------------------------------------------------------------------------


async def test_least_request_spreads_over_replicas(upstreams, make_sidecar, client):
    """Requests to a backend with three replicas reach all three."""
    ups = [await upstreams.start() for _ in range(3)]
    sc = await make_sidecar(config({"m": {"endpoints": [x.url for x in ups]}}))
    for _ in range(60):
        assert (await post(client, sc))[0] == 200
    assert all(x.hits >= 5 for x in ups), [x.hits for x in ups]


async def test_failing_replica_is_ejected_and_comes_back(upstreams, make_sidecar, client):
    """A replica failing in a row gets no traffic for eject_for, then is used again."""
    bad, good = await upstreams.start(u.status(503), name="bad"), await upstreams.start(name="good")
    sc = await make_sidecar(config({"m": {"endpoints": [bad.url, good.url], "balance": "round_robin",
                                          "outlier": {"consecutive_failures": 2, "eject_for": "500ms"}}}))
    for _ in range(4):
        await post(client, sc)
    assert bad.hits == 2
    assert await metric(client, sc, "endpoint_ejected", backend="m", endpoint="0") == 1
    for _ in range(10):
        status, _, _ = await post(client, sc)
        assert status == 200
    assert bad.hits == 2
    bad.behaviour = u.answer()
    await until(lambda: _eq(metric(client, sc, "endpoint_ejected", backend="m", endpoint="0"), 0))
    for _ in range(4):
        assert (await post(client, sc))[0] == 200
    assert bad.hits > 2


# -- active health checks ----------------------------------------------------------------------


def health_behaviour(state: dict[str, int]) -> u.Behaviour:
    async def behave(request: web.BaseRequest, up: u.Upstream) -> web.StreamResponse:
        if request.path.endswith("/health"):
            return web.Response(status=state["health"])
        return web.json_response({"from": up.name})
    return behave


async def test_health_checks_take_replicas_and_backend_out_and_back(upstreams, make_sidecar, client):
    """A replica failing health checks gets no traffic; with none healthy the route says 503; then both recover."""
    sa, sb = {"health": 200}, {"health": 200}
    a = await upstreams.start(health_behaviour(sa), name="a")
    b = await upstreams.start(health_behaviour(sb), name="b")
    sc = await make_sidecar(config({"m": {"endpoints": [a.url + "/base", b.url + "/base"], "health_check": {
        "path": "/health", "interval": "30ms", "timeout": "200ms", "unhealthy_after": 2, "healthy_after": 1}}}))
    backend = sc.proxy.runtime.backends["m"]
    await a.wait_hits(1)
    assert a.last.path_qs == "/base/health"
    sa["health"] = 503
    await until(lambda: backend.endpoints.healthy == [False, True], what="a unhealthy")
    a_hits = sum(1 for s in a.requests if not s.path_qs.endswith("/health"))
    for _ in range(10):
        status, _, body = await post(client, sc)
        assert status == 200 and body == b'{"from": "b"}'
    assert sum(1 for s in a.requests if not s.path_qs.endswith("/health")) == a_hits
    sb["health"] = 500
    await until(lambda: _eq(metric(client, sc, "backend_healthy", backend="m"), 0), what="backend down")
    status, headers, body = await post(client, sc)
    assert status == 503 and headers["retry-after"] == "1" and b"no_backend_available" in body
    async with client.get(sc.admin_url + "/readyz") as r:
        assert r.status == 200  # a sick model never unreadies the sidecar
    sa["health"] = sb["health"] = 200
    await until(lambda: _eq(metric(client, sc, "backend_healthy", backend="m"), 1), what="backend up")
    assert (await post(client, sc))[0] == 200


# -- fallback ----------------------------------------------------------------------------------


async def test_fallback_to_another_backend(upstreams, make_sidecar, client):
    """When the split's backend fails, the fallback backend answers and is named."""
    bad, spare = await upstreams.start(u.status(500)), await upstreams.start(u.answer({"spare": 1}))
    sc = await make_sidecar(config({"bad": {"url": bad.url}, "spare": {"url": spare.url}},
                                   split={"bad": 1}, fallback=[{"backend": "spare"}]))
    status, headers, body = await post(client, sc)
    assert status == 200 and body == b'{"spare":1}' and headers["x-sidecar-backend"] == "spare"
    assert await metric(client, sc, "fallbacks_total", route="r", kind="backend") == 1


async def test_fallback_static_response(upstreams, make_sidecar, client):
    """With every backend failing, the static fallback answers with its status, JSON and headers."""
    bad = await upstreams.start(u.status(503))
    sc = await make_sidecar(config(
        {"bad": {"url": bad.url}, "worse": {"url": u.refused_url()}}, split={"bad": 1},
        retry=FAST_RETRY,
        fallback=[{"backend": "worse"},
                  {"response": {"status": 200, "json": {"predictions": [], "fallback": True},
                                "headers": {"x-degraded": "1"}}}]))
    status, headers, body = await post(client, sc)
    assert status == 200 and orjson.loads(body) == {"predictions": [], "fallback": True}
    assert headers["x-degraded"] == "1" and headers["content-type"] == "application/json"
    assert headers["x-sidecar-backend"] == "fallback:response"
    assert headers["x-sidecar-attempts"] == "4"  # three tries of `bad`, one of `worse`
    assert await metric(client, sc, "fallbacks_total", route="r", kind="response") == 1


async def test_no_backend_available_uses_fallback_or_503(upstreams, make_sidecar, client):
    """With the circuit open and a fallback, the fallback answers; without one, 503 with Retry-After."""
    bad = await upstreams.start(u.status(500))
    breaker = {"consecutive_failures": 1, "open_for": "30s"}
    sc = await make_sidecar(config({"bad": {"url": bad.url, "circuit_breaker": breaker}},
                                   fallback=[{"response": {"status": 503, "json": {"degraded": True}}}]))
    assert (await post(client, sc))[0] == 503  # the first failure opens the circuit, then falls back
    status, headers, body = await post(client, sc)
    assert status == 503 and body == b'{"degraded":true}' and headers["retry-after"] == "1"
    assert bad.hits == 1
    sc2 = await make_sidecar(config({"bad": {"url": bad.url, "circuit_breaker": breaker}}))
    assert (await post(client, sc2))[0] == 500  # the backend's own answer passes
    status, headers, body = await post(client, sc2)
    assert status == 503 and headers["retry-after"] == "1" and b"no_backend_available" in body


async def test_connect_error_without_fallback_is_502(upstreams, make_sidecar, client):
    """When tries are spent with no answer at all, the sidecar answers 502."""
    sc = await make_sidecar(config({"m": {"url": u.refused_url()}}, retry=FAST_RETRY))
    status, headers, body = await post(client, sc)
    assert status == 502 and b"upstream_error" in body and headers["x-sidecar-attempts"] == "3"
