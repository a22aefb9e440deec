"""Load shedding, CI-sized: past limits.max_inflight the sidecar answers 503 `overloaded` at
once instead of queueing, admitted requests keep their latency, and it recovers by itself."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp

from reliability.common import Outcome
from tests import upstreams as u
from tests.conftest import MakeSidecar

MAX_INFLIGHT = 16
UPSTREAM_S = 0.05
SHED_PAUSE_S = 0.02


async def burst(url: str, clients: int, per_client: int) -> tuple[Counter[Outcome], list[float], set[str]]:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    counts: Counter[Outcome] = Counter()
    admitted: list[float] = []
    retry_after: set[str] = set()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=20)) as s:

        async def one_client() -> None:
            for _ in range(per_client):
                t0 = time.perf_counter()
                async with s.post(url, data=b"{}") as r:
                    body = await r.json()
                    if r.status == 200:
                        admitted.append(time.perf_counter() - t0)
                        counts[(200, "backend")] += 1
                    else:
                        counts[(r.status, body["error"]["type"])] += 1
                        retry_after.add(r.headers.get("retry-after", ""))
                if r.status == 503:
                    # NOTE: clients, upstream and sidecar share this test's one event loop; a
                    # refused client that retried at once would measure the test's own loop
                    # contention, not the sidecar. Real clients back off (Retry-After: 1).
                    await asyncio.sleep(SHED_PAUSE_S)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return counts, admitted, retry_after


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


async def test_overload_sheds_keeps_admitted_latency_and_recovers(upstreams, make_sidecar: MakeSidecar, client):
    """At 2x and 6x what max_inflight admits: only 200s and 503 overloaded, admitted p99 bounded, then recovery."""
    up = await upstreams.start(u.slow(UPSTREAM_S))
    sc = await make_sidecar({"limits": {"max_inflight": MAX_INFLIGHT},
                             "backends": {"m": {"url": up.url, "max_connections": 256}},
                             "routes": [{"name": "r", "split": {"m": 1}}]})
    url = sc.proxy_url + "/v1/models/m:predict"
    # the yardstick: p99 at 1x (half of max_inflight, nothing shed), on this machine right now
    counts, admitted, _ = await burst(url, MAX_INFLIGHT // 2, 8)
    assert set(counts) == {(200, "backend")}, counts
    baseline = p99(admitted)
    p99s: dict[int, float] = {}
    for factor in (2, 6):
        counts, admitted, retry_after = await burst(url, MAX_INFLIGHT * factor, 8)
        assert set(counts) <= {(200, "backend"), (503, "overloaded")}, counts
        assert counts[(503, "overloaded")] > 0 and counts[(200, "backend")] > 0, counts
        assert retry_after == {"1"}
        assert up.in_flight <= MAX_INFLIGHT
        p99s[factor] = p99(admitted)
    # The backend never sees more than max_inflight (above); admitted latency stays within a
    # small factor of the backend's 50 ms, or of the 1x run's p99 when the machine is busy.
    # NOTE: clients, backend and sidecar share this test's one event loop: at 6x its 96 clients
    # are most of the loop's work, which a busy machine stretches more than the 1x run, so
    # these bounds only catch gross queueing (seconds); the long run (reliability/overload.py,
    # a real process under wrk) gives the figures.
    assert max(p99s.values()) < max(20 * UPSTREAM_S, 20 * baseline), (p99s, baseline)
    t0 = time.perf_counter()
    async with client.post(url, data=b"{}") as r:
        assert r.status == 200
    assert time.perf_counter() - t0 < 1.0
    assert sc.proxy.inflight == 0
