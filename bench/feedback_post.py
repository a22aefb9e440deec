#!/usr/bin/env python3
"""A feedback POST of 1000 items over HTTP, end to end, and what the event loop feels meanwhile.

    python3 bench/feedback_post.py                    # 5000 predictions, 5 posts of 1000 labels

An in-process sidecar on loopback (tests/harness.py) in front of one fake model (a fixed
score), a route with `feedback` (accuracy with a threshold, one request segment). It sends
`--predictions` requests (32 at a time), then posts their labels in lists of 1000 and prints
the time of each post as the client sees it (read, parse, join on the feedback worker,
answer), and the longest `/healthz` time measured during the posts: the join runs on the
worker thread, so the event loop keeps serving. Clients, fake model and sidecar share one
process, so the figures include their contention: read them as upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402

from tests.harness import SidecarFactory  # noqa: E402
from tests.upstreams import UpstreamFactory, answer  # noqa: E402


async def main(predictions: int) -> None:
    ups, sidecars = UpstreamFactory(), SidecarFactory()
    model = await ups.start(answer({"predictions": [0.9]}), name="stable")
    sc = await sidecars.make({"backends": {"stable": {"url": model.url}}, "routes": [{
        "name": "fraud", "match": {"path_prefix": "/v1"}, "split": {"stable": 1},
        "feedback": {"path": "/v1/feedback", "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                     "segments": {"country": {"from": "request", "path": "$.country", "values": ["US", "DE"]}}}}]})
    try:
        async with aiohttp.ClientSession() as s:
            ids: list[str] = []
            sem = asyncio.Semaphore(32)

            async def predict() -> None:
                async with sem, s.post(sc.proxy_url + "/v1/models/fraud:predict", json={"country": "US"}) as r:
                    await r.read()
                    ids.append(r.headers["x-request-id"])

            await asyncio.gather(*(predict() for _ in range(predictions)))
            posts: list[float] = []
            health: list[float] = []
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    async with s.get(sc.admin_url + "/healthz") as r:
                        await r.read()
                    health.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.002)

            watcher = asyncio.ensure_future(watch())
            for k in range(0, len(ids) - 999, 1000):
                items = [{"request_id": rid, "label": 1} for rid in ids[k:k + 1000]]
                t0 = time.perf_counter()
                async with s.post(sc.proxy_url + "/v1/feedback", data=orjson.dumps(items)) as r:
                    doc = await r.json()
                posts.append(time.perf_counter() - t0)
                assert doc["counts"]["joined"] == 1000, doc["counts"]
            stop.set()
            await watcher
        print(f"{len(posts)} posts of 1000 labels: median {statistics.median(posts) * 1000:.1f} ms, "
              f"max {max(posts) * 1000:.1f} ms; /healthz during them: max {max(health) * 1000:.1f} ms "
              f"over {len(health)} calls (median {statistics.median(health) * 1000:.1f} ms)")
        print("each post (ms):", " ".join(f"{t * 1000:.0f}" for t in posts))
    finally:
        await sidecars.aclose()
        await ups.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=5000)
    uvloop.run(main(parser.parse_args().predictions))
