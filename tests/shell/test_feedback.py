"""Feedback over real sockets: captures from real answers, `POST {feedback.path}` per item,
`GET /admin/feedback`, the feedback metrics, /admin/status, streamed answers, reload carry-over."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from sidecar.shell import feedback as feedback_module
from sidecar.shell.server import Sidecar
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config
from tests.harness import until

PREDICT = "/v1/models/fraud:predict"
FEEDBACK = "/v1/feedback"


def route(feedback: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "fraud", "match": {"path_prefix": "/v1/models/fraud"}, "split": {"stable": 1, "canary": 1},
        "feedback": {"path": FEEDBACK, "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                     "metric": "accuracy", "keep": "10m", "max_pending": 10000, **(feedback or {})},
    }
    base.update(kw)
    return base


async def two_backends(upstreams) -> dict[str, Any]:
    """stable always scores 0.9 (class 1), canary always 0.2 (class 0)."""
    stable = await upstreams.start(u.answer({"predictions": [0.9]}), name="stable")
    canary = await upstreams.start(u.answer({"predictions": [0.2]}), name="canary")
    return {"stable": {"url": stable.url}, "canary": {"url": canary.url}}


async def predict(client: aiohttp.ClientSession, sc: Sidecar, body: Any = None,
                  path: str = PREDICT) -> tuple[str, str]:
    """One answered request: (its x-request-id, the backend that answered)."""
    async with client.post(sc.proxy_url + path, json=body or {"instances": [{"country": "US"}]}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["x-request-id"], r.headers["x-sidecar-backend"]


async def post(client: aiohttp.ClientSession, sc: Sidecar, payload: Any = None, *,
               data: bytes | None = None) -> tuple[int, Any]:
    body = data if data is not None else orjson.dumps(payload)
    async with client.post(sc.proxy_url + FEEDBACK, data=body, headers={"content-type": "application/json"}) as r:
        return r.status, await r.json()


async def get_json(client: aiohttp.ClientSession, url: str) -> Any:
    async with client.get(url) as r:
        assert r.status == 200
        return await r.json()


async def feedback_doc(client: aiohttp.ClientSession, sc: Sidecar) -> dict[str, Any]:
    doc = await get_json(client, sc.admin_url + "/admin/feedback")
    return {r["route"]: r for r in doc["routes"]}


def backends_of(route_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["backend"]: b for b in route_doc["backends"]}


async def metrics_text(client: aiohttp.ClientSession, sc: Sidecar) -> str:
    async with client.get(sc.admin_url + "/metrics") as r:
        return await r.text()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_labels_for_real_answers_give_exact_accuracy_per_backend(upstreams, make_sidecar: MakeSidecar,
                                                                     client):
    """Labels posted for the ids of real answers give each backend its exact accuracy, in
    /admin/feedback, /admin/status and the metrics."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route()]})
    answered = [await predict(client, sc) for _ in range(40)]
    # label 1 for every third request, else 0: stable (always 1) is right on those, canary (always 0) on the rest
    items = [{"request_id": rid, "label": 1 if i % 3 == 0 else 0} for i, (rid, _) in enumerate(answered)]
    status, doc = await post(client, sc, items)
    assert status == 200
    assert doc["counts"] == {"joined": 40, "unknown": 0, "expired": 0, "duplicate": 0, "invalid": 0}
    assert [r["outcome"] for r in doc["results"]] == ["joined"] * 40
    assert [r["request_id"] for r in doc["results"]] == [rid for rid, _ in answered]
    want: dict[str, list[int]] = {"stable": [], "canary": []}
    for i, (_, backend) in enumerate(answered):
        label = 1 if i % 3 == 0 else 0
        want[backend].append(1 if label == (1 if backend == "stable" else 0) else 0)
    assert want["stable"] and want["canary"]
    got = backends_of((await feedback_doc(client, sc))["fraud"])
    for b in ("stable", "canary"):
        assert got[b]["count"] == len(want[b])
        assert got[b]["metric"] == pytest.approx(sum(want[b]) / len(want[b]))
        assert got[b]["outcomes"]["joined"] == len(want[b])
    assert got["stable"]["score_mean"] == pytest.approx(0.9)
    assert got["canary"]["score_mean"] == pytest.approx(0.2)
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_feedback_metric", route="fraud", backend="canary", metric="accuracy") == \
        pytest.approx(sum(want["canary"]) / len(want["canary"]))
    assert sample_value(text, "sidecar_feedback_total", route="fraud", backend="stable", outcome="joined") == \
        len(want["stable"])
    assert sample_value(text, "sidecar_feedback_score_mean", route="fraud", backend="stable") == pytest.approx(0.9)
    st = await get_json(client, sc.admin_url + "/admin/status")
    rows = {row["backend"]: row for row in st["feedback"] if row["route"] == "fraud"}
    assert rows["stable"]["count"] == len(want["stable"]) and rows["canary"]["score_mean"] == pytest.approx(0.2)
    assert rows["canary"]["value"] == pytest.approx(sum(want["canary"]) / len(want["canary"]))


async def test_every_outcome_over_http(upstreams, make_sidecar: MakeSidecar, client):
    """One post answers joined, duplicate, unknown and invalid item by item, with a message for
    invalid; an expired prediction reads expired."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route()]})
    a, _ = await predict(client, sc)
    b, _ = await predict(client, sc)
    status, doc = await post(client, sc, [
        {"request_id": a, "label": 1}, {"request_id": a, "label": 1}, {"request_id": "never-seen", "label": 1},
        {"request_id": b, "label": 0.5}, {"label": 1}, "not an object"])
    assert status == 200
    assert [r["outcome"] for r in doc["results"]] == ["joined", "duplicate", "unknown", "invalid", "invalid",
                                                      "invalid"]
    assert "label" in doc["results"][3]["message"] and "request_id" in doc["results"][4]["message"]
    assert doc["counts"] == {"joined": 1, "unknown": 1, "expired": 0, "duplicate": 1, "invalid": 3}
    # the invalid item changed nothing: a corrected post joins b
    status, doc = await post(client, sc, {"request_id": b, "label": 0})
    assert status == 200 and doc["results"] == [{"request_id": b, "outcome": "joined"}]
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_feedback_total", route="fraud", backend="", outcome="unknown") == 1.0
    assert sample_value(text, "sidecar_feedback_total", route="fraud", backend="", outcome="invalid") == 3.0


async def test_expired_prediction(upstreams, make_sidecar: MakeSidecar, client):
    """A label posted after `keep` reads expired."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route({"keep": "200ms"})]})
    a, _ = await predict(client, sc)

    async def expired() -> bool:
        return bool((await feedback_doc(client, sc))["fraud"]["pending_expired"] == 1)

    await until(expired, what="the prediction expired")
    status, doc = await post(client, sc, {"request_id": a, "label": 1})
    assert status == 200 and doc["results"][0]["outcome"] == "expired"


async def test_a_list_of_1000_in_one_call(upstreams, make_sidecar: MakeSidecar, client):
    """1000 items are answered in one call; 1001 are refused with 400."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route()]})
    answered = await asyncio.gather(*(predict(client, sc) for _ in range(200)))
    items = [{"request_id": rid, "label": 1} for rid, _ in answered]
    items += [{"request_id": f"other-{i}", "label": 1} for i in range(800)]
    status, doc = await post(client, sc, items)
    assert status == 200 and len(doc["results"]) == 1000
    assert doc["counts"]["joined"] == 200 and doc["counts"]["unknown"] == 800
    status, doc = await post(client, sc, [*items, {"request_id": "x", "label": 1}])
    assert status == 400 and "1000" in doc["error"]["message"]


async def test_bad_bodies(upstreams, make_sidecar: MakeSidecar, client):
    """A body that is not JSON gets 400, one over limits.max_body_bytes 413, a GET 405; the
    backends see none of them."""
    ups = await two_backends(upstreams)
    sc = await make_sidecar({"backends": ups, "routes": [route()], "limits": {"max_body_bytes": 2000}})
    status, doc = await post(client, sc, data=b"{not json")
    assert status == 400 and doc["error"]["type"] == "bad_request"
    status, doc = await post(client, sc, data=b"42")
    assert status == 400
    status, doc = await post(client, sc, [{"request_id": f"id-{i}", "label": 1} for i in range(100)])
    assert status == 413 and doc["error"]["type"] == "body_too_large"
    async with client.get(sc.proxy_url + FEEDBACK) as r:
        assert r.status == 405 and r.headers["allow"] == "POST"


async def test_feedback_path_wins_over_a_catch_all_route(upstreams, make_sidecar: MakeSidecar, client):
    """With a route on `/`, a POST to the feedback path is answered by the sidecar, never forwarded."""
    catch_all = await upstreams.start(u.echo(), name="all")
    ups = await two_backends(upstreams)
    ups["all"] = {"url": catch_all.url}
    sc = await make_sidecar({"backends": ups, "routes": [
        route(), {"name": "all", "match": {"path_prefix": "/"}, "split": {"all": 1}}]})
    rid, _ = await predict(client, sc)
    status, doc = await post(client, sc, {"request_id": rid, "label": 1})
    assert status == 200 and doc["counts"]["joined"] == 1
    assert catch_all.hits == 0


async def test_segment_worse_for_one_value(upstreams, make_sidecar: MakeSidecar, client):
    """A canary that is worse only for country DE shows it in that segment value, in
    /admin/feedback and the metrics; the other values and `other` stay level."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route({"segments": {
        "country": {"from": "request", "path": "$.instances[0].country", "values": ["US", "DE"]}}})]})
    items = []
    for i in range(120):
        country = ("US", "DE", "BR")[i % 3]
        rid, backend = await predict(client, sc, {"instances": [{"country": country}]})
        right = 1 if backend == "stable" else 0       # what each backend predicts
        wrong = 1 - right
        items.append({"request_id": rid, "label": wrong if backend == "canary" and country == "DE" else right})
    status, doc = await post(client, sc, items)
    assert status == 200 and doc["counts"]["joined"] == 120
    got = backends_of((await feedback_doc(client, sc))["fraud"])
    seg = {b: {s["value"]: s for s in got[b]["segments"]} for b in got}
    assert seg["canary"]["DE"]["metric"] == 0.0 and seg["canary"]["US"]["metric"] == 1.0
    assert seg["canary"]["other"]["metric"] == 1.0
    assert seg["stable"]["DE"]["metric"] == 1.0
    assert all(s["too_small"] == (s["count"] < 30) for b in seg for s in seg[b].values())
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_feedback_segment_metric", route="fraud", backend="canary",
                        segment="country", value="DE", metric="accuracy") == 0.0
    assert sample_value(text, "sidecar_feedback_segment_metric", route="fraud", backend="canary",
                        segment="country", value="US", metric="accuracy") == 1.0


async def test_streamed_answer_is_a_counted_miss(upstreams, make_sidecar: MakeSidecar, client):
    """An event-stream answer reaches the client whole; its prediction is a counted miss, and
    feedback for it reads unknown."""
    up = await upstreams.start(u.sse(["a", "b"], delay=0.01), name="stable")
    sc = await make_sidecar({"backends": {"stable": {"url": up.url}},
                             "routes": [route(split={"stable": 1})]})
    async with client.post(sc.proxy_url + PREDICT, json={}) as r:
        assert r.status == 200
        assert b"data: b" in await r.read()
        rid = r.headers["x-request-id"]
    status, doc = await post(client, sc, {"request_id": rid, "label": 1})
    assert status == 200 and doc["results"][0]["outcome"] == "unknown"
    assert (await feedback_doc(client, sc))["fraud"]["captures_missed"] == {"streamed": 1}
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_feedback_captures_missed_total", route="fraud", reason="streamed") == 1.0


async def test_reload_keeps_the_tracker_of_an_unchanged_route(upstreams, make_sidecar: MakeSidecar, client,
                                                             tmp_path: Path):
    """A reload that does not change the feedback section keeps its pending predictions and
    metrics; one that changes it starts afresh."""
    ups = await two_backends(upstreams)
    cfg: dict[str, Any] = {"backends": ups, "routes": [route()]}
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(cfg, path=path)
    a, _ = await predict(client, sc)
    b, _ = await predict(client, sc)
    assert (await post(client, sc, {"request_id": a, "label": 1}))[0] == 200
    before = sc.services.feedback.tracker("fraud")
    assert before is not None

    async def reload(new: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump(sidecar_config(new)))
        async with client.post(sc.admin_url + "/admin/reload") as r:
            assert r.status == 200, await r.text()

    cfg["routes"][0]["timeout"] = "7s"       # the route changes, its feedback section does not
    await reload(cfg)
    assert sc.services.feedback.tracker("fraud") is before
    status, doc = await post(client, sc, {"request_id": b, "label": 1})
    assert status == 200 and doc["results"][0]["outcome"] == "joined"   # b waited through the reload
    assert sum(x["count"] for x in (await feedback_doc(client, sc))["fraud"]["backends"]) == 2
    cfg["routes"][0]["feedback"]["keep"] = "5m"
    await reload(cfg)
    await until(lambda: sc.services.feedback.tracker("fraud") is not before, what="a new tracker")
    assert sum(x["count"] for x in (await feedback_doc(client, sc))["fraud"]["backends"]) == 0


async def test_captures_and_joins_are_bounded_while_the_worker_is_stuck(upstreams, make_sidecar: MakeSidecar, client,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """While the feedback worker is stuck, answers still go out: captures past the bound are
    dropped and counted (queue_full), and posts past the join bound get 503; once it is free,
    the kept captures join."""
    monkeypatch.setattr(feedback_module, "MAX_PENDING", 3)
    monkeypatch.setattr(feedback_module, "MAX_JOINS", 1)
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route()]})
    stuck = threading.Event()
    fb = sc.services.feedback
    blocker = fb._executor.submit(stuck.wait, 10)
    try:
        answered = [await predict(client, sc) for _ in range(5)]          # answered though the worker is stuck
        assert (await feedback_doc_cached(sc))["fraud"]["captures_missed"] == {"queue_full": 2}
        items = [{"request_id": rid, "label": 1} for rid, _ in answered]
        first = asyncio.ensure_future(post(client, sc, items))
        await until(lambda: not fb.would_accept_join(), what="the first post waits for the worker")
        status, doc = await post(client, sc, {"request_id": "x", "label": 1})
        assert status == 503 and doc["error"]["type"] == "overloaded"
    finally:
        stuck.set()
    await asyncio.wrap_future(blocker)
    status, doc = await first
    assert status == 200
    assert [r["outcome"] for r in doc["results"]] == ["joined"] * 3 + ["unknown"] * 2


async def feedback_doc_cached(sc: Sidecar) -> dict[str, Any]:
    """/admin/feedback's routes from the published snapshot (no worker pass: it is stuck)."""
    return {r["route"]: r for r in sc.services.feedback.routes_json()}


async def test_step_view_for_the_rollout(upstreams, make_sidecar: MakeSidecar, client):
    """`services.feedback.mark` / `since` give the feedback joined since a mark, per backend:
    what a rollout step is judged on."""
    sc = await make_sidecar({"backends": await two_backends(upstreams), "routes": [route()]})
    fb = sc.services.feedback
    before = [await predict(client, sc) for _ in range(6)]
    assert (await post(client, sc, [{"request_id": rid, "label": 1} for rid, _ in before]))[0] == 200
    mark = await fb.mark("fraud")
    assert mark is not None and await fb.mark("nope") is None
    after = [await predict(client, sc) for _ in range(10)]
    assert (await post(client, sc, [{"request_id": rid, "label": 1} for rid, _ in after]))[0] == 200
    step = await fb.since("fraud", mark)
    assert step is not None
    for backend in ("stable", "canary"):
        n = sum(1 for _, b in after if b == backend)
        assert step.backend(backend).count == n
        assert step.backend(backend).value(step.metric) == (None if n == 0 else 1.0 if backend == "stable" else 0.0)
