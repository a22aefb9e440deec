"""The status page in a real browser: headless Chromium renders it against a running sidecar."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.shell.test_reload import admin, fraud

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
TOKEN = "page-token"


async def render(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran (Chromium's --dump-dom with a virtual time budget)."""
    if not HAVE_CHROMIUM:
        pytest.skip("headless Chromium is not installed (/usr/bin/chromium; .ci/run installs it)")
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--dump-dom", "--virtual-time-budget=5000", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, "chromium failed"
    return out.decode()


def row(dom: str, attrs: str) -> str:
    m = re.search(rf"<tr {attrs}>(.*?)</tr>", dom, re.S)
    assert m, f"no row {attrs} in the rendered page"
    return m.group(1)


def cell(row_html: str, cls: str) -> str:
    m = re.search(rf'<td class="{cls}"[^>]*>(.*?)</td>', row_html, re.S)
    assert m, f"no cell {cls} in {row_html}"
    return m.group(1)


async def test_page_shows_backends_and_follows_a_weight_change(upstreams, make_sidecar: MakeSidecar, client,
                                                                tmp_path):
    """The page shows routes, weights and backends with their state, and the new weights after a change."""
    up = await upstreams.start()
    cfg = fraud(up.url, u.refused_url())
    cfg["backends"]["canary"]["circuit_breaker"] = {"consecutive_failures": 1, "open_for": "60s"}
    cfg["routes"][0]["override_header"] = "x-sidecar-backend"
    sc = await make_sidecar(cfg)
    sc.status_providers.append(lambda: {"drift": [{"route": "fraud", "feature": "amount", "drifted": False}]})
    async with client.post(sc.proxy_url + "/v1/models/fraud:predict", data=b"{}",
                           headers={"x-sidecar-backend": "canary"}) as r:
        assert r.status == 502  # the canary refuses: its circuit opens
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    assert f'data-version="{sc.proxy.runtime.plan.version}"' in dom
    stable = row(dom, 'data-backend="stable"')
    canary = row(dom, 'data-backend="canary"')
    assert "healthy" in cell(stable, "health ok") and cell(stable, "circuit ") == "closed"
    assert cell(canary, "circuit bad") == "open"
    # the open canary is left out of the split: all traffic goes to stable
    assert cell(row(dom, 'data-route="fraud" data-backend="canary"'), "num effective") == "0.0%"
    assert 'id="section-drift"' in dom and "amount" in dom

    status, _ = await admin(client, "PUT", sc.admin_url + "/admin/routes/fraud/weights", {"stable": 30, "canary": 70})
    assert status == 200
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    canary_route = row(dom, 'data-route="fraud" data-backend="canary"')
    stable_route = row(dom, 'data-route="fraud" data-backend="stable"')
    assert cell(canary_route, "num weight") == "70" and cell(stable_route, "num weight") == "30"
    # the canary's circuit is still open: stable takes everything until it closes
    assert cell(canary_route, "num effective") == "0.0%" and cell(stable_route, "num effective") == "100.0%"
    assert ">override<" in dom


async def test_page_shows_the_rollout_and_its_decisions(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A route's rollout shows its state, step and weights, and its decisions in a table."""
    up = await upstreams.start()
    cfg = fraud(up.url, up.url)
    cfg["routes"][0]["rollout"] = {"canary": "canary", "baseline": "stable", "steps": [10, 100], "interval": "1h"}
    sc = await make_sidecar(cfg)
    status, _ = await admin(client, "POST", sc.admin_url + "/admin/routes/fraud/rollout/pause")
    assert status == 200
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    assert "paused · step 0 of 2 (10%) · canary=10 stable=90 · paused by admin" in dom
    assert 'id="section-rollout_decisions"' in dom and "paused by admin" in dom
    assert '<svg' in dom and 'class="timeline"' in dom and 'class="decision manual"' in dom


async def test_page_asks_for_the_token(upstreams, make_sidecar: MakeSidecar, tmp_path):
    """With a token set, the page loads, shows no data and asks for the token."""
    up = await upstreams.start()
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    assert '<form id="auth" style="display: block;">' in dom
    assert 'data-backend="stable"' not in dom


async def test_page_shows_feedback_beside_drift(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A route with feedback shows a feedback table: per backend the metric, its count, the score
    mean, and the segment values flagged too small."""
    up = await upstreams.start(u.answer({"predictions": [0.75]}), name="stable")
    sc = await make_sidecar({"backends": {"stable": {"url": up.url}}, "routes": [{
        "name": "fraud", "match": {"path_prefix": "/v1/models/fraud"}, "split": {"stable": 1},
        "feedback": {"path": "/v1/feedback", "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                     "segments": {"country": {"from": "request", "path": "$.country", "values": ["US"]}}}}]})
    async with client.post(sc.proxy_url + "/v1/models/fraud:predict", json={"country": "US"}) as r:
        rid = r.headers["x-request-id"]
    async with client.post(sc.proxy_url + "/v1/feedback", json={"request_id": rid, "label": 1}) as r:
        assert (await r.json())["counts"]["joined"] == 1
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    m = re.search(r'<section id="section-feedback">(.*?)</section>', dom, re.S)
    assert m, "no feedback section on the page"
    section = m.group(1)
    assert "score_mean" in section and "0.75" in section and "accuracy" in section
    assert "too_small" in section and ">US<" in section


async def test_page_shows_each_backends_model_version(upstreams, make_sidecar: MakeSidecar, tmp_path):
    """Each backend shows the model version it serves; an alias the registry did not resolve shows as `v?`."""
    up = await upstreams.start()
    cfg = fraud(up.url, up.url)
    cfg["registry"] = {"mlflow": {"url": u.refused_url(), "timeout": "0.2s"}}
    cfg["backends"]["stable"]["model"] = {"name": "fraud", "version": "7"}
    cfg["backends"]["canary"]["model"] = {"name": "fraud", "alias": "champion"}
    sc = await make_sidecar(cfg)
    dom = await render(sc.admin_url + "/", tmp_path / "profile")
    assert cell(row(dom, 'data-backend="stable"'), "model") == "fraud v7"
    assert cell(row(dom, 'data-backend="canary"'), "model warn") == "fraud v? @champion"
