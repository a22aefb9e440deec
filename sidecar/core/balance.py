"""Load balancing over one backend's endpoints (replicas), with passive outlier ejection.

Owns per-endpoint inflight counts, active-health flags (set by the shell's health checks)
and ejections. An endpoint is *usable* at `now` when it is healthy and not ejected.

Balancing (`backends.<name>.balance`):
- least_request: power of two choices (Mitzenmacher): two distinct usable endpoints at
  random, the one with fewer inflight tries wins (the first drawn on a tie). Unlike
  "least inflight overall" it does not stampede onto one fresh endpoint;
- round_robin: the next usable endpoint after the last one picked;
- random: uniform over the usable endpoints.
`avoid` (a retry or hedge) steers away from the endpoint just tried while another is usable.

Outlier ejection (`backends.<name>.outlier`, docs/resilience.md), Envoy's consecutive-5xx detector
without its growing ejection times:
- each endpoint counts failed tries in a row (Outcome.failed); a success resets the count;
- at `consecutive_failures` the endpoint is ejected for `eject_for_s`, and its count resets;
- at most max(1, floor(max_ejected * n)) endpoints are ejected at once when n >= 2; an
  ejection refused for this reason is tried again on the endpoint's next failure;
- the last usable endpoint is never ejected: an ejection needs another usable endpoint;
- an ejection ends by itself when `now` passes `ejected_until` (no timer, no sweep).

Cost: with every endpoint usable and no `avoid`, `pick` is O(1) (two counters say so).
Otherwise it scans the n endpoints without allocating; n is a handful of replicas.

Imports: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

Rng = Callable[[], float]

_NEVER = -math.inf  # ejected_until of an endpoint never ejected


class Balance(StrEnum):
    """`backends.<name>.balance`."""

    LEAST_REQUEST = "least_request"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """`backends.<name>.outlier`, compiled."""

    consecutive_failures: int
    eject_for_s: float
    max_ejected: float  # share of the endpoints, 0..1

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if not (self.eject_for_s > 0 and math.isfinite(self.eject_for_s)):
            raise ValueError(f"eject_for_s must be a finite number > 0, got {self.eject_for_s}")
        if not 0.0 <= self.max_ejected <= 1.0:
            raise ValueError(f"max_ejected must be in [0, 1], got {self.max_ejected}")

    def max_ejected_count(self, n: int) -> int:
        """docs/resilience.md: a share of the n endpoints, rounded down, but at least 1 when n >= 2."""
        if n < 2:
            return 0
        # The epsilon keeps e.g. 0.29 * 100 == 28.999999999999996 at 29.
        return max(1, math.floor(self.max_ejected * n + 1e-9))


def _index(rng: Rng, k: int) -> int:
    """Uniform index in [0, k).

    No clamp needed: for x < 1 and k < 2**53, the correctly rounded x * k is below k (its
    distance to k, at least k * 2**-53, exceeds half a unit in the last place).
    """
    return int(rng() * k)


# The policies as module names: read on every pick, and in CPython 3.11 an Enum member read
# through its class costs about five times a global.
_LEAST_REQUEST, _ROUND_ROBIN = Balance.LEAST_REQUEST, Balance.ROUND_ROBIN


class EndpointSet:
    """The endpoints of one backend: picks, inflight counts, health and ejections."""

    __slots__ = (
        "_eject_horizon",
        "_failures",
        "_max_ejected",
        "_next_rr",
        "_unhealthy",
        "balance",
        "ejected_until",
        "healthy",
        "inflight",
        "n",
        "outlier",
    )

    def __init__(self, n: int, balance: Balance, outlier: OutlierPolicy | None) -> None:
        if n < 1:
            raise ValueError(f"a backend needs at least one endpoint, got {n}")
        self.n = n
        self.balance = balance
        self.outlier = outlier
        self.inflight = [0] * n
        self.healthy = [True] * n
        self.ejected_until = [_NEVER] * n  # ejected while now < ejected_until[i]
        self._failures = [0] * n  # failed tries in a row, per endpoint
        self._max_ejected = outlier.max_ejected_count(n) if outlier is not None else 0
        self._next_rr = 0
        # Fast-path invariants: _unhealthy == healthy.count(False), and
        # _eject_horizon >= max(ejected_until), so now >= _eject_horizon means none ejected.
        self._unhealthy = 0
        self._eject_horizon = _NEVER

    def __repr__(self) -> str:
        return (
            f"<EndpointSet {self.balance} inflight={self.inflight} healthy={self.healthy} "
            f"ejected_until={self.ejected_until}>"
        )

    # -- queries -------------------------------------------------------------------------

    def is_ejected(self, i: int, now: float) -> bool:
        return now < self.ejected_until[i]

    def ejected_count(self, now: float) -> int:
        if now >= self._eject_horizon:
            return 0
        return sum(1 for until in self.ejected_until if now < until)

    def usable(self, i: int, now: float) -> bool:
        """Healthy and not ejected: `pick` may choose it."""
        return self.healthy[i] and now >= self.ejected_until[i]

    def available(self, now: float) -> bool:
        """Whether any endpoint is usable (else the backend counts as unavailable, docs/reference/http.md#the-split)."""
        if self._unhealthy == 0 and now >= self._eject_horizon:
            return True
        healthy, until = self.healthy, self.ejected_until
        return any(healthy[i] and now >= until[i] for i in range(self.n))

    # -- picking -------------------------------------------------------------------------

    def pick(self, now: float, rng: Rng, avoid: int | None = None) -> int | None:
        """Index of the endpoint for the next try, or None when no endpoint is usable."""
        n = self.n
        if n == 1:
            return 0 if self.healthy[0] and now >= self.ejected_until[0] else None
        if avoid is None and self._unhealthy == 0 and now >= self._eject_horizon:
            return self._pick_all(rng)
        return self._pick_some(now, rng, avoid)

    def _pick_all(self, rng: Rng) -> int:
        """Every endpoint usable: O(1)."""
        n = self.n
        if self.balance is _LEAST_REQUEST:
            a = _index(rng, n)
            b = _index(rng, n - 1)
            if b >= a:
                b += 1  # two distinct candidates
            return b if self.inflight[b] < self.inflight[a] else a
        if self.balance is _ROUND_ROBIN:
            i = self._next_rr
            self._next_rr = i + 1 if i + 1 < n else 0
            return i
        return _index(rng, n)

    def _pick_some(self, now: float, rng: Rng, avoid: int | None) -> int | None:
        """Some endpoints unusable, or one to avoid: O(n) scans, no allocation."""
        healthy, until = self.healthy, self.ejected_until
        k = 0  # usable candidates other than `avoid`
        for i in range(self.n):
            if i != avoid and healthy[i] and now >= until[i]:
                k += 1
        if k == 0:
            # Only `avoid` is left, if even that: retrying on it beats not retrying.
            if avoid is not None and healthy[avoid] and now >= until[avoid]:
                return avoid
            return None
        if self.balance is _ROUND_ROBIN:
            n = self.n
            i = self._next_rr
            for _ in range(n):
                if i != avoid and healthy[i] and now >= until[i]:
                    self._next_rr = i + 1 if i + 1 < n else 0
                    return i
                i = i + 1 if i + 1 < n else 0
            raise AssertionError("unreachable: k > 0 usable endpoints")
        if self.balance is _LEAST_REQUEST and k >= 2:
            ra = _index(rng, k)
            rb = _index(rng, k - 1)
            if rb >= ra:
                rb += 1
            a = self._nth_usable(ra, now, avoid)
            b = self._nth_usable(rb, now, avoid)
            return b if self.inflight[b] < self.inflight[a] else a
        return self._nth_usable(_index(rng, k), now, avoid)

    def _nth_usable(self, r: int, now: float, avoid: int | None) -> int:
        healthy, until = self.healthy, self.ejected_until
        for i in range(self.n):
            if i != avoid and healthy[i] and now >= until[i]:
                if r == 0:
                    return i
                r -= 1
        raise AssertionError("unreachable: r < number of usable endpoints")

    # -- bookkeeping ---------------------------------------------------------------------

    def set_healthy(self, i: int, ok: bool) -> None:
        """Active health check result for endpoint i (a flip from HealthTracker)."""
        if self.healthy[i] != ok:
            self.healthy[i] = ok
            self._unhealthy += -1 if ok else 1

    def on_start(self, i: int) -> None:
        """A try to endpoint i starts."""
        self.inflight[i] += 1

    def on_cancel(self, i: int) -> None:
        """A try to endpoint i ended without an outcome (a hedge that lost, a client that left)."""
        assert self.inflight[i] > 0, f"on_cancel({i}) without on_start"
        self.inflight[i] -= 1

    def on_finish(self, i: int, failed: bool, now: float) -> bool:
        """A try to endpoint i ended (`Outcome.failed`). True when this ejected endpoint i.

        The return value is for the shell's log line and `endpoint_ejected` gauge.
        """
        assert self.inflight[i] > 0, f"on_finish({i}) without on_start"
        self.inflight[i] -= 1
        outlier = self.outlier
        if outlier is None:
            return False
        if not failed:
            self._failures[i] = 0
            return False
        self._failures[i] += 1
        if self._failures[i] < outlier.consecutive_failures or now < self.ejected_until[i]:
            # Below the threshold, or already ejected (tries that were in flight when it
            # was ejected finish late): nothing to decide.
            return False
        return self._try_eject(i, now, outlier.eject_for_s)

    def _try_eject(self, i: int, now: float, eject_for_s: float) -> bool:
        # O(n), only when an endpoint reaches the threshold.
        healthy, until = self.healthy, self.ejected_until
        ejected = 0
        other_usable = False
        for j in range(self.n):
            if now < until[j]:
                ejected += 1
            elif j != i and healthy[j]:
                other_usable = True
        if ejected >= self._max_ejected or not other_usable:
            return False  # the count stays at the threshold: the next failure asks again
        until[i] = now + eject_for_s
        if until[i] > self._eject_horizon:
            self._eject_horizon = until[i]
        self._failures[i] = 0
        return True
