"""The CLI client against a running in-process sidecar: status, reload, weights, exit codes."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from sidecar.cli import main
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.shell.test_reload import TWO_ERRORS, fraud, two_mistakes, write_config

TOKEN = "cli-token"


async def run_cli(*argv: str) -> int:
    """The CLI blocks (urllib), so it runs in a thread while the sidecar serves on the loop."""
    return await asyncio.to_thread(main, list(argv))


async def test_status_table_and_json(upstreams, make_sidecar: MakeSidecar, capfd):
    """`sidecar status` prints routes with weights and backends with state; --json the raw document."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    assert await run_cli("status", "--admin", sc.admin_url) == 0
    out = capfd.readouterr().out
    assert f"config {sc.proxy.runtime.plan.version}" in out
    assert "ROUTE" in out and "BACKEND" in out and "INFLIGHT" in out
    assert any(line.split()[:5] == ["fraud", "canary", "10", "10", "10.0%"] for line in out.splitlines())
    assert await run_cli("status", "--json", "--admin", sc.admin_url) == 0
    doc = orjson.loads(capfd.readouterr().out)
    assert doc["routes"][0]["name"] == "fraud"


async def test_weights_blue_green_and_refusals(upstreams, make_sidecar: MakeSidecar, capfd):
    """`sidecar weights` switches traffic, exits 1 with the API's message when refused, 2 on bad usage."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    assert await run_cli("weights", "fraud", "stable=0", "canary=100", "--admin", sc.admin_url) == 0
    assert "canary=100 (100.0%)" in capfd.readouterr().out
    assert await run_cli("weights", "fraud", "canary2=1", "--admin", sc.admin_url) == 1
    assert "unknown backend 'canary2'" in capfd.readouterr().err
    assert await run_cli("weights", "nope", "stable=1", "--admin", sc.admin_url) == 1
    assert "unknown route 'nope'" in capfd.readouterr().err
    assert await run_cli("weights", "fraud", "stable", "--admin", sc.admin_url) == 2
    assert "BACKEND=WEIGHT" in capfd.readouterr().err
    assert await run_cli("weights", "fraud", "--clear", "--admin", sc.admin_url) == 0
    assert "configured weights" in capfd.readouterr().out


async def test_reload_ok_unchanged_and_rejected(upstreams, make_sidecar: MakeSidecar, capfd, tmp_path):
    """`sidecar reload` prints the new version, or the errors and exits 1."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    assert await run_cli("reload", "--admin", sc.admin_url) == 0
    assert "config unchanged" in capfd.readouterr().out
    await asyncio.to_thread(write_config, path, fraud(up.url, up.url, weights=(1, 1)))
    assert await run_cli("reload", "--admin", sc.admin_url) == 0
    assert f"-> {sc.proxy.runtime.plan.version}" in capfd.readouterr().out
    await asyncio.to_thread(write_config, path, "routes: 3\n")
    assert await run_cli("reload", "--admin", sc.admin_url) == 1
    err = capfd.readouterr().err
    assert "config rejected" in err and "routes" in err


async def test_rejected_reload_prints_every_error(upstreams, make_sidecar: MakeSidecar, capfd, tmp_path):
    """`sidecar reload` of a file with two mistakes prints both, each at its place, and exits 1."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    await asyncio.to_thread(write_config, path, two_mistakes(up.url, up.url))
    assert await run_cli("reload", "--admin", sc.admin_url) == 1
    assert capfd.readouterr().err.splitlines() == [
        f"error: the admin API refused: 400: config rejected; still running {sc.proxy.runtime.plan.version}",
        *(f"  {e}" for e in TWO_ERRORS)]


async def test_token_from_flag_and_environment(upstreams, make_sidecar: MakeSidecar, capfd, monkeypatch):
    """Without the token the CLI exits 1 and says how to pass it; --token or SIDECAR_ADMIN_TOKEN work."""
    up = await upstreams.start()
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    monkeypatch.delenv("SIDECAR_ADMIN_TOKEN", raising=False)
    assert await run_cli("status", "--admin", sc.admin_url) == 1
    assert "SIDECAR_ADMIN_TOKEN" in capfd.readouterr().err
    assert await run_cli("status", "--admin", sc.admin_url, "--token", TOKEN) == 0
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("SIDECAR_ADMIN", sc.admin_url)
    assert await run_cli("status") == 0


async def test_unreachable_admin_api_exits_3(capfd):
    """When nothing listens, the CLI says so plainly and exits 3."""
    url = u.refused_url()
    assert await run_cli("status", "--admin", url) == 3
    assert f"cannot reach the admin API at {url}: connection refused" in capfd.readouterr().err


def test_usage_error_exits_2(capfd):
    """A command without its arguments is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(["weights"])
    assert e.value.code == 2


async def test_rollout_status_and_actions(upstreams, make_sidecar: MakeSidecar, capfd):
    """`sidecar rollout` shows the state, step and weights, steers the rollout, and exits 1 on a conflict."""
    up = await upstreams.start()
    cfg = fraud(up.url, up.url)
    cfg["routes"][0]["rollout"] = {"canary": "canary", "baseline": "stable", "steps": [10, 100], "interval": "1h"}
    sc = await make_sidecar(cfg)
    assert await run_cli("rollout", "fraud", "--admin", sc.admin_url) == 0
    out = capfd.readouterr().out
    assert "rollout progressing" in out and "step      0 of 2 (10%)" in out and "canary=10, stable=90" in out
    assert await run_cli("rollout", "fraud", "resume", "--admin", sc.admin_url) == 1
    assert "cannot resume a rollout that is progressing" in capfd.readouterr().err
    assert await run_cli("rollout", "fraud", "rollback", "--admin", sc.admin_url) == 0
    out = capfd.readouterr().out
    assert "rollout rolled_back" in out and "manual -> rollback: rolled back by admin" in out
    with pytest.raises(SystemExit) as e:
        await run_cli("rollout", "fraud", "jump", "--admin", sc.admin_url)
    assert e.value.code == 2
