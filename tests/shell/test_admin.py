"""The admin API: auth on every endpoint, status shape and parts, masked config, weights, OpenAPI."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.shell.admin import build_admin_app
from sidecar.shell.openapi import openapi_document
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.shell.test_reload import PREDICT, admin, fraud

TOKEN = "s3cret-admin-token"
PUBLIC = {"/healthz", "/readyz", "/metrics"}


def registered(sc: Any) -> list[tuple[str, str]]:
    """Every (method, path) the admin app serves, with path parameters filled in."""
    out = []
    for route in build_admin_app(sc).router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        if route.method != "HEAD":
            out.append((route.method, path.replace("{route}", "fraud").replace("{action}", "pause")))
    return out


def with_rollout(cfg: dict[str, Any]) -> dict[str, Any]:
    """The route `fraud` with a rollout that judges nothing for an hour (so every rollout endpoint answers)."""
    cfg["routes"][0]["rollout"] = {"canary": "canary", "baseline": "stable", "steps": [10, 100], "interval": "1h"}
    return cfg


async def test_token_needed_everywhere_but_health_ready_metrics(upstreams, make_sidecar: MakeSidecar, client):
    """With a token set, every admin endpoint but /healthz, /readyz, /metrics answers 401 without it."""
    up = await upstreams.start()
    sc = await make_sidecar({**with_rollout(fraud(up.url, up.url)),
                             "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    endpoints = registered(sc)
    assert len(endpoints) >= 10
    body = {"stable": 1}
    for method, path in endpoints:
        for token in (None, "wrong", TOKEN[:-1], TOKEN):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            async with client.request(method, sc.admin_url + path, json=body if method == "PUT" else None,
                                      headers=headers) as r:
                public = path in PUBLIC or path == "/"
                if token == TOKEN or public:
                    assert r.status != 401, (method, path, token)
                else:
                    assert r.status == 401, (method, path, token)
                    doc = await r.json()
                    assert doc["error"]["type"] == "unauthorized"
                    assert r.headers["www-authenticate"].startswith("Bearer")
    # the page is static code: its data comes from /admin/status, which needs the token
    async with client.get(sc.admin_url + "/") as r:
        assert r.status == 200 and TOKEN not in await r.text()
    async with client.get(sc.admin_url + "/admin/status", headers={"authorization": f"bearer {TOKEN}"}) as r:
        assert r.status == 200


async def test_non_loopback_without_token_refuses_changes(upstreams, make_sidecar: MakeSidecar, client):
    """An admin listener on every interface without a token answers 403 to mutating calls only."""
    up = await upstreams.start()
    sc = await make_sidecar({**with_rollout(fraud(up.url, up.url)), "admin": {"listen": "0.0.0.0:0"}})
    for method, path in registered(sc):
        async with client.request(method, sc.admin_url + path, json={"stable": 1} if method == "PUT" else None) as r:
            if method in ("GET", "HEAD"):
                assert r.status == 200, path
            else:
                assert r.status == 403, path
                assert (await r.json())["error"]["type"] == "forbidden"


async def test_status_shape_and_capability_parts(upstreams, make_sidecar: MakeSidecar, client):
    """Status shows routes with weights, backends with their state, and sections capabilities add."""
    up = await upstreams.start()
    cfg = fraud(up.url, u.refused_url())
    cfg["backends"]["canary"]["circuit_breaker"] = {"consecutive_failures": 1, "open_for": "60s"}
    cfg["routes"][0]["override_header"] = "x-sidecar-backend"
    sc = await make_sidecar(cfg)
    sc.status_providers.append(lambda: {"mirrors": [{"route": "fraud", "shadow": "x", "agreement": 0.97}]})
    sc.status_providers.append(lambda: 1 / 0)        # type: ignore[arg-type,return-value]
    async with client.post(sc.proxy_url + "/v1/models/fraud", data=b"{}", headers={"x-sidecar-backend": "canary"}):
        pass  # refused: the canary's circuit opens
    status, doc = await admin(client, "GET", sc.admin_url + "/admin/status")
    assert status == 200
    assert doc["version"] == sc.proxy.runtime.plan.version and doc["last_reload"] is None
    assert doc["ready"] is True and doc["draining"] is False and doc["uptime_s"] >= 0
    route = doc["routes"][0]
    assert route["name"] == "fraud" and route["weights"] == {"stable": 90.0, "canary": 10.0}
    assert route["effective"] == {"stable": 1.0, "canary": 0.0} and route["override"] is False
    assert route["rollout"] is None
    backends = {b["name"]: b for b in doc["backends"]}
    assert backends["canary"]["circuit"] == "open" and backends["stable"]["circuit"] == "closed"
    assert backends["stable"]["inflight"] == 0 and backends["stable"]["p99_s"] is None
    assert doc["mirrors"][0]["agreement"] == 0.97


async def test_config_is_masked(upstreams, make_sidecar: MakeSidecar, client, monkeypatch):
    """/admin/config hides the token, URL passwords and values of *KEY*/*SECRET* variables."""
    monkeypatch.setenv("MODEL_API_KEY", "k-very-secret")
    monkeypatch.setenv("PLAIN_HOST", "127.0.0.1")
    up = await upstreams.start()
    cfg = fraud("http://bob:hunter2@127.0.0.1:9/base", up.url + "/${MODEL_API_KEY}")
    cfg["backends"]["stable"]["url"] = "http://bob:hunter2@${PLAIN_HOST}:9/base"
    sc = await make_sidecar({**cfg, "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    async with client.get(sc.admin_url + "/admin/config", headers={"authorization": f"Bearer {TOKEN}"}) as r:
        text = await r.text()
        doc = await r.json()
    assert doc["version"] == sc.proxy.runtime.plan.version
    for secret in (TOKEN, "hunter2", "k-very-secret"):
        assert secret not in text
    assert doc["config"]["admin"]["token"] == "***"
    assert doc["config"]["backends"]["stable"]["url"] == "http://bob:***@127.0.0.1:9/base"
    assert doc["config"]["backends"]["canary"]["url"] == "***"
    _, st = await admin(client, "GET", sc.admin_url + "/admin/status", token=TOKEN)
    assert "hunter2" not in str(st)


@pytest.mark.parametrize(("route", "body", "status", "needle"), [
    ("nope", {"stable": 1}, 404, "unknown route 'nope'"),
    ("fraud", {"canary2": 1}, 400, "unknown backend 'canary2'"),
    ("fraud", {"stable": -1}, 400, "0 or more"),
    ("fraud", {"stable": 0, "canary": 0}, 400, "must not all be 0"),
    ("fraud", {"stable": "ten"}, 400, "must be a number"),
    ("fraud", {"stable": True}, 400, "must be a number"),
    ("fraud", [1, 2], 400, "JSON object"),
    ("fraud", {}, 400, "JSON object"),
])
async def test_weights_refused(upstreams, make_sidecar: MakeSidecar, client, route, body, status, needle):
    """Bad weight overrides are refused with a JSON error and change nothing."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    before = sc.proxy.runtime.splits["fraud"]
    got, doc = await admin(client, "PUT", sc.admin_url + f"/admin/routes/{route}/weights", body)
    assert got == status and needle in doc["error"]["message"]
    assert sc.proxy.runtime.splits["fraud"] is before


async def test_weights_not_json(upstreams, make_sidecar: MakeSidecar, client):
    """A body that is not JSON is a 400 with a JSON error."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", data=b"stable=1") as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_weights"


async def test_weights_partial_then_cleared(upstreams, make_sidecar: MakeSidecar, client):
    """A partial override keeps the other weights; DELETE goes back to the configured ones."""
    stable, canary = await upstreams.start(name="stable"), await upstreams.start(name="canary")
    sc = await make_sidecar(fraud(stable.url, canary.url))
    url = sc.admin_url + "/admin/routes/fraud/weights"
    status, doc = await admin(client, "PUT", url, {"stable": 0})
    assert status == 200 and doc["current_weights"] == {"stable": 0.0, "canary": 10.0}
    assert doc["override"] is True and doc["effective"] == {"stable": 0.0, "canary": 1.0}
    for _ in range(20):
        async with client.post(sc.proxy_url + PREDICT) as r:
            assert r.headers["x-sidecar-backend"] == "canary"
    async with client.get(sc.admin_url + "/metrics") as r:
        assert 'sidecar_route_weight{backend="canary",route="fraud"} 1.0' in await r.text()
    status, doc = await admin(client, "DELETE", url)
    assert status == 200 and doc["override"] is False and doc["effective"] == {"stable": 0.9, "canary": 0.1}


async def test_unknown_admin_path_is_json_404(upstreams, make_sidecar: MakeSidecar, client):
    """Admin errors are JSON, the unknown path included."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    status, doc = await admin(client, "GET", sc.admin_url + "/admin/nothing")
    assert status == 404 and doc["error"]["type"] == "not_found"


async def test_openapi_documents_every_admin_route(upstreams, make_sidecar: MakeSidecar, client):
    """/admin/openapi.json is OpenAPI 3.1 and names every route the admin app serves."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    status, doc = await admin(client, "GET", sc.admin_url + "/admin/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert doc == openapi_document()
    for route in build_admin_app(sc).router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        assert route.method.lower() in doc["paths"].get(path, {}), f"{route.method} {path} is not documented"
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(doc["components"]["schemas"])


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
    else:
        yield node
