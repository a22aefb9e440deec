"""Retry budget of one route: retries as a share of recent requests, with a floor.

docs/resilience.md#retry-budget: "The budget counts over the last 10 s: a retry is allowed while
retries <= max(budget x requests, 10 x 10)". Here: a retry is allowed when, counting it,

    retries_in_window + 1 <= max(ratio * requests_in_window, min_per_s * window_s)

`requests` are client requests (`record_request`, once per request, not per try);
`retries` are the extra tries, hedges included (`try_spend`), as in Finagle's and Envoy's
retry budgets. Owns only the counters; the shell counts `retry_budget_exhausted_total`.

Approximation (NOTE): the window is `buckets` time buckets of window_s / buckets seconds,
the newest one being the bucket `now` falls in. So the window covers between
(buckets - 1) / buckets and all of window_s, depending on where `now` sits in its bucket:
with the defaults, the last 9 to 10 s. Every interval of 9 s therefore holds at most the
limit's worth of retries, judged against the requests of at most the last 10 s; over an
exact sliding 10 s window, up to one bucket's worth more may slip through.

Time: `now` is monotonic seconds. A jump forward clears what fell out of the window (at
most `buckets` buckets cleared, so O(1) amortised); a `now` earlier than the newest bucket
(it should not happen with a monotonic clock) counts into the newest bucket.

Imports: standard library only.
"""

from __future__ import annotations

import math


class RetryBudget:
    """Counters of requests and retries over the last `window_s`, in `buckets` buckets."""

    __slots__ = (
        "_epoch",
        "_floor",
        "_requests",
        "_retries",
        "_total_requests",
        "_total_retries",
        "_width_s",
        "ratio",
    )

    def __init__(
        self, ratio: float, min_per_s: float = 10.0, window_s: float = 10.0, buckets: int = 10
    ) -> None:
        if not (ratio >= 0.0 and math.isfinite(ratio)):
            raise ValueError(f"ratio must be a finite number >= 0, got {ratio}")
        if not min_per_s >= 0.0:
            raise ValueError(f"min_per_s must be >= 0, got {min_per_s}")
        if not (window_s > 0.0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a finite number > 0, got {window_s}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.ratio = ratio
        self._floor = min_per_s * window_s
        self._width_s = window_s / buckets
        # Bucket b of absolute time t is floor(t / width); it lives in slot b % buckets.
        # Invariant: the slots hold buckets _epoch - buckets + 1 .. _epoch, and the totals
        # are the sums over the slots.
        self._epoch: int | None = None  # newest bucket; None until the first call
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._total_requests = 0
        self._total_retries = 0

    def __repr__(self) -> str:
        return (
            f"<RetryBudget ratio={self.ratio:g} requests={self._total_requests} "
            f"retries={self._total_retries} limit={self._limit():g}>"
        )

    @property
    def requests(self) -> int:
        """Requests in the window as of the last call (for status pages and tests)."""
        return self._total_requests

    @property
    def retries(self) -> int:
        """Retries in the window as of the last call."""
        return self._total_retries

    def _limit(self) -> float:
        limit = self.ratio * self._total_requests
        return limit if limit > self._floor else self._floor

    def _slot(self, now: float) -> int:
        """Rotate the window to `now` and return the slot of the newest bucket."""
        epoch = math.floor(now / self._width_s)
        n = len(self._requests)
        last = self._epoch
        if last is None:
            self._epoch = epoch
        elif epoch > last:
            # Clear the buckets that fell out: those after `last`, up to `epoch`. After a
            # jump of a whole window or more, that is every bucket, once.
            stale = epoch - last if epoch - last < n else n
            requests, retries = self._requests, self._retries
            for b in range(epoch - stale + 1, epoch + 1):
                i = b % n
                self._total_requests -= requests[i]
                self._total_retries -= retries[i]
                requests[i] = 0
                retries[i] = 0
            self._epoch = epoch
        else:
            epoch = last  # same bucket, or the clock went backwards: count into the newest
        return epoch % n

    def record_request(self, now: float) -> None:
        """Count one client request (once per request, not per try)."""
        i = self._slot(now)
        self._requests[i] += 1
        self._total_requests += 1

    def would_allow(self, now: float) -> bool:
        """Whether one more retry fits in the budget now; spends nothing."""
        self._slot(now)  # rotating is bookkeeping, not spending
        return self._total_retries + 1 <= self._limit()

    def try_spend(self, now: float) -> bool:
        """Count a retry (or hedge) and return True when it fits in the budget, else False."""
        i = self._slot(now)
        if self._total_retries + 1 > self._limit():
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True
