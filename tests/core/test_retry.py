"""Retry policy, full-jitter backoff, and the per-request retry decision."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.budget import RetryBudget
from sidecar.core.outcome import Outcome
from sidecar.core.retry import MIN_TRY_S, NoRetry, RetryPolicy, RetryState, backoff_s


def make_policy(**changes: object) -> RetryPolicy:
    """A typical policy (docs/resilience.md#retries): attempts 3, on [connect-error, timeout, 502, 503, 504]."""
    base = RetryPolicy(
        attempts=3,
        on_connect_error=True,
        on_timeout=True,
        on_reset=False,
        on_5xx=False,
        on_statuses=frozenset({502, 503, 504}),
        backoff_base_s=0.025,
        backoff_max_s=0.25,
        other_backend=True,
        hedge_after_s=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def half() -> float:
    return 0.5


# -- would_retry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status", "expected"),
    [
        (Outcome.CONNECT_ERROR, None, True),
        (Outcome.TIMEOUT, None, True),
        (Outcome.SERVER_ERROR, 503, True),
        (Outcome.SERVER_ERROR, 500, False),  # only listed codes, no `5xx`
        (Outcome.RESET, None, False),
        (Outcome.PROTOCOL_ERROR, None, False),
        (Outcome.CLIENT_ERROR, 429, False),
        (Outcome.OK, 200, False),
        (Outcome.STREAM_BROKEN, 200, False),
        (Outcome.CANCELLED, None, False),
    ],
)
def test_would_retry_listed_outcomes(outcome, status, expected):
    """Only the outcomes and codes in `retry.on` are retried."""
    assert make_policy().would_retry(outcome, status) is expected


def test_reset_covers_protocol_errors_and_5xx_covers_every_server_error():
    """`on: [reset, 5xx]` retries resets, garbled answers and any status from 500 up."""
    p = make_policy(on_reset=True, on_5xx=True, on_statuses=frozenset())
    assert p.would_retry(Outcome.RESET, None)
    assert p.would_retry(Outcome.PROTOCOL_ERROR, None)
    assert p.would_retry(Outcome.SERVER_ERROR, 500)
    assert p.would_retry(Outcome.SERVER_ERROR, 599)
    assert p.would_retry(Outcome.SERVER_ERROR, None)
    assert not p.would_retry(Outcome.CLIENT_ERROR, 400)
    assert not p.would_retry(Outcome.STREAM_BROKEN, 500)


def test_explicitly_listed_4xx_is_retried():
    """An operator who lists 429 gets 429 answers retried, though 4xx are otherwise final."""
    p = make_policy(on_statuses=frozenset({429}))
    assert p.would_retry(Outcome.CLIENT_ERROR, 429)
    assert not p.would_retry(Outcome.CLIENT_ERROR, 404)


def test_single_retries_only_a_connect_error_once():
    """A route without `retry` makes one try, but a connect error (nothing was sent) is tried once
    more, elsewhere when it can be, as nginx's default proxy_next_upstream does."""
    p = RetryPolicy.single()
    assert p.attempts == 2 and p.other_backend and p.connect_errors_only
    assert [o for o in Outcome if p.would_retry(o, 503)] == [Outcome.CONNECT_ERROR]
    state = RetryState(p, None, deadline=100.0)
    state.record_try()
    assert state.decide(Outcome.SERVER_ERROR, 503, 0.0, half) is NoRetry.NOT_RETRYABLE
    assert state.decide(Outcome.TIMEOUT, None, 0.0, half) is NoRetry.NOT_RETRYABLE
    assert state.decide(Outcome.CONNECT_ERROR, None, 0.0, half) == 0.0  # at once: no backoff
    state.record_try()
    assert state.decide(Outcome.CONNECT_ERROR, None, 0.0, half) is NoRetry.ATTEMPTS


@pytest.mark.parametrize(
    "changes",
    [
        {"attempts": 0},
        {"backoff_base_s": 1.0, "backoff_max_s": 0.5},
        {"hedge_after_s": 0.0},
    ],
)
def test_policy_rejects_nonsense(changes):
    """A retry policy that could never work is refused when it is built."""
    with pytest.raises(ValueError, match=r"must be|needs"):
        make_policy(**changes)


# -- backoff -------------------------------------------------------------------------------


@given(
    k=st.integers(1, 2000),
    base=st.floats(0.0, 10.0),
    cap=st.floats(0.0, 100.0),
    r=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_is_full_jitter_within_the_cap(k, base, cap, r):
    """Retry k waits between 0 and min(max, base x 2^(k-1)), scaled by the random draw."""
    d = backoff_s(k, base, cap, lambda: r)
    ceiling = min(Fraction(cap), Fraction(base) * 2 ** (k - 1))  # exact, however large k is
    assert 0 <= Fraction(d) <= ceiling
    assert d == pytest.approx(r * float(ceiling), rel=1e-12, abs=0.0)


def test_backoff_doubles_until_the_max():
    """With the draw at its top, waits grow 25, 50, 100, 200 ms and then stay at 250 ms."""
    top = 1.0 - 2**-53
    waits = [backoff_s(k, 0.025, 0.25, lambda: top) for k in range(1, 7)]
    assert waits == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])


# -- RetryState.decide ---------------------------------------------------------------------


def state_after(tries: int, deadline: float = 10.0, budget: RetryBudget | None = None, **changes):
    s = RetryState(make_policy(**changes), budget, deadline)
    for _ in range(tries):
        s.record_try()
    return s


def empty_budget() -> RetryBudget:
    b = RetryBudget(0.0, min_per_s=0.1)  # one retry per 10 s ...
    assert b.try_spend(0.0)  # ... already spent
    return b


def test_decide_returns_the_backoff_and_spends_budget():
    """A retryable failure with tries, time and budget left is retried after a jittered wait."""
    budget = RetryBudget(0.2)
    s = state_after(1, budget=budget)
    assert s.decide(Outcome.TIMEOUT, None, 1.0, half) == pytest.approx(0.0125)
    assert budget.retries == 1
    s.record_try()
    assert s.decide(Outcome.SERVER_ERROR, 503, 1.1, half) == pytest.approx(0.025)  # second retry
    assert repr(s) == "<RetryState tries=2/3 deadline=10>"


def test_started_response_is_never_retried():
    """A stream that broke after bytes reached the client ends there, even with tries left."""
    s = state_after(1, on_5xx=True, on_reset=True)
    assert s.decide(Outcome.STREAM_BROKEN, 200, 0.0, half) is NoRetry.STARTED


def test_not_retryable_comes_before_attempts():
    """A 4xx is reported as not retryable, whether or not tries are left."""
    assert state_after(3).decide(Outcome.CLIENT_ERROR, 400, 0.0, half) is NoRetry.NOT_RETRYABLE


def test_attempts_come_before_deadline_and_budget():
    """With every try spent the reason is attempts, even past the deadline with no budget."""
    s = state_after(3, deadline=1.0, budget=empty_budget())
    assert s.decide(Outcome.CONNECT_ERROR, None, 5.0, half) is NoRetry.ATTEMPTS


def test_deadline_comes_before_budget_and_spends_nothing():
    """A retry that could not finish before the route's timeout is not made and costs no budget."""
    budget = RetryBudget(0.0, min_per_s=0.1)
    s = state_after(1, deadline=1.0, budget=budget)
    assert s.decide(Outcome.CONNECT_ERROR, None, 1.0, half) is NoRetry.DEADLINE
    assert budget.retries == 0
    s2 = state_after(1, deadline=1.0, budget=empty_budget())
    assert s2.decide(Outcome.CONNECT_ERROR, None, 1.0, half) is NoRetry.DEADLINE


def test_deadline_counts_the_backoff_and_a_minimal_try():
    """A retry whose wait would leave less than a millisecond before the deadline is not made."""
    # First retry, draw 1.0-ish: wait 25 ms. now + 25 ms + 1 ms must stay below the deadline.
    top = 1.0 - 2**-53
    wait = backoff_s(1, 0.025, 0.25, lambda: top)
    edge = 5.0 + wait + MIN_TRY_S
    assert state_after(1, deadline=edge).decide(Outcome.TIMEOUT, None, 5.0, lambda: top) is NoRetry.DEADLINE
    assert state_after(1, deadline=edge + 1e-6).decide(Outcome.TIMEOUT, None, 5.0, lambda: top) == wait
    # A zero draw still needs the minimal try time.
    s = state_after(1, deadline=5.0 + MIN_TRY_S / 2)
    assert s.decide(Outcome.TIMEOUT, None, 5.0, lambda: 0.0) is NoRetry.DEADLINE


def test_budget_is_the_last_reason():
    """With tries and time left, an exhausted retry budget stops the retry."""
    s = state_after(1, budget=empty_budget())
    assert s.decide(Outcome.CONNECT_ERROR, None, 0.5, half) is NoRetry.BUDGET


# -- hedging -------------------------------------------------------------------------------


def test_hedge_needs_hedging_configured():
    """Without `hedge_after`, no hedge is ever sent."""
    assert not state_after(1, budget=RetryBudget(1.0)).try_hedge(0.0)


def test_hedge_is_a_try_and_spends_budget():
    """A hedge spends a retry-budget unit and needs a try left in `attempts`."""
    budget = RetryBudget(0.0, min_per_s=0.2)  # two per 10 s
    s = state_after(1, budget=budget, hedge_after_s=0.2)
    assert s.try_hedge(0.3)
    assert budget.retries == 1
    s.record_try()
    assert s.try_hedge(0.4)
    s.record_try()
    assert not s.try_hedge(0.5)  # 3 of 3 tries started
    assert budget.retries == 2


def test_hedge_refused_without_budget_or_time():
    """No hedge goes out when the budget is spent or the deadline has come."""
    assert not state_after(1, budget=empty_budget(), hedge_after_s=0.2).try_hedge(0.3)
    assert state_after(1, hedge_after_s=0.2).try_hedge(0.3)
    late = state_after(1, deadline=1.0, hedge_after_s=0.2)
    assert not late.try_hedge(1.0)
