"""Per-backend circuit breaker: closed -> open -> half-open, decided from try outcomes.

Owns the breaker's state and counters. Knows nothing about backends, metrics or logs: the
shell asks `would_allow`/`try_acquire` before a try and calls `record` with the outcome
(`Outcome.failed`, docs/resilience.md#circuit-breaker: every try to a backend, on any of its endpoints, counts).

    CLOSED --(consecutive_failures in a row, or failure share >= failure_rate
              over the last `window` calls once `window` calls were seen)--> OPEN
    OPEN   --(open_for_s elapsed; lazily, on the next call that passes `now`)--> HALF_OPEN
    HALF_OPEN: at most `half_open_probes` tries are let through;
               a success closes (counters reset), a failure re-opens for open_for_s.

Notes and approximations, in the spirit of Envoy's NOTEs:
- OPEN -> HALF_OPEN is not a timer: `state(now)` computes it, the spending calls
  (`try_acquire`, `record`, `release`) store it. Nothing needs waking up.
- In HALF_OPEN, any recorded outcome decides, also one of a try that started before the
  circuit opened and finished late; such stragglers are rare and, either way, tell us how
  the backend behaves now. Outcomes recorded while OPEN are ignored.
- `release` hands back a probe slot without tracking which episode it was taken in; a
  probe that outlives a whole open period could return a slot to the next half-open
  episode. The slots are clamped to `half_open_probes`, so the limit is never exceeded.

Imports: standard library only.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import StrEnum


class CircuitState(StrEnum):
    """The breaker's state; the value is what `/admin/status` shows."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """Value of the `sidecar_circuit_state` gauge: 0 closed, 1 half-open, 2 open."""
        return _GAUGE[self]


_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


# The states as module names: read on every try, and in CPython 3.11 an Enum member read
# through its class costs about five times a global.
_CLOSED, _HALF_OPEN, _OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """`backends.<name>.circuit_breaker`, compiled. A trigger set to None never fires."""

    consecutive_failures: int | None
    failure_rate: float | None
    window: int
    open_for_s: float
    half_open_probes: int

    def __post_init__(self) -> None:
        if self.consecutive_failures is not None and self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if self.failure_rate is not None and not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not (self.open_for_s >= 0.0 and math.isfinite(self.open_for_s)):
            raise ValueError(f"open_for_s must be a finite number >= 0, got {self.open_for_s}")
        if self.half_open_probes < 1:
            raise ValueError(f"half_open_probes must be >= 1, got {self.half_open_probes}")


def _rate_threshold(rate: float, window: int) -> int:
    """Smallest failure count k with k / window >= rate.

    Comparing counts, not floats, keeps the hot path integer-only; deriving k with the same
    division the rule is written in avoids `0.3 * 10 == 3.0000000000000004` surprises.
    """
    k = max(1, math.ceil(rate * window))
    while k > 1 and (k - 1) / window >= rate:
        k -= 1
    while k < window and k / window < rate:
        k += 1
    return k


class Breaker:
    """One backend's circuit. Every call is O(1) and allocates nothing."""

    __slots__ = (
        "_consecutive",
        "_consecutive_limit",
        "_open_until",
        "_probes_left",
        "_rate_limit",
        "_ring",
        "_ring_failures",
        "_ring_pos",
        "_seen",
        "_state",
        "opened_total",
        "policy",
    )

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.opened_total = 0  # transitions into OPEN, re-opens from HALF_OPEN included
        self._state = _CLOSED
        self._open_until = 0.0  # meaningful only while OPEN
        self._probes_left = 0  # meaningful only while HALF_OPEN
        # Triggers, precomputed. A disabled consecutive trigger gets a limit no count
        # reaches; a disabled rate trigger has no ring (_rate_limit is then unused).
        self._consecutive_limit = (
            policy.consecutive_failures if policy.consecutive_failures is not None else sys.maxsize
        )
        self._rate_limit = (
            _rate_threshold(policy.failure_rate, policy.window) if policy.failure_rate is not None else 0
        )
        # CLOSED-state counters, reset on closing. Invariants: _seen <= window; the _seen
        # slots before _ring_pos (circularly) hold the latest outcomes and _ring_failures is
        # their sum; slots beyond _seen are stale and are overwritten before they are read.
        # The ring is only kept when failure_rate is set.
        self._consecutive = 0
        self._ring = bytearray(policy.window if policy.failure_rate is not None else 0)
        self._ring_pos = 0
        self._seen = 0
        self._ring_failures = 0

    def __repr__(self) -> str:
        if self._state is _OPEN:
            detail = f"until={self._open_until:g}"
        elif self._state is _HALF_OPEN:
            detail = f"probes_left={self._probes_left}"
        else:
            detail = f"consecutive={self._consecutive}"
            if self._ring:
                detail += f" window={self._ring_failures}/{self._seen}"
        return f"<Breaker {self._state} {detail} opened_total={self.opened_total}>"

    # -- queries (pure) ------------------------------------------------------------------

    def state(self, now: float) -> CircuitState:
        """The state at `now`: an OPEN circuit whose open_for_s has passed is HALF_OPEN."""
        if self._state is _OPEN and now >= self._open_until:
            return _HALF_OPEN
        return self._state

    def would_allow(self, now: float) -> bool:
        """Whether a try could go now, spending nothing (for picking among backends)."""
        state = self._state
        if state is _CLOSED:
            return True
        if state is _OPEN:
            # A fresh half-open episode always starts with half_open_probes >= 1 slots.
            return now >= self._open_until
        return self._probes_left > 0

    # -- transitions ---------------------------------------------------------------------

    def try_acquire(self, now: float) -> bool:
        """Let a try through, spending a probe slot when half-open. Pair with record or release."""
        state = self._state
        if state is _CLOSED:
            return True
        if state is _OPEN:
            if now < self._open_until:
                return False
            self._half_open()
        if self._probes_left > 0:
            self._probes_left -= 1
            return True
        return False

    def release(self, now: float) -> None:
        """Give back a probe slot taken by a try that ended without an outcome (cancelled)."""
        if self._state is _OPEN and now >= self._open_until:
            self._half_open()  # a fresh episode is already full: the clamp below applies
        if self._state is _HALF_OPEN and self._probes_left < self.policy.half_open_probes:
            self._probes_left += 1

    def record(self, failed: bool, now: float) -> None:
        """Count a try's outcome (`Outcome.failed`); may open, close or re-open the circuit."""
        state = self._state
        if state is _CLOSED:
            self._record_closed(failed, now)
            return
        if state is _OPEN:
            if now < self._open_until:
                return  # a straggler from before the circuit opened: ignored
            self._half_open()
        # HALF_OPEN: the first outcome decides.
        if failed:
            self._open(now)
        else:
            self._close()

    def _record_closed(self, failed: bool, now: float) -> None:
        if failed:
            self._consecutive += 1
        else:
            self._consecutive = 0
        trip = self._consecutive >= self._consecutive_limit
        ring = self._ring
        if ring:
            pos = self._ring_pos
            if self._seen == len(ring):
                self._ring_failures -= ring[pos]  # the oldest outcome leaves the window
            else:
                self._seen += 1
            ring[pos] = failed
            self._ring_failures += failed
            self._ring_pos = pos + 1 if pos + 1 < len(ring) else 0
            # docs/resilience.md#circuit-breaker: the rate is judged only once `window` calls were seen since closing.
            trip = trip or (self._seen == len(ring) and self._ring_failures >= self._rate_limit)
        if trip:
            self._open(now)

    def _open(self, now: float) -> None:
        self._state = _OPEN
        self._open_until = now + self.policy.open_for_s
        self.opened_total += 1

    def _half_open(self) -> None:
        self._state = _HALF_OPEN
        self._probes_left = self.policy.half_open_probes

    def _close(self) -> None:
        self._state = _CLOSED
        self._consecutive = 0
        self._seen = 0  # the stale ring slots need no clearing (see the invariant above)
        self._ring_failures = 0
        self._ring_pos = 0
