"""Feedback across a fleet: real `sidecar run` processes sharing a real `redis-server`. A
prediction served by one replica is joined by the replica its label is posted to, once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web

from tests.harness import until
from tests.shell.test_fleet import SYNC_S, RedisServer, Replica, redis_server  # noqa: F401 (a fixture)
from tests.upstreams import Upstream, UpstreamFactory

FEEDBACK = "/fb"


async def scorer(request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
    """The model: a score of 0.9 for every request (class 1 at threshold 0.5)."""
    await request.read()
    return web.json_response({"predictions": [0.9]})


def config(redis_url: str, model: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "access_log": False,
        "drain": {"delay": 0, "grace": 1},
        "fleet": {"redis": redis_url, "name": "fb", "lease": "1s", "sync_every": f"{SYNC_S}s"},
        "backends": {"stable": {"url": model}},
        "routes": [{"name": "r", "match": {"path_prefix": "/r"}, "split": {"stable": 100},
                    "feedback": {"path": FEEDBACK, "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                                 "metric": "accuracy", "keep": "60s"}}],
    }


class Two:
    def __init__(self, s: aiohttp.ClientSession, a: Replica, b: Replica) -> None:
        self.s, self.a, self.b = s, a, b

    async def predict(self, r: Replica) -> str:
        async with self.s.post(f"{r.url}/r/predict", json={"x": 1}, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
            return resp.headers["x-request-id"]

    async def label(self, r: Replica, items: list[dict[str, Any]]) -> list[str]:
        async with self.s.post(f"{r.url}{FEEDBACK}", json=items, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200, await resp.text()
            return [x["outcome"] for x in (await resp.json())["results"]]

    async def route(self, r: Replica) -> dict[str, Any]:
        async with self.s.get(f"http://127.0.0.1:{r.admin}/admin/feedback",
                              timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200
            return next(x for x in (await resp.json())["routes"] if x["route"] == "r")

    async def pending(self, r: Replica) -> int:
        return int((await self.route(r))["pending"])

    async def metric(self, r: Replica, name: str, *labels: str) -> float:
        async with self.s.get(f"http://127.0.0.1:{r.admin}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith(name) and all(x in line for x in labels):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def handed_over(self, r: Replica) -> None:
        """Every prediction of `r` is in the store (none pending on the replica itself)."""
        async def none_pending() -> bool:
            return await self.pending(r) == 0
        await until(none_pending, 10, f"{r.name}'s predictions in the fleet's store")


@pytest.fixture
async def two(redis_server: RedisServer, upstreams: UpstreamFactory, tmp_path: Path) -> AsyncIterator[Two]:  # noqa: F811
    model = await upstreams.start(scorer)
    cfg = config(redis_server.url, model.url)
    a, b = Replica("a", cfg, tmp_path), Replica("b", cfg, tmp_path)
    try:
        await asyncio.gather(a.start(), b.start())
        async with aiohttp.ClientSession() as s:
            yield Two(s, a, b)
    finally:
        await a.stop()
        await b.stop()


async def test_a_label_posted_to_another_replica_joins_there(two: Two, redis_server: RedisServer):  # noqa: F811
    """Served by A, labelled on B: joined on B, shown in B's /admin/feedback and metrics as a
    local join is; A counts nothing, and the same label again, on either, joins nothing."""
    rids = [await two.predict(two.a) for _ in range(10)]
    await two.handed_over(two.a)
    # in the store, under an expiry: kept at least `keep` (60 s) and at most keep + one bucket (60/16 s)
    store = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in store.scan_iter(match="sidecar:fleet:{fb}:fb:r:*")]
        assert keys and sum([await store.hlen(k) for k in keys]) == 10
        for k in keys:
            assert 55_000 < await store.pttl(k) <= 60_000 + 60_000 / 16 + 1000
    finally:
        await store.aclose()
    labels = [{"request_id": rid, "label": 1 if i < 7 else 0} for i, rid in enumerate(rids)]
    assert await two.label(two.b, labels) == ["joined"] * 10
    doc = await two.route(two.b)
    stable = next(x for x in doc["backends"] if x["backend"] == "stable")
    assert stable["count"] == 10 and stable["metric"] == pytest.approx(0.7)
    assert stable["outcomes"]["joined"] == 10
    assert await two.metric(two.b, "sidecar_feedback_total", 'outcome="joined"', 'backend="stable"') == 10
    assert await two.metric(two.b, "sidecar_feedback_metric", 'backend="stable"') == pytest.approx(0.7)
    assert await two.metric(two.a, "sidecar_feedback_total", 'outcome="joined"') == 0
    assert "joined" not in await two.label(two.a, labels[:3])
    assert "joined" not in await two.label(two.b, labels[:3])


async def test_the_same_labels_posted_to_both_replicas_join_once(two: Two):
    """Predictions served by both replicas, every label posted to both at once: each joins
    exactly once in the fleet, on one replica or the other."""
    rids = [await two.predict(two.a if i % 2 else two.b) for i in range(40)]
    await asyncio.gather(two.handed_over(two.a), two.handed_over(two.b))
    labels = [{"request_id": rid, "label": 1} for rid in rids]
    on_a, on_b = await asyncio.gather(two.label(two.a, labels), two.label(two.b, labels))
    joined = [(x == "joined") + (y == "joined") for x, y in zip(on_a, on_b, strict=True)]
    assert joined == [1] * 40
    total = sum([await two.metric(r, "sidecar_feedback_total", 'outcome="joined"') for r in (two.a, two.b)])
    assert total == 40


async def test_a_label_for_a_prediction_not_yet_handed_over_joins_on_its_replica(two: Two):
    """Posted to the replica that served it at once: joined there, whether it was still
    pending there or already in the store; never twice."""
    rids = [await two.predict(two.a) for _ in range(20)]
    outcomes = await two.label(two.a, [{"request_id": rid, "label": 1} for rid in rids])
    assert outcomes == ["joined"] * 20
    await two.handed_over(two.a)
    assert "joined" not in await two.label(two.b, [{"request_id": rid, "label": 1} for rid in rids])


async def test_store_down_requests_answer_and_predictions_wait_on_their_replica(two: Two,
                                                                               redis_server: RedisServer):  # noqa: F811
    """Redis stopped: every request still answers, a label posted to the serving replica joins
    there, one posted elsewhere reads unknown (counted in fleet_sync_errors_total); Redis
    back: the predictions that waited are handed over and join on the other replica."""
    await redis_server.stop()
    rids = [await two.predict(two.a) for _ in range(12)]
    assert await two.pending(two.a) == 12
    errors = await two.metric(two.b, "sidecar_fleet_sync_errors_total")
    assert await two.label(two.b, [{"request_id": rids[0], "label": 1}]) == ["unknown"]
    assert await two.label(two.a, [{"request_id": rids[1], "label": 1}]) == ["joined"]

    async def counted() -> bool:
        return await two.metric(two.b, "sidecar_fleet_sync_errors_total") > errors
    await until(counted, 10, "store errors counted on b")
    await redis_server.start()
    await two.handed_over(two.a)

    # b leaves the store alone for sync_every after its failed lookup: meanwhile a label reads unknown
    async def joined_on_b() -> bool:
        return await two.label(two.b, [{"request_id": rids[2], "label": 1}]) == ["joined"]
    await until(joined_on_b, 10, "b looking labels up in the store again")
    assert await two.label(two.b, [{"request_id": rid, "label": 1} for rid in rids[3:]]) == ["joined"] * 9
