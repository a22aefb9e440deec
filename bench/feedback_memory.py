#!/usr/bin/env python3
"""Memory per pending prediction of sidecar/core/feedback.py, and the cost of its batched calls.

    python3 bench/feedback_memory.py                  # 100,000 pending, each case in a fresh process
    python3 bench/feedback_memory.py --pending 1000000

Each case runs in a new Python process (so nothing allocated before skews it) that builds a
FeedbackTracker with the case's policy, captures `--pending` predictions from parsed
answers (request ids as the proxy makes them: 32 hex characters, a fresh str each) and adds
them in batches of 1000. Measured there:

- tracemalloc: bytes allocated and still held after the adds, divided by the count: what
  one pending prediction costs the store (its packed record with the id, the int key and
  the dict's slot, the two order arrays' entries); the parsed answers are dropped first;
- RSS: the process's VmRSS growth over the same span, which includes the allocator's
  slack and freed-but-kept memory, so it reads a little higher;
- time per item of `capture` and of `add_many`, of `join_many` of 1000 items, and of one
  full garbage collection with everything pending (the store is built to add nothing to it).

Then the memory of recent ids (`RecentIds`, which tells `expired` and `duplicate` from
`unknown`) is measured the same way in its steady state: `--pending` ids given up evenly
over `keep`, as when every prediction expires unlabelled.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.core.feedback import FeedbackPolicy, FeedbackTracker, Metric, RecentIds, SegmentPolicy  # noqa: E402
from sidecar.core.jsonpath import compile_path  # noqa: E402

CASES: dict[str, dict[str, Any]] = {
    "accuracy, threshold, 1 segment": {"metric": "accuracy", "threshold": 0.5, "segments": 1},
    "accuracy, threshold, no segment": {"metric": "accuracy", "threshold": 0.5, "segments": 0},
    "mae, 2 segments": {"metric": "mae", "threshold": None, "segments": 2},
}
BATCH = 1000
PREFIX = "5f2b9c0e1d3a4b6c"   # the proxy's ids: 16 hex of process prefix, 16 of counter


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def policy_of(case: dict[str, Any], n: int) -> FeedbackPolicy:
    segments = tuple(SegmentPolicy(name, "request", compile_path(f"$.instances[0].{name}"), values)
                     for name, values in [("country", ("US", "DE", "FR")), ("tier", ("gold", "silver"))]
                     [: case["segments"]])
    return FeedbackPolicy(metric=Metric(case["metric"]), keep_s=86400.0, max_pending=n, window=2000,
                          prediction_path=compile_path("$.predictions[0]"), threshold=case["threshold"],
                          segments=segments)


def full_gc_s() -> float:
    """The best of three full garbage collections, in seconds (the VM is shared: take the least disturbed)."""
    gc.collect()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t0)
    return best


def fill(tracker: FeedbackTracker, n: int) -> tuple[float, float]:
    """Capture and add n predictions in batches of BATCH; (seconds capturing, seconds adding)."""
    countries = ["US", "DE", "FR", "BR", "JP"]
    requests = [{"instances": [{"country": countries[i % 5], "tier": "gold", "amount": 12.5}]} for i in range(50)]
    capture_s = add_s = 0.0
    now = 1000.0
    for start in range(0, n, BATCH):
        t0 = time.perf_counter()
        batch = []
        for i in range(start, min(start + BATCH, n)):
            # a fresh answer per request, as orjson would give it; the id as the proxy makes it
            answer = {"predictions": [((i * 7919) % 1000) / 1000.0]}
            batch.append((f"{PREFIX}{i:016x}", tracker.capture("canary" if i % 10 == 0 else "stable",
                                                                now, requests[i % 50], answer)))
        t1 = time.perf_counter()
        tracker.add_many(batch, now)
        t2 = time.perf_counter()
        capture_s += t1 - t0
        add_s += t2 - t1
        now += 0.001
        del batch
    assert tracker.store.counts().pending == n
    return capture_s, add_s


def child(case_name: str, n: int, traced: bool) -> dict[str, Any]:
    """One case in this (fresh) process: tracemalloc figures when `traced`, else RSS and times
    (tracemalloc's own bookkeeping would inflate both)."""
    policy = policy_of(CASES[case_name], n)
    tracker = FeedbackTracker(policy, backends=("stable", "canary"))
    if not traced:
        gc0_s = full_gc_s()                            # nothing pending
        rss0 = rss_bytes()
        capture_s, add_s = fill(tracker, n)
        rss1 = rss_bytes()
        gc_s = full_gc_s()                             # everything pending
        items = [{"request_id": f"{PREFIX}{i:016x}", "label": i % 2} for i in range(BATCH)]
        t0 = time.perf_counter()
        results = tracker.join_many(items, 1001.0)
        join_s = time.perf_counter() - t0
        assert all(r.outcome == "joined" for r in results)
        return {"rss_bytes_per_pending": (rss1 - rss0) / n, "capture_us": capture_s / n * 1e6,
                "add_many_us": add_s / n * 1e6, "join_many_1000_ms": join_s * 1e3, "full_gc_ms": gc_s * 1e3,
                "full_gc_empty_ms": gc0_s * 1e3}
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    fill(tracker, n)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del tracker
    # the memory of recent ids on its own, in its steady state: n ids given up evenly over
    # `keep` (60 s), with `rotate` called every 0.1 s as the store's calls would
    recent = RecentIds(keep_s=60.0, capacity=n)
    per_tick = max(1, n // 600)
    tracemalloc.start()
    rbase, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        now = i // per_tick * 0.1
        recent.remember(hash(f"{PREFIX}{i:016x}"), 1, now)   # the id string is freed, its hash kept
        if (i + 1) % per_tick == 0:
            recent.rotate(now)
    held_recent, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(recent) == n, len(recent)
    return {"tracemalloc_bytes_per_pending": (held - base) / n, "recent_ids": (held_recent - rbase) / n}


def run_child(name: str, n: int, traced: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--pending", str(n)] + (["--traced"] if traced else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.pending, args.traced)))
        return 0
    print(f"{args.pending:,} pending predictions, each case in fresh processes:")
    for name in CASES:
        row = run_child(name, args.pending, True) | run_child(name, args.pending, False)
        print(f"- {name}: {row['tracemalloc_bytes_per_pending']:.0f} B each (tracemalloc), "
              f"{row['rss_bytes_per_pending']:.0f} B each (RSS growth); "
              f"capture {row['capture_us']:.2f} us, add_many {row['add_many_us']:.2f} us per item, "
              f"join_many of {BATCH}: {row['join_many_1000_ms']:.2f} ms; "
              f"a full GC pass {row['full_gc_ms']:.1f} ms ({row['full_gc_empty_ms']:.1f} ms with none pending); "
              f"recent ids {row['recent_ids']:.0f} B/id")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
