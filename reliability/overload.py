#!/usr/bin/env python3
"""Overload, the long run: the sidecar at its measured capacity and at twice it sheds with
503 `overloaded` instead of queueing, keeps admitted latency bounded, and recovers.

Uses the shared bench harness's pieces like reliability/rss_soak.py: its nginx fake model
(configs/upstream-nginx.conf) and wrk pinned to CPU 0, `sidecar run` alone on CPU 1.

    python -m reliability.overload --bench /work/shared/bench

Phases (each `--seconds` long):
  capacity   closed loop, `--capacity-connections` (below max_inflight): the req/s measured = R
  1x         fixed rate R over `--connections` connections (more than max_inflight)
  2x         fixed rate 2R, same connections
  recovery   fixed rate R/4 right after: no 503 at all, admitted p99 back to normal

The fixed-rate phases use the bench's wrk_rate.lua, patched to keep latencies of 200s only,
counted from the moment each was written to the moment its answer was read (`admitted
p50/p99`). Not corrected for coordinated omission on purpose: past capacity wrk falls behind
its own schedule, and the corrected figure would measure wrk's backlog, not the sidecar.
`server_p99_ms` is the upper bound of the `request_duration_seconds` bucket holding the 99th
percentile of admitted requests, as the sidecar measured them. 503s are wrk's `errors.status`,
cross-checked with the sidecar's `shed_requests_total`. Any other error (connect, read,
timeout, another status) is reported as `other_errors` and must be 0.

NOTE: other engineers run test suites on this machine in parallel: absolute figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from reliability.common import metric, rss_mib, stop_process_groups

PORTS = {"@STABLE_PORT@": "18681", "@CANARY_PORT@": "18682", "@PORT@": "18680", "@ADMIN_PORT@": "18780"}
URL = "http://127.0.0.1:18680/v1/models/fraud:predict"
ADMIN = "http://127.0.0.1:18780"


def sidecar_yaml(max_inflight: int) -> str:
    return f"""
listen: 127.0.0.1:18680
admin: {{listen: 127.0.0.1:18780}}
access_log: false
limits: {{max_inflight: {max_inflight}}}
backends:
  stable: {{url: "http://127.0.0.1:18681", max_connections: 1024}}
  canary: {{url: "http://127.0.0.1:18682", max_connections: 1024}}
routes:
  - name: models
    match: {{path_prefix: /}}
    split: {{stable: 90, canary: 10}}
"""


def scrape() -> str:
    return str(urllib.request.urlopen(ADMIN + "/metrics", timeout=5).read().decode())


def wrk(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(["taskset", "-c", "0", "wrk", *args], capture_output=True, text=True, check=True).stdout
    return next(json.loads(line[9:]) for line in out.splitlines() if line.startswith("WRK_JSON"))


def server_p99_ms(before: str, after: str) -> float:
    """Upper bound of the histogram bucket holding the 99th percentile of admitted requests."""
    def buckets(text: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for line in text.splitlines():
            if line.startswith("sidecar_request_duration_seconds_bucket{") and 'route="models"' in line:
                le = line.split('le="')[1].split('"')[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    b0, b1 = buckets(before), buckets(after)
    delta = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
    total = delta[-1][1] if delta else 0.0
    for le, cum in delta:
        if total and cum >= 0.99 * total:
            return le * 1000
    return float("nan")


def phase(name: str, rate: float, conns: int, seconds: int, script: Path, body: Path) -> dict[str, Any]:
    before = scrape()
    w = wrk([f"-t{conns}", f"-c{conns}", f"-d{seconds}s", "-s", str(script), URL, "--", str(body),
             str(int(rate)), str(conns)])
    after = scrape()
    shed = metric(after, "sidecar_shed_requests_total") - metric(before, "sidecar_shed_requests_total")
    admitted = metric(after, "sidecar_requests_total", 'code="200"') - metric(before, "sidecar_requests_total",
                                                                              'code="200"')
    e = w["errors"]
    return {"phase": name, "offered_rate": int(rate), "sent_rate": round(w["co_send_rate"]),
            "answered": w["requests"], "admitted": int(admitted), "shed_503": int(shed),
            "wrk_non_2xx": e["status"], "other_errors": e["connect"] + e["read"] + e["write"] + e["timeout"]
            + max(0, e["status"] - int(shed)),
            "admitted_p50_ms": w["co_latency_us"]["p50"] / 1000, "admitted_p99_ms": w["co_latency_us"]["p99"] / 1000,
            "wrk_all_p99_ms": w["latency_us"]["p99"] / 1000,
            "admitted_per_s": round(admitted / seconds), "server_p99_ms": server_p99_ms(before, after)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="/work/shared/bench")
    ap.add_argument("--max-inflight", type=int, default=32)
    ap.add_argument("--connections", type=int, default=96, help="for the fixed-rate phases (> max_inflight)")
    ap.add_argument("--capacity-connections", type=int, default=24)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sidecar", default=str(Path(sys.executable).parent / "sidecar"))
    args = ap.parse_args()
    bench = Path(args.bench)
    run = Path(tempfile.mkdtemp(prefix="sidecar-overload-"))
    (run / "upstream-nginx-tmp").mkdir()
    text = (bench / "configs" / "upstream-nginx.conf").read_text()
    for k, v in {**PORTS, "@RUN_DIR@": str(run)}.items():
        text = text.replace(k, v)
    (run / "upstream.conf").write_text(text)
    (run / "sidecar.yaml").write_text(sidecar_yaml(args.max_inflight))
    # wrk_rate.lua keeping latencies of 200s only: the admitted requests
    rate_lua = (bench / "wrk_rate.lua").read_text()
    anchor = "   local start = intended or sent_at\n"
    assert anchor in rate_lua, "wrk_rate.lua changed: update the patch"
    (run / "wrk_admitted.lua").write_text(
        rate_lua.replace(anchor, "   if status ~= 200 then return end\n   local start = sent_at\n"))
    body = bench / "payload.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", str(run / "upstream.conf"), "-g",
                                       "daemon off;"], start_new_session=True))
        sc = subprocess.Popen(["taskset", "-c", "1", args.sidecar, "run", "-c", str(run / "sidecar.yaml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(sc)
        time.sleep(2)
        c = args.capacity_connections
        cap = wrk(["-t1", f"-c{c}", f"-d{args.seconds}s", "-s", str(bench / "wrk_post.lua"), URL, "--", str(body)])
        capacity = cap["requests"] / (cap["duration_us"] / 1e6)
        print(json.dumps({"phase": "capacity", "connections": c, "req_per_s": round(capacity),
                          "errors": cap["errors"], "p99_ms": cap["latency_us"]["p99"] / 1000}), flush=True)
        results = []
        for name, factor in (("1x", 1.0), ("2x", 2.0), ("recovery", 0.25)):
            r = phase(name, capacity * factor, args.connections, args.seconds, run / "wrk_admitted.lua", body)
            results.append(r)
            print(json.dumps(r), flush=True)
        summary = {"max_inflight": args.max_inflight, "connections": args.connections,
                   "capacity_req_per_s": round(capacity), "rss_mib": round(rss_mib(sc.pid), 1),
                   "passed": all(r["other_errors"] == 0 for r in results) and results[-1]["shed_503"] == 0}
        print(json.dumps(summary), flush=True)
        return 0 if summary["passed"] else 1
    finally:
        stop_process_groups(procs)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
