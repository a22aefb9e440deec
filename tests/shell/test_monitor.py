"""Monitoring over real sockets: latency windows, sampling, drift in /admin/drift and metrics,
missing features, reference kinds, reload carry-over, the `sidecar reference` command."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from sidecar.cli import main as cli_main
from sidecar.config.load import LoadedConfig, config_version, load_config, parse_config
from sidecar.config.plan import Plan
from sidecar.core.drift import DriftPolicy, judge
from sidecar.demo.models import ModelSpec, RunningModel, make_instances, start_model_server
from sidecar.shell.monitor import load_reference_file
from sidecar.shell.runtime import Runtime
from sidecar.shell.server import Sidecar
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config
from tests.harness import until

PREDICT = "/v1/models/fraud:predict"


@pytest.fixture
async def models():
    running: list[RunningModel] = []

    async def start(shift: float = 0.0, seed: int = 0) -> RunningModel:
        m = await start_model_server(ModelSpec(name="fraud", version=f"s{shift}", shift=shift, latency_s=0.0,
                                               seed=seed))
        running.append(m)
        return m

    try:
        yield start
    finally:
        for m in running:
            await m.stop()


def monitor(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sample": 1.0, "window": 400,
        "features": {"amount": {"from": "request", "path": "$.instances[*].amount"},
                     "country": {"from": "request", "path": "$.instances[*].country", "kind": "categorical"},
                     "score": {"from": "response", "path": "$.predictions[*]"}},
        "reference": {"backend": "stable"},
        "drift": {"min_samples": 100, "every": "200ms", "p_value": 0.01, "psi": 0.2},
    }
    base.update(kw)
    return base


async def drive(client: aiohttp.ClientSession, url: str, n: int, seed: int, per_request: int = 5,
                drift: float = 0.0, concurrency: int = 16) -> list[int]:
    rng = np.random.default_rng(seed)
    bodies = [orjson.dumps({"instances": make_instances(per_request, rng, drift)}) for _ in range(n)]
    statuses: list[int] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(body: bytes) -> None:
        async with sem, client.post(url + PREDICT, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            statuses.append(r.status)

    await asyncio.gather(*(one(b) for b in bodies))
    return statuses


async def get_json(client: aiohttp.ClientSession, url: str) -> Any:
    async with client.get(url) as r:
        assert r.status == 200
        return await r.json()


async def wait_rows(client: aiohttp.ClientSession, sc: Sidecar, want: set[tuple[str, str]],
                    timeout_s: float = 10.0, n_cur: int = 0) -> dict[tuple[str, str], dict[str, Any]]:
    """Poll /admin/drift until every (backend, feature) in `want` has been judged, on at least `n_cur`
    current samples (a pass may run while the monitor worker is still taking in the last samples)."""
    async with asyncio.timeout(timeout_s):
        while True:
            doc = await get_json(client, sc.admin_url + "/admin/drift")
            rows = {(f["backend"], f["feature"]): f for r in doc["routes"] for f in r["features"]}
            if all(k in rows and rows[k]["status"] == "ok" and rows[k]["n_cur"] >= n_cur for k in want):
                return rows
            await asyncio.sleep(0.05)


async def metrics_text(client: aiohttp.ClientSession, sc: Sidecar) -> str:
    async with client.get(sc.admin_url + "/metrics") as r:
        return await r.text()


def sample_value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    del want
    return None


async def test_shifted_canary_drifts_and_stable_pair_does_not(models, make_sidecar: MakeSidecar, client):
    """A canary whose scores are shifted is reported drifted in /admin/drift and metrics; a second
    stable is not, and neither are the request features both get from the same traffic."""
    stable, stable2, canary = await models(0.0, 1), await models(0.0, 2), await models(2.5, 3)
    sc = await make_sidecar({
        "backends": {"stable": {"url": stable.url}, "stable2": {"url": stable2.url}, "canary": {"url": canary.url}},
        "routes": [{"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"},
                    "split": {"stable": 1, "stable2": 1, "canary": 1}, "monitor": monitor()}],
    })
    statuses = await drive(client, sc.proxy_url, 240, seed=7)
    assert statuses == [200] * 240
    rows = await wait_rows(client, sc, {(b, f) for b in ("stable2", "canary") for f in ("amount", "score", "country")})
    assert ("stable", "score") not in rows  # the reference is not compared with itself
    canary_score = rows[("canary", "score")]
    assert canary_score["drifted"] is True and canary_score["test"] == "ks"
    assert canary_score["p_value"] < 0.01 and canary_score["psi"] > 0.2 and canary_score["statistic"] > 0.3
    assert canary_score["n_ref"] >= 100 and canary_score["n_cur"] >= 100
    assert rows[("stable2", "score")]["drifted"] is False
    assert rows[("canary", "amount")]["drifted"] is False
    assert rows[("canary", "country")]["test"] == "chi2" and rows[("canary", "country")]["drifted"] is False

    # /admin/drift and /metrics read the same published pass; a later pass (every 200 ms, as the
    # last answers are parsed) may change the figures between two reads: take a pair of reads
    # with no pass between them
    want = {(b, f) for b in ("stable2", "canary") for f in ("amount", "score", "country")}
    text = ""

    async def same_pass() -> bool:
        nonlocal canary_score, text
        first = (await wait_rows(client, sc, want))[("canary", "score")]
        text = await metrics_text(client, sc)
        canary_score = (await wait_rows(client, sc, want))[("canary", "score")]
        return bool(first == canary_score)

    await until(same_pass, what="two reads of the same drift pass")
    assert sample_value(text, "sidecar_drift_detected", route="fraud", backend="canary", feature="score") == 1.0
    assert sample_value(text, "sidecar_drift_detected", route="fraud", backend="stable2", feature="score") == 0.0
    assert sample_value(text, "sidecar_drift_statistic", backend="canary", feature="score", test="ks") == \
        pytest.approx(canary_score["statistic"])
    assert sample_value(text, "sidecar_drift_statistic", backend="canary", feature="score", test="psi") == \
        pytest.approx(canary_score["psi"])
    assert sample_value(text, "sidecar_drift_statistic", backend="canary", feature="country", test="chi2") is not None
    assert sample_value(text, "sidecar_monitor_samples_total", route="fraud", backend="canary") is not None


async def test_latency_percentiles_for_every_request(upstreams, make_sidecar: MakeSidecar, client):
    """Every request feeds p50/p95/p99 and the error rate, with or without a monitor section."""
    ok = await upstreams.start(u.answer())
    bad = await upstreams.start(u.answer(status=503))
    sc = await make_sidecar({
        "backends": {"ok": {"url": ok.url}, "bad": {"url": bad.url}},
        "routes": [{"name": "a", "match": {"path_prefix": "/a"}, "split": {"ok": 1}},
                   {"name": "b", "match": {"path_prefix": "/b"}, "split": {"bad": 1}}],
    })
    for _ in range(20):
        async with client.post(sc.proxy_url + "/a", data=b"{}") as r:
            assert r.status == 200
        async with client.post(sc.proxy_url + "/b", data=b"{}") as r:
            assert r.status == 503
    status = sc.services.monitor.status_json()
    a = status["routes"]["a"]["ok"]
    assert a["count"] == 20 and a["error_rate"] == 0.0 and 0 < a["p50"] <= a["p95"] <= a["p99"]
    assert status["routes"]["b"]["bad"]["error_rate"] == 1.0
    assert status["backends"]["ok"]["count"] == 20
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_route_latency_seconds", route="a", backend="ok", quantile="0.99") is not None
    assert sample_value(text, "sidecar_route_error_ratio", route="b", backend="bad") == 1.0


async def test_missing_and_wrong_typed_features_are_counted(upstreams, make_sidecar: MakeSidecar, client):
    """Bodies without the feature, with a wrong-typed value, or not JSON at all are counted as
    missing samples; every request is still answered normally."""
    up = await upstreams.start(u.answer({"predictions": ["high", None]}))
    sc = await make_sidecar({
        "backends": {"m": {"url": up.url}},
        "routes": [{"name": "r", "split": {"m": 1}, "monitor": {
            "sample": 1.0, "features": {"x": {"from": "request", "path": "$.x"},
                                        "score": {"from": "response", "path": "$.predictions[*]"}}}}],
    })
    bodies = [b'{"x": 1.5}', b'{"y": 1}', b'{"x": "text"}', b"not json", b'{"x": [1]}']
    for body in bodies:
        async with client.post(sc.proxy_url + "/", data=body) as r:
            assert r.status == 200
    mon = sc.services.monitor
    await mon.tick(asyncio.get_running_loop())
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_monitor_missing_total", route="r", backend="m", feature="x") == 4.0
    # two wrong-typed predictions per answer, five answers
    assert sample_value(text, "sidecar_monitor_missing_total", route="r", backend="m", feature="score") == 10.0
    assert sample_value(text, "sidecar_monitor_samples_total", route="r", backend="m") == 5.0


async def test_unsampled_and_streamed_answers(upstreams, make_sidecar: MakeSidecar, client):
    """With sample 0 nothing is parsed; a streamed (chunked) answer gives no response features
    and is not counted missing."""
    up = await upstreams.start(u.chunked([b'{"predictions": ', b"[0.5]}"], content_type="application/json"))
    sc = await make_sidecar({
        "backends": {"m": {"url": up.url}},
        "routes": [{"name": "r", "split": {"m": 1}, "monitor": {
            "sample": 1.0, "features": {"score": {"from": "response", "path": "$.predictions[*]"}}}}],
    })
    for _ in range(3):
        async with client.post(sc.proxy_url + "/", data=b"{}") as r:
            assert await r.read() == b'{"predictions": [0.5]}'
    await sc.services.monitor.tick(asyncio.get_running_loop())
    text = await metrics_text(client, sc)
    assert sample_value(text, "sidecar_monitor_samples_total", route="r", backend="m") == 3.0
    assert sample_value(text, "sidecar_monitor_missing_total", route="r", backend="m", feature="score") is None


async def test_warmup_reference(models, make_sidecar: MakeSidecar, client):
    """{warmup: N}: a backend compared with its own first N samples drifts when its model changes."""
    model = await models(0.0)
    sc = await make_sidecar({
        "backends": {"m": {"url": model.url}},
        "routes": [{"name": "fraud", "split": {"m": 1}, "monitor": monitor(
            reference={"warmup": 150}, drift={"min_samples": 100, "every": "200ms"})}],
    })
    await drive(client, sc.proxy_url, 30, seed=1)  # exactly the 150 warm-up samples per feature
    model.spec.shift = 3.0
    await drive(client, sc.proxy_url, 40, seed=2)
    rows = await wait_rows(client, sc, {("m", "score"), ("m", "amount")}, n_cur=200)
    assert rows[("m", "score")]["drifted"] is True
    assert rows[("m", "score")]["n_ref"] == 150 and rows[("m", "score")]["n_cur"] == 200
    assert rows[("m", "amount")]["drifted"] is False
    doc = await get_json(client, sc.admin_url + "/admin/drift")
    assert doc["routes"][0]["reference"] == {"kind": "warmup", "warmup": 150}


async def test_file_reference(models, make_sidecar: MakeSidecar, client, tmp_path: Path):
    """{file: ...}: the backends are compared with a JSON file of reference samples."""
    model = await models(0.0)
    rng = np.random.default_rng(5)
    shifted = make_instances(600, rng, drift=1.5)
    same = make_instances(600, rng)
    ref = tmp_path / "ref.json"
    ref.write_bytes(orjson.dumps({"amount": [i["amount"] for i in shifted],
                                  "country": [i["country"] for i in same]}))
    sc = await make_sidecar({
        "backends": {"m": {"url": model.url}},
        "routes": [{"name": "fraud", "split": {"m": 1}, "monitor": monitor(reference={"file": str(ref)})}],
    })
    await drive(client, sc.proxy_url, 60, seed=3)
    rows = await wait_rows(client, sc, {("m", "amount"), ("m", "country")})
    assert rows[("m", "amount")]["drifted"] is True
    assert rows[("m", "country")]["drifted"] is False
    assert rows[("m", "score")]["status"] == "no_reference"


def test_reference_file_relative_to_config(tmp_path: Path):
    """Relative `reference.file` and `log.path` are resolved against the config file's folder."""
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(
        "backends: {m: {url: 'http://127.0.0.1:1'}}\n"
        "routes:\n- name: r\n  split: {m: 1}\n"
        "  monitor: {features: {x: {from: request, path: '$.x'}}, reference: {file: refs/r.json},\n"
        "            log: {path: logs/s.jsonl, redact: ['$.email']}}\n")
    plan = Plan.build(load_config(cfg))
    m = plan.routes[0].monitor
    assert m is not None and m.log is not None
    assert m.reference_file == tmp_path.resolve() / "refs/r.json"
    assert m.log.path == tmp_path.resolve() / "logs/s.jsonl"
    assert [p.text for p in m.log.redact] == ["$.email"]
    assert m.draw_below == 0.1 and m.log.sample == 0.1


@pytest.mark.parametrize(("monitor_cfg", "place", "text"), [
    ({"reference": {"backend": "zz"}}, "routes[0].monitor.reference.backend", "not in the route's split"),
    ({"reference": {"warmup": 10, "file": "x"}}, "routes[0].monitor.reference", "exactly one"),
    ({"features": {"f": {"from": "request", "path": "x.y"}}}, "routes[0].monitor.features.f.path", "bad JSON path"),
    ({"features": {"f": {"from": "body", "path": "$.x"}}}, "routes[0].monitor.features.f.from", "request"),
    ({"log": {"path": "s", "redact": ["$["]}}, "routes[0].monitor.log.redact[0]", "bad JSON path"),
    ({"sample": 1.5}, "routes[0].monitor.sample", "less than or equal"),
    ({"drift": {"every": "0s"}}, "routes[0].monitor.drift.every", "greater than 0"),
])
def test_config_errors_name_their_place(monitor_cfg, place, text):
    """Monitor config errors read like `routes[0].monitor.reference.backend: ...`."""
    import yaml

    from sidecar.errors import ConfigError

    cfg = sidecar_config({"backends": {"m": {"url": "http://127.0.0.1:1"}},
                          "routes": [{"name": "r", "split": {"m": 1}, "monitor": monitor_cfg}]})
    with pytest.raises(ConfigError) as e:
        parse_config(yaml.safe_dump(cfg))
    assert any(i.place == place and text in i.message for i in e.value.issues), e.value.issues


async def test_statistics_survive_reload_of_unchanged_routes(models, make_sidecar: MakeSidecar, client):
    """A reload keeps windows of unchanged routes and backends and drops those whose config changed."""
    stable, canary = await models(0.0), await models(2.5)
    base: dict[str, Any] = {
        "backends": {"stable": {"url": stable.url}, "canary": {"url": canary.url}},
        "routes": [{"name": "fraud", "match": {"path_prefix": "/v1/models/fraud"},
                    "split": {"stable": 1, "canary": 1}, "monitor": monitor()},
                   {"name": "other", "match": {"path_prefix": "/other"}, "split": {"stable": 1}}],
    }
    sc = await make_sidecar(base)
    await drive(client, sc.proxy_url, 80, seed=4)
    lat_before = sc.services.monitor.status_json()["routes"]["fraud"]["canary"]["count"]
    n_before = 5 * lat_before  # every sampled answer judged (5 scores each), not just some

    async def all_judged() -> bool:
        return bool((await wait_rows(client, sc, {("canary", "score")}))[("canary", "score")]["n_cur"] >= n_before)

    await until(all_judged, timeout_s=10, what="every canary score judged")

    def reload(cfg: dict[str, Any]) -> None:
        import yaml

        parsed, secrets = parse_config(yaml.safe_dump(sidecar_config(cfg)))
        plan = Plan.build(LoadedConfig(parsed, config_version(parsed), None, secrets))
        sc.adopt(Runtime.build(plan, sc.runtime))

    changed_other = {**base, "routes": [base["routes"][0], {**base["routes"][1], "timeout": 3}]}
    reload(changed_other)
    await asyncio.sleep(0.5)  # two drift passes on the new config
    after = await wait_rows(client, sc, {("canary", "score")})
    assert after[("canary", "score")]["n_cur"] == n_before
    assert sc.services.monitor.status_json()["routes"]["fraud"]["canary"]["count"] == lat_before

    changed_feature = {**base, "routes": [{**base["routes"][0], "monitor": monitor(window=300)},
                                          base["routes"][1]]}
    reload(changed_feature)
    async with asyncio.timeout(5):
        while True:
            doc = await get_json(client, sc.admin_url + "/admin/drift")
            rows = {(f["backend"], f["feature"]): f for f in doc["routes"][0]["features"]}
            if rows:
                break
            await asyncio.sleep(0.05)
    assert rows[("canary", "score")]["n_cur"] == 0 and rows[("canary", "score")]["status"] == "pending"


async def test_sample_log_and_reference_command(models, make_sidecar: MakeSidecar, client, tmp_path: Path):
    """The sample log is redacted JSONL, and `sidecar reference` turns it into a reference file."""
    model = await models(0.0)
    log_path = tmp_path / "samples.jsonl"
    cfg = {
        "backends": {"stable": {"url": model.url}},
        "routes": [{"name": "fraud", "split": {"stable": 1}, "monitor": monitor(
            log={"path": str(log_path), "sample": 1.0, "redact": ["$.instances[*].country"]})}],
    }
    sc = await make_sidecar(cfg)
    await drive(client, sc.proxy_url, 20, seed=9)
    mon = sc.services.monitor
    await mon.tick(asyncio.get_running_loop())
    sample_log = mon.sample_log("fraud")
    assert sample_log is not None
    await until(lambda: sample_log.written >= 20)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert len(lines) == 20
    first = lines[0]
    assert set(first) == {"time", "request_id", "route", "backend", "model", "version", "status", "request",
                          "response"}
    assert first["route"] == "fraud" and first["backend"] == "stable" and first["status"] == 200
    assert first["model"] is None and first["version"] is None   # no `model` configured (docs/registry.md)
    assert all(i["country"] == "[redacted]" for line in lines for i in line["request"]["instances"])
    assert isinstance(first["response"]["predictions"][0], float)

    config_file = tmp_path / "sidecar.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(sidecar_config(cfg)))
    out = tmp_path / "ref.json"
    code = await asyncio.to_thread(cli_main, ["reference", "-c", str(config_file), "--log", str(log_path),
                                              "--route", "fraud", "-o", str(out)])
    assert code == 0
    plan = Plan.build(load_config(config_file))
    m = plan.routes[0].monitor
    assert m is not None
    ref = load_reference_file(out, m.features)
    assert len(ref["amount"]) == 100 and len(ref["score"]) == 100
    assert len(ref["country"]) == 0  # redacted values are not a reference


async def test_unwritable_sample_log_is_counted_and_proxy_serves(upstreams, make_sidecar: MakeSidecar, client,
                                                                 tmp_path: Path):
    """A sample log that cannot be written is logged and counted; every request is still answered."""
    up = await upstreams.start(u.answer())
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    sc = await make_sidecar({
        "backends": {"m": {"url": up.url}},
        "routes": [{"name": "r", "split": {"m": 1}, "monitor": {
            "sample": 1.0, "log": {"path": str(not_a_dir / "samples.jsonl")}}}],
    })
    for _ in range(10):
        async with client.post(sc.proxy_url + "/", data=b'{"a": 1}') as r:
            assert r.status == 200
    mon = sc.services.monitor
    await mon.tick(asyncio.get_running_loop())
    sample_log = mon.sample_log("r")
    assert sample_log is not None
    await until(lambda: sample_log.dropped_total >= 10)
    text = await metrics_text(client, sc)
    assert (sample_value(text, "sidecar_sample_log_errors_total", route="r") or 0) >= 1
    assert sample_value(text, "sidecar_sample_log_dropped_total", route="r", reason="write_error") == 10.0
    async with client.post(sc.proxy_url + "/", data=b"{}") as r:
        assert r.status == 200


def test_drift_pass_20x2000_is_fast_and_off_the_loop():
    """A 20-feature x 2000-sample drift pass runs in the worker thread in well under a second,
    and the event loop keeps ticking meanwhile (figures in docs/performance.md#monitoring)."""
    import uvloop

    rng = np.random.default_rng(0)
    policy = DriftPolicy(min_samples=200)
    cats = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    data = []
    for i in range(20):
        if i % 4 == 3:
            data.append((f"f{i}", rng.choice(cats, 2000), rng.choice(cats, 2000), True))
        else:
            data.append((f"f{i}", rng.normal(0, 1, 2000), rng.normal(0.05 * i, 1, 2000), False))
    judge("warm", [0.0, 1.0], [1.0, 2.0], False, DriftPolicy(min_samples=1))  # scipy import, as the monitor does

    def pass_() -> float:
        t0 = time.perf_counter()
        for name, ref, cur, categorical in data:
            judge(name, ref, cur, categorical, policy)
        return time.perf_counter() - t0

    async def measure() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        worst = 0.0
        stop = False

        async def ticker() -> None:
            nonlocal worst
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t - 0.001)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.01)
        elapsed = min([await loop.run_in_executor(None, pass_) for _ in range(5)])
        stop = True
        await t
        return elapsed, worst

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        elapsed, worst_stall = runner.run(measure())
    print(f"\n20x2000 drift pass: {elapsed * 1000:.1f} ms; worst loop stall {worst_stall * 1000:.2f} ms")
    assert elapsed < 1.0  # the target is 100 ms; generous here because CI machines are shared
    assert worst_stall < 0.1


_SCIPY_AT_READY = """
import asyncio, json, sys
from tests.harness import SidecarFactory

async def main():
    factory = SidecarFactory()
    try:
        await factory.make(json.loads(sys.argv[1]))  # returns once the sidecar is ready
        print("scipy.stats" in sys.modules, flush=True)
    finally:
        await factory.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("reference", [{"backend": "stable"}, None])
def test_scipy_is_loaded_before_ready_only_when_drift_is_judged(reference: dict[str, str] | None):
    """Its import holds the GIL for long: done before the sidecar serves, and only where needed."""
    import json
    import subprocess
    import sys

    route_monitor = monitor(reference=reference) if reference else monitor()
    if reference is None:
        del route_monitor["reference"], route_monitor["drift"]
    config = {"backends": {"stable": {"url": "http://127.0.0.1:9"}, "canary": {"url": "http://127.0.0.1:9"}},
              "routes": [{"name": "m", "match": {"path_prefix": "/"}, "split": {"stable": 9, "canary": 1},
                          "monitor": route_monitor}]}
    out = subprocess.run([sys.executable, "-c", _SCIPY_AT_READY, json.dumps(config)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == str(reference is not None), out.stderr[-2000:]
