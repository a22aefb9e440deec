"""GET /admin/history and the backends' health in /admin/status, on a real sidecar."""

from __future__ import annotations

from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import until
from tests.shell.test_reload import admin, fraud

EVERY_S = 0.1


async def predict(client, sc, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        async with client.post(sc.proxy_url + "/v1/models/fraud:predict", data=b"{}") as r:
            await r.read()
            statuses.append(r.status)
    return statuses


async def test_history_has_rates_codes_and_weights_per_point(upstreams, make_sidecar: MakeSidecar, client):
    """Each point holds answers per second by backend and status code, failed tries, p50/p99 and
    the effective weights; the columns line up with `time`."""
    stable = await upstreams.start(name="stable")
    canary = await upstreams.start(u.status(503), name="canary")
    sc = await make_sidecar(fraud(stable.url, canary.url, weights=(50, 50)), history_every_s=EVERY_S)
    # traffic after the first point, so that each answer falls in a point whose interval is known
    await until(lambda: len(sc.services.history.history.points) >= 1, 5, "the first history point")
    statuses = await predict(client, sc, 60)
    assert 0 < statuses.count(503) < 60
    points = len(sc.services.history.history.points)
    await until(lambda: len(sc.services.history.history.points) > points + 1, 5, "a history point")
    status, doc = await admin(client, "GET", sc.admin_url + "/admin/history")
    assert status == 200 and doc["every_s"] == EVERY_S and doc["keep_s"] == 900
    n = len(doc["time"])
    assert n >= 2 and doc["time"] == sorted(doc["time"])
    stable_doc, canary_doc = doc["backends"]["stable"], doc["backends"]["canary"]
    assert all(len(v) == n for v in stable_doc.values() if isinstance(v, list))
    # integrate rates back to counts: every answer is in exactly one point
    dts = [0.0] + [b - a for a, b in zip(doc["time"], doc["time"][1:], strict=False)]
    ok = sum(r * dt for r, dt in zip(stable_doc["codes_per_s"]["200"], dts, strict=True))
    failed = sum(r * dt for r, dt in zip(canary_doc["codes_per_s"]["503"], dts, strict=True))
    assert round(failed) == statuses.count(503) and round(ok) == 60 - statuses.count(503)
    assert round(sum(r * dt for r, dt in zip(canary_doc["failed_tries_per_s"], dts, strict=True))) == round(failed)
    assert any(v is not None and v > 0 for v in stable_doc["p99_s"])
    assert doc["routes"]["fraud"]["weights"]["stable"][-1] == 0.5


async def test_a_stopped_canary_is_not_called_healthy(upstreams, make_sidecar: MakeSidecar, client):
    """The quick start's canary, stopped: clients get stable's answers (a connect error is tried on
    another backend), and status says "not checked" with every try of the canary failed, never
    "healthy"; a health-checked stable says "healthy"."""
    stable = await upstreams.start(name="stable")
    cfg = fraud(stable.url, u.refused_url(), weights=(50, 50))
    cfg["backends"]["stable"]["health_check"] = {"path": "/health", "interval": "1s"}
    sc = await make_sidecar(cfg, history_every_s=EVERY_S)
    assert await predict(client, sc, 40) == [200] * 40
    points = len(sc.services.history.history.points)
    await until(lambda: len(sc.services.history.history.points) > points + 1, 5, "a history point")
    _, doc = await admin(client, "GET", sc.admin_url + "/admin/status")
    backends = {b["name"]: b for b in doc["backends"]}
    canary, stable_doc = backends["canary"], backends["stable"]
    assert canary["health"] == "not checked" and canary["health_checked"] is False
    assert canary["recent_error_rate"] == 1.0 and canary["recent_tries"] > 5
    assert canary["answers_total"] == 0
    assert stable_doc["health"] == "healthy" and stable_doc["recent_error_rate"] == 0.0
    assert stable_doc["answers_total"] == 40 and stable_doc["answers_per_s"] > 0
