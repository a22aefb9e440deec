"""Rolling windows: LatencyWindow against a naive list model, FeatureWindow's conversions."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.window import (
    MAX_CATEGORY_CHARS,
    FeatureWindow,
    LatencySummary,
    LatencyWindow,
    as_category,
    as_number,
)

records = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=120.0, allow_nan=False), st.booleans()),
    max_size=80,
)


# ---------------------------------------------------------------------------------------------
# LatencyWindow


@given(size=st.integers(min_value=1, max_value=16), recs=records)
def test_latency_summary_matches_numpy_over_last_requests(size, recs):
    """The reported p50/p95/p99 and error rate are numpy's over exactly the last `size` requests."""
    window = LatencyWindow(size)
    model: list[tuple[float, bool]] = []
    for latency_s, failed in recs:
        window.record(latency_s, failed)
        model.append((latency_s, failed))
    kept = model[-size:]
    summary = window.summary()
    assert summary.count == len(kept) == window.count
    assert window.total == len(model)
    assert window.failed_total == sum(f for _, f in model)
    if not kept:
        assert summary == LatencySummary(count=0, p50=None, p95=None, p99=None, error_rate=None)
        return
    expected = np.percentile([lat for lat, _ in kept], [50, 95, 99])
    assert summary.p50 == pytest.approx(expected[0], rel=1e-12, abs=1e-12)
    assert summary.p95 == pytest.approx(expected[1], rel=1e-12, abs=1e-12)
    assert summary.p99 == pytest.approx(expected[2], rel=1e-12, abs=1e-12)
    assert summary.error_rate == sum(f for _, f in kept) / len(kept)


def test_empty_window_reports_no_latency_rather_than_zero():
    """A backend with no traffic yet shows null percentiles and error rate, not a perfect 0."""
    summary = LatencyWindow(8).summary()
    assert summary.to_json() == {"count": 0, "p50": None, "p95": None, "p99": None, "error_rate": None}


def test_ring_wraps_and_forgets_old_requests():
    """Once the window is full, the oldest requests (and their failures) stop counting."""
    window = LatencyWindow(3)
    window.record(9.0, True)    # scrolls out
    window.record(8.0, True)    # scrolls out
    window.record(0.1, False)
    window.record(0.2, True)
    window.record(0.3, False)
    summary = window.summary()
    assert summary.count == 3
    assert summary.p50 == pytest.approx(0.2)
    assert summary.error_rate == pytest.approx(1 / 3)
    assert (window.total, window.failed_total) == (5, 3)
    for _ in range(3):  # a full lap of successes clears the rate
        window.record(0.1, False)
    assert window.summary().error_rate == 0.0


def test_error_rate_is_failed_share():
    """One failure in four requests reads as an error rate of 0.25."""
    window = LatencyWindow()
    for failed in (False, True, False, False):
        window.record(0.05, failed)
    summary = window.summary()
    assert summary.error_rate == 0.25
    assert summary.p99 == pytest.approx(0.05)


def test_latency_clear_keeps_lifetime_totals():
    """Clearing the window (a new rollout step) empties it but keeps the lifetime counters."""
    window = LatencyWindow(4)
    window.record(0.1, True)
    window.record(0.2, False)
    window.clear()
    assert window.summary().count == 0
    assert (window.total, window.failed_total) == (2, 1)
    window.record(0.3, False)
    assert window.summary().error_rate == 0.0
    assert "count=1" in repr(window)


def test_window_size_must_be_positive():
    """A zero-sized window is a programming error, reported at construction."""
    with pytest.raises(ValueError, match="at least 1"):
        LatencyWindow(0)
    with pytest.raises(ValueError, match="at least 1"):
        FeatureWindow(0, categorical=False)


# ---------------------------------------------------------------------------------------------
# FeatureWindow


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.text(max_size=5),
)


@given(size=st.integers(min_value=1, max_value=12), values=st.lists(json_scalars, max_size=50))
def test_numeric_feature_window_keeps_last_numbers(size, values):
    """A numeric feature holds the last `size` numbers and counts everything else as missing."""
    window = FeatureWindow(size, categorical=False)
    kept: list[float] = []
    for v in values:
        number = as_number(v)
        assert window.add(v) == (number is not None)
        if number is not None:
            kept.append(number)
    out = window.values()
    assert out.dtype == np.float64
    assert sorted(out.tolist()) == sorted(kept[-size:])
    assert window.count == len(out)
    assert window.missing_total == len(values) - len(kept)


@given(size=st.integers(min_value=1, max_value=12), values=st.lists(json_scalars, max_size=50))
def test_categorical_feature_window_keeps_last_categories(size, values):
    """A categorical feature holds the last `size` values as strings; None and NaN are missing."""
    window = FeatureWindow(size, categorical=True)
    kept = [c for c in map(as_category, values) if c is not None]
    for v in values:
        window.add(v)
    out = window.values()
    assert out.dtype == object
    assert all(type(x) is str for x in out)
    assert sorted(out.tolist()) == sorted(kept[-size:])
    assert window.missing_total == len(values) - len(kept)


def test_numbers_follow_json_types():
    """Numeric features take JSON numbers only: booleans, strings and NaN are missing samples."""
    assert as_number(3) == 3.0
    assert as_number(2.5) == 2.5
    assert as_number(np.float64(1.5)) == 1.5
    for wrong in (True, False, None, "3.5", [1.0], {"a": 1}, math.nan, math.inf, 10**400):
        assert as_number(wrong) is None, wrong


def test_categories_are_spelled_like_json():
    """Categorical values read as their JSON text, so `true`, `1` and `1.0` compare sensibly."""
    assert as_category("US") == "US"
    assert as_category(True) == "true"
    assert as_category(False) == "false"
    assert as_category(7) == "7"
    assert as_category(1.0) == "1"
    assert as_category(0.5) == "0.5"
    for missing in (None, math.nan, -math.inf, [1], {"a": "b"}):
        assert as_category(missing) is None, missing


def test_long_category_strings_are_cut():
    """A huge string in a request cannot make a window hold megabytes: it is cut to a prefix."""
    window = FeatureWindow(2, categorical=True)
    window.add("x" * 1_000_000)
    (value,) = window.values()
    assert value == "x" * MAX_CATEGORY_CHARS
    assert as_category(10**300) is None  # too long to be a label


def test_feature_window_missing_and_clear():
    """Paths that found nothing are counted, and clearing a window keeps that lifetime count."""
    window = FeatureWindow(4, categorical=False)
    window.add(1.0)
    window.add_missing()
    window.add("oops")
    assert (window.count, window.missing_total) == (1, 2)
    window.clear()
    assert window.count == 0
    assert window.values().shape == (0,)
    assert window.missing_total == 2
    assert "missing_total=2" in repr(window)


def test_values_is_a_snapshot():
    """The array handed to a drift job does not change while new samples keep arriving."""
    window = FeatureWindow(3, categorical=False)
    for v in (1.0, 2.0, 3.0):
        window.add(v)
    snapshot = window.values()
    window.add(4.0)
    assert snapshot.tolist() == [1.0, 2.0, 3.0]
    assert sorted(window.values().tolist()) == [2.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------
# Hot-path cost, measured by hand: `python tests/core/test_window.py`


def bench_hot_path(n: int = 1_000_000) -> None:
    """Print the per-call cost of LatencyWindow.record and FeatureWindow.add."""
    latency = LatencyWindow(2048)
    numeric = FeatureWindow(2000, categorical=False)
    categorical = FeatureWindow(2000, categorical=True)
    for name, call, arg in (
        ("LatencyWindow.record", lambda _: latency.record(0.012, False), None),
        ("FeatureWindow.add numeric", numeric.add, 0.5),
        ("FeatureWindow.add categorical", categorical.add, "US"),
    ):
        start = time.perf_counter()
        for _ in range(n):
            call(arg)
        per_call_ns = (time.perf_counter() - start) / n * 1e9
        print(f"{name:32s} {per_call_ns:6.0f} ns/call (loop overhead included)")


if __name__ == "__main__":
    bench_hot_path()
