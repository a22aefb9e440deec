"""Rollouts over real sockets: the driver walks steps, rolls back, bakes, pauses, persists, and obeys the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from tests.harness import until
from tests.upstreams import answer


def rollout_config(stable: str, canary: str, **rollout: Any) -> dict[str, Any]:
    ro = {"canary": "canary", "baseline": "stable", "steps": [20, 50, 100], "interval": 0.3,
          "min_requests": 5, "gates": {"max_error_rate": 0.2}, **rollout}
    return {
        "backends": {"stable": {"url": stable}, "canary": {"url": canary}},
        "routes": [{"name": "fraud", "match": {"path_prefix": "/v1"}, "split": {"stable": 100, "canary": 0},
                    "rollout": ro}],
    }


@contextlib.asynccontextmanager
async def traffic(client: aiohttp.ClientSession, url: str, every_s: float = 0.005) -> AsyncIterator[None]:
    """Requests to the proxy, one after another, until the block ends."""
    async def loop() -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with client.post(url + "/v1/predict", json={"x": 1}) as r:
                    await r.read()
            await asyncio.sleep(every_s)

    task = asyncio.ensure_future(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rollout_of(client: aiohttp.ClientSession, sc: Any) -> dict[str, Any]:
    async with client.get(sc.admin_url + "/admin/routes/fraud/rollout") as r:
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def post_action(client: aiohttp.ClientSession, sc: Any, action: str) -> tuple[int, dict[str, Any]]:
    async with client.post(sc.admin_url + f"/admin/routes/fraud/rollout/{action}") as r:
        return r.status, await r.json()


async def wait_state(client: aiohttp.ClientSession, sc: Any, state: str, timeout_s: float = 10.0) -> dict[str, Any]:
    got: dict[str, Any] = {}

    async def reached() -> bool:
        got.update(await rollout_of(client, sc))
        return bool(got["state"] == state)

    await until(reached, timeout_s, f"rollout {state}")
    return got


async def test_healthy_canary_is_promoted_and_the_webhook_hears_each_event(upstreams, make_sidecar, client):
    """A healthy canary walks every step to 100 and the webhook receives started, stepped, ..., promoted in order."""
    events: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        events.append(await request.json())
        if events[-1]["event"] == "promoted":
            done.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        stable, canary = await upstreams.start(), await upstreams.start()
        cfg = rollout_config(stable.url, canary.url, notify={"webhook": f"http://127.0.0.1:{port}/hook"})
        sc = await make_sidecar(cfg)
        async with traffic(client, sc.proxy_url):
            async with asyncio.timeout(15):
                await done.wait()
        doc = await rollout_of(client, sc)
        assert doc["state"] == "promoted"
        assert doc["weights"] == {"canary": 100, "stable": 0}
        assert sc.runtime.splits["fraud"].weights[sc.runtime.plan.routes[0].backends.index("canary")] == 100
        assert [e["event"] for e in events] == ["started", "stepped", "stepped", "promoted"]
        assert all(e["route"] == "fraud" and e["text"].startswith("fraud: ") for e in events)
        assert [d["verdict"] for d in doc["decisions"]][-3:] == ["pass", "pass", "pass"]
        async with client.get(sc.admin_url + "/metrics") as r:
            text = await r.text()
        assert 'sidecar_rollout_state{route="fraud",state="promoted"} 1.0' in text
        assert 'sidecar_rollout_step{route="fraud"} 2.0' in text
        assert 'sidecar_rollout_decisions_total{route="fraud",verdict="pass"} 3.0' in text
        sent = sc.services.metrics.rollout_notify.labels("fraud", "sent")
        await until(lambda: sent.value == 4, 2, "notify counted")
    finally:
        await runner.cleanup()


async def test_failing_canary_is_rolled_back_within_one_interval(upstreams, make_sidecar, client):
    """A canary that starts answering 500 at step 1 is rolled back to weight 0 at that step's judgement."""
    stable, canary = await upstreams.start(), await upstreams.start()
    sc = await make_sidecar(rollout_config(stable.url, canary.url, steps=[10, 30, 60, 100], interval=0.5))
    async with traffic(client, sc.proxy_url):
        await until(lambda: sc.services.rollouts.by_route["fraud"].state.step == 1, 10, "step 1")
        canary.behaviour = answer(status=500)
        t0 = time.monotonic()
        doc = await wait_state(client, sc, "rolled_back", 5)
        assert time.monotonic() - t0 < 1.0 + 0.5
    assert doc["step"] == 1
    assert doc["weights"] == {"canary": 0, "stable": 100}
    assert doc["decisions"][-1]["verdict"] == "fail"
    assert "max_error_rate" in doc["decisions"][-1]["reason"]
    route = sc.runtime.plan.routes[0]
    assert sc.runtime.splits["fraud"].weights[route.backends.index("canary")] == 0


async def test_sequential_test_rolls_back_a_bad_canary_in_seconds(upstreams, make_sidecar, client):
    """With compare.errors: sequential, a failing canary is rolled back long before a 30 s interval."""
    stable, canary = await upstreams.start(), await upstreams.start(answer(status=500))
    cfg = rollout_config(stable.url, canary.url, steps=[50, 100], interval="30s",
                         gates={"compare": {"errors": "sequential", "alpha": 0.01}})
    sc = await make_sidecar(cfg)
    t0 = time.monotonic()
    async with traffic(client, sc.proxy_url, every_s=0.002):
        doc = await wait_state(client, sc, "rolled_back", 15)
    assert time.monotonic() - t0 < 15
    assert doc["decisions"][-1]["gates"][0]["gate"] == "compare.errors"


async def test_bake_catches_a_canary_that_breaks_at_100(upstreams, make_sidecar, client):
    """A canary that breaks while baking at 100 is rolled back."""
    stable, canary = await upstreams.start(), await upstreams.start()
    sc = await make_sidecar(rollout_config(stable.url, canary.url, steps=[50, 100], bake="30s"))
    async with traffic(client, sc.proxy_url):
        await wait_state(client, sc, "baking", 10)
        canary.behaviour = answer(status=500)
        doc = await wait_state(client, sc, "rolled_back", 5)
    assert "while baking" not in doc["reason"]  # the reason is the gate's; the notify text says where
    assert doc["weights"] == {"canary": 0, "stable": 100}


async def test_low_traffic_rollout_pauses_at_its_progress_deadline(upstreams, make_sidecar, client):
    """Without traffic a step stays inconclusive and the rollout pauses at progress_deadline, saying why."""
    stable, canary = await upstreams.start(), await upstreams.start()
    sc = await make_sidecar(rollout_config(stable.url, canary.url, progress_deadline=0.6))
    doc = await wait_state(client, sc, "paused", 5)
    assert doc["reason"].startswith("inconclusive: min_requests")
    assert doc["step"] == 0
    status, body = await post_action(client, sc, "resume")
    assert status == 200 and body["state"] == "progressing"


async def test_admin_actions_and_weights_conflict(upstreams, make_sidecar, client):
    """PUT weights is 409 while progressing; pause allows it; a refused action is 409; restart goes to step 0."""
    stable, canary = await upstreams.start(), await upstreams.start()
    sc = await make_sidecar(rollout_config(stable.url, canary.url, interval="1h"))
    url = sc.admin_url + "/admin/routes/fraud/weights"
    async with client.put(url, json={"canary": 100}) as r:
        assert r.status == 409
        assert (await r.json())["error"]["type"] == "rollout_conflict"
    status, body = await post_action(client, sc, "resume")
    assert status == 409
    assert body["error"]["message"] == "cannot resume a rollout that is progressing (resume needs it paused)"
    status, body = await post_action(client, sc, "pause")
    assert status == 200 and body["state"] == "paused"
    async with client.put(url, json={"canary": 100}) as r:
        assert r.status == 200
    status, body = await post_action(client, sc, "rollback")
    assert status == 200 and body["state"] == "rolled_back" and body["weights"] == {"canary": 0, "stable": 100}
    status, body = await post_action(client, sc, "promote")
    assert status == 409
    status, body = await post_action(client, sc, "restart")
    assert status == 200 and body["state"] == "progressing" and body["step"] == 0
    assert body["weights"] == {"canary": 20, "stable": 80}
    assert [d["action"] for d in body["decisions"]] == ["pause", "rollback", "restart"]
    async with client.get(sc.admin_url + "/admin/status") as r:
        route = (await r.json())["routes"][0]
    assert route["rollout"]["state"] == "progressing"
    assert route["current_weights"] == {"stable": 80.0, "canary": 20.0}
    async with client.post(sc.admin_url + "/admin/routes/fraud/rollout/jump") as r:
        assert r.status == 404


async def test_state_persisted_resumes_at_the_same_step(upstreams, make_sidecar, client, tmp_path):
    """A sidecar stopped mid-rollout with state_dir resumes at the same step, weights applied."""
    stable, canary = await upstreams.start(), await upstreams.start()
    cfg = {**rollout_config(stable.url, canary.url, steps=[10, 30, 60, 100], interval=0.4),
           "state_dir": str(tmp_path)}
    sc = await make_sidecar(cfg)
    async with traffic(client, sc.proxy_url):
        await until(lambda: sc.services.rollouts.by_route["fraud"].state.step == 1, 10, "step 1")
    status, _ = await post_action(client, sc, "pause")
    assert status == 200
    sc.request_stop()
    await asyncio.sleep(0.1)
    assert (tmp_path / "rollouts.json").exists()
    sc2 = await make_sidecar(cfg)
    doc = await rollout_of(client, sc2)
    assert doc["state"] == "paused" and doc["step"] == 1
    assert doc["weights"] == {"canary": 30, "stable": 70}
    route = sc2.runtime.plan.routes[0]
    assert sc2.runtime.splits["fraud"].weights[route.backends.index("canary")] == 30
    # another rollout config starts anew
    cfg3 = {**rollout_config(stable.url, canary.url, steps=[5, 100], interval=0.4), "state_dir": str(tmp_path)}
    sc2.request_stop()
    await asyncio.sleep(0.1)
    sc3 = await make_sidecar(cfg3)
    doc = await rollout_of(client, sc3)
    assert doc["state"] == "progressing" and doc["step"] == 0 and doc["weights"] == {"canary": 5, "stable": 95}


async def test_reload_keeps_an_unchanged_rollout_and_restarts_a_changed_one(upstreams, make_sidecar, client,
                                                                            tmp_path):
    """A reload that leaves the rollout block alone keeps its step (weights applied again); one that changes it
    starts at step 0."""
    from tests.shell.test_reload import write_config

    stable, canary = await upstreams.start(), await upstreams.start()
    cfg = rollout_config(stable.url, canary.url, steps=[10, 30, 60, 100], interval="1h")
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(cfg, path=path)
    status, _ = await post_action(client, sc, "pause")
    assert status == 200
    cfg["routes"][0]["timeout"] = "7s"            # the route changes (its override is cleared) ...
    write_config(path, cfg)
    async with client.post(sc.admin_url + "/admin/reload") as r:
        assert r.status == 200, await r.text()
    doc = await rollout_of(client, sc)
    assert doc["state"] == "paused"              # ... the rollout stays, and its weights apply again
    route = sc.runtime.plan.routes[0]
    assert sc.runtime.splits["fraud"].weights[route.backends.index("canary")] == 10
    cfg["routes"][0]["rollout"]["steps"] = [20, 100]
    write_config(path, cfg)
    async with client.post(sc.admin_url + "/admin/reload") as r:
        assert r.status == 200, await r.text()
    doc = await rollout_of(client, sc)
    assert doc["state"] == "progressing" and doc["step"] == 0 and doc["weights"] == {"canary": 20, "stable": 80}


async def test_dry_run_judges_but_changes_no_weight(upstreams, make_sidecar, client):
    """In dry run the rollout steps through its decisions and shows the weights it would set, routing unchanged."""
    stable, canary = await upstreams.start(), await upstreams.start()
    cfg = rollout_config(stable.url, canary.url, dry_run=True)
    cfg["routes"][0]["split"] = {"stable": 50, "canary": 50}
    sc = await make_sidecar(cfg)
    async with traffic(client, sc.proxy_url):
        doc = await wait_state(client, sc, "promoted", 10)
    assert doc["would_weights"] == {"canary": 100, "stable": 0}
    route = sc.runtime.plan.routes[0]
    assert sc.runtime.splits["fraud"].weights[route.backends.index("canary")] == 50
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", json={"canary": 1}) as r:
        assert r.status == 200


async def test_canary_whose_circuit_opens_fails_its_step_at_once(upstreams, make_sidecar, client):
    """A canary whose circuit breaker opens is rolled back at once, not at the interval's end."""
    stable, canary = await upstreams.start(), await upstreams.start(answer(status=500))
    cfg = rollout_config(stable.url, canary.url, steps=[50, 100], interval="1h")
    cfg["backends"]["canary"]["circuit_breaker"] = {"consecutive_failures": 3, "open_for": "60s"}
    sc = await make_sidecar(cfg)
    async with traffic(client, sc.proxy_url):
        doc = await wait_state(client, sc, "rolled_back", 5)
    assert doc["decisions"][-1]["gates"][0]["gate"] == "circuit"
    assert doc["weights"] == {"canary": 0, "stable": 100}


async def test_sigkilled_sidecar_resumes_its_rollout_at_the_same_step(upstreams, tmp_path):
    """A `sidecar run` killed with SIGKILL mid-rollout resumes, started again, at the step it had reached."""
    from tests.shell.test_lifecycle import start_process

    stable, canary = await upstreams.start(), await upstreams.start()
    cfg = {"listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "access_log": False,
           "drain": {"delay": 0, "grace": 2}, "state_dir": str(tmp_path / "state"),
           **rollout_config(stable.url, canary.url, steps=[10, 30, 60, 100], interval=0.4)}

    async def drain_stderr(proc: Any) -> None:
        while await proc.stderr.readline():
            pass

    proc, port, admin_port = await start_process(cfg, tmp_path)
    reader = asyncio.ensure_future(drain_stderr(proc))
    async with aiohttp.ClientSession() as s:
        async def at_step_1() -> bool:
            async with s.get(f"http://127.0.0.1:{admin_port}/admin/routes/fraud/rollout") as r:
                return bool((await r.json())["step"] == 1)

        async with traffic(s, f"http://127.0.0.1:{port}"):
            await until(at_step_1, 10, "step 1")
        async with s.post(f"http://127.0.0.1:{admin_port}/admin/routes/fraud/rollout/pause") as r:
            assert r.status == 200
        proc.kill()
        await proc.wait()
        await reader
        proc, port, admin_port = await start_process(cfg, tmp_path)
        reader = asyncio.ensure_future(drain_stderr(proc))
        try:
            async with s.get(f"http://127.0.0.1:{admin_port}/admin/routes/fraud/rollout") as r:
                doc = await r.json()
            assert doc["state"] == "paused" and doc["step"] == 1
            assert doc["weights"] == {"canary": 30, "stable": 70}
            async with s.get(f"http://127.0.0.1:{admin_port}/admin/status") as r:
                route = (await r.json())["routes"][0]
            assert route["current_weights"] == {"stable": 70.0, "canary": 30.0}
        finally:
            proc.terminate()
            await proc.wait()
            await reader
