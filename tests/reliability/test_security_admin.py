"""Security of the admin listener and of the files the sidecar writes, over real sockets:
a stalled sample log bounded by bytes, non-UTF-8 bearer tokens, cross-origin and DNS-rebinding
requests to a token-less loopback admin, planted symlinks where the sidecar writes, and URL
passwords that contain `@`.

Elsewhere, not repeated here: the token on every endpoint and 403 on a non-loopback listener
without a token (tests/shell/test_admin.py), the sample log's rotation and error policy
(tests/shell/test_samplelog.py), label values never taken from requests
(tests/reliability/test_security.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from reliability.common import metric
from sidecar.adminclient import AdminClient, AdminRefused
from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan
from sidecar.errors import ConfigError
from sidecar.shell.admin import mask_url
from sidecar.shell.reference import build_reference
from tests import upstreams as u
from tests.conftest import MakeSidecar
from tests.harness import sidecar_config, until
from tests.shell.test_reload import PREDICT, fraud

TOKEN = "s3cret-admin-token"
MiB = 1024**2


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange with bytes exactly as given (aiohttp's client would refuse them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace(b"\n", b"\r\n") + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head_out, _, body_out = data.partition(b"\r\n\r\n")
    status_line, *lines = head_out.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body_out


async def metrics_text(client: Any, sc: Any) -> str:
    async with client.get(sc.admin_url + "/metrics") as r:
        assert r.status == 200
        return str(await r.text())


# -- 5. the sample log's queue is bounded by bytes ----------------------------------------------------------


def _drain_fifo(path: Path) -> None:
    """Read a FIFO until its writer closes it (frees a writer thread stalled on it)."""
    with path.open("rb") as fh:
        while fh.read(1 << 16):
            pass


async def test_stalled_sample_log_is_bounded_by_bytes(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """With the sample log's reader gone (a FIFO nobody reads), big sampled requests are still
    answered, the log holds at most `max_queue_bytes` and the rest is dropped and counted on
    /metrics; a reload raises the bound on the same writer."""
    up = await upstreams.start(u.answer(json={"predictions": [0.5]}))
    fifo = tmp_path / "samples.jsonl"
    os.mkfifo(fifo)
    cfg_path = tmp_path / "sidecar.yaml"

    def config(max_queue: str) -> dict[str, Any]:
        return {"backends": {"m": {"url": up.url}},
                "routes": [{"name": "r", "split": {"m": 1}, "monitor": {
                    "sample": 1.0, "log": {"path": str(fifo), "max_queue_bytes": max_queue}}}]}

    sc = await make_sidecar(config("1MiB"), path=cfg_path)
    body = orjson.dumps({"instances": [{"x": "a" * 300_000}]})   # one log line: ~300 KB
    queued: list[float] = []

    async def send(n: int) -> None:
        for _ in range(n):
            async with client.post(sc.proxy_url + "/v1/predict", data=body) as r:
                assert r.status == 200
            queued.append(metric(await metrics_text(client, sc), "sidecar_sample_log_queue_bytes", 'route="r"'))

    async def dropped_at_least(n: int) -> bool:
        text = await metrics_text(client, sc)
        queued.append(metric(text, "sidecar_sample_log_queue_bytes", 'route="r"'))
        return metric(text, "sidecar_sample_log_dropped_total", 'reason="queue_bytes"') >= n

    try:
        await send(20)
        await until(lambda: dropped_at_least(20 - MiB // len(body)), what="20 - 3 lines dropped for bytes")
        assert 0 < max(queued) <= MiB
        text = await metrics_text(client, sc)
        assert metric(text, "sidecar_sample_log_dropped_total", 'reason="queue_bytes",route="r"') == 17
        assert metric(text, "sidecar_sample_log_lines_total", 'route="r"') == 0
        # hot reload: the same writer keeps its queue and takes the new bound
        sample_log = sc.services.monitor.sample_log("r")
        cfg_path.write_text(yaml.safe_dump(sidecar_config(config("2MiB"))))
        async with client.post(sc.admin_url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        assert sc.services.monitor.sample_log("r") is sample_log
        queued.clear()
        await send(10)
        await until(lambda: dropped_at_least(17 + 10 - 3), what="7 more lines dropped for bytes")
        assert MiB < max(queued) <= 2 * MiB
    finally:
        threading.Thread(target=_drain_fifo, args=(fifo,), daemon=True).start()


def test_sample_log_queue_bound_default_and_validation():
    """Without `max_queue_bytes` a sample log queues at most 64 MiB; a bound under 64 KiB is refused."""
    log: dict[str, Any] = {"path": "s.jsonl"}
    base = {"backends": {"m": {"url": "http://127.0.0.1:9"}},
            "routes": [{"name": "r", "split": {"m": 1}, "monitor": {"log": log}}]}
    cfg, secrets = parse_config(yaml.safe_dump(sidecar_config(base)))
    monitor = Plan.build(LoadedConfig(cfg, config_version(cfg), None, secrets)).routes[0].monitor
    assert monitor is not None and monitor.log is not None and monitor.log.max_queue_bytes == 64 * MiB
    log["max_queue_bytes"] = "1KiB"
    with pytest.raises(ConfigError, match=r"routes\[0\]\.monitor\.log\.max_queue_bytes"):
        parse_config(yaml.safe_dump(sidecar_config(base)))


# -- 7. a bearer token that is not UTF-8 ----------------------------------------------------------------


@pytest.mark.parametrize("given_token", [b"\xff\xfe", b"\xc3\x28", TOKEN.encode() + b"\xff", b"\x80" + TOKEN.encode()])
async def test_non_utf8_bearer_token_is_a_json_401(upstreams, make_sidecar: MakeSidecar, given_token: bytes):
    """A bearer token of non-UTF-8 bytes gets the admin API's JSON 401, not a plain-text 500."""
    up = await upstreams.start()
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    for method, path in ((b"GET", b"/admin/status"), (b"POST", b"/admin/reload")):
        status, headers, body = await raw_request(sc.admin_port, method + b" " + path + b" HTTP/1.1\n"
                                                  b"Host: 127.0.0.1\nAuthorization: Bearer " + given_token
                                                  + b"\nContent-Length: 0\nConnection: close\n")
        assert status == 401, body
        assert headers["content-type"].startswith("application/json")
        assert orjson.loads(body)["error"]["type"] == "unauthorized"


async def test_non_ascii_token_is_compared_as_utf8_bytes(upstreams, make_sidecar: MakeSidecar):
    """A token with non-ASCII characters works when sent as its UTF-8 bytes, and only then."""
    up = await upstreams.start()
    token = "tök€n-ß"
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": token}})
    for sent, want in ((token.encode(), 200), (token.encode("latin-1", "replace"), 401), (b"t\xf6k", 401)):
        status, _, body = await raw_request(sc.admin_port, b"GET /admin/status HTTP/1.1\nHost: 127.0.0.1\n"
                                            b"Authorization: Bearer " + sent + b"\nConnection: close\n")
        assert status == want, (sent, body[:200])


# -- 8. cross-origin calls and DNS rebinding --------------------------------------------------------------


async def test_cross_origin_changes_are_refused(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A web page on another origin cannot reload the sidecar or change weights (403, JSON);
    the admin's own origin can."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url), path=tmp_path / "sidecar.yaml")
    before = sc.proxy.runtime.splits["fraud"]
    own = f"http://127.0.0.1:{sc.admin_port}"
    refused = [
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "null", "Content-Type": "text/plain"},
        {"Origin": f"http://127.0.0.1:{sc.admin_port + 1}"},
        {"Origin": f"http://localhost:{sc.admin_port}"},      # another origin, though the same machine
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": own, "Sec-Fetch-Site": "cross-site"},
    ]
    for headers in refused:
        for method, path, body in (("POST", "/admin/reload", b"x"),
                                   ("PUT", "/admin/routes/fraud/weights", b'{"canary": 100}'),
                                   ("DELETE", "/admin/routes/fraud/weights", b"")):
            async with client.request(method, sc.admin_url + path, data=body, headers=headers) as r:
                assert r.status == 403, (method, headers, await r.text())
                assert (await r.json())["error"]["type"] == "forbidden"
    assert sc.proxy.runtime.splits["fraud"] is before
    assert sc.reloader.last is None
    assert metric(await metrics_text(client, sc), "sidecar_config_reloads_total") == 0
    # the admin's own origin (a browser on the status page) and a GET from anywhere still work
    for headers in ({"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {}):
        async with client.post(sc.admin_url + "/admin/reload", headers=headers) as r:
            assert r.status == 200, (headers, await r.text())
    async with client.get(sc.admin_url + "/admin/status", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 200


async def test_dns_rebinding_host_is_refused_without_token(upstreams, make_sidecar: MakeSidecar, client):
    """Without a token, a loopback admin answers only requests addressed to a loopback name at its
    own port: a rebound name (Host: evil.example) gets 421 on every path, status and page included."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url))
    port = sc.admin_port
    paths = ["/", "/admin/status", "/admin/config", "/metrics", "/healthz", "/readyz", "/admin/openapi.json"]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}",
                 f"localhost:{port + 1}", "127.0.0.1", f"localhost.evil.example:{port}", f"[::2]:{port}"):
        for path in paths:
            async with client.get(sc.admin_url + path, headers={"Host": host}) as r:
                assert r.status == 421, (host, path, r.status)
                doc = await r.json()
                assert doc["error"]["type"] == "misdirected_request" and str(port) in doc["error"]["message"]
        async with client.post(sc.admin_url + "/admin/reload", headers={"Host": host}) as r:
            assert r.status == 421
    assert sc.reloader.last is None
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}", f"127.0.0.2:{port}"):
        for path in paths:
            async with client.get(sc.admin_url + path, headers={"Host": host}) as r:
                assert r.status == 200, (host, path, r.status)


async def test_with_token_host_is_free_but_origin_is_checked(upstreams, make_sidecar: MakeSidecar, client):
    """With a token, any Host name may be used (a proxy or a DNS name in front), but a foreign
    Origin still cannot change anything."""
    up = await upstreams.start()
    sc = await make_sidecar({**fraud(up.url, up.url), "admin": {"listen": "127.0.0.1:0", "token": TOKEN}})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client.get(sc.admin_url + "/admin/status", headers={**auth, "Host": "sidecar.internal:9901"}) as r:
        assert r.status == 200
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", json={"canary": 100},
                          headers={**auth, "Origin": "http://evil.example"}) as r:
        assert r.status == 403 and (await r.json())["error"]["type"] == "forbidden"
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", json={"canary": 100},
                          headers={**auth, "Host": "sidecar.internal:9901",
                                   "Origin": "https://sidecar.internal:9901"}) as r:
        assert r.status == 200   # a page served by the admin behind a TLS proxy that keeps the Host


async def test_status_page_and_cli_keep_working(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """The status page (as a browser loads it) and the `sidecar` CLI work against the default admin."""
    up = await upstreams.start()
    sc = await make_sidecar(fraud(up.url, up.url), path=tmp_path / "sidecar.yaml")
    own = f"127.0.0.1:{sc.admin_port}"
    browser = {"Host": own, "User-Agent": "Mozilla/5.0", "Accept": "text/html", "Sec-Fetch-Site": "none",
               "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    async with client.get(sc.admin_url + "/", headers=browser) as r:
        assert r.status == 200 and "/admin/status" in await r.text()
    fetch = {"Host": own, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Referer": f"http://{own}/"}
    async with client.get(sc.admin_url + "/admin/status", headers=fetch) as r:
        assert r.status == 200 and (await r.json())["routes"][0]["name"] == "fraud"
    for base in (sc.admin_url, f"http://localhost:{sc.admin_port}"):
        cli = AdminClient(base)
        assert (await asyncio.to_thread(cli.status))["routes"][0]["name"] == "fraud"
        assert (await asyncio.to_thread(cli.set_weights, "fraud", {"canary": 100}))["current_weights"]["canary"] == 100
        await asyncio.to_thread(cli.clear_weights, "fraud")
        assert "version" in await asyncio.to_thread(cli.reload)
    with pytest.raises(AdminRefused) as e:
        await asyncio.to_thread(AdminClient(sc.admin_url).set_weights, "fraud", {"nope": 1})
    assert e.value.status == 400


# -- 9. planted symlinks where the sidecar writes ----------------------------------------------------------


async def test_state_write_does_not_follow_a_planted_symlink(upstreams, make_sidecar: MakeSidecar, client,
                                                             tmp_path):
    """A weights PUT with `state_dir` never writes through a symlink planted at a temp name or at
    state.json: the file it points to stays as it was."""
    up = await upstreams.start()
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    planted = state / f".state.json.{os.getpid()}.tmp"   # the temp name the writer used to take
    planted.symlink_to(victim)
    sc = await make_sidecar({**fraud(up.url, up.url), "state_dir": str(state)})
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", json={"canary": 100}) as r:
        assert r.status == 200 and (await r.json())["persisted"] is True
    assert victim.read_bytes() == b"precious\n"
    assert planted.is_symlink()
    saved = state / "state.json"
    assert not saved.is_symlink() and orjson.loads(saved.read_bytes())["weights"]["fraud"]["weights"]["canary"] == 100
    assert saved.stat().st_mode & 0o777 == 0o600
    # a symlink planted at state.json itself is replaced, not written through
    saved.unlink()
    saved.symlink_to(victim)
    async with client.put(sc.admin_url + "/admin/routes/fraud/weights", json={"canary": 50}) as r:
        assert r.status == 200 and (await r.json())["persisted"] is True
    assert victim.read_bytes() == b"precious\n" and not saved.is_symlink()
    assert sorted(p.name for p in state.iterdir()) == sorted([planted.name, "state.json"])  # no temp file left


async def test_sample_log_does_not_write_through_a_symlink(upstreams, make_sidecar: MakeSidecar, client, tmp_path):
    """A symlink planted at the sample log's path is not written through: the lines are dropped
    and counted as write errors, the requests answered, the file it points to untouched."""
    up = await upstreams.start(u.answer(json={"predictions": [0.5]}))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    log_path = tmp_path / "samples.jsonl"
    log_path.symlink_to(victim)
    sc = await make_sidecar({"backends": {"m": {"url": up.url}}, "routes": [
        {"name": "r", "split": {"m": 1}, "monitor": {"sample": 1.0, "log": {"path": str(log_path)}}}]})
    for i in range(5):
        async with client.post(sc.proxy_url + "/v1/predict", data=orjson.dumps({"i": i})) as r:
            assert r.status == 200

    async def all_dropped() -> bool:
        return metric(await metrics_text(client, sc), "sidecar_sample_log_dropped_total", 'reason="write_error"') >= 5
    await until(all_dropped, what="5 lines dropped for write errors")
    text = await metrics_text(client, sc)
    assert metric(text, "sidecar_sample_log_errors_total", 'route="r"') >= 1
    assert metric(text, "sidecar_sample_log_lines_total", 'route="r"') == 0
    assert victim.read_bytes() == b"precious\n"


def test_reference_command_does_not_follow_a_planted_symlink(tmp_path):
    """`sidecar reference` writes its output without following a symlink planted at its old temp name."""
    base = {"backends": {"m": {"url": "http://127.0.0.1:9"}}, "routes": [
        {"name": "r", "split": {"m": 1}, "monitor": {"features": {"x": {"from": "request", "path": "$.x"}}}}]}
    cfg, secrets = parse_config(yaml.safe_dump(sidecar_config(base)))
    plan = Plan.build(LoadedConfig(cfg, config_version(cfg), None, secrets))
    log = tmp_path / "samples.jsonl"
    log.write_bytes(b"".join(orjson.dumps({"route": "r", "backend": "m", "status": 200, "request": {"x": i},
                                           "response": None}) + b"\n" for i in range(10)))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    out = tmp_path / "ref.json"
    (tmp_path / "ref.json.tmp").symlink_to(victim)
    assert build_reference(plan, "r", [log], out) == {"x": 10}
    assert victim.read_bytes() == b"precious\n"
    assert not out.is_symlink() and orjson.loads(out.read_bytes()) == {"x": list(map(float, range(10)))}


# -- 10. URL passwords containing '@' ------------------------------------------------------------------------

_USER = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%@"), max_size=12)
_PASSWORD = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%@:"), min_size=1, max_size=16)
_HOST = st.sampled_from(["127.0.0.1:9001", "models.internal", "[::1]:8080", "redis-0.redis:6379", "h"])
_PATH = st.sampled_from(["", "/", "/base/path", "/db?x=1", "/v1#frag", "?q=a@b", "/a@b/c"])


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(["http", "https", "redis", "rediss"]), user=_USER, password=_PASSWORD, host=_HOST,
       path=_PATH)
@example(scheme="http", user="user", password="p@ss", host="host", path="")
@example(scheme="http", user="a@b", password="p@ss@", host="host:1", path="/x@y")
def test_masked_url_never_shows_the_password(scheme: str, user: str, password: str, host: str, path: str):
    """Whatever a URL's password holds (`@` and `:` included), the masked URL keeps the user,
    host and path and shows `***` in the password's place."""
    url = f"{scheme}://{user}:{password}@{host}{path}"
    masked = mask_url(url)
    assert masked == f"{scheme}://{user}:***@{host}{path}"
    assume(password not in f"{scheme}://{user}:***@{host}{path}")
    assert password not in masked
    assert mask_url(f"see {url} and {url}") == f"see {masked} and {masked}"


@pytest.mark.parametrize("url", ["http://host/p", "http://user@host/p", "http://host/p?u=a:b@c", "plain text: a@b",
                                 "mailto:a:b@example.com"])
def test_urls_without_a_password_are_unchanged(url: str):
    """URLs without a password (and text that is no URL) are shown as they are."""
    assert mask_url(url) == url


async def test_password_with_at_sign_is_masked_in_admin(upstreams, make_sidecar: MakeSidecar, client):
    """/admin/config and /admin/status show `http://user:***@host`, never a piece of a password with `@`."""
    up = await upstreams.start()
    cfg = fraud("http://user:p@ss@127.0.0.1:9/base", up.url)
    sc = await make_sidecar(cfg)
    for path in ("/admin/config", "/admin/status"):
        async with client.get(sc.admin_url + path) as r:
            text = await r.text()
        assert "p@ss" not in text and "ss@" not in text, path
        assert "http://user:***@127.0.0.1:9/base" in text, path
    async with client.post(sc.proxy_url + PREDICT, data=b"{}") as r:
        await r.read()
