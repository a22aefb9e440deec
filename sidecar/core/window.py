"""Rolling windows fed on the proxy's hot path and summarised on a schedule.

Owns: `LatencyWindow` (latency percentiles and error rate over the last N requests of one
(route, backend)), `FeatureWindow` (the last N samples of one monitored feature) and the one
definition of what counts as a numeric or categorical sample (`as_number`, `as_category`),
shared by the windows and by whoever loads a reference file, so both sides of a drift test
see values converted the same way.

Two costs, kept apart on purpose (STYLE "Hot path"):
- `record`/`add` run once per request or sample on the event loop. They only write one slot
  of a preallocated Python list and bump an index: O(1), a few hundred nanoseconds, no numpy,
  no allocation beyond the float/str object the caller already has.
- `summary`/`values` run on a schedule. They copy the filled part of the ring into a fresh
  numpy array (a snapshot the caller may hand to a worker thread while the hot path keeps
  writing) and compute there.

Imports: the standard library and numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Longer category strings are cut to this many characters. Request data is untrusted: without
# a cap one window could pin `size` multi-megabyte strings. Two categories that share this
# long a prefix are counted as one (a named approximation; real category labels are short).
MAX_CATEGORY_CHARS = 256
_MAX_CATEGORY_INT = 10**MAX_CATEGORY_CHARS
_EXACT_INT_FLOAT = 2.0**53  # integral floats below this print as their integer


def as_number(value: object) -> float | None:
    """The float a numeric feature records for a JSON value, or None for a missing sample.

    int and float count (finite only); bool, str, None, lists and objects are the wrong type
    (docs/monitoring.md#sampling: counted as missing, never an error). JSON `true` is not the number 1 here.
    """
    if isinstance(value, float):  # float and its subclasses (numpy.float64)
        return float(value) if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range (> ~1.8e308)
            return None
    return None


def as_category(value: object) -> str | None:
    """The string a categorical feature records for a JSON value, or None for a missing sample.

    Strings are kept (cut to MAX_CATEGORY_CHARS); booleans become "true"/"false" as JSON
    writes them; integers become their decimal text, and integral floats the same text as the
    integer (so `1` and `1.0` are one category); other finite floats use `repr`. None, NaN,
    infinities, lists and objects are missing samples.
    """
    if type(value) is str:
        return value if len(value) <= MAX_CATEGORY_CHARS else value[:MAX_CATEGORY_CHARS]
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        # Bounded before str(): Python refuses to print ints of more than 4300 digits.
        return str(value) if -_MAX_CATEGORY_INT < value < _MAX_CATEGORY_INT else None
    if type(value) is float:
        if not math.isfinite(value):
            return None
        if value.is_integer() and -_EXACT_INT_FLOAT < value < _EXACT_INT_FLOAT:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):  # str subclasses (StrEnum and friends)
        return as_category(str(value))
    return None


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency and errors over a LatencyWindow's current contents.

    Percentiles are in seconds, computed with numpy's default (linear interpolation between
    the closest ranks). Everything but `count` is None while the window is empty: there is
    no p99 of nothing, and 0 would read as "perfectly healthy".
    """

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    error_rate: float | None  # failed share of the window, 0..1

    def to_json(self) -> dict[str, Any]:
        """Admin JSON shape: seconds and ratios as plain numbers (null when empty)."""
        return {
            "count": self.count,
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "error_rate": self.error_rate,
        }


class LatencyWindow:
    """The last `size` requests' latencies and failure flags, as a ring.

    Invariants: `_latency_s[:count]` and `_failed[:count]` hold the window (in ring order, not
    chronological once it has wrapped); `_next` is the slot the next record overwrites;
    `_failed_in_window == sum(_failed[:count])`, maintained on each write so that the error
    rate never needs a scan. Latencies of failed requests are included in the percentiles
    (a timeout's latency is the time the caller waited); callers that want otherwise record
    only what they want measured.
    """

    __slots__ = ("_count", "_failed", "_failed_in_window", "_latency_s", "_next", "failed_total",
                 "size", "total")

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.size = size
        self._latency_s: list[float] = [0.0] * size
        self._failed: list[bool] = [False] * size
        self._next = 0
        self._count = 0
        self._failed_in_window = 0
        self.total = 0          # lifetime records, never reset
        self.failed_total = 0   # lifetime failed records, never reset

    @property
    def count(self) -> int:
        """Records currently in the window (at most `size`)."""
        return self._count

    def record(self, latency_s: float, failed: bool) -> None:
        """Hot path: remember one request. O(1), no numpy."""
        i = self._next
        if self._failed[i]:  # the slot being overwritten held a failure; never true before wrap
            self._failed_in_window -= 1
        self._latency_s[i] = latency_s
        self._failed[i] = failed
        if failed:
            self._failed_in_window += 1
            self.failed_total += 1
        self.total += 1
        i += 1
        self._next = 0 if i == self.size else i
        if self._count < self.size:
            self._count += 1

    def summary(self) -> LatencySummary:
        """Percentiles and error rate of the window's current contents (scheduled, not hot)."""
        n = self._count
        if n == 0:
            return LatencySummary(count=0, p50=None, p95=None, p99=None, error_rate=None)
        lat = np.array(self._latency_s[:n], dtype=np.float64)
        p50, p95, p99 = np.percentile(lat, (50.0, 95.0, 99.0)).tolist()
        return LatencySummary(
            count=n,
            p50=float(p50),
            p95=float(p95),
            p99=float(p99),
            error_rate=self._failed_in_window / n,
        )

    def clear(self) -> None:
        """Empty the window (e.g. at a new rollout step); lifetime totals are kept."""
        self._failed = [False] * self.size
        self._next = 0
        self._count = 0
        self._failed_in_window = 0

    def __repr__(self) -> str:
        return (f"LatencyWindow(size={self.size}, count={self._count}, "
                f"failed_in_window={self._failed_in_window}, total={self.total})")


class FeatureWindow:
    """The last `size` samples of one feature of one (route, backend), as a ring.

    `add` converts with `as_number` or `as_category` and stores the result; a value of the
    wrong type is counted in `missing_total` instead (docs/monitoring.md#sampling), as is an explicit
    `add_missing()` for a path that found nothing. `values()` returns the filled part of the
    ring as a fresh array: float64 for numeric features, dtype=object holding `str` for
    categorical ones (object, not numpy's fixed-width unicode, whose size is the longest
    string times the count). The order of `values()` is ring order, NOT chronological once
    the window has wrapped: the drift tests are order-free, so no rotation is paid for.
    """

    __slots__ = ("_buf", "_convert", "_count", "_next", "categorical", "missing_total", "size")

    def __init__(self, size: int, categorical: bool) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.size = size
        self.categorical = categorical
        self._buf: list[Any] = [None] * size
        self._convert = as_category if categorical else as_number
        self._next = 0
        self._count = 0
        self.missing_total = 0  # lifetime, never reset: feeds a counter

    @property
    def count(self) -> int:
        """Samples currently in the window (at most `size`)."""
        return self._count

    def add(self, value: object) -> bool:
        """Hot path: store one sample; returns False when it was counted as missing instead.

        Numeric windows take int/float (finite); categorical windows take str, bool, int or
        float, converted to str by `as_category`.
        """
        converted = self._convert(value)
        if converted is None:
            self.missing_total += 1
            return False
        i = self._next
        self._buf[i] = converted
        i += 1
        self._next = 0 if i == self.size else i
        if self._count < self.size:
            self._count += 1
        return True

    def add_missing(self) -> None:
        """Count a sample whose path found nothing."""
        self.missing_total += 1

    def values(self) -> npt.NDArray[Any]:
        """A snapshot copy of the window, in ring order (see the class docstring)."""
        filled = self._buf[: self._count]
        if self.categorical:
            out = np.empty(len(filled), dtype=object)
            out[:] = filled
            return out
        return np.array(filled, dtype=np.float64)

    def clear(self) -> None:
        """Empty the window; `missing_total` is a lifetime counter and is kept."""
        self._buf = [None] * self.size
        self._next = 0
        self._count = 0

    def __repr__(self) -> str:
        kind = "categorical" if self.categorical else "numeric"
        return (f"FeatureWindow(size={self.size}, {kind}, count={self._count}, "
                f"missing_total={self.missing_total})")
