"""The CLI client against a running in-process sidecar: status, reload, weights, exit codes."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from sidecar.cli import main
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import until
from tests.shell.test_reload import TWO_ERRORS, fraud, two_mistakes, write_config
from tests.shell.test_status_page import scorer

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


async def test_status_summary_of_a_busy_sidecar(upstreams, make_sidecar: MakeSidecar, client, capfd):
    """Per backend its requests, rate, failed tries, p99, circuit and health ("not checked"
    without a health check); mirrors' agreement as a percentage, drift and the rollout, marked
    where something is wrong; sections with nothing configured say so."""
    stable = await upstreams.start(scorer(0.2, 1), name="stable")
    canary = await upstreams.start(scorer(0.8, 2, fail_every=4), name="canary")
    shadow = await upstreams.start(scorer(0.6, 3), name="shadow")
    cfg = fraud(stable.url, canary.url, weights=(50, 50))
    cfg["backends"]["shadow"] = {"url": shadow.url}
    cfg["backends"]["stable"]["health_check"] = {"path": "/health", "interval": "1s"}
    cfg["routes"][0].update({
        "mirror": [{"backend": "shadow", "percent": 100, "compare": {"path": "$.predictions[*]", "tolerance": 0.01}}],
        "monitor": {"sample": 1.0, "features": {"score": {"from": "response", "path": "$.predictions[*]"}},
                    "reference": {"backend": "stable"}, "drift": {"min_samples": 30, "every": "200ms"}},
        "rollout": {"canary": "canary", "baseline": "stable", "steps": [50, 100], "interval": "1h"},
    })
    sc = await make_sidecar(cfg, history_every_s=0.2)
    for i in range(200):
        async with client.post(sc.proxy_url + "/v1/models/fraud:predict", data=b"{}",
                               headers={"x-user-id": str(i)}) as r:
            await r.read()
    points = len(sc.services.history.history.points)
    await until(lambda: len(sc.services.history.history.points) > points + 1, 5, "a history point")
    await until(lambda: any(row.result is not None and row.result.drifted
                            for row in sc.services.monitor.drift_rows()), 10, "the canary's drift")
    assert await run_cli("status", "--admin", sc.admin_url) == 0
    out = capfd.readouterr().out
    lines = out.splitlines()

    def row(section: str, first: list[str]) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith(section))
        return next(line.split() for line in lines[start:] if line.split()[:len(first)] == first)

    answered = {b: sum(c.value for (_, name, _), c in sc.services.metrics.requests.items() if name == b)
                for b in ("stable", "canary")}
    assert answered["stable"] + answered["canary"] == 200
    stable_row, canary_row = row("BACKENDS", ["stable"]), row("BACKENDS", ["canary"])
    # BACKEND MODEL REQUESTS RATE MIRRORED ERRORS P50 P99 CIRCUIT HEALTH INFLIGHT
    assert stable_row[1] == "-" and stable_row[2] == str(round(answered["stable"]))
    assert stable_row[3].endswith("/s") and float(stable_row[3][:-2]) > 0
    assert stable_row[5] == "0.0%" and stable_row[7].endswith("ms") and stable_row[8:10] == ["closed", "healthy"]
    assert canary_row[2] == str(round(answered["canary"])) and canary_row[9:11] == ["not", "checked"]
    assert 15 < float(canary_row[5].rstrip("%")) < 35 and canary_row[-1] == "<-"   # every 4th try fails
    shadow_backend = row("BACKENDS", ["shadow"])
    assert shadow_backend[2] == "0" and float(shadow_backend[4][:-2]) > 0   # it answers mirror copies only
    shadow_row = row("MIRRORS", ["fraud", "shadow"])
    assert shadow_row[2] == "100%" and float(shadow_row[6].rstrip("%")) < 20 and shadow_row[7:9] == ["<-", "below"]
    assert row("DRIFT", ["fraud", "canary", "score"])[-1] == "DRIFTED"
    assert "  fraud: progressing, step 1 of 2 (50 -> 100%), canary=50% stable=50%" in lines
    assert "FEEDBACK: none joined or configured" in lines
    assert "mirrors: [" not in out and "drift: [" not in out


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
