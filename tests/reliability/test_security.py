"""Security properties: no request data in metric labels; the access log never carries the
Authorization header, cookies or query strings; the sample log never carries redacted
fields (request or response) nor any header.

Elsewhere, not repeated here: the admin token on every admin endpoint but /healthz, /readyz
and /metrics, driven from the admin app's router so a new endpoint cannot be forgotten, and
403 for mutating calls on a non-loopback listener without a token (tests/shell/test_admin.py);
the same with random tokens, methods and paths (tests/reliability/test_fuzz_admin.py);
masked secrets in /admin/config (tests/shell/test_admin.py); redaction in mirror
disagreements (tests/shell/test_mirror.py) and in the sample log's record shape
(tests/shell/test_monitor.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets

import orjson

from reliability.common import metric
from sidecar.core.feedback import JoinOutcome
from sidecar.core.outcome import Outcome
from sidecar.core.retry import NoRetry
from sidecar.core.rollout import DecisionVerdict
from sidecar.core.rollout import State as RolloutStateName
from sidecar.shell.mirror import MirrorOutcome
from sidecar.shell.notify import OUTCOMES as NOTIFY_OUTCOMES
from sidecar.shell.samplelog import DROP_REASONS
from tests import upstreams as u
from tests.conftest import MakeSidecar


def token() -> str:
    return "leak" + secrets.token_hex(6)


async def test_no_request_data_in_metric_labels(upstreams, make_sidecar: MakeSidecar, client):
    """Random paths, queries, header names and values, override names, sticky keys: none reaches /metrics."""
    stable, canary = await upstreams.start(name="stable"), await upstreams.start(u.status(500), name="canary")
    shadow = await upstreams.start(u.echo(), name="shadow")
    # every capability that makes labels: retries, fallback, breaker, endpoints and health
    # checks, a mirror with comparison, monitoring with features and a reference
    sc = await make_sidecar({
        "backends": {"stable": {"endpoints": [stable.url, stable.url], "health_check": {"interval": "1s"},
                                "outlier": {}},
                     "canary": {"url": canary.url, "circuit_breaker": {}}, "shadow": {"url": shadow.url},
                     "down": {"url": u.refused_url()}},
        "routes": [{"name": "r", "match": {"path_prefix": "/v1", "methods": ["POST"]},
                    "split": {"stable": 50, "canary": 50}, "sticky": {"header": "x-user-id"},
                    "override_header": "x-backend", "retry": {"attempts": 2, "on": ["5xx", "connect-error"]},
                    "mirror": [{"backend": "shadow", "compare": {"path": "$.predictions[*]"}}],
                    "monitor": {"sample": 1.0, "reference": {"backend": "stable"}, "drift": {"min_samples": 5,
                                                                                            "every": "100ms"},
                                "features": {"f": {"from": "request", "path": "$.x"}}},
                    "rollout": {"canary": "canary", "baseline": "stable", "steps": [50, 100], "interval": "1h",
                                "notify": {"webhook": u.refused_url(), "timeout": "100ms"}},
                    "feedback": {"path": "/fb", "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                                 "segments": {"seg": {"from": "request", "path": "$.seg", "values": ["a", "b"]}}}},
                   {"name": "down", "match": {"path_prefix": "/down"}, "split": {"down": 1},
                    "fallback": [{"response": {"status": 200, "json": {"fallback": True}}}]}]})
    sent: list[str] = []
    for i in range(60):
        t = [token() for _ in range(7)]
        sent += t
        path = ("/v1/" if i % 3 else "/down/" if i % 2 else "/nope/") + t[0] + f"?q={t[1]}"
        headers = {"x-user-id": t[2], "x-backend": t[3] if i % 2 else "canary", "x-request-id": t[4],
                   f"x-{t[5]}": t[6], "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
        method = "POST" if i % 5 else "PUT"
        body = orjson.dumps({"x": i, t[5]: t[6], "seg": t[6] if i % 4 else "a"})
        async with client.request(method, sc.proxy_url + path, data=body, headers=headers) as r:
            await r.read()
        # feedback for this id (joined or not) and for made-up ids, with made-up labels
        feedback = [{"request_id": t[4], "label": t[5] if i % 2 else 1}, {"request_id": t[0], "label": t[1]}]
        async with client.post(sc.proxy_url + "/fb", data=orjson.dumps(feedback)) as r:
            await r.read()
    async with client.get(sc.admin_url + "/metrics") as r:
        text = await r.text()
    assert {"endpoint", "outcome", "reason", "kind", "segment", "value", "metric"} <= set(re.findall(r'(\w+)="', text))
    assert "leak" not in text, [line for line in text.splitlines() if "leak" in line][:5]
    # every label value comes from the config or a fixed enumeration (a new label name must be added here)
    allowed = {"route": {"r", "down", "(no_route)", "(feedback)"},
               "backend": {"stable", "canary", "shadow", "down", "fallback:response", ""},
               "reason": {"max_inflight", "max_connections", *map(str, NoRetry), *DROP_REASONS,
                          "streamed", "error_status", "queue_full"},
               "phase": {"header", "write"},
               "outcome": set(map(str, Outcome)) | set(map(str, MirrorOutcome)) | set(map(str, JoinOutcome)),
               "kind": {"backend", "response"}, "segment": {"seg"}, "value": {"a", "b", "other"},
               "metric": {"accuracy"},
               "result": {"ok", "unchanged", "error"}, "quantile": {"0.5", "0.95", "0.99"},
               "feature": {"f"}, "test": {"ks", "chi2"}, "endpoint": {"0", "1"},
               "state": set(map(str, RolloutStateName)), "verdict": set(map(str, DecisionVerdict))}
    allowed["outcome"] |= set(NOTIFY_OUTCOMES)
    for line in text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        for name, value in re.findall(r'(\w+)="([^"]*)"', line):
            if name == "le":
                continue
            if name == "code":
                assert value.isdigit(), line
            elif name == "version":
                assert re.fullmatch(r"[0-9a-f]{12}", value), line
            else:
                assert value in allowed.get(name, set()), f"label {name}={value!r} is not a config name: {line}"


async def test_access_log_never_has_authorization_cookies_or_query(upstreams, make_sidecar: MakeSidecar, client,
                                                                   tmp_path):
    """Authorization, Proxy-Authorization, Cookie values and query strings never reach the access log."""
    up = await upstreams.start()
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    secret = token()
    try:
        sc = await make_sidecar({"access_log": True, "backends": {"m": {"url": up.url}},
                                 "routes": [{"name": "r", "split": {"m": 1}}]}, access_log_fd=fd)
        for i in range(5):
            async with client.post(sc.proxy_url + f"/v1/models/m:predict?api_key={secret}", data=b"{}", headers={
                    "Authorization": f"Bearer {secret}", "Proxy-Authorization": f"Basic {secret}",
                    "Cookie": f"session={secret}", "x-request-id": f"rid-{i}"}) as r:
                assert r.status == 200
        for _ in range(60):
            if path.read_bytes().count(b"\n") >= 5:
                break
            await asyncio.sleep(0.05)
        text = path.read_bytes()
    finally:
        os.close(fd)
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    assert secret.encode() not in text
    assert b"authorization" not in text.lower() and b"cookie" not in text.lower()
    assert all(rec["path"] == "/v1/models/m:predict" for rec in lines)


async def test_sample_log_never_has_redacted_fields_or_headers(upstreams, make_sidecar: MakeSidecar, client,
                                                                tmp_path):
    """Redacted request and response fields, the Authorization header and cookies never reach the sample log."""
    secret = token()
    up = await upstreams.start(u.answer(json={"predictions": [0.5], "user": {"email": f"{secret}@example.com"}}))
    path = tmp_path / "samples.jsonl"
    monitor = {"sample": 1.0, "log": {"path": str(path), "redact": ["$.user.email", "$.instances[*].ssn"]}}
    sc = await make_sidecar({"backends": {"m": {"url": up.url}},
                             "routes": [{"name": "r", "split": {"m": 1}, "monitor": monitor}]})
    n = 10
    for i in range(n):
        body = orjson.dumps({"user": {"email": f"{secret}@example.com", "plan": "gold"},
                             "instances": [{"ssn": f"{secret}-{i}", "amount": i}]})
        async with client.post(sc.proxy_url + f"/v1/models/m:predict?api_key={secret}", data=body, headers={
                "Authorization": f"Bearer {secret}", "Cookie": f"session={secret}", "x-api-key": secret}) as r:
            assert r.status == 200
    for _ in range(200):
        async with client.get(sc.admin_url + "/metrics") as r:
            if metric(await r.text(), "sidecar_sample_log_lines_total", 'route="r"') >= n:
                break
        await asyncio.sleep(0.05)
    text = path.read_bytes()
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert len(lines) == n
    assert secret.encode() not in text
    assert b"authorization" not in text.lower() and b"cookie" not in text.lower() and b"bearer" not in text.lower()
    for line in lines:
        assert line["request"]["user"] == {"email": "[redacted]", "plan": "gold"}
        assert line["request"]["instances"][0]["ssn"] == "[redacted]"
        assert line["response"]["user"]["email"] == "[redacted]"
        assert "headers" not in line and "query" not in line
