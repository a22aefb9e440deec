"""The status page's history: points from counter snapshots, on a fake clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.history import History, Recent, Snapshot, histogram_quantile

BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25)


def snap(ok: float = 0, err: float = 0, buckets: tuple[int, ...] = (0,) * 6, failed: float = 0,
         mirrored: float = 0, weight: float = 0.9) -> Snapshot:
    return Snapshot(
        requests={("fraud", "stable", "200"): ok, ("fraud", "stable", "503"): err, ("fraud", "", "502"): 1},
        durations={("fraud", "stable"): buckets},
        attempts={("fraud", "canary", "ok", False): 10, ("fraud", "canary", "connect_error", True): failed},
        mirrors={("fraud", "shadow", "agree"): mirrored, ("fraud", "shadow", "dropped"): 100},
        weights={("fraud", "stable"): weight, ("fraud", "canary"): 1 - weight},
        agreement={("fraud", "shadow"): 0.97},
        feedback={("fraud", "stable", "accuracy"): 0.91})


def test_the_first_snapshot_only_starts_the_history():
    """No point before two snapshots: a rate needs an interval."""
    h = History(BOUNDS, every_s=5, keep_s=60)
    assert h.record(snap(), 100.0) is None
    assert h.to_json(["stable"], ["fraud"])["time"] == []


def test_a_point_holds_rates_codes_tries_and_percentiles_over_its_interval():
    """Rates are deltas over the interval; answers without a backend count for the route only."""
    h = History(BOUNDS, every_s=5, keep_s=60)
    h.record(snap(ok=100, err=0, buckets=(50, 0, 0, 0, 0, 0)), 100.0)
    h.record(snap(ok=150, err=10, buckets=(50, 30, 0, 20, 0, 0), failed=5, mirrored=20), 105.0)
    doc = h.to_json(["stable", "canary", "shadow"], ["fraud"])
    assert doc["time"] == [105.0]
    stable = doc["backends"]["stable"]
    assert stable["answers_per_s"] == [12.0]
    assert stable["codes_per_s"] == {"200": [10.0], "503": [2.0]}
    assert stable["p50_s"][0] is not None and 0.01 < stable["p50_s"][0] <= 0.025
    assert 0.05 < stable["p99_s"][0] <= 0.1
    assert doc["backends"]["canary"]["failed_tries_per_s"] == [1.0]
    assert doc["backends"]["shadow"]["mirrored_per_s"] == [4.0]   # dropped copies are no tries
    assert doc["routes"]["fraud"]["codes_per_s"]["502"] == [0.0]
    weights = doc["routes"]["fraud"]["weights"]
    assert weights["stable"] == [0.9] and abs(weights["canary"][0] - 0.1) < 1e-9
    assert doc["mirrors"] == [{"route": "fraud", "backend": "shadow", "agreement": [0.97]}]
    assert doc["feedback"][0]["values"] == [0.91]


def test_the_ring_keeps_only_the_last_keep_s():
    """15 minutes at 5 s is 180 points, however long the sidecar runs."""
    h = History(BOUNDS, every_s=5, keep_s=900)
    for i in range(500):
        h.record(snap(ok=i), 5.0 * i)
    doc = h.to_json(["stable"], ["fraud"])
    assert len(doc["time"]) == 180 and doc["time"][-1] == 5.0 * 499
    assert all(len(v) == 180 for v in doc["backends"]["stable"].values() if isinstance(v, list))


def test_recent_tries_sum_the_last_minute():
    """The recent error rate reads the points of the last minute only."""
    h = History(BOUNDS, every_s=5, keep_s=900)
    assert h.recent("canary", 0.0, 60) is None
    failed = 0
    for i in range(40):
        failed += 1 if i >= 30 else 0   # failures start 50 s before the end
        h.record(snap(failed=failed), 5.0 * i)
    # 13 points end within the minute (65 s); their tries are the 10 failed ones
    assert h.recent("canary", 5.0 * 39, 60) == Recent(answers=0.0, tries=10.0, failed=10.0, span_s=65.0)
    assert h.recent("canary", 5.0 * 39 + 3600, 60) is None   # nothing that recent


@given(st.lists(st.integers(0, 1000), min_size=6, max_size=6), st.floats(0, 1))
def test_quantiles_stay_within_the_buckets(counts, q):
    """A quantile is None without observations, else between 0 and the highest bound."""
    got = histogram_quantile(q, BOUNDS, counts)
    if sum(counts) == 0:
        assert got is None
    else:
        assert got is not None and 0 <= got <= BOUNDS[-1]


def test_a_quantile_in_the_overflow_bucket_is_the_highest_bound():
    """As Prometheus's histogram_quantile: past the last bound there is nothing to interpolate."""
    assert histogram_quantile(0.99, BOUNDS, [0, 0, 0, 0, 0, 5]) == 0.25
