"""Retry budget: the limit, the floor, the window, and time that jumps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.budget import RetryBudget


def test_floor_allows_ten_per_second_over_the_window():
    """With no traffic, a route may still make 100 retries per 10 s, and not one more."""
    b = RetryBudget(0.2)
    assert all(b.try_spend(0.5) for _ in range(100))
    assert not b.would_allow(0.5)
    assert not b.try_spend(9.9)
    assert b.retries == 100


def test_ratio_of_requests_above_the_floor():
    """A busy route may retry 20% of its recent requests."""
    b = RetryBudget(0.2)
    for _ in range(1000):
        b.record_request(0.1)
    spent = sum(b.try_spend(0.2) for _ in range(500))
    assert spent == 200
    assert repr(b) == "<RetryBudget ratio=0.2 requests=1000 retries=200 limit=200>"


def test_would_allow_spends_nothing():
    """Asking whether a retry fits leaves the budget as it was."""
    b = RetryBudget(0.0, min_per_s=0.1)  # floor: 1 retry per 10 s
    assert b.would_allow(0.0)
    assert b.would_allow(0.0)
    assert b.try_spend(0.0)
    assert not b.would_allow(0.0)


def test_old_retries_leave_the_window():
    """Retries made more than 10 s ago no longer count."""
    b = RetryBudget(0.0, min_per_s=0.1)
    assert b.try_spend(0.0)
    assert not b.try_spend(9.999)
    assert b.try_spend(10.0)


def test_requests_leave_the_window_too():
    """Requests from more than 10 s ago no longer raise the limit."""
    b = RetryBudget(0.5, min_per_s=0.0)
    for _ in range(10):
        b.record_request(0.0)
    assert b.try_spend(5.0)
    assert b.requests == 10
    assert not b.try_spend(10.5)  # the requests of second 0 are gone
    assert b.requests == 0


def test_big_jump_in_time_clears_everything():
    """After a long quiet spell the budget starts afresh, whatever it was before."""
    b = RetryBudget(0.2, min_per_s=1.0)
    for _ in range(50):
        b.record_request(3.0)
        b.try_spend(3.0)
    assert (b.requests, b.retries) == (50, 10)
    assert b.would_allow(1e9)
    assert (b.requests, b.retries) == (0, 0)


def test_clock_going_backwards_counts_into_the_newest_bucket():
    """A clock that steps back neither crashes nor frees budget."""
    b = RetryBudget(0.0, min_per_s=0.2)  # floor: 2 per 10 s
    assert b.try_spend(100.0)
    assert b.try_spend(50.0)
    assert not b.try_spend(-1e6)
    assert not b.try_spend(109.9)
    assert b.try_spend(110.0)  # measured from the newest bucket, the 100 s one


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-0.1,), "ratio"),
        ((0.2, -1.0), "min_per_s"),
        ((0.2, 10.0, 0.0), "window_s"),
        ((0.2, 10.0, 10.0, 0), "buckets"),
    ],
)
def test_rejects_nonsense(args, match):
    """A budget that could never work is refused when it is built."""
    with pytest.raises(ValueError, match=match):
        RetryBudget(*args)


# Events: (milliseconds since the previous event, is it a retry attempt?).
events = st.lists(st.tuples(st.integers(0, 1500), st.booleans()), max_size=300)


@settings(max_examples=150, deadline=None)
@given(
    evs=events,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    min_per_s=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_retries_never_exceed_the_budget(evs, ratio, min_per_s):
    """Whatever the traffic, retries stay within max(ratio x requests, floor) of the last window.

    NOTE the approximation of 1 s buckets: the budget's window is 9 to 10 s long, so the
    property is stated for the retries in the 9 s up to each allowed retry, judged against
    the requests of the 10 s before it. Times are integer milliseconds so the bucket edges
    are exact.
    """
    b = RetryBudget(ratio, min_per_s=min_per_s)
    floor = min_per_s * 10.0
    ms = 0
    requests: list[int] = []  # times (ms) of requests recorded so far
    retries: list[int] = []  # times (ms) of allowed retries so far
    for dt, is_retry in evs:
        ms += dt
        if not is_retry:
            b.record_request(ms / 1000)
            requests.append(ms)
            continue
        if not b.try_spend(ms / 1000):
            continue
        retries.append(ms)
        recent_retries = sum(1 for t in retries if t >= ms - 9000)
        recent_requests = sum(1 for t in requests if t > ms - 10000)
        assert recent_retries <= max(ratio * recent_requests, floor)


@settings(max_examples=100, deadline=None)
@given(n_requests=st.integers(0, 400), ratio=st.sampled_from([0.1, 0.2, 0.5]))
def test_budget_is_usable_up_to_the_limit(n_requests, ratio):
    """Within one second a route gets exactly the retries its budget promises, no fewer."""
    b = RetryBudget(ratio, min_per_s=1.0)
    for _ in range(n_requests):
        b.record_request(7.25)
    spent = 0
    while b.try_spend(7.5):
        spent += 1
    assert spent == max(math.floor(ratio * n_requests), 10)
