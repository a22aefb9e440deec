"""Shadow mirroring over real sockets: copies, comparison, caps, skips, drain, admin and metrics."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan, RoutePlan
from sidecar.shell.mirror import MirrorStats, key_share_below
from sidecar.shell.server import Sidecar
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config
from tests.harness import until

PATH = "/v1/models/fraud"


def mirrored(primary: str, shadow: str, mirror: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Route `fraud` to `primary`, mirrored to `shadow`; route `plain` without a mirror."""
    return {
        "backends": {"primary": {"url": primary}, "shadow": {"url": shadow}},
        "routes": [
            {"name": "fraud", "match": {"path_prefix": PATH}, "split": {"primary": 1},
             "mirror": [{"backend": "shadow", **(mirror or {})}]},
            {"name": "plain", "match": {"path_prefix": "/plain"}, "split": {"primary": 1}},
        ],
        **extra,
    }


def stats(sc: Sidecar, route: str = "fraud", backend: str = "shadow") -> dict[str, Any]:
    for entry in sc.services.mirrors.status_json(sc.proxy.runtime.plan):
        if entry["route"] == route and entry["backend"] == backend:
            return entry
    raise AssertionError(f"no mirror {route}/{backend}")


async def settle(sc: Sidecar) -> None:
    async with asyncio.timeout(10):
        await sc.services.mirrors.wait_idle()


async def post(client: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with client.post(url, data=kw.pop("data", b'{"instances": [1]}'), **kw) as r:
        return r.status, await r.read(), r.headers


async def test_shadow_gets_the_same_request_with_shadow_header(upstreams, make_sidecar: MakeSidecar, client):
    """The shadow sees the client's method, path, body and request id, plus x-sidecar-shadow: 1."""
    primary = await upstreams.start(u.echo())
    shadow = await upstreams.start(u.echo())
    sc = await make_sidecar(mirrored(primary.url, shadow.url))
    status, _, _ = await post(client, sc.proxy_url + PATH + ":predict?v=1", data=b'{"x": 1}',
                                    headers={"x-request-id": "rid-1"})
    assert status == 200
    await shadow.wait_hits(1)
    seen = shadow.last
    assert seen.method == "POST" and seen.path_qs == PATH + ":predict?v=1" and seen.body == b'{"x": 1}'
    assert seen.headers["x-sidecar-shadow"] == "1"
    assert seen.headers["x-request-id"] == "rid-1" == primary.last.headers["x-request-id"]
    assert "x-sidecar-shadow" not in primary.last.headers
    await settle(sc)
    assert stats(sc)["outcomes"]["sent"] == 1 and stats(sc)["sent"] == 1


async def test_client_never_sees_shadow_header_or_body(upstreams, make_sidecar: MakeSidecar, client):
    """The client's answer is the primary's, whatever the shadow answers."""
    primary = await upstreams.start(u.answer(json={"predictions": [0.5]}, headers={"x-model": "prod"}))
    shadow = await upstreams.start(u.answer(json={"predictions": [0.9], "secret": "shadow-only"},
                                            status=201, headers={"x-model": "candidate", "x-shadow-only": "1"}))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"compare": {"path": "$.predictions[*]"}}))
    for _ in range(5):
        status, body, headers = await post(client, sc.proxy_url + PATH)
        assert status == 200
        assert orjson.loads(body) == {"predictions": [0.5]}
        assert headers["x-model"] == "prod" and "x-shadow-only" not in headers
        assert "x-sidecar-shadow" not in headers and headers["x-sidecar-backend"] == "primary"
    await settle(sc)
    assert shadow.hits == 5
    assert stats(sc)["outcomes"]["disagree"] == 5


async def test_hanging_shadow_costs_the_client_no_latency(upstreams, make_sidecar: MakeSidecar, client):
    """With a shadow that hangs 5 s, the client's answers are as fast as on a route without a mirror."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.slow(5.0))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"timeout": "10s", "max_inflight": 100},
                                     drain={"delay": 0, "grace": 0.2}))

    async def timed(path: str) -> float:
        t0 = time.perf_counter()
        status, _, _ = await post(client, sc.proxy_url + path)
        assert status == 200
        return time.perf_counter() - t0

    await timed("/plain")  # warm the client's and the primary's connections
    await timed(PATH)
    without, with_mirror = [], []
    for _ in range(30):
        without.append(await timed("/plain"))
        with_mirror.append(await timed(PATH))
    assert max(with_mirror) < 1.0, "a client request waited for the hanging shadow"
    # generous: same machine, same run; a regression would be seconds, not milliseconds
    assert statistics.median(with_mirror) <= 2 * statistics.median(without) + 0.01, (without, with_mirror)
    await shadow.wait_hits(31)
    assert stats(sc)["inflight"] == 31


async def test_shadow_timeout_is_counted(upstreams, make_sidecar: MakeSidecar, client):
    """A shadow slower than mirror.timeout is counted as shadow_timeout; the client is unaffected."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.slow(2.0))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"timeout": "100ms"}))
    status, _, _ = await post(client, sc.proxy_url + PATH)
    assert status == 200
    await settle(sc)
    assert stats(sc)["outcomes"]["shadow_timeout"] == 1


@pytest.mark.parametrize("behaviour", [u.reset(), u.reset(rst=True), u.reset_mid_body(), u.status(503, "down")])
async def test_failing_shadow_is_counted_and_invisible(upstreams, make_sidecar: MakeSidecar, client, behaviour):
    """A shadow that resets or fails is counted as shadow_error; the client gets the primary's answer."""
    primary = await upstreams.start(u.answer(json={"predictions": [1]}))
    shadow = await upstreams.start(behaviour)
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"compare": {"path": "$.predictions"}}))
    for _ in range(3):
        status, body, _ = await post(client, sc.proxy_url + PATH)
        assert status == 200 and orjson.loads(body) == {"predictions": [1]}
    await settle(sc)
    outcomes = stats(sc)["outcomes"]
    assert outcomes["shadow_error"] == 3, outcomes
    assert stats(sc)["agreement"] is None


async def test_hanging_shadow_with_a_breaker_is_skipped_until_it_recovers(upstreams, make_sidecar: MakeSidecar,
                                                                         client):
    """A shadow copy is a try on its backend: timeouts open the shadow's circuit, later requests are
    not mirrored (skipped_unavailable) and hold no connection; after open_for a probe goes through
    and, the shadow well again, mirroring resumes."""
    release = asyncio.Event()
    primary = await upstreams.start(u.answer(json={"predictions": [1]}))
    shadow = await upstreams.start(u.hang(release))
    cfg = mirrored(primary.url, shadow.url, {"timeout": "100ms"})
    cfg["backends"]["shadow"]["circuit_breaker"] = {"consecutive_failures": 3, "open_for": "600ms",
                                                    "half_open_probes": 1}
    sc = await make_sidecar(cfg)
    for _ in range(3):  # one at a time: each mirror times out before the next request
        assert (await post(client, sc.proxy_url + PATH))[0] == 200
        await settle(sc)
    assert stats(sc)["outcomes"]["shadow_timeout"] == 3
    assert sc.proxy.runtime.backends["shadow"].circuit_state(asyncio.get_running_loop().time()) == "open"
    for _ in range(20):
        status, body, _ = await post(client, sc.proxy_url + PATH)
        assert status == 200 and orjson.loads(body) == {"predictions": [1]}
    assert sc.services.mirrors.inflight == 0 and shadow.hits == 3
    assert stats(sc)["outcomes"]["skipped_unavailable"] == 20
    release.set()  # the shadow recovers; after open_for one probe closes the circuit
    await asyncio.sleep(0.7)
    for _ in range(3):
        assert (await post(client, sc.proxy_url + PATH))[0] == 200
        await settle(sc)
    assert stats(sc)["outcomes"]["sent"] == 3 and shadow.hits == 6
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_mirror_requests_total{backend="shadow",outcome="skipped_unavailable",route="fraud"} 20.0' in text


async def test_shadow_failing_health_checks_is_not_mirrored(upstreams, make_sidecar: MakeSidecar, client):
    """A shadow its active health checks find down gets no copies; the skips are counted."""
    health = {"status": 200}

    async def behave(request: web.BaseRequest, up: u.Upstream) -> web.StreamResponse:
        if request.path.endswith("/health"):
            return web.Response(status=health["status"])
        return web.json_response({"predictions": [2]})

    primary = await upstreams.start(u.answer(json={"predictions": [1]}))
    shadow = await upstreams.start(behave)
    cfg = mirrored(primary.url, shadow.url)
    cfg["backends"]["shadow"]["health_check"] = {"path": "/health", "interval": "30ms", "timeout": "200ms",
                                                 "unhealthy_after": 1, "healthy_after": 1}
    sc = await make_sidecar(cfg)
    assert (await post(client, sc.proxy_url + PATH))[0] == 200
    await settle(sc)
    assert stats(sc)["outcomes"]["sent"] == 1
    health["status"] = 503
    backend = sc.proxy.runtime.backends["shadow"]
    await until(lambda: not backend.endpoints.available(asyncio.get_running_loop().time()), what="shadow down")
    for _ in range(5):
        assert (await post(client, sc.proxy_url + PATH))[0] == 200
    await settle(sc)
    assert stats(sc)["outcomes"]["skipped_unavailable"] == 5 and stats(sc)["outcomes"]["sent"] == 1


async def test_agreement_ratio_near_known_share(upstreams, make_sidecar: MakeSidecar, client):
    """A shadow that disagrees on every 4th request shows an agreement ratio of 0.75, with the
    disagreements listed (request id, path, both values) and the ratio in /metrics."""
    primary = await upstreams.start(u.answer(json={"predictions": [0.5, 0.25]}))
    close = u.answer(json={"predictions": [0.505, 0.25]})   # within tolerance: agrees
    far = u.answer(json={"predictions": [0.9, 0.25]})
    shadow = await upstreams.start(u.sequence([close, close, close, far] * 10))
    sc = await make_sidecar(mirrored(primary.url, shadow.url,
                                     {"compare": {"path": "$.predictions[*]", "tolerance": 0.01}}))
    for i in range(40):
        status, _, _ = await post(client, sc.proxy_url + PATH, headers={"x-request-id": f"req-{i}"})
        assert status == 200
        await settle(sc)  # one at a time: the shadow's sequence follows the client's order
    entry = stats(sc)
    assert entry["outcomes"]["agree"] == 30 and entry["outcomes"]["disagree"] == 10
    assert entry["agreement"] == pytest.approx(0.75, abs=0.05)
    assert entry["compared"] == 40
    newest = entry["disagreements"][0]
    assert newest["request_id"] == "req-39" and newest["path"] == "$.predictions[*]"
    assert newest["primary"] == [0.5, 0.25] and newest["shadow"] == [0.9, 0.25]
    assert len(entry["disagreements"]) == 10

    async with client.get(sc.admin_url + "/admin/mirrors") as r:
        assert r.status == 200
        listed = (await r.json())["mirrors"]
    assert listed[0]["route"] == "fraud" and listed[0]["backend"] == "shadow"
    assert listed[0]["agreement"] == pytest.approx(0.75)
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_mirror_agreement_ratio{backend="shadow",route="fraud"} 0.75' in text
    assert 'sidecar_mirror_requests_total{backend="shadow",outcome="disagree",route="fraud"} 10.0' in text


async def test_mirrors_at_the_cap_are_dropped_and_counted(upstreams, make_sidecar: MakeSidecar, client):
    """Past max_inflight, mirrors are dropped (counted), never queued; the client is unaffected."""
    release = asyncio.Event()
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.hang(release))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"max_inflight": 2, "timeout": "10s"}))
    for _ in range(5):
        status, _, _ = await post(client, sc.proxy_url + PATH)
        assert status == 200
    await shadow.wait_in_flight(2)
    entry = stats(sc)
    assert entry["dropped"] == 3 and entry["sent"] == 2 and entry["inflight"] == 2
    release.set()
    await settle(sc)
    assert shadow.hits == 2
    assert stats(sc)["outcomes"]["sent"] == 2
    # a free slot is used again
    await post(client, sc.proxy_url + PATH)
    await settle(sc)
    assert shadow.hits == 3


async def test_keyed_mirroring_selects_the_same_users_every_time(upstreams, make_sidecar: MakeSidecar, client):
    """With key: {header: x-user-id}, the same users are mirrored on every request."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.answer())
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"percent": 30, "key": {"header": "X-User-Id"}}))
    users = [f"user-{i}" for i in range(60)]
    rounds = []
    for _ in range(3):
        before = shadow.hits
        for user in users:
            await post(client, sc.proxy_url + PATH, headers={"x-user-id": user})
        await settle(sc)
        rounds.append({seen.headers["x-user-id"] for seen in shadow.requests[before:]})
    assert rounds[0] == rounds[1] == rounds[2]
    assert 5 <= len(rounds[0]) <= 35
    assert rounds[0] == {user for user in users if key_share_below(user, 0.3)}


async def test_method_and_body_skips_are_counted(upstreams, make_sidecar: MakeSidecar, client):
    """Requests a rule excludes (method, body size) are not mirrored and are counted by reason."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.answer())
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"methods": ["post"], "max_body_bytes": 16}))
    async with client.get(sc.proxy_url + PATH) as r:
        assert r.status == 200
    async with client.put(sc.proxy_url + PATH, data=b"{}") as r:
        assert r.status == 200
    status, _, _ = await post(client, sc.proxy_url + PATH, data=b"x" * 17)
    assert status == 200
    status, _, _ = await post(client, sc.proxy_url + PATH, data=b"x" * 16)
    assert status == 200
    await settle(sc)
    outcomes = stats(sc)["outcomes"]
    assert outcomes["skipped_method"] == 2 and outcomes["skipped_body"] == 1 and outcomes["sent"] == 1
    assert shadow.hits == 1 and shadow.last.body == b"x" * 16


async def test_percent_zero_mirrors_nothing(upstreams, make_sidecar: MakeSidecar, client):
    """percent: 0 sends no copy and counts nothing."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.answer())
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"percent": 0}))
    for _ in range(5):
        await post(client, sc.proxy_url + PATH)
    await settle(sc)
    assert shadow.hits == 0 and stats(sc)["sent"] == 0


async def test_streamed_primary_is_mirrored_but_not_compared(upstreams, make_sidecar: MakeSidecar, client):
    """A streamed primary answer reaches the client event by event; the shadow still gets the
    request, and the mirror counts primary_unreadable instead of a comparison."""
    primary = await upstreams.start(u.sse(["a", "b", "c"], delay=0.01))
    shadow = await upstreams.start(u.sse(["a", "b", "x"], delay=0.01))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"compare": {"path": "$"}}))
    status, body, _ = await post(client, sc.proxy_url + PATH)
    assert status == 200 and body == b"data: a\n\ndata: b\n\ndata: c\n\n"
    await settle(sc)
    assert shadow.hits == 1
    assert stats(sc)["outcomes"]["primary_unreadable"] == 1


async def test_failed_primary_still_mirrors(upstreams, make_sidecar: MakeSidecar, client):
    """When the primary cannot be reached the client gets 502 and the shadow still gets the request."""
    shadow = await upstreams.start(u.answer())
    sc = await make_sidecar(mirrored(u.refused_url(), shadow.url, {"compare": {"path": "$.predictions"}}))
    status, _, _ = await post(client, sc.proxy_url + PATH)
    assert status == 502
    await settle(sc)
    assert shadow.hits == 1 and stats(sc)["outcomes"]["primary_unreadable"] == 1


async def test_large_primary_answer_is_read_whole_for_comparison(upstreams, make_sidecar: MakeSidecar, client):
    """A mirrored answer over buffer_response_bytes is still compared (read whole up to max_body_bytes)."""
    doc = {"predictions": list(range(2000))}
    primary = await upstreams.start(u.answer(json=doc))
    shadow = await upstreams.start(u.answer(json=doc))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"compare": {"path": "$.predictions"}},
                                     limits={"buffer_response_bytes": 1024}))
    status, body, _ = await post(client, sc.proxy_url + PATH)
    assert status == 200 and orjson.loads(body) == doc
    await settle(sc)
    assert stats(sc)["outcomes"]["agree"] == 1


async def test_non_json_answers_are_a_missing_sample(upstreams, make_sidecar: MakeSidecar, client):
    """Answers the path finds nothing in are counted as missing, not as an error or a disagreement."""
    primary = await upstreams.start(u.status(200, "not json"))
    shadow = await upstreams.start(u.status(200, "also not json"))
    sc = await make_sidecar(mirrored(primary.url, shadow.url, {"compare": {"path": "$.predictions"}}))
    status, body, _ = await post(client, sc.proxy_url + PATH)
    assert status == 200 and body == b"not json"
    await settle(sc)
    assert stats(sc)["outcomes"]["missing"] == 1 and stats(sc)["agreement"] is None


async def test_hanging_shadow_does_not_delay_drain_beyond_grace(upstreams, client):
    """On SIGTERM, mirrors still hanging when drain.grace runs out are cancelled; the process exits 0."""
    primary = await upstreams.start(u.answer())
    shadow = await upstreams.start(u.hang())
    text = yaml.safe_dump(sidecar_config(mirrored(primary.url, shadow.url, {"timeout": "30s"},
                                                  drain={"delay": 0, "grace": 0.5})))
    cfg, secrets = parse_config(text, env=os.environ)
    sc = Sidecar(LoadedConfig(cfg, config_version(cfg), None, secrets))
    task = asyncio.ensure_future(sc.run())
    try:
        async with asyncio.timeout(10):
            await sc.ready.wait()
        status, _, _ = await post(client, sc.proxy_url + PATH)
        assert status == 200
        await shadow.wait_in_flight(1)
        t0 = time.perf_counter()
        sc.request_stop()
        async with asyncio.timeout(10):
            code = await task
        elapsed = time.perf_counter() - t0
    finally:
        sc.request_stop()
        await asyncio.wait({task}, timeout=10)
    assert code == 0
    assert 0.4 <= elapsed < 1.5, elapsed
    assert sc.services.mirrors.inflight == 0
    assert stats(sc)["outcomes"]["cancelled"] == 1
    await shadow.wait_in_flight(0)


async def test_config_errors_name_their_place():
    """A bad compare path or an unknown shadow backend is rejected with its place."""
    from sidecar.errors import ConfigError

    base = mirrored("http://127.0.0.1:1", "http://127.0.0.1:2", {"compare": {"path": "$.predictions[x]"}})
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(base), env={})
    assert "routes[0].mirror[0].compare.path: bad JSON path '$.predictions[x]'" in str(e.value)
    base["routes"][0]["mirror"] = [{"backend": "nope"}, {"backend": "shadow"}, {"backend": "shadow"}]
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(base), env={})
    text = str(e.value)
    assert "routes[0].mirror[0].backend: unknown backend 'nope' (known: primary, shadow)" in text
    assert "routes[0].mirror[2].backend: backend 'shadow' is mirrored twice" in text
    base["routes"][0]["mirror"] = [{"backend": "shadow", "percent": 101}]
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(base), env={})
    assert "routes[0].mirror[0].percent" in str(e.value)


# -- plan and state, without sockets ----------------------------------------------------------------


def build_plan(mirror: dict[str, Any], **extra: Any) -> Plan:
    cfg, secrets = parse_config(yaml.safe_dump(mirrored("http://127.0.0.1:1", "http://127.0.0.1:2", mirror, **extra)),
                                env={})
    return Plan.build(LoadedConfig(cfg, config_version(cfg), None, secrets))


def test_plan_defaults():
    """Unset mirror keys take the documented defaults (timeout: the shadow backend's)."""
    plan = build_plan({"key": {"header": "X-User"}}, backends={
        "primary": {"url": "http://127.0.0.1:1"}, "shadow": {"url": "http://127.0.0.1:2", "timeout": "750ms"}})
    m = plan.routes_by_name["fraud"].mirrors[0]
    assert m.threshold == 1.0 and m.key_header == "x-user" and m.methods == frozenset({"POST", "GET"})
    assert m.timeout_s == 0.75 and m.max_inflight == 32 and m.max_body_bytes is None and m.compare_path is None
    assert plan.routes_by_name["plain"].mirrors == ()


def test_disagreements_are_redacted_and_bounded():
    """Kept disagreement values go through the redact paths and are cut when large."""
    import dataclasses

    from sidecar.core.jsonpath import compile_path
    from sidecar.shell.metrics import Metrics
    from sidecar.shell.mirror import MAX_SHOWN_BYTES, Mirrors

    plan = build_plan({"compare": {"path": "$.predictions[*]"}})
    m = dataclasses.replace(plan.routes[0].mirrors[0], redact=(compile_path("$.predictions[*].email"),))
    mirrors = Mirrors(Metrics(), lambda: 0.0, plan, clock=lambda: 123.0)
    stats = mirrors._stats_for(m)
    assert m.compare_path is not None
    primary = orjson.dumps({"predictions": [{"score": 1, "email": "a@x"}]})
    shadow = orjson.dumps({"predictions": [{"score": 2, "email": "b@x"}]})
    assert mirrors._compare(m, m.compare_path, stats, "r1", primary, shadow) == "disagree"
    (d,) = stats.disagreements.items()
    assert d.primary == [{"score": 1, "email": "[redacted]"}] and d.shadow == [{"score": 2, "email": "[redacted]"}]
    assert d.request_id == "r1" and d.at == 123.0
    big = orjson.dumps({"predictions": ["x" * 10_000]})
    assert mirrors._compare(m, m.compare_path, stats, "r2", big, primary) == "disagree"
    shown = stats.disagreements.items()[0].primary
    assert isinstance(shown, str) and len(shown) < MAX_SHOWN_BYTES + 50 and shown.endswith("bytes)")


def test_stats_survive_a_reload_that_keeps_the_mirror():
    """A reload keeps a mirror's counters and window; a changed comparison starts a new window;
    a removed mirror is forgotten."""
    from sidecar.core.compare import Verdict
    from sidecar.shell.metrics import Metrics
    from sidecar.shell.mirror import MirrorOutcome, Mirrors

    metrics = Metrics()
    plan = build_plan({"compare": {"path": "$.p"}})
    mirrors = Mirrors(metrics, lambda: 0.0, plan)
    stats = mirrors._stats_for(plan.routes[0].mirrors[0])
    stats.window.record_verdict(Verdict.AGREE)
    stats.count(MirrorOutcome.AGREE)
    mirrors.retain(build_plan({"compare": {"path": "$.p"}, "percent": 50}))
    assert mirrors._stats[("fraud", "shadow")] is stats and ratio(stats) == 1.0
    mirrors.retain(build_plan({"compare": {"path": "$.q"}}))
    assert mirrors._stats[("fraud", "shadow")] is stats and ratio(stats) is None
    assert stats.cells[MirrorOutcome.AGREE].value == 1
    no_mirror = build_plan({})
    no_mirror_routes = [r for r in no_mirror.routes if r.name == "plain"]
    mirrors.retain(dataclasses_replace_routes(no_mirror, no_mirror_routes))
    assert mirrors._stats == {}


def ratio(stats: MirrorStats) -> float | None:
    return stats.window.ratio


def dataclasses_replace_routes(plan: Plan, routes: list[RoutePlan]) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, routes=tuple(routes), routes_by_name={r.name: r for r in routes})


@given(key=st.text(max_size=40), low=st.floats(0, 1), high=st.floats(0, 1))
def test_keyed_share_is_monotone_in_percent(key: str, low: float, high: float):
    """Raising a keyed mirror's percent never stops mirroring a user who was mirrored."""
    low, high = min(low, high), max(low, high)
    if key_share_below(key, low):
        assert key_share_below(key, high)
    assert key_share_below(key, 1.0) and not key_share_below(key, 0.0)
