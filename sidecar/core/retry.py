"""Retry decisions: the route's RetryPolicy (immutable, built once) and a RetryState per request.

As in Envoy (`retry_policy_impl.h` / `retry_state_impl.h`): `RetryPolicy.would_retry` only
says whether an outcome is retryable by the route's `retry.on` list; it does not consider
tries left, deadline or budget. `RetryState.decide` does, in this order, and names the
first reason that stops the retry:

    response already started  ->  NoRetry.STARTED        (docs/resilience.md#retries: never retried)
    not retryable             ->  NoRetry.NOT_RETRYABLE
    tries spent               ->  NoRetry.ATTEMPTS      (`attempts` counts the first try)
    backoff + a minimal try would end past the deadline  ->  NoRetry.DEADLINE
    retry budget empty        ->  NoRetry.BUDGET        (checked last: only a retry that
                                                         will really be made spends budget)
    otherwise                 ->  the backoff delay in seconds

Backoff is exponential with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): retry k waits rng() * min(max, base * 2**(k-1)).

Hedges (docs/resilience.md#hedging) are tries: they count in `attempts` and spend the retry budget.

The timeouts of a try are not here: they depend on the backend too (`RoutePlan.timeouts`).
What to do next with these answers, round by round, is core/attempts.py's.

Imports: standard library and sidecar.core.budget / sidecar.core.outcome.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from sidecar.core.budget import RetryBudget
from sidecar.core.outcome import Outcome

Rng = Callable[[], float]

# A retry that cannot get at least this long before the deadline is not worth starting.
MIN_TRY_S = 0.001


def backoff_s(retry_index: int, base_s: float, max_s: float, rng: Rng) -> float:
    """Delay before retry number `retry_index` (1 = the first retry): full jitter.

    rng() * min(max_s, base_s * 2**(retry_index - 1)), exact for any index: ldexp with a
    non-negative exponent is exact until it overflows, and an overflow means "past max_s".
    """
    assert retry_index >= 1, retry_index
    try:
        # 2100 doublings take even the smallest float (2**-1074) past any float: the cap
        # keeps huge indexes from building huge ints, and changes no result.
        ceiling = math.ldexp(base_s, min(retry_index - 1, 2100))
    except OverflowError:
        ceiling = max_s
    return rng() * (ceiling if ceiling < max_s else max_s)


class NoRetry(StrEnum):
    """Why a failed try is not retried; values are fit for logs and metric labels."""

    NOT_RETRYABLE = "not_retryable"
    ATTEMPTS = "attempts_exhausted"
    BUDGET = "budget_exhausted"
    DEADLINE = "deadline"
    STARTED = "response_started"


_OK, _CLIENT_ERROR = Outcome.OK, Outcome.CLIENT_ERROR  # module names: cheaper than Enum reads (3.11)

# Outcomes that are never retried whatever `retry.on` says: bytes already reached the
# client, or the try was cancelled on purpose (a hedge that lost, a client that left).
_NEVER = frozenset({Outcome.STREAM_BROKEN, Outcome.CANCELLED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`routes[].retry`, compiled. Durations in seconds."""

    attempts: int
    on_connect_error: bool
    on_timeout: bool
    on_reset: bool  # also covers Outcome.PROTOCOL_ERROR
    on_5xx: bool
    on_statuses: frozenset[int]  # exact codes listed in `on`, e.g. 502, or 429
    backoff_base_s: float
    backoff_max_s: float
    other_backend: bool
    hedge_after_s: float | None
    # Derived once from the on_* flags, so would_retry is one set lookup.
    _retry_on: frozenset[Outcome] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if not 0 <= self.backoff_base_s <= self.backoff_max_s < math.inf:
            raise ValueError(
                f"backoff needs 0 <= base <= max, got base={self.backoff_base_s} max={self.backoff_max_s}"
            )
        if self.hedge_after_s is not None and not self.hedge_after_s > 0:
            raise ValueError(f"hedge_after_s must be > 0, got {self.hedge_after_s}")
        on: set[Outcome] = set()
        if self.on_connect_error:
            on.add(Outcome.CONNECT_ERROR)
        if self.on_timeout:
            on.add(Outcome.TIMEOUT)
        if self.on_reset:
            on.update((Outcome.RESET, Outcome.PROTOCOL_ERROR))
        if self.on_5xx:
            on.add(Outcome.SERVER_ERROR)
        object.__setattr__(self, "_retry_on", frozenset(on))

    @classmethod
    def single(cls) -> RetryPolicy:
        """A route without `retry`: one try, except that a connect error (nothing was sent) is
        tried once more, on another available backend of the split when there is one, as
        nginx's default `proxy_next_upstream error` does (docs/resilience.md)."""
        return cls(
            attempts=2,
            on_connect_error=True,
            on_timeout=False,
            on_reset=False,
            on_5xx=False,
            on_statuses=frozenset(),
            backoff_base_s=0.0,
            backoff_max_s=0.0,
            other_backend=True,
            hedge_after_s=None,
        )

    @property
    def connect_errors_only(self) -> bool:
        """Only tries that sent nothing are retried (RetryPolicy.single)."""
        return self._retry_on == {Outcome.CONNECT_ERROR} and not self.on_statuses

    def is_final(self, outcome: Outcome, status: int) -> bool:
        """Whether an answer goes to the client as it is, no retry considered: 1xx-3xx, or a
        4xx (the model's answer, docs/resilience.md) that `retry.on` does not list by its code."""
        return outcome is _OK or (outcome is _CLIENT_ERROR and status not in self.on_statuses)

    def would_retry(self, outcome: Outcome, status: int | None) -> bool:
        """Whether `retry.on` covers this outcome; ignores tries left, deadline and budget."""
        if outcome in self._retry_on:
            return True
        # An exact code matches any answer with that status, a 4xx included: the
        # operator listed it on purpose (e.g. 429).
        return status is not None and status in self.on_statuses and outcome not in _NEVER


class RetryState:
    """Retry bookkeeping of one request. `tries` counts tries started, hedges included."""

    __slots__ = ("budget", "deadline", "policy", "tries")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None, deadline: float) -> None:
        self.policy = policy
        self.budget = budget
        self.deadline = deadline  # monotonic seconds: the route's whole-request timeout
        self.tries = 0

    def __repr__(self) -> str:
        return f"<RetryState tries={self.tries}/{self.policy.attempts} deadline={self.deadline:g}>"

    def record_try(self) -> None:
        """Count a try as started (the first, each retry and each hedge)."""
        self.tries += 1

    def decide(self, outcome: Outcome, status: int | None, now: float, rng: Rng) -> float | NoRetry:
        """After a failed try: the backoff delay (s) before retrying, or why not to retry.

        A returned delay has spent one unit of the retry budget; the caller then sleeps,
        calls `record_try` and makes the try.
        """
        assert self.tries >= 1, "record_try() before each try, so decide() follows one"
        if outcome is Outcome.STREAM_BROKEN:
            return NoRetry.STARTED
        policy = self.policy
        if not policy.would_retry(outcome, status):
            return NoRetry.NOT_RETRYABLE
        if self.tries >= policy.attempts:
            return NoRetry.ATTEMPTS
        # The next try is retry number `tries` (hedges count: they are tries, docs/resilience.md#hedging).
        delay = backoff_s(self.tries, policy.backoff_base_s, policy.backoff_max_s, rng)
        if now + delay + MIN_TRY_S >= self.deadline:
            return NoRetry.DEADLINE
        if self.budget is not None and not self.budget.try_spend(now):
            return NoRetry.BUDGET
        return delay

    def would_hedge(self, now: float) -> bool:
        """Whether a hedge may be sent now, the budget aside: hedging on, a try and time left."""
        policy = self.policy
        return policy.hedge_after_s is not None and self.tries < policy.attempts and now + MIN_TRY_S < self.deadline

    def try_hedge(self, now: float) -> bool:
        """Whether to send a hedge now; when True, the hedge's budget unit is spent.

        The caller then makes the hedge try (and calls `record_try`).
        """
        return self.would_hedge(now) and (self.budget is None or self.budget.try_spend(now))
