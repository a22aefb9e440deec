"""Edge cases found in review: who answered after retries, clients that leave mid-upload,
half-open circuits under hedging, and reloads that change buffering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.config.model import BackendConfig
from sidecar.config.plan import BackendPlan
from sidecar.core.outcome import Outcome
from sidecar.shell.backend import Backend
from sidecar.shell.upstream import UpstreamFailure, header_block
from tests import upstreams as u
from tests.conftest import MakeSidecar, sidecar_config
from tests.shell.test_reload import admin, write_config


async def metric_lines(client: Any, admin_url: str, prefix: str) -> list[str]:
    async with client.get(admin_url + "/metrics") as r:
        return [line for line in (await r.text()).splitlines() if line.startswith(prefix)]


async def test_passed_answer_names_the_backend_that_gave_it(upstreams, make_sidecar: MakeSidecar, client):
    """When the last try fails without an answer, the earlier backend's 503 passes, named as its own."""
    bad = await upstreams.start(u.status(503, b'{"from": "bad"}'), name="bad")
    sc = await make_sidecar({
        "backends": {"bad": {"url": bad.url}, "dead": {"url": u.refused_url()}},
        "routes": [{"name": "r", "split": {"bad": 1, "dead": 1},
                    "retry": {"attempts": 2, "on": ["5xx", "connect-error"], "budget": 1.0}}]})
    for _ in range(12):
        async with client.post(sc.proxy_url + "/x", data=b"{}") as r:
            assert r.status == 503
            assert await r.read() == b'{"from": "bad"}'
            assert r.headers["x-sidecar-backend"] == "bad"
    lines = await metric_lines(client, sc.admin_url, "sidecar_requests_total")
    assert not any('backend="dead"' in line for line in lines), lines


async def test_client_leaving_mid_upload_is_not_a_500(upstreams, make_sidecar: MakeSidecar, client):
    """A client that closes while sending its body is counted (499, client_disconnects), never a 500."""
    up = await upstreams.start()
    sc = await make_sidecar({"backends": {"m": {"url": up.url}}, "routes": [{"name": "r", "split": {"m": 1}}]})
    _, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n0123456789")
    await writer.drain()
    writer.close()
    lines: list[str] = []
    for _ in range(100):
        lines = await metric_lines(client, sc.admin_url, "sidecar_client_disconnects_total")
        if lines:
            break
        await asyncio.sleep(0.02)
    assert lines == ['sidecar_client_disconnects_total{route="r"} 1.0']
    codes = await metric_lines(client, sc.admin_url, "sidecar_requests_total")
    assert any('code="499"' in line for line in codes) and not any('code="500"' in line for line in codes)
    assert up.hits == 0


async def test_try_on_a_half_open_circuit_without_probe_slots_fails_cleanly():
    """A try that finds the half-open circuit's probe taken fails unsent as a connect error."""
    cfg = BackendConfig.model_validate({"url": u.refused_url(), "circuit_breaker": {
        "consecutive_failures": 1, "open_for": "10ms", "half_open_probes": 1}})
    backend = Backend(BackendPlan.build("b", cfg), 1024)
    loop = asyncio.get_running_loop()
    assert backend.breaker is not None
    backend.breaker.record(True, loop.time())          # opens
    await asyncio.sleep(0.02)                           # half-open now
    assert backend.breaker.try_acquire(loop.time())     # another request took the one probe
    with pytest.raises(UpstreamFailure) as e:
        await backend.try_(0, "POST", "/x", header_block("POST", [], b""), b"", loop.time() + 1, loop.time() + 1)
    assert e.value.outcome is Outcome.CONNECT_ERROR and e.value.backend == "b"
    assert backend.endpoints.inflight == [0]
    await backend.close()


async def test_reload_changing_buffering_keeps_backend_state(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A new limits.buffer_response_bytes keeps every unchanged backend's pool and open circuit."""
    up = await upstreams.start()
    cfg = {"backends": {"m": {"url": up.url},
                        "dead": {"url": u.refused_url(), "circuit_breaker": {"consecutive_failures": 1,
                                                                              "open_for": "60s"}}},
           "routes": [{"name": "r", "split": {"m": 1, "dead": 0}, "override_header": "x-b"}]}
    path = tmp_path / "sidecar.yaml"
    sc = await make_sidecar(cfg, path=path, config_poll_s=0)
    async with client.post(sc.proxy_url + "/x", data=b"{}", headers={"x-b": "dead"}) as r:
        assert r.status == 502
    before = dict(sc.proxy.runtime.backends)
    cfg["limits"] = {"buffer_response_bytes": "2MiB"}
    await asyncio.to_thread(write_config, path, sidecar_config(cfg))
    status, doc = await admin(client, "POST", sc.admin_url + "/admin/reload")
    assert status == 200 and doc["result"] == "ok"
    assert all(sc.proxy.runtime.backends[n] is b for n, b in before.items())
    assert 'sidecar_circuit_state{backend="dead"} 2.0' in await metric_lines_text(client, sc.admin_url)


async def metric_lines_text(client: Any, admin_url: str) -> str:
    async with client.get(admin_url + "/metrics") as r:
        text: str = await r.text()
    return text
