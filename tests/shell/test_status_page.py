"""The status page in a real browser: headless Chromium (DevTools protocol, tests/browser.py)
renders it against a running sidecar; screenshots at 1280 and 1920 px go to the test output."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests import upstreams as u
from tests.browser import Browser
from tests.conftest import MakeSidecar
from tests.harness import until
from tests.shell.test_reload import admin, fraud

TOKEN = "page-token"
WIDTHS = (1280, 1920)
HISTORY_EVERY_S = 0.25
GREEN, BLUE, GREY = "#1a7f37", "#0969da", "#57606a"   # 2xx answers, p50 / weight / agreement lines, manual decisions

# pixels of one colour in a chart's canvas: what uPlot drew for that series
PAINTED = """((id, hex) => {
  const c = document.querySelector(`[data-chart-id="${id}"] canvas`);
  if (!c) return -1;
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (d[i + 3] > 200 && rgb.every((v, k) => Math.abs(d[i + k] - v) < 40)) n++;
  return n;
})"""
NO_OVERFLOW = "document.documentElement.scrollWidth <= window.innerWidth"


def scorer(mean: float, seed: int, fail_every: int = 0) -> u.Behaviour:
    """A model answering `{"predictions": [score]}` around `mean`; every `fail_every`-th call a 503."""
    rng = random.Random(seed)
    calls = 0

    async def handle(request: web.BaseRequest, up: u.Upstream) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        await request.read()
        if fail_every and calls % fail_every == 0:
            return web.Response(status=503)
        return web.json_response({"predictions": [min(1.0, max(0.0, rng.gauss(mean, 0.1)))]})
    return handle


def output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "screenshots"
    out.mkdir(exist_ok=True)
    print(f"\nstatus page screenshots: {out}")
    return out


async def drive(client, sc, n: int, feedback: bool = False) -> None:
    """`n` predictions (with their labels posted when `feedback`), then one more history point."""
    ids = []
    for i in range(n):
        async with client.post(sc.proxy_url + "/v1/models/fraud:predict", data=b'{"instances": [{"amount": 1}]}',
                               headers={"x-user-id": f"user-{i}"}) as r:
            await r.read()
            ids.append(r.headers["x-request-id"])
    if feedback:
        async with client.post(sc.proxy_url + "/v1/feedback",
                               data=orjson.dumps([{"request_id": rid, "label": 0} for rid in ids])) as r:
            assert r.status == 200
    points = len(sc.services.history.history.points)
    await until(lambda: len(sc.services.history.history.points) > points + 1, 5, "a history point")


async def test_page_charts_traffic_and_highlights_what_is_wrong(upstreams, make_sidecar: MakeSidecar, client,
                                                                 tmp_path):
    """Backends, routes, the rollout, mirrors, drift and live accuracy are drawn as charts and
    tables; the drifted feature and the disagreeing shadow are highlighted; nothing overflows."""
    stable = await upstreams.start(scorer(0.2, 1), name="stable")
    canary = await upstreams.start(scorer(0.8, 2, fail_every=8), name="canary")
    shadow = await upstreams.start(scorer(0.6, 3), name="shadow")
    cfg = fraud(stable.url, canary.url, weights=(50, 50))
    cfg["backends"]["shadow"] = {"url": shadow.url}
    cfg["routes"][0].update({
        "sticky": {"header": "x-user-id"},
        "mirror": [{"backend": "shadow", "percent": 100, "compare": {"path": "$.predictions[*]", "tolerance": 0.01}}],
        "monitor": {"sample": 1.0, "window": 500,
                    "features": {"score": {"from": "response", "path": "$.predictions[*]"}},
                    "reference": {"backend": "stable"}, "drift": {"min_samples": 30, "every": "200ms"}},
        "feedback": {"path": "/v1/feedback", "prediction": {"path": "$.predictions[0]", "threshold": 0.5}},
        "rollout": {"canary": "canary", "baseline": "stable", "steps": [30, 60, 100], "interval": "1h"},
    })
    sc = await make_sidecar(cfg, history_every_s=HISTORY_EVERY_S)
    for _ in range(3):
        await drive(client, sc, 60, feedback=True)
    for action in ("pause", "resume"):   # two manual decisions, marked on the weight chart
        status, _ = await admin(client, "POST", sc.admin_url + f"/admin/routes/fraud/rollout/{action}")
        assert status == 200
    for _ in range(2):
        await drive(client, sc, 60, feedback=True)

    async def drifted() -> bool:
        _, doc = await admin(client, "GET", sc.admin_url + "/admin/status")
        return any(d["backend"] == "canary" and d["drifted"] for d in doc["drift"])
    await until(drifted, 10, "the canary's score drifted")

    out = output_dir(tmp_path)
    async with Browser(tmp_path / "profile") as b:
        for width in WIDTHS:
            await b.open(sc.admin_url + "/", width)
            await b.wait_for("Number(document.body.dataset.points) >= 5 && document.querySelector("
                             "'[data-chart-id=\"rollout-fraud\"] canvas') && document.querySelector("
                             "'tr.alert[data-feature=\"score\"]')", what="the page rendered with history")
            await b.eval("new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)))")
            assert await b.eval(NO_OVERFLOW), f"horizontal overflow at {width} px"
            painted: dict[str, Any] = {
                "codes-stable": await b.eval(f"{PAINTED}('codes-stable', '{GREEN}')"),
                "codes-canary": await b.eval(f"{PAINTED}('codes-canary', '{GREEN}')"),
                "latency-stable": await b.eval(f"{PAINTED}('latency-stable', '{BLUE}')"),
                "route-codes-fraud": await b.eval(f"{PAINTED}('route-codes-fraud', '{GREEN}')"),
                "rollout-fraud line": await b.eval(f"{PAINTED}('rollout-fraud', '{BLUE}')"),
                "rollout-fraud decisions": await b.eval(f"{PAINTED}('rollout-fraud', '{GREY}')"),
                "mirror-fraud-shadow": await b.eval(f"{PAINTED}('mirror-fraud-shadow', '{BLUE}')"),
                "feedback": await b.eval(f"{PAINTED}('feedback', '{BLUE}')"),
            }
            assert all(n > 20 for n in painted.values()), f"charts with nothing drawn at {width} px: {painted}"
            # what is wrong is highlighted, and said first
            assert await b.eval("document.querySelector('tr[data-backend=\"canary\"][data-feature=\"score\"]')"
                                ".classList.contains('alert')")
            assert await b.eval("!document.querySelector('tr[data-backend=\"stable\"][data-feature=\"score\"]')")
            assert await b.eval("document.querySelector('#mirrors tr[data-shadow=\"shadow\"]').classList"
                                ".contains('alert')")
            alerts = await b.eval("[...document.querySelectorAll('#alerts li')].map((li) => li.textContent)")
            assert any(a.startswith("drift: score on fraud / canary") for a in alerts), alerts
            assert any(a.startswith("shadow shadow on fraud agrees on") for a in alerts), alerts
            assert any(a.startswith("canary: ") and "tries failed in the last minute (no health check)" in a
                       for a in alerts), alerts
            # no health check: "not checked", never "healthy"; no model configured: "-"
            health = await b.eval("[...document.querySelectorAll('.backend .health')].map((e) => e.textContent)")
            assert health == ["not checked"] * 3
            assert await b.eval("document.querySelector('[data-backend=\"stable\"] .model').textContent") == "model -"
            assert await b.eval("document.querySelectorAll('.notconf').length") == 0
            await b.screenshot(out / f"status-{width}.png", width)
    assert (out / "status-1280.png").stat().st_size > 10_000


async def test_page_says_not_configured_and_follows_a_weight_change(upstreams, make_sidecar: MakeSidecar, client,
                                                                      tmp_path):
    """A plain split shows its weights and effective shares; sections with nothing configured
    say so instead of showing bare headings; a weight change shows on the next refresh."""
    up = await upstreams.start()
    cfg = fraud(up.url, u.refused_url())
    cfg["backends"]["canary"]["circuit_breaker"] = {"consecutive_failures": 1, "open_for": "60s"}
    cfg["backends"]["stable"]["health_check"] = {"path": "/health", "interval": "1s"}
    cfg["routes"][0]["override_header"] = "x-sidecar-backend"
    sc = await make_sidecar(cfg, history_every_s=HISTORY_EVERY_S)
    async with client.post(sc.proxy_url + "/v1/models/fraud:predict", data=b"{}",
                           headers={"x-sidecar-backend": "canary"}) as r:
        assert r.status == 502  # the canary refuses: its circuit opens
    out = output_dir(tmp_path)
    async with Browser(tmp_path / "profile") as b:
        await b.open(sc.admin_url + "/", 1280)
        await b.wait_for("Number(document.body.dataset.renders) >= 1", what="the page rendered")
        notconf = await b.eval("Object.fromEntries([...document.querySelectorAll('section')].map((s) => "
                               "[s.id, s.querySelector('.notconf')?.textContent ?? null]))")
        assert notconf["section-rollouts"] == "not configured: no route has a rollout"
        assert notconf["section-mirrors"] == "not configured: no route mirrors to a shadow"
        assert notconf["section-drift"] == "not configured: no route has a monitor"
        assert notconf["section-feedback"] == "not configured: no route has feedback"
        assert await b.eval("document.querySelector('[data-backend=\"canary\"] .circuit').dataset.circuit") == "open"
        assert await b.eval("document.querySelector('[data-backend=\"stable\"] .health').textContent") == "healthy"
        assert await b.eval("document.querySelector('[data-backend=\"canary\"] .health').textContent") == \
            "not checked"
        effective = ("document.querySelector('tr[data-route=\"fraud\"][data-backend=\"{}\"] td.effective')"
                     ".textContent")
        assert await b.eval(effective.format("canary")) == "0.0%"   # open: left out of the split
        assert await b.eval(NO_OVERFLOW)
        await b.screenshot(out / "plain-1280.png", 1280)

        status, _ = await admin(client, "PUT", sc.admin_url + "/admin/routes/fraud/weights",
                                {"stable": 30, "canary": 70})
        assert status == 200
        await b.wait_for("document.querySelector('tr[data-route=\"fraud\"][data-backend=\"canary\"] td.weight')"
                         ".textContent === '70'", what="the new weight on the page")
        assert await b.eval("document.querySelector('#routes .pill.warn').textContent") == "override"
        assert await b.eval(effective.format("stable")) == "100.0%"


async def test_page_asks_for_the_token(upstreams, make_sidecar: MakeSidecar, tmp_path):
    """With a token set, the page loads, shows no data and asks for the token; with it, the data."""
    up = await upstreams.start()
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    async with Browser(tmp_path / "profile") as b:
        await b.open(sc.admin_url + "/", 1280)
        await b.wait_for("document.getElementById('auth').style.display === 'block'", what="the token form")
        assert await b.eval("document.querySelectorAll('.backend').length") == 0
        await b.eval(f"document.getElementById('token').value = '{TOKEN}'; "
                     "document.getElementById('auth').requestSubmit(); true")
        await b.wait_for("document.querySelectorAll('.backend').length === 2", what="the backends with the token")


async def test_page_shows_each_backends_model_version(upstreams, make_sidecar: MakeSidecar, tmp_path):
    """Each backend shows the model version it serves; an alias the registry did not resolve shows as `v?`,
    marked as a warning."""
    up = await upstreams.start()
    cfg = fraud(up.url, up.url)
    cfg["registry"] = {"mlflow": {"url": u.refused_url(), "timeout": "0.2s"}}
    cfg["backends"]["stable"]["model"] = {"name": "fraud", "version": "7"}
    cfg["backends"]["canary"]["model"] = {"name": "fraud", "alias": "champion"}
    sc = await make_sidecar(cfg)
    model = "document.querySelector('[data-backend=\"{}\"] .model')"
    async with Browser(tmp_path / "profile") as b:
        await b.open(sc.admin_url + "/", 1280)
        await b.wait_for("document.querySelectorAll('.backend').length === 2", what="the backends")
        assert await b.eval(model.format("stable") + ".textContent") == "model fraud v7"
        assert await b.eval(model.format("canary") + ".textContent") == "model fraud v? @champion"
        assert await b.eval(model.format("canary") + ".classList.contains('warn')") is True
