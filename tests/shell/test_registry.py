"""The model registry against a real MLflow tracking server: aliases resolved and refreshed, answers attributed, a
promotion moving `champion`, a rollback tagging its version, and a registry that is down at load and at promotion."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from sidecar.cli import format_rollout, format_status
from tests.harness import sidecar_config, until
from tests.mlflow_server import RestClient, mlflow_server
from tests.upstreams import answer, refused_url


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def mlflow(mlflow_url: str, client: aiohttp.ClientSession) -> RestClient:
    return RestClient(client, mlflow_url)


def unique() -> str:
    return f"fraud-{uuid.uuid4().hex[:8]}"


def config(registry_url: str, name: str, up: str, rollout: dict[str, Any] | None = None,
           **mlflow: Any) -> dict[str, Any]:
    """stable serves `name@champion`, canary serves version 2 of it."""
    route: dict[str, Any] = {"name": "fraud", "match": {"path_prefix": "/v1"}, "split": {"stable": 100, "canary": 0}}
    if rollout is not None:
        route["rollout"] = {"canary": "canary", "baseline": "stable", "steps": [50, 100], "interval": "10m",
                            "registry": {"promote_alias": "champion"}, **rollout}
    return {
        "registry": {"mlflow": {"url": registry_url, "refresh": "0.2s", **mlflow}},
        "backends": {"stable": {"url": up, "model": {"name": name, "alias": "champion"}},
                     "canary": {"url": up, "model": {"name": name, "version": "2"}}},
        "routes": [route],
    }


async def status_of(client: aiohttp.ClientSession, sc: Any) -> dict[str, Any]:
    async with client.get(sc.admin_url + "/admin/status") as r:
        doc: dict[str, Any] = await r.json()
        return doc


async def model_of(client: aiohttp.ClientSession, sc: Any, backend: str) -> Any:
    doc = await status_of(client, sc)
    return next(b["model"] for b in doc["backends"] if b["name"] == backend)


async def metrics_of(client: aiohttp.ClientSession, sc: Any) -> str:
    async with client.get(sc.admin_url + "/metrics") as r:
        return await r.text()


async def rollout_of(client: aiohttp.ClientSession, sc: Any) -> dict[str, Any]:
    async with client.get(sc.admin_url + "/admin/routes/fraud/rollout") as r:
        doc: dict[str, Any] = await r.json()
        return doc


async def act(client: aiohttp.ClientSession, sc: Any, action: str) -> None:
    async with client.post(sc.admin_url + f"/admin/routes/fraud/rollout/{action}") as r:
        assert r.status == 200, await r.text()


async def test_an_alias_is_resolved_at_load_and_a_moved_alias_shows(mlflow, upstreams, make_sidecar, client,
                                                                     tmp_path: Path):
    """`champion` resolves before the sidecar is ready; status, backend_info, access and sample log name the
    version; when the alias moves in MLflow, the next refresh shows the new version."""
    name = unique()
    await mlflow.register(name, 2)
    await mlflow.set_alias(name, "champion", "1")
    up = await upstreams.start()
    cfg = config(mlflow.base.removesuffix("/api/2.0/mlflow"), name, up.url)
    cfg["access_log"] = True
    cfg["routes"][0]["monitor"] = {"sample": 1.0, "log": {"path": str(tmp_path / "samples.jsonl")}}
    access = tmp_path / "access.log"
    fd = os.open(access, os.O_WRONLY | os.O_CREAT)
    try:
        sc = await make_sidecar(cfg, access_log_fd=fd)
        # resolved before ready: the first status already has it
        assert await model_of(client, sc, "stable") == {"name": name, "version": "1", "alias": "champion"}
        assert await model_of(client, sc, "canary") == {"name": name, "version": "2", "alias": None}
        text = await metrics_of(client, sc)
        assert f'sidecar_backend_info{{alias="champion",backend="stable",model="{name}",version="1"}} 1.0' in text
        assert f'sidecar_backend_info{{alias="",backend="canary",model="{name}",version="2"}} 1.0' in text
        assert 'sidecar_registry_calls_total{operation="resolve_alias",outcome="ok"}' in text
        async with client.post(sc.proxy_url + "/v1/predict", json={"x": 1}, headers={"x-request-id": "r1"}) as r:
            assert r.status == 200
        await until(lambda: access.read_bytes().endswith(b"\n"), what="an access log line")
        line = orjson.loads(access.read_bytes().splitlines()[0])
        assert (line["request_id"], line["backend"], line["model"], line["version"]) == ("r1", "stable", name, "1")
        await until(lambda: (tmp_path / "samples.jsonl").exists()
                    and (tmp_path / "samples.jsonl").read_bytes().endswith(b"\n"), what="a sample log line")
        sample = orjson.loads((tmp_path / "samples.jsonl").read_bytes().splitlines()[0])
        assert (sample["request_id"], sample["model"], sample["version"]) == ("r1", name, "1")

        await mlflow.set_alias(name, "champion", "2")

        async def moved() -> bool:
            return bool(await model_of(client, sc, "stable") == {"name": name, "version": "2", "alias": "champion"})
        await until(moved, timeout_s=10, what="the moved alias")
        text = await metrics_of(client, sc)
        assert f'sidecar_backend_info{{alias="champion",backend="stable",model="{name}",version="2"}} 1.0' in text
        assert f'backend="stable",model="{name}",version="1"' not in text
    finally:
        os.close(fd)


async def test_a_reload_keeps_resolved_versions_and_resolves_a_new_alias(mlflow, upstreams, make_sidecar, client,
                                                                         tmp_path: Path):
    """A reload that names a new alias resolves it at once, in the background; the kept alias keeps its version."""
    name = unique()
    await mlflow.register(name, 2)
    await mlflow.set_alias(name, "champion", "1")
    await mlflow.set_alias(name, "challenger", "2")
    up = await upstreams.start()
    cfg = config(mlflow.base.removesuffix("/api/2.0/mlflow"), name, up.url, refresh="1h")
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(cfg, path=path, config_poll_s=0)
    cfg["backends"]["canary"]["model"] = {"name": name, "alias": "challenger"}
    path.write_text(yaml.safe_dump(sidecar_config(cfg)))
    async with client.post(sc.admin_url + "/admin/reload") as r:
        assert r.status == 200, await r.text()

    async def resolved() -> bool:
        return bool(await model_of(client, sc, "canary") == {"name": name, "version": "2", "alias": "challenger"})
    await until(resolved, timeout_s=10, what="the new alias")
    assert await model_of(client, sc, "stable") == {"name": name, "version": "1", "alias": "champion"}


async def test_a_promotion_moves_champion_to_the_canarys_version_and_tags_it(mlflow, upstreams, make_sidecar,
                                                                             client):
    """Promoted: `champion` points at the canary's version 2, which is tagged promoted with the reason; the
    decision and the webhook event name that version, and the baseline's alias follows at once."""
    name = unique()
    await mlflow.register(name, 2)
    await mlflow.set_alias(name, "champion", "1")
    up = await upstreams.start()
    hook = await upstreams.start()
    cfg = config(mlflow.base.removesuffix("/api/2.0/mlflow"), name, up.url,
                 rollout={"notify": {"webhook": hook.url + "/hook"}})
    sc = await make_sidecar(cfg)
    await act(client, sc, "promote")
    assert (await rollout_of(client, sc))["state"] == "promoted"

    async def written() -> bool:
        reg = (await rollout_of(client, sc))["registry"]
        return reg is not None and all(w["outcome"] != "pending" for w in reg["writes"])
    await until(written, timeout_s=10, what="the registry writes")
    doc = await rollout_of(client, sc)
    assert [(w["operation"], w["outcome"]) for w in doc["registry"]["writes"]] == [
        ("set_alias", "written"), ("set_tag", "written"), ("set_tag", "written")]
    assert doc["registry"]["error"] is None
    assert await mlflow.alias(name, "champion") == "2"
    assert await mlflow.tags(name, "2") == {"sidecar.rollout": "promoted",
                                            "sidecar.rollout.reason": "promoted by admin"}
    assert await mlflow.tags(name, "1") == {}
    assert doc["decisions"][-1]["canary_model"] == {"name": name, "version": "2", "alias": None}
    assert await model_of(client, sc, "stable") == {"name": name, "version": "2", "alias": "champion"}
    # what `sidecar rollout fraud` and `sidecar status` print
    text = format_rollout(doc)
    assert f"  canary    {name} version 2\n" in text and "  registry  promoted: written\n" in text
    assert "    written  set_alias champion (version 2, 1 tries)" in text
    assert f"{name} v2 @champion" in format_status(await status_of(client, sc))
    await until(lambda: any(s.json()["event"] == "promoted" for s in hook.requests), what="the promoted event")
    event = next(s.json() for s in hook.requests if s.json()["event"] == "promoted")
    assert event["canary_model"] == {"name": name, "version": "2", "alias": None}
    text = await metrics_of(client, sc)
    assert 'sidecar_registry_writes_total{outcome="written",route="fraud"} 3.0' in text
    assert 'sidecar_registry_calls_total{operation="set_alias",outcome="ok"} 1.0' in text


async def test_a_rollback_tags_the_canarys_version_and_leaves_the_alias(mlflow, upstreams, make_sidecar, client):
    """Rolled back: version 2 is tagged rolled_back with the decision's reason; `champion` stays on version 1."""
    name = unique()
    await mlflow.register(name, 2)
    await mlflow.set_alias(name, "champion", "1")
    up = await upstreams.start()
    sc = await make_sidecar(config(mlflow.base.removesuffix("/api/2.0/mlflow"), name, up.url, rollout={}))
    await act(client, sc, "rollback")

    async def written() -> bool:
        reg = (await rollout_of(client, sc))["registry"]
        return reg is not None and all(w["outcome"] != "pending" for w in reg["writes"])
    await until(written, timeout_s=10, what="the registry writes")
    doc = await rollout_of(client, sc)
    assert [(w["operation"], w["outcome"]) for w in doc["registry"]["writes"]] == [
        ("set_tag", "written"), ("set_tag", "written")]
    assert await mlflow.tags(name, "2") == {"sidecar.rollout": "rolled_back",
                                            "sidecar.rollout.reason": "rolled back by admin"}
    assert await mlflow.alias(name, "champion") == "1"


async def test_a_registry_down_at_load_and_at_promotion_holds_nothing_up(upstreams, make_sidecar, client):
    """Nothing listens at the registry's address: the sidecar is ready within the timeout with the alias
    unresolved, the promotion happens at once, and the state shows the writes that could not be made."""
    up = await upstreams.start()
    dead = refused_url()
    t0 = time.monotonic()
    sc = await make_sidecar(config(dead, "fraud", up.url, rollout={}, timeout="0.5s"))
    assert time.monotonic() - t0 < 5.0
    assert await model_of(client, sc, "stable") == {"name": "fraud", "version": None, "alias": "champion"}
    reg = (await status_of(client, sc))["registry"]
    assert reg["aliases"][0]["version"] is None and reg["aliases"][0]["error"].startswith("unreachable")
    assert 'sidecar_backend_info{alias="champion",backend="stable",model="fraud",version="unresolved"} 1.0' \
        in await metrics_of(client, sc)
    async with client.post(sc.proxy_url + "/v1/predict", json={"x": 1}) as r:
        assert r.status == 200   # serving does not wait for the registry

    await act(client, sc, "promote")
    doc = await rollout_of(client, sc)
    assert doc["state"] == "promoted" and doc["weights"] == {"canary": 100, "stable": 0}

    async def failed() -> bool:
        reg = (await rollout_of(client, sc))["registry"]
        return reg is not None and all(w["outcome"] == "failed" for w in reg["writes"])
    await until(failed, timeout_s=15, what="the writes to fail")
    reg = (await rollout_of(client, sc))["registry"]
    assert reg["writes"][0]["tries"] == 3 and reg["writes"][0]["error"].startswith("unreachable")
    assert reg["error"].startswith("alias champion of fraud -> version 2 not written after 3 tries")
    assert [w["error"] for w in reg["writes"][1:]] == ["not tried: the registry did not answer"] * 2
    text = await metrics_of(client, sc)
    assert 'sidecar_registry_calls_total{operation="set_alias",outcome="unreachable"} 3.0' in text
    assert 'sidecar_registry_writes_total{outcome="failed",route="fraud"} 3.0' in text


async def test_the_token_is_sent_as_a_bearer_and_masked(mlflow_url, upstreams, make_sidecar, client):
    """Behind a gateway that wants `Authorization: Bearer <token>` (as a hosted MLflow does), the alias resolves
    with the token; /admin/config never shows it."""
    name = unique()
    rest = RestClient(client, mlflow_url)
    await rest.register(name, 1)
    await rest.set_alias(name, "champion", "1")
    refused = 0

    async def gateway(request: web.Request) -> web.StreamResponse:
        nonlocal refused
        if request.headers.get("authorization") != "Bearer s3cret-token":
            refused += 1
            return web.json_response({"error_code": "UNAUTHENTICATED"}, status=401)
        async with client.request(request.method, mlflow_url + request.rel_url.path_qs,
                                  data=await request.read(), headers={"content-type": "application/json"}) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        up = await upstreams.start()
        sc = await make_sidecar(config(f"http://127.0.0.1:{port}", name, up.url, token="s3cret-token"))
        assert await model_of(client, sc, "stable") == {"name": name, "version": "1", "alias": "champion"}
        assert refused == 0
        async with client.get(sc.admin_url + "/admin/config") as r:
            body = await r.text()
        assert "s3cret" not in body and orjson.loads(body)["config"]["registry"]["mlflow"]["token"] == "***"
    finally:
        await runner.cleanup()


async def test_feedback_rows_name_the_model_version(upstreams, make_sidecar, client):
    """/admin/feedback and the status's feedback rows name the version each backend serves (a static one here)."""
    up = await upstreams.start(answer({"predictions": [0.9]}))
    sc = await make_sidecar({
        "backends": {"stable": {"url": up.url, "model": {"name": "fraud", "version": 7}}},
        "routes": [{"name": "fraud", "match": {"path_prefix": "/v1"}, "split": {"stable": 1},
                    "feedback": {"path": "/v1/feedback",
                                 "prediction": {"path": "$.predictions[0]", "threshold": 0.5}}}],
    })
    async with client.post(sc.proxy_url + "/v1/predict", json={"x": 1}) as r:
        rid = r.headers["x-request-id"]
    async with client.post(sc.proxy_url + "/v1/feedback", json={"request_id": rid, "label": 1}) as r:
        assert (await r.json())["counts"]["joined"] == 1
    async with client.get(sc.admin_url + "/admin/feedback") as r:
        doc = await r.json()
    assert doc["routes"][0]["backends"][0]["model"] == {"name": "fraud", "version": "7", "alias": None}

    async def row() -> Any:
        rows = (await status_of(client, sc))["feedback"]
        return rows[0] if rows else None
    await until(row, what="a feedback row")
    assert (await row())["model"] == {"name": "fraud", "version": "7", "alias": None}
