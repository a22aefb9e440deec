"""Active health-check thresholds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.health import HealthTracker


def test_turns_unhealthy_after_threshold_and_back():
    """An endpoint is marked down after 3 failed checks in a row and up again after 2 passed ones."""
    h = HealthTracker(unhealthy_after=3, healthy_after=2)
    seen = [(h.record(ok), h.healthy) for ok in (False, False, False, True, True)]
    assert seen == [(None, True), (None, True), (False, False), (None, False), (True, True)]
    h.record(False)
    assert repr(h) == "<HealthTracker healthy streak=1>"


def test_a_result_in_between_resets_the_streak():
    """Flapping checks never reach the threshold and leave the endpoint as it was."""
    h = HealthTracker(unhealthy_after=2, healthy_after=2)
    for _ in range(10):
        assert h.record(False) is None
        assert h.record(True) is None
    assert h.healthy


def test_initially_unhealthy_waits_for_passing_checks():
    """An endpoint that starts unhealthy gets traffic only after healthy_after passed checks."""
    h = HealthTracker(unhealthy_after=1, healthy_after=3, initially_healthy=False)
    assert [h.record(True) for _ in range(3)] == [None, None, True]


def test_threshold_of_one_flips_at_once():
    """With thresholds of 1, every change of result flips the health."""
    h = HealthTracker(1, 1)
    assert [h.record(ok) for ok in (False, False, True, True, False)] == [False, None, True, None, False]


def test_rejects_zero_thresholds():
    """A zero threshold is refused when the tracker is built."""
    with pytest.raises(ValueError, match="thresholds"):
        HealthTracker(0, 1)


@given(
    results=st.lists(st.booleans(), max_size=200),
    down=st.integers(1, 5),
    up=st.integers(1, 5),
    start=st.booleans(),
)
def test_health_follows_the_latest_run(results, down, up, start):
    """Health flips exactly when the latest run of opposite results reaches its threshold."""
    h = HealthTracker(down, up, initially_healthy=start)
    healthy, history = start, []
    for ok in results:
        history.append(ok)
        run = 0
        for r in reversed(history):
            if r != ok:
                break
            run += 1
        flips = ok != healthy and run >= (up if ok else down)
        assert h.record(ok) == (ok if flips else None)
        if flips:
            healthy, history = ok, []
        assert h.healthy == healthy
