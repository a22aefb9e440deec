"""Circuit breaker: examples, and a state machine run against a small reference model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sidecar.core.breaker import Breaker, BreakerPolicy, CircuitState


def policy(
    consecutive: int | None = 3,
    rate: float | None = None,
    window: int = 10,
    open_for_s: float = 30.0,
    probes: int = 1,
) -> BreakerPolicy:
    return BreakerPolicy(
        consecutive_failures=consecutive,
        failure_rate=rate,
        window=window,
        open_for_s=open_for_s,
        half_open_probes=probes,
    )


def test_gauge_values():
    """The circuit_state metric reads 0 closed, 1 half-open, 2 open."""
    assert [s.gauge for s in CircuitState] == [0, 1, 2]
    assert str(CircuitState.HALF_OPEN) == "half_open"


def test_opens_after_consecutive_failures():
    """A backend that fails 3 times in a row stops getting traffic, and a success in between resets it."""
    b = Breaker(policy(consecutive=3))
    for failed in (True, True, False, True, True):
        b.record(failed, now=1.0)
    assert b.state(1.0) is CircuitState.CLOSED
    b.record(True, now=1.0)
    assert b.state(1.0) is CircuitState.OPEN
    assert not b.would_allow(1.0)
    assert not b.try_acquire(1.0)
    assert b.opened_total == 1
    assert repr(b) == "<Breaker open until=31 opened_total=1>"


def test_failure_rate_waits_for_a_full_window():
    """A failure rate is judged only once `window` calls were seen, then over the last `window`."""
    b = Breaker(policy(consecutive=None, rate=0.5, window=4))
    b.record(True, 0.0)
    b.record(True, 0.0)
    b.record(True, 0.0)
    assert b.state(0.0) is CircuitState.CLOSED  # 3 of 3 failed, but only 3 calls seen
    b.record(False, 0.0)
    assert b.state(0.0) is CircuitState.OPEN  # 3 of 4


def test_failure_rate_slides_over_the_window():
    """Old failures leave the window: 1 of the last 4 failing keeps a 0.5 breaker closed."""
    b = Breaker(policy(consecutive=None, rate=0.5, window=4))
    for failed in (True, False, False, False, False, True, False):
        b.record(failed, 0.0)
        assert b.state(0.0) is CircuitState.CLOSED
    assert repr(b) == "<Breaker closed consecutive=0 window=1/4 opened_total=0>"


def test_failure_rate_threshold_is_exact():
    """A 0.3 failure rate over 10 calls opens at exactly 3 failures, despite float rounding."""
    b = Breaker(policy(consecutive=None, rate=0.3, window=10))
    for failed in [False] * 8 + [True, True]:
        b.record(failed, 0.0)
    assert b.state(0.0) is CircuitState.CLOSED  # 2 of 10
    b.record(True, 0.0)  # the oldest success leaves: 3 of 10
    assert b.state(0.0) is CircuitState.OPEN


def test_half_open_lets_limited_probes_through():
    """After open_for, only half_open_probes tries get through until one of them answers."""
    b = Breaker(policy(consecutive=1, open_for_s=10.0, probes=2))
    b.record(True, 0.0)
    assert not b.would_allow(9.999)
    assert b.state(10.0) is CircuitState.HALF_OPEN
    assert b.would_allow(10.0)
    assert b.try_acquire(10.0)
    assert b.try_acquire(10.0)
    assert not b.would_allow(10.0)
    assert not b.try_acquire(10.0)
    b.release(10.5)  # one probe was cancelled: its slot comes back
    assert b.try_acquire(10.5)
    assert not b.try_acquire(10.5)


def test_half_open_success_closes_and_resets():
    """One good probe closes the circuit, and the backend again needs the full count of failures to open."""
    b = Breaker(policy(consecutive=2, open_for_s=1.0))
    b.record(True, 0.0)
    b.record(True, 0.0)
    assert b.try_acquire(1.0)
    b.record(False, 1.0)
    assert b.state(1.0) is CircuitState.CLOSED
    b.record(True, 1.0)
    assert b.state(1.0) is CircuitState.CLOSED


def test_half_open_failure_reopens():
    """A failed probe keeps the backend out for another open_for."""
    b = Breaker(policy(consecutive=1, open_for_s=5.0))
    b.record(True, 0.0)
    assert b.try_acquire(5.0)
    b.record(True, 6.0)
    assert b.state(6.0) is CircuitState.OPEN
    assert b.state(10.999) is CircuitState.OPEN
    assert b.state(11.0) is CircuitState.HALF_OPEN
    assert b.opened_total == 2


def test_outcomes_while_open_are_ignored():
    """Late answers of tries started before the circuit opened do not extend or close it."""
    b = Breaker(policy(consecutive=1, open_for_s=5.0))
    b.record(True, 0.0)
    b.record(False, 1.0)
    b.record(True, 2.0)
    assert b.state(5.0) is CircuitState.HALF_OPEN
    assert b.opened_total == 1


def test_no_trigger_never_opens():
    """A breaker with neither trigger never opens, whatever fails."""
    b = Breaker(policy(consecutive=None, rate=None))
    for _ in range(1000):
        b.record(True, 0.0)
    assert b.state(0.0) is CircuitState.CLOSED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive": 0},
        {"rate": 0.0},
        {"rate": 1.5},
        {"window": 0},
        {"open_for_s": -1.0},
        {"probes": 0},
    ],
)
def test_policy_rejects_nonsense(kwargs):
    """A breaker policy that could never work is refused when it is built."""
    with pytest.raises(ValueError, match="must be"):
        policy(**kwargs)


# -- state machine against a reference model ----------------------------------------------


class Model:
    """The rules of docs/resilience.md#circuit-breaker, written naively: lists and recounting, no rings."""

    def __init__(self, p: BreakerPolicy) -> None:
        self.p = p
        self.state = CircuitState.CLOSED
        self.history: list[bool] = []  # outcomes since the circuit last closed
        self.open_until = 0.0
        self.probes = 0
        self.opened = 0

    def at(self, now: float) -> CircuitState:
        if self.state is CircuitState.OPEN and now >= self.open_until:
            return CircuitState.HALF_OPEN
        return self.state

    def sync(self, now: float) -> None:
        if self.at(now) is not self.state:
            self.state = CircuitState.HALF_OPEN
            self.probes = self.p.half_open_probes

    def would_allow(self, now: float) -> bool:
        state = self.at(now)
        if state is CircuitState.HALF_OPEN:
            return self.probes > 0 if self.state is CircuitState.HALF_OPEN else True
        return state is CircuitState.CLOSED

    def acquire(self, now: float) -> bool:
        self.sync(now)
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.HALF_OPEN and self.probes > 0:
            self.probes -= 1
            return True
        return False

    def release(self, now: float) -> None:
        self.sync(now)
        if self.state is CircuitState.HALF_OPEN:
            self.probes = min(self.probes + 1, self.p.half_open_probes)

    def record(self, failed: bool, now: float) -> None:
        self.sync(now)
        if self.state is CircuitState.OPEN:
            return
        if self.state is CircuitState.HALF_OPEN:
            if failed:
                self.open(now)
            else:
                self.state = CircuitState.CLOSED
                self.history = []
            return
        self.history.append(failed)
        run = 0
        for f in reversed(self.history):
            if not f:
                break
            run += 1
        p = self.p
        by_run = p.consecutive_failures is not None and run >= p.consecutive_failures
        last = self.history[-p.window :]
        by_rate = (
            p.failure_rate is not None
            and len(self.history) >= p.window
            and sum(last) / p.window >= p.failure_rate
        )
        if by_run or by_rate:
            self.open(now)

    def open(self, now: float) -> None:
        self.state = CircuitState.OPEN
        self.open_until = now + self.p.open_for_s
        self.opened += 1


policies = st.builds(
    BreakerPolicy,
    consecutive_failures=st.none() | st.integers(1, 5),
    failure_rate=st.none() | st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 1.0]),
    window=st.integers(1, 8),
    open_for_s=st.sampled_from([0.0, 1.0, 5.0]),
    half_open_probes=st.integers(1, 3),
)


class BreakerMachine(RuleBasedStateMachine):
    """Random calls at random times; the breaker and the model must agree at every step."""

    @initialize(p=policies)
    def setup(self, p: BreakerPolicy) -> None:
        self.ms = 0  # integer milliseconds keep the time arithmetic exact
        self.breaker = Breaker(p)
        self.model = Model(p)

    @property
    def now(self) -> float:
        return self.ms / 1000

    @rule(dt_ms=st.sampled_from([0, 1, 250, 999, 1000, 1001, 4999, 5000, 7000]))
    def advance(self, dt_ms: int) -> None:
        self.ms += dt_ms

    @rule()
    def acquire(self) -> None:
        assert self.breaker.try_acquire(self.now) == self.model.acquire(self.now)

    @rule(failed=st.booleans())
    def record(self, failed: bool) -> None:
        self.breaker.record(failed, self.now)
        self.model.record(failed, self.now)

    @precondition(lambda self: self.model.state is not CircuitState.CLOSED)
    @rule()
    def release(self) -> None:
        self.breaker.release(self.now)
        self.model.release(self.now)

    @invariant()
    def agrees(self) -> None:
        now = self.now
        assert self.breaker.state(now) is self.model.at(now), (self.breaker, self.model.history)
        assert self.breaker.would_allow(now) == self.model.would_allow(now), self.breaker
        assert self.breaker.opened_total == self.model.opened


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_model = BreakerMachine.TestCase
