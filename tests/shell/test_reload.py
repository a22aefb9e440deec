"""Hot reload over real sockets: file edits, admin reloads, ConfigMap symlink swaps, SIGHUP,
invalid configs, state that survives, and weight overrides kept in state_dir."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from sidecar.shell.reload import Result
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config
from tests.harness import free_port, until

PREDICT = "/v1/models/fraud"


def fraud(stable: str, canary: str, *, weights: tuple[float, float] = (90, 10), timeout: str = "5s",
          canary_timeout: str = "5s", extra_routes: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return {
        "backends": {"stable": {"url": stable}, "canary": {"url": canary, "timeout": canary_timeout}},
        "routes": [{"name": "fraud", "match": {"path_prefix": PREDICT}, "timeout": timeout,
                    "split": {"stable": weights[0], "canary": weights[1]}}, *extra_routes],
    }


def write_config(path: Path, config: dict[str, Any] | str) -> None:
    """Replace the file as editors and config tools do: a new file renamed over the old one."""
    text = config if isinstance(config, str) else yaml.safe_dump(sidecar_config(config))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ConfigMap:
    """A Kubernetes ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()
        self._new_folder("")
        os.symlink(self.root / "..data" / "config.yaml", self.root / "config.yaml")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def _new_folder(self, text: str) -> None:
        self.generation += 1
        folder = self.root / f"..2024_01_01_00_00_0{self.generation}.{self.generation}"
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(folder.name, tmp)
        os.replace(tmp, self.root / "..data")   # the atomic swap kubelet does

    def swap(self, config: dict[str, Any]) -> None:
        self._new_folder(yaml.safe_dump(sidecar_config(config)))


async def admin(client: aiohttp.ClientSession, method: str, url: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with client.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_traffic_never_fails_during_reloads_weights_and_symlink_swap(
        upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """Clients see no failed request while the config is edited, reloaded, swapped and re-weighted."""
    stable = await upstreams.start(u.slow(0.003), name="stable")
    canary = await upstreams.start(u.slow(0.003), name="canary")
    cm = ConfigMap(tmp_path / "configmap")
    sc = await make_sidecar(fraud(stable.url, canary.url), path=cm.path, config_poll_s=0.05)
    stop = asyncio.Event()
    seen: list[tuple[float, int, str]] = []
    failures: list[str] = []

    async def worker() -> None:
        for _ in range(600):   # bounded, whatever happens
            if stop.is_set():
                return
            t = time.monotonic()
            try:
                async with client.post(sc.proxy_url + PREDICT, data=b'{"instances": [1]}') as r:
                    await r.read()
                    seen.append((t, r.status, r.headers.get("x-sidecar-backend", "")))
            except aiohttp.ClientError as e:
                failures.append(repr(e))

    workers = [asyncio.ensure_future(worker()) for _ in range(8)]
    try:
        await until(lambda: len(seen) > 50)
        # 1. the file is edited in place (inside the current ConfigMap folder): the watcher reloads
        n = sc.reloader.count
        await asyncio.to_thread(write_config, cm.path.resolve(), fraud(stable.url, canary.url, timeout="4s"))
        assert (await sc.reloader.wait_count(n + 1)).result is Result.OK
        # 2. an admin reload that changes the canary backend: it gets a new pool, the old one retires
        old_canary_pool = sc.proxy.runtime.backends["canary"]
        await asyncio.to_thread(write_config, cm.path.resolve(),
                                fraud(stable.url, canary.url, timeout="4s", canary_timeout="3s"))
        status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
        assert status == 200 and doc["result"] in ("ok", "unchanged")  # the watcher may have been first
        assert sc.proxy.runtime.backends["canary"] is not old_canary_pool
        await until(lambda: len(seen) > 300)
        # 3. kubelet swaps ..data to a new folder that adds a route (fraud itself unchanged)
        version = sc.proxy.runtime.plan.version
        other = {"name": "other", "match": {"path_prefix": "/other"}, "split": {"stable": 1}}
        n = sc.reloader.count
        await asyncio.to_thread(cm.swap, fraud(stable.url, canary.url, timeout="4s", canary_timeout="3s",
                                               extra_routes=(other,)))
        res = await sc.reloader.wait_count(n + 1)
        assert res.result is Result.OK and res.version != version
        assert "other" in sc.proxy.runtime.plan.routes_by_name
        # 4. blue-green: all traffic to the canary, at once
        status, doc = await admin(client, "PUT", sc.admin_url + "/admin/routes/fraud/weights",
                                  {"stable": 0, "canary": 100})
        assert status == 200 and doc["effective"] == {"stable": 0.0, "canary": 1.0}
        switched_at = time.monotonic()
        # 5. another swap that leaves the fraud route alone keeps the override
        n = sc.reloader.count
        await asyncio.to_thread(cm.swap, fraud(stable.url, canary.url, timeout="4s", canary_timeout="3s"))
        assert (await sc.reloader.wait_count(n + 1)).result is Result.OK
        count_after = len(seen)
        await until(lambda: len(seen) > count_after + 200)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert [s for s in seen if s[1] != 200] == []
    after = [backend for t, _, backend in seen if t > switched_at]
    assert len(after) > 200 and set(after) == {"canary"}
    split = sc.proxy.runtime.splits["fraud"]
    assert dict(zip(split.names, split.weights, strict=True)) == {"stable": 0.0, "canary": 100.0}
    await until(lambda: not sc.reloader.retired)   # the old canary pool closed once its requests ended


@pytest.mark.parametrize(("text", "expected"), [
    ("listen: [unclosed\n", "invalid YAML"),
    ("BAD_KEY", "unknown key 'surprise'"),
    ("BAD_BACKEND", "routes[0].split: unknown backend 'canary2'"),
])
async def test_invalid_config_rejected_and_old_one_keeps_serving(
        upstreams, make_sidecar: MakeSidecar, client, tmp_path, text, expected):
    """A broken edit is rejected with its error in status; the running config keeps serving."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    good = fraud(up.url, up.url)
    sc = await make_sidecar(good, path=path, config_poll_s=0)
    version = sc.proxy.runtime.plan.version
    if text == "BAD_KEY":
        text = yaml.safe_dump(sidecar_config({**good, "surprise": 1}))
    elif text == "BAD_BACKEND":
        bad = fraud(up.url, up.url)
        bad["routes"][0]["split"] = {"stable": 1, "canary2": 1}
        text = yaml.safe_dump(sidecar_config(bad))
    await asyncio.to_thread(write_config, path, text)
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 400 and doc["error"]["type"] == "invalid_config"
    assert any(expected in e for e in doc["error"]["errors"]), doc
    assert sc.proxy.runtime.plan.version == version
    async with client.post(sc.proxy_url + PREDICT, data=b"{}") as r:
        assert r.status == 200
    _, st = await admin(client, "GET", sc.admin_url + "/admin/status")
    assert st["version"] == version and st["last_reload"]["result"] == "error"
    assert any(expected in e for e in st["last_reload"]["errors"])
    async with client.get(sc.admin_url + "/metrics") as r:
        assert 'sidecar_config_reloads_total{result="error"} 1.0' in await r.text()
    # fixing the file makes the next reload succeed
    await asyncio.to_thread(write_config, path, fraud(up.url, up.url, weights=(50, 50)))
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 200 and doc["result"] == "ok" and doc["previous_version"] == version


def two_mistakes(stable: str, canary: str) -> dict[str, Any]:
    """A misspelt key in one backend and an unknown backend in the split."""
    bad = fraud(stable, canary)
    bad["backends"]["stable"]["timout"] = "2s"
    bad["routes"][0]["split"] = {"stable": 90, "canary2": 10}
    return bad


TWO_ERRORS = ["backends.stable: unknown key 'timout' (did you mean 'timeout'?)",
              "routes[0].split: unknown backend 'canary2' (known: canary, stable)"]


async def test_rejected_reload_lists_every_error(upstreams, make_sidecar: MakeSidecar, client, tmp_path, caplog):
    """A rejected reload answers, shows and logs every error of the file, its cross-references included."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    version = sc.proxy.runtime.plan.version
    await asyncio.to_thread(write_config, path, two_mistakes(up.url, up.url))
    with caplog.at_level(logging.ERROR, logger="sidecar.reload"):
        status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 400 and doc["error"]["errors"] == TWO_ERRORS
    _, st = await admin(client, "GET", sc.admin_url + "/admin/status")
    assert st["last_reload"]["errors"] == TWO_ERRORS
    assert [r.getMessage() for r in caplog.records if r.name == "sidecar.reload"] == [
        f"config rejected (admin), still running {version}: {'; '.join(TWO_ERRORS)}"]


async def test_reload_without_change_is_a_noop(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """Reloading an unchanged file changes nothing: same version, same runtime, counted as unchanged."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    rt = sc.proxy.runtime
    # rewriting the same content (new inode, new mtime) is not a change either
    await asyncio.to_thread(write_config, path, fraud(up.url, up.url))
    for _ in range(2):
        status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
        assert status == 200 and doc["result"] == "unchanged" and doc["version"] == rt.plan.version
    assert sc.proxy.runtime is rt
    async with client.get(sc.admin_url + "/metrics") as r:
        assert 'sidecar_config_reloads_total{result="unchanged"} 2.0' in await r.text()


async def test_listen_change_needs_a_restart(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A new listen address is rejected with a message saying it needs a restart."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    await asyncio.to_thread(write_config, path, {**fraud(up.url, up.url), "listen": "127.0.0.1:1"})
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 400
    assert doc["error"]["errors"] == ["listen: cannot change from 127.0.0.1:0 to 127.0.0.1:1 without a restart"]


async def test_in_memory_config_cannot_reload(upstreams, make_sidecar: MakeSidecar, client):
    """A sidecar started without a file says so when asked to reload."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 400 and "no config file" in doc["error"]["errors"][0]


async def test_unchanged_backend_keeps_pool_and_connection(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """After a reload, an unchanged backend's keep-alive connection is reused; a changed one gets a new pool."""
    a, b = await upstreams.start(name="a"), await upstreams.start(name="b")

    def two_routes(b_timeout: str) -> dict[str, Any]:
        return {"backends": {"a": {"url": a.url}, "b": {"url": b.url, "timeout": b_timeout}},
                "routes": [{"name": "ra", "match": {"path_prefix": "/a"}, "split": {"a": 1}},
                           {"name": "rb", "match": {"path_prefix": "/b"}, "split": {"b": 1}}]}

    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(two_routes("5s"), path=path, config_poll_s=0.05)
    for p in ("/a", "/b"):
        async with client.post(sc.proxy_url + p) as r:
            assert r.status == 200
    pool_a, pool_b = sc.proxy.runtime.backends["a"], sc.proxy.runtime.backends["b"]
    peer_a, peer_b = a.last.peer, b.last.peer
    await asyncio.to_thread(write_config, path, two_routes("4s"))
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 200 and doc["result"] == "ok"
    assert sc.proxy.runtime.backends["a"] is pool_a
    assert sc.proxy.runtime.backends["b"] is not pool_b
    for p in ("/a", "/b"):
        async with client.post(sc.proxy_url + p) as r:
            assert r.status == 200
    assert a.last.peer == peer_a      # the same pooled connection, before and after the reload
    assert b.last.peer != peer_b      # a new pool, a new connection
    await until(lambda: not sc.reloader.retired)


async def test_request_in_flight_finishes_on_removed_backend(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A request in flight to a backend a reload removes still gets its answer; the pool closes after."""
    release = asyncio.Event()
    stable = await upstreams.start(name="stable")
    canary = await upstreams.start(u.hang(release, then=u.answer(json={"from": "canary"})), name="canary")
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(fraud(stable.url, canary.url, weights=(0, 1)), path=path, config_poll_s=0.05)
    pending = asyncio.ensure_future(client.post(sc.proxy_url + PREDICT, data=b"{}"))
    await canary.wait_in_flight(1)
    old_pool = sc.proxy.runtime.backends["canary"]
    only_stable = {"backends": {"stable": {"url": stable.url}},
                   "routes": [{"name": "fraud", "match": {"path_prefix": PREDICT}, "split": {"stable": 1}}]}
    await asyncio.to_thread(write_config, path, only_stable)
    status, _ = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 200 and "canary" not in sc.proxy.runtime.backends
    assert sc.reloader.retired == [old_pool]          # kept open: a request still uses it
    async with client.post(sc.proxy_url + PREDICT, data=b"{}") as r:
        assert r.headers["x-sidecar-backend"] == "stable"
    release.set()
    async with await pending as r:
        assert r.status == 200 and await r.json() == {"from": "canary"}
    await until(lambda: not sc.reloader.retired)


async def test_weights_cleared_only_by_a_reload_that_changes_the_route(
        upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """An override stays through reloads of other routes and is cleared when its own route changes."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    other = {"name": "other", "match": {"path_prefix": "/other"}, "split": {"stable": 1}}
    sc = await make_sidecar(fraud(up.url, up.url), path=path, config_poll_s=0)
    url = sc.admin_url + "/admin/routes/fraud/weights"
    assert (await admin(client, "PUT", url, {"canary": 90}))[0] == 200
    await asyncio.to_thread(write_config, path, fraud(up.url, up.url, extra_routes=(other,)))
    _, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert doc["result"] == "ok" and doc["cleared_overrides"] == []
    assert set(sc.proxy.runtime.splits["fraud"].weights) == {90.0}
    await asyncio.to_thread(write_config, path, fraud(up.url, up.url, weights=(80, 20), extra_routes=(other,)))
    _, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert doc["result"] == "ok" and doc["cleared_overrides"] == ["fraud"]
    _, st = await admin(client, "GET", sc.admin_url + "/admin/status")
    route = st["routes"][0]
    assert route["override"] is False and route["current_weights"] == {"stable": 80.0, "canary": 20.0}


async def test_weights_survive_a_restart_and_drop_when_the_route_changed(
        upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """With state_dir, an override survives a restart, and is dropped when the route changed meanwhile."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    cfg = {**fraud(up.url, up.url), "state_dir": "state"}       # relative: next to the config file
    first = await make_sidecar(cfg, path=path)
    status, doc = await admin(client, "PUT", first.admin_url + "/admin/routes/fraud/weights", {"stable": 0})
    assert status == 200 and doc["persisted"] is True
    state = orjson.loads(await asyncio.to_thread((tmp_path / "state" / "state.json").read_bytes))
    assert state["weights"]["fraud"]["weights"] == {"stable": 0.0, "canary": 10.0}
    # a second process on the same config and state: the override is back
    second = await make_sidecar(cfg, path=tmp_path / "second.yaml")
    _, st = await admin(client, "GET", second.admin_url + "/admin/status")
    assert st["routes"][0]["override"] is True and st["routes"][0]["effective"] == {"stable": 0.0, "canary": 1.0}
    async with client.post(second.proxy_url + PREDICT) as r:
        assert r.headers["x-sidecar-backend"] == "canary"
    # the route changed while it was down: the override is dropped (and the file rewritten)
    changed = {**fraud(up.url, up.url, weights=(70, 30)), "state_dir": str(tmp_path / "state")}
    third = await make_sidecar(changed, path=tmp_path / "third.yaml")
    _, st = await admin(client, "GET", third.admin_url + "/admin/status")
    assert st["routes"][0]["override"] is False
    state = orjson.loads(await asyncio.to_thread((tmp_path / "state" / "state.json").read_bytes))
    assert state["weights"] == {}



async def test_sighup_reloads_a_running_process(upstreams, client, tmp_path):
    """`sidecar run` reloads its config on SIGHUP and exits 0 on SIGTERM."""
    up = await upstreams.start()
    path = tmp_path / "sidecar.yaml"
    admin_port = free_port()
    base = {"listen": f"127.0.0.1:{free_port()}", "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "drain": {"delay": 0, "grace": 2}, "access_log": False}
    await asyncio.to_thread(write_config, path, yaml.safe_dump({**base, **fraud(up.url, up.url)}))
    env = {**os.environ, "SIDECAR_CONFIG_POLL_S": "0"}     # only the signal may trigger the reload
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sidecar", "run", "-c", str(path),
                                                env=env, stderr=asyncio.subprocess.DEVNULL)
    admin_url = f"http://127.0.0.1:{admin_port}"
    try:
        async def version() -> str | None:
            try:
                async with client.get(admin_url + "/admin/status") as r:
                    return str((await r.json())["version"])
            except aiohttp.ClientConnectionError:
                return None

        async with asyncio.timeout(15):
            while (first := await version()) is None:  # noqa: ASYNC110 - another process: poll it
                await asyncio.sleep(0.05)
        await asyncio.to_thread(write_config, path,
                                yaml.safe_dump({**base, **fraud(up.url, up.url, weights=(1, 1))}))
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while await version() == first:  # noqa: ASYNC110 - another process: poll it
                await asyncio.sleep(0.05)
        async with client.get(admin_url + "/admin/status") as r:
            assert (await r.json())["last_reload"]["reason"] == "SIGHUP"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_open_breaker_survives_a_reload_that_keeps_its_backend(upstreams, make_sidecar: MakeSidecar, client,
                                                                    tmp_path):
    """A circuit open before a reload is still open after it when its backend did not change."""
    stable = await upstreams.start(name="stable")
    cfg = fraud(stable.url, u.refused_url())
    cfg["backends"]["canary"]["circuit_breaker"] = {"consecutive_failures": 1, "open_for": "60s"}
    cfg["routes"][0]["override_header"] = "x-sidecar-backend"
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(cfg, path=path, config_poll_s=0)
    async with client.post(sc.proxy_url + PREDICT, data=b"{}", headers={"x-sidecar-backend": "canary"}) as r:
        assert r.status == 502
    canary = sc.proxy.runtime.backends["canary"]
    assert str(canary.circuit_state(asyncio.get_running_loop().time())) == "open"
    cfg["routes"][0]["split"] = {"stable": 80, "canary": 20}     # the route changes, the backend does not
    await asyncio.to_thread(write_config, path, sidecar_config(cfg))
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 200 and doc["result"] == "ok"
    assert sc.proxy.runtime.backends["canary"] is canary
    async with client.get(sc.admin_url + "/metrics") as r:
        assert 'sidecar_circuit_state{backend="canary"} 2.0' in await r.text()
    for _ in range(20):  # the open canary takes nothing, though its weight is now 20
        async with client.post(sc.proxy_url + PREDICT, data=b"{}") as r:
            assert r.status == 200 and r.headers["x-sidecar-backend"] == "stable"
