#!/usr/bin/env python3
"""Memory under sustained load: RSS of `sidecar run` sampled while wrk drives it.

Uses the shared bench harness's pieces (its upstream nginx config, wrk and wrk_post.lua),
all on 127.0.0.1. Prints one line per sample (elapsed s, requests so far, RSS MiB) and a
summary: RSS after `--requests` requests, and the growth between minute 2 and minute 4.

    python -m reliability.rss_soak --bench /work/shared/bench --minutes 4 --connections 64
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from reliability.common import rss_mib, stop_process_groups


def requests_total(admin: int) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^sidecar_requests_total\{[^}]*\} (\S+)$", text, re.M))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="/work/shared/bench")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1_000_000, help="report RSS once this many were served")
    ap.add_argument("--sidecar", default="sidecar")
    args = ap.parse_args()
    bench = Path(args.bench)
    run = Path(tempfile.mkdtemp(prefix="sidecar-rss-"))
    (run / "upstream-nginx-tmp").mkdir()
    ports = {"@STABLE_PORT@": "18481", "@CANARY_PORT@": "18482", "@PORT@": "18480", "@ADMIN_PORT@": "18580",
             "@RUN_DIR@": str(run)}

    def render(src: Path, dst: Path) -> Path:
        text = src.read_text()
        for k, v in ports.items():
            text = text.replace(k, v)
        dst.write_text(text)
        return dst

    up_conf = render(bench / "configs" / "upstream-nginx.conf", run / "upstream.conf")
    sc_conf = render(bench / "configs" / "sidecar.yaml", run / "sidecar.yaml")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", str(up_conf), "-g", "daemon off;"],
                                      start_new_session=True))
        sc = subprocess.Popen(["taskset", "-c", "1", args.sidecar, "run", "-c", str(sc_conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(sc)
        time.sleep(2)
        total_s = args.minutes * 60
        wrk = subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", f"-c{args.connections}", f"-d{int(total_s)}s",
                                "-s", str(bench / "wrk_post.lua"), "http://127.0.0.1:18480/v1/models/fraud:predict"],
                               stdout=subprocess.PIPE, start_new_session=True)
        procs.append(wrk)
        t0 = time.monotonic()
        samples: list[tuple[float, float, float]] = []
        at_target: tuple[float, float] | None = None
        while wrk.poll() is None:
            time.sleep(10)
            el, n, rss = time.monotonic() - t0, requests_total(18580), rss_mib(sc.pid)
            samples.append((el, n, rss))
            print(f"{el:6.0f}s {n:10.0f} requests  RSS {rss:6.1f} MiB", flush=True)
            if at_target is None and n >= args.requests:
                at_target = (n, rss)
        out = wrk.stdout.read().decode() if wrk.stdout else ""
        summary: dict[str, Any] = next(
            (json.loads(line[9:]) for line in out.splitlines() if line.startswith("WRK_JSON")), {})
        m2 = min(samples, key=lambda s: abs(s[0] - 120))
        m4 = min(samples, key=lambda s: abs(s[0] - 240))
        print(json.dumps({"requests": samples[-1][1], "errors": summary.get("errors"),
                          "rss_at_target_mib": at_target, "rss_min2_mib": m2[2], "rss_min4_mib": m4[2],
                          "growth_min2_to_min4_pct": round((m4[2] - m2[2]) / m2[2] * 100, 2)}))
        return 0
    finally:
        stop_process_groups(procs)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
