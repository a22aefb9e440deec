"""A fleet of real `sidecar run` processes sharing a real `redis-server`: one rollout, one set of
weights, a leader replaced without losing the step, a store that goes away costing no request."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.harness import free_port, missing, until
from tests.upstreams import Upstream, UpstreamFactory

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

SYNC_S = 0.25
LEASE_S = 1.0



class RedisServer:
    """One redis-server on a loopback port, persistence off; stopped by its pid."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await until(self.ping, 10, "redis-server answering")

    async def ping(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return await asyncio.wait_for(reader.readline(), 1) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
        self.proc = None


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    if not os.path.exists(REDIS):  # noqa: ASYNC240 (a stat, before anything runs)
        missing("redis-server is not installed (Debian's redis-server; .ci/run installs it)")
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class Replica:
    """One `sidecar run` process; its log goes to a file (a pipe nobody reads would fill and stop it)."""

    def __init__(self, name: str, config: dict[str, Any], tmp: Path) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        (self.dir / "sidecar.yaml").write_text(yaml.safe_dump(config))
        self.log = self.dir / "log.jsonl"
        self.proc: asyncio.subprocess.Process | None = None
        self.port = self.admin = 0

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "run", "-c", str(self.dir / "sidecar.yaml"),
                stdout=asyncio.subprocess.DEVNULL, stderr=out, env={**os.environ, "SIDECAR_REPLICA_ID": self.name})

        def serving() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log.read_text()[-3000:]
            m = re.search(r"serving on [^:]+:(\d+), admin on [^:]+:(\d+)", self.log.read_text())
            if m:
                self.port, self.admin = int(m.group(1)), int(m.group(2))
            return m is not None

        await until(serving, 30, f"replica {self.name} serving")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


class Fleet:
    def __init__(self, session: aiohttp.ClientSession, replicas: list[Replica]) -> None:
        self.s = session
        self.replicas = replicas
        self.statuses: list[int] = []
        self.paused: set[str] = set()     # replicas the traffic leaves alone (killed or stopped)
        self.fail_via: str | None = None  # requests through this replica carry x-fail (the canary fails them)

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    async def get(self, r: Replica, path: str) -> Any:
        async with self.s.get(f"http://127.0.0.1:{r.admin}{path}", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def rollout(self, r: Replica) -> Any:
        return await self.get(r, "/admin/routes/r/rollout")

    async def leader(self) -> Replica:
        live = [r for r in self.replicas if r.name not in self.paused]

        async def agreed() -> str | None:
            views = [await self.get(r, "/admin/fleet") for r in live]
            leaders = {v["leader"] for v in views}
            if len(leaders) == 1 and None not in leaders and any(v["leading"] for v in views):
                return views[0]["leader"]  # type: ignore[no-any-return]
            return None

        name: list[str] = []

        async def found() -> bool:
            got = await agreed()
            if got:
                name.append(got)
            return bool(got)

        await until(found, 10, "one leader all live replicas agree on")
        return self.by_name(name[-1])

    async def traffic(self) -> None:
        """Requests to every live replica in turn, until cancelled; every status is kept."""
        i = 0
        while True:
            live = [r for r in self.replicas if r.name not in self.paused]
            r = live[i % len(live)]
            i += 1
            headers = {"x-fail": "1"} if r.name == self.fail_via else {}
            try:
                async with self.s.post(f"{r.url}/r/predict", data=b"{}", headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
                    if r.name not in self.paused:
                        self.statuses.append(resp.status)
            except (aiohttp.ClientError, TimeoutError):
                if r.name not in self.paused:
                    self.statuses.append(-1)
            await asyncio.sleep(0.004)   # pacing, ~150 requests/s over the fleet


async def model(request: web.BaseRequest, up: Upstream) -> web.StreamResponse:
    """The model: fails (500) requests that carry x-fail, answers the others."""
    await request.read()
    if request.headers.get("x-fail"):
        return web.json_response({"error": "boom"}, status=500)
    return web.json_response({"predictions": [0.5]})


def fleet_config(redis_url: str, stable: str, canary: str, **rollout: Any) -> dict[str, Any]:
    ro = {"canary": "canary", "baseline": "stable", "steps": [10, 50, 100], "interval": "1s",
          "min_requests": 5, "gates": {"max_error_rate": 0.2}, **rollout}
    return {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "access_log": False,
        "drain": {"delay": 0, "grace": 1},
        "fleet": {"redis": redis_url, "name": "test", "lease": f"{LEASE_S}s", "sync_every": f"{SYNC_S}s"},
        "backends": {"stable": {"url": stable}, "canary": {"url": canary}},
        "routes": [{"name": "r", "match": {"path_prefix": "/r"}, "split": {"stable": 100, "canary": 0},
                    "rollout": ro},
                   {"name": "plain", "match": {"path_prefix": "/plain"}, "split": {"stable": 100, "canary": 0}}],
    }


@pytest.fixture
async def fleet_of_three(redis_server: RedisServer, upstreams: UpstreamFactory, tmp_path: Path,
                         request: pytest.FixtureRequest) -> AsyncIterator[Fleet]:
    stable = await upstreams.start(model)
    canary = await upstreams.start(model)
    rollout = getattr(request, "param", {})
    cfg = fleet_config(redis_server.url, stable.url, canary.url, **rollout)
    replicas = [Replica(f"r{i}", cfg, tmp_path) for i in range(3)]
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        async with aiohttp.ClientSession() as s:
            yield Fleet(s, replicas)
    finally:
        for r in replicas:
            await r.stop()


async def run_traffic(fleet: Fleet) -> asyncio.Task[None]:
    task = asyncio.ensure_future(fleet.traffic())
    await until(lambda: len(fleet.statuses) > 20, 10, "traffic flowing")
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def weights_of(status: dict[str, Any], route: str) -> dict[str, float]:
    return next(r["current_weights"] for r in status["routes"] if r["name"] == route)


# A rollout too slow to finish during the test, for tests about weights and faults
SLOW = {"interval": "30s"}


@pytest.mark.parametrize("fleet_of_three", [SLOW], indirect=True)
async def test_weights_set_on_one_replica_apply_on_every_replica_within_sync_every(fleet_of_three: Fleet):
    """PUT weights on one replica: all three route by them within sync_every; DELETE clears them everywhere."""
    f = fleet_of_three
    await f.leader()
    r1 = f.replicas[1]
    t0 = time.monotonic()
    async with f.s.put(f"http://127.0.0.1:{r1.admin}/admin/routes/plain/weights",
                       json={"stable": 0, "canary": 100}) as resp:
        assert resp.status == 200, await resp.text()

    async def everywhere(want: dict[str, float]) -> bool:
        got = [weights_of(await f.get(r, "/admin/status"), "plain") for r in f.replicas]
        return all(w == want for w in got)

    await until(lambda: everywhere({"stable": 0.0, "canary": 100.0}), 5, "weights on every replica")
    took = time.monotonic() - t0
    assert took < SYNC_S + 0.5, f"took {took:.2f}s"
    # the rollout's weights are the fleet's too: the same on every replica
    views = [await f.rollout(r) for r in f.replicas]
    assert len({(v["state"], v["step"], json.dumps(v["weights"], sort_keys=True)) for v in views}) == 1
    async with f.s.delete(f"http://127.0.0.1:{f.replicas[2].admin}/admin/routes/plain/weights") as resp:
        assert resp.status == 200
    await until(lambda: everywhere({"stable": 100.0, "canary": 0.0}), 5, "cleared on every replica")


async def test_leader_killed_mid_rollout_another_goes_on_from_the_same_step(fleet_of_three: Fleet):
    """SIGKILL the leader at step 1: another replica leads within the lease and the rollout goes on to promotion
    from step 1, never from step 0, with no client request failing through the live replicas."""
    f = fleet_of_three
    task = await run_traffic(f)
    try:
        leader = await f.leader()
        other = next(r for r in f.replicas if r is not leader)
        await until(lambda: _step(f, other, 1), 15, "step 1")
        before = await f.rollout(other)
        f.paused.add(leader.name)
        leader.signal(signal.SIGKILL)
        t0 = time.monotonic()
        new = await f.leader()
        assert new is not leader and time.monotonic() - t0 < LEASE_S + 2.0
        await until(lambda: _state(f, other, "promoted"), 20, "promoted")
        after = await f.rollout(other)
        assert after["started_at"] == before["started_at"]
        moves = [(d["step"], d["action"]) for d in after["decisions"]]
        assert ("restart" not in {a for _, a in moves}) and moves[-1] == (2, "promote")
        assert {s for s, a in moves if a == "advance"} == {1, 2}   # advanced to 1 (old leader), then 2 (new)
    finally:
        await stop(task)
    assert set(f.statuses) == {200}, f"failed requests: {[s for s in f.statuses if s != 200][:10]}"


async def test_canary_failing_through_a_follower_only_is_rolled_back_by_the_leader(fleet_of_three: Fleet):
    """The canary fails only on traffic through a replica that does not lead; the leader sees the fleet's
    pooled counts and rolls it back."""
    f = fleet_of_three
    leader = await f.leader()
    follower = next(r for r in f.replicas if r is not leader)
    f.fail_via = follower.name
    task = await run_traffic(f)
    try:
        await until(lambda: _state(f, leader, "rolled_back"), 20, "rolled back")
    finally:
        await stop(task)
    doc = await f.rollout(leader)
    last = doc["decisions"][-1]
    assert last["action"] == "rollback" and "max_error_rate" in last["reason"]
    gate = next(g for g in last["gates"] if g["gate"] == "max_error_rate")
    # the leader's own canary traffic never failed: the failures it judged came from the follower
    assert gate["value"] > 0.2
    for r in f.replicas:   # every replica follows within sync_every
        await until(functools.partial(_state, f, r, "rolled_back"), 2, f"{r.name} rolled back")
        assert weights_of(await f.get(r, "/admin/status"), "r") == {"stable": 100.0, "canary": 0.0}


async def test_store_stopped_mid_rollout_pauses_it_and_costs_no_request(fleet_of_three: Fleet,
                                                                          redis_server: RedisServer):
    """Redis stops at step 1: requests go on, /readyz stays 200, the rollout pauses with the reason, admin
    changes get 503; Redis comes back empty: the replicas refill it (rollout state, weights) and the rollout
    goes on to promotion."""
    import redis.asyncio as ra

    f = fleet_of_three
    async with f.s.put(f"http://127.0.0.1:{f.replicas[1].admin}/admin/routes/plain/weights",
                       json={"stable": 50, "canary": 50}) as resp:
        assert resp.status == 200
    task = await run_traffic(f)
    try:
        await until(lambda: _step(f, f.replicas[0], 1), 15, "step 1")
        await redis_server.stop()
        down_at = len(f.statuses)
        for r in f.replicas:
            await until(functools.partial(_store_down, f, r), 5, "store seen down")
        note = (await f.rollout(f.replicas[0]))["fleet"]
        assert note["paused"].startswith("fleet store unreachable") and not note["judged_here"]
        for r in f.replicas:   # readiness does not depend on the store
            async with f.s.get(f"http://127.0.0.1:{r.admin}/readyz") as resp:
                assert resp.status == 200
        async with f.s.post(f"http://127.0.0.1:{f.replicas[1].admin}/admin/routes/r/rollout/pause") as resp:
            assert resp.status == 503 and (await resp.json())["error"]["type"] == "store_unavailable"
        async with f.s.put(f"http://127.0.0.1:{f.replicas[2].admin}/admin/routes/plain/weights",
                           json={"canary": 1}) as resp:
            assert resp.status == 503
        step_while_down = (await f.rollout(f.replicas[0]))["step"]
        await until(lambda: len(f.statuses) > down_at + 200, 15, "traffic while the store is down")
        assert (await f.rollout(f.replicas[0]))["step"] == step_while_down    # nobody judged
        await redis_server.start()   # empty: persistence is off
        await until(lambda: _state(f, f.replicas[1], "promoted"), 25, "promoted after the store came back")
    finally:
        await stop(task)
    store = ra.Redis.from_url(redis_server.url, decode_responses=True)
    try:   # the weight override the store lost was written back by the replicas
        refilled = await store.hget("sidecar:fleet:{test}:state", "weights:plain")
    finally:
        await store.aclose(close_connection_pool=True)
    assert refilled is not None and json.loads(refilled)["weights"] == {"stable": 50.0, "canary": 50.0}
    for r in f.replicas:
        assert weights_of(await f.get(r, "/admin/status"), "plain") == {"stable": 50.0, "canary": 50.0}
    assert set(f.statuses) == {200}, f"failed requests: {[s for s in f.statuses if s != 200][:10]}"
    doc = await f.rollout(f.replicas[2])
    assert [d["action"] for d in doc["decisions"]].count("restart") == 0
    assert max(d["step"] for d in doc["decisions"] if d["action"] == "advance") == 2
    metrics = await _metrics(f, f.replicas[0])
    assert _value(metrics, "sidecar_fleet_sync_errors_total") > 0


async def test_a_stale_leader_is_refused_after_a_pause_past_its_lease(fleet_of_three: Fleet):
    """SIGSTOP the leader past its lease: another leads with a higher epoch; after SIGCONT the old one's renewal
    is refused, it follows, and the rollout goes on under the new leader."""
    f = fleet_of_three
    task = await run_traffic(f)
    try:
        old = await f.leader()
        epoch = (await f.get(old, "/admin/fleet"))["epoch"]
        f.paused.add(old.name)
        old.signal(signal.SIGSTOP)
        new = await f.leader()
        new_view = await f.get(new, "/admin/fleet")
        assert new is not old and new_view["epoch"] > epoch
        old.signal(signal.SIGCONT)
        f.paused.discard(old.name)

        async def deposed() -> bool:
            v = await f.get(old, "/admin/fleet")
            return v["leader"] == new.name and not v["leading"] and v["epoch"] == new_view["epoch"]

        await until(deposed, 5, "the old leader follows")
        metrics = await _metrics(f, old)
        assert _value(metrics, 'sidecar_fleet_writes_refused_total{reason="lease"}') >= 1
        await until(lambda: _state(f, old, "promoted"), 20, "promoted")
    finally:
        await stop(task)
    assert set(f.statuses) == {200}


async def _step(f: Fleet, r: Replica, step: int) -> bool:
    return (await f.rollout(r))["step"] >= step  # type: ignore[no-any-return]


async def _state(f: Fleet, r: Replica, state: str) -> bool:
    return (await f.rollout(r))["state"] == state  # type: ignore[no-any-return]


async def _store_down(f: Fleet, r: Replica) -> bool:
    return not (await f.get(r, "/admin/fleet"))["store"]["healthy"]


async def _metrics(f: Fleet, r: Replica) -> str:
    async with f.s.get(f"http://127.0.0.1:{r.admin}/metrics") as resp:
        return await resp.text()


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# -- in one process ---------------------------------------------------------------------------------


async def test_a_leaders_write_is_refused_once_the_lease_is_not_its_own(redis_server: RedisServer, upstreams,
                                                                        make_sidecar):
    """Another holder in the lease (what a successor writes): the leader's next judgement is refused by the
    store and carried out nowhere: the stored state and this replica's decisions stay as they were."""
    import redis.asyncio as ra

    up = await upstreams.start(model)
    cfg = fleet_config(redis_server.url, up.url, up.url, interval="300ms")
    cfg["fleet"].update(lease="12s", sync_every="3s")   # no round during the test: the view still says leading
    sc = await make_sidecar(cfg)
    fleet = sc.services.fleet
    assert fleet is not None and fleet.view.leading
    store = ra.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        prefix = "sidecar:fleet:{test}:"
        before = await store.hgetall(prefix + "state")
        decisions = len(sc.services.rollouts.by_route["r"].state.decisions)
        await store.set(prefix + "lease", "intruder|99", px=60_000)
        refused = sc.services.metrics.fleet_writes_refused.labels("epoch")
        await until(lambda: refused.value >= 1, 2.5, "a refused write")
        assert await store.hgetall(prefix + "state") == before
        assert len(sc.services.rollouts.by_route["r"].state.decisions) == decisions
    finally:
        await store.aclose(close_connection_pool=True)


def test_without_fleet_nothing_of_it_runs_and_redis_is_not_imported(tmp_path: Path):
    """A sidecar without `fleet` never loads the Redis client and serves /admin/fleet as a fleet of none."""
    code = (
        "import sys, yaml\n"
        "from sidecar.config.load import LoadedConfig, config_version, parse_config\n"
        "from sidecar.shell.server import Sidecar\n"
        "cfg, secrets = parse_config(yaml.safe_dump({'backends': {'m': {'url': 'http://127.0.0.1:9'}},"
        " 'routes': [{'name': 'r', 'split': {'m': 1}}]}), env={})\n"
        "sc = Sidecar(LoadedConfig(cfg, config_version(cfg), None, secrets))\n"
        "assert sc.services.fleet is None and 'fleet' not in sc.services.tasks()\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


async def test_a_replica_whose_rollout_config_differs_applies_nothing_of_it_and_shows_the_skew(
        redis_server: RedisServer, upstreams, make_sidecar, monkeypatch, client):
    """A replica with other rollout steps than the fleet's: its route keeps the configured split, /admin/fleet
    shows the skew (on it and, for it, on the leader), and it refuses to steer that rollout (409)."""
    up = await upstreams.start(model)
    monkeypatch.setenv("SIDECAR_REPLICA_ID", "a")
    a = await make_sidecar(fleet_config(redis_server.url, up.url, up.url, interval="30s"))
    monkeypatch.setenv("SIDECAR_REPLICA_ID", "b")
    b = await make_sidecar(fleet_config(redis_server.url, up.url, up.url, interval="30s", steps=[20, 100]))
    assert a.services.fleet is not None and a.services.fleet.view.leading
    async with client.get(b.admin_url + "/admin/fleet") as resp:
        doc = await resp.json()
    assert doc["leader"] == "a" and [s["route"] for s in doc["skew"]] == ["r"]
    assert weights_of(await (await client.get(b.admin_url + "/admin/status")).json(), "r") == \
        {"stable": 100.0, "canary": 0.0}
    assert weights_of(await (await client.get(a.admin_url + "/admin/status")).json(), "r") == \
        {"stable": 90.0, "canary": 10.0}

    async def leader_sees_it() -> bool:
        async with client.get(a.admin_url + "/admin/fleet") as resp:
            members = {m["replica"]: m["skew"] for m in (await resp.json())["members"]}
        return members == {"a": [], "b": ["r"]}

    await until(leader_sees_it, 3, "the leader sees b's skew")
    async with client.post(b.admin_url + "/admin/routes/r/rollout/pause") as resp:
        assert resp.status == 409 and "differs from the fleet's" in (await resp.json())["error"]["message"]
    async with client.post(a.admin_url + "/admin/routes/r/rollout/pause") as resp:
        assert resp.status == 200
