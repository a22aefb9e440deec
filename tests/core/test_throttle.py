"""The rate limit of repeated log lines: one pass per key per period, on a fake clock."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.throttle import Throttle


def test_first_passes_then_one_per_period_per_key():
    """A repeated event is logged the first time, then once per period; each key on its own."""
    t = Throttle(10.0)
    assert t.try_pass(0.0, "a")
    assert not t.try_pass(9.99, "a")
    assert t.try_pass(0.5, "b")
    assert t.try_pass(10.0, "a")
    assert not t.try_pass(15.0, "a")
    assert t.try_pass(0.0)   # the default key: one throttle for one thing
    assert repr(t) == "<Throttle every 10s, 3 keys>"


@given(st.lists(st.floats(0.0, 1000.0), max_size=50))
def test_passes_are_a_period_apart(times):
    """However often it is asked, two passes of one key are never closer than the period."""
    t = Throttle(3.0)
    passed = [now for now in sorted(times) if t.try_pass(now, "k")]
    assert all(b - a >= 3.0 for a, b in pairwise(passed))
    if times:
        assert passed[0] == min(times)
