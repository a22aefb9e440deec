"""The recent past that the status page charts: a bounded ring of points, each made from two
snapshots of the sidecar's cumulative counters (docs/reference/admin-api.md#history).

    shell/history.py, every `every_s`:   snapshot of counters  ->  History.record(snapshot, t)
    GET /admin/history:                  History.to_json()  (columns, one value per point)
    GET /admin/status:                   History.recent(backend, now, over_s)

A point holds what happened between two snapshots, as rates per second: answers per backend
and per route by status code, tries and failed tries, mirror copies; latency percentiles
from the difference of the duration histograms; and the gauges read at the same moment
(effective weights, mirror agreement, feedback metric). Nothing here runs per request: the
hot path only bumps the counters it always bumped.

Bounds: `keep_s / every_s` points (180 for 15 minutes at 5 s); the series in a point are
bounded by the config's names and the fixed label values of the counters (status codes,
outcomes), never by request data.

NOTE: p50/p99 per point are interpolated within histogram buckets (as Prometheus's
`histogram_quantile` does), so they are approximate to the bucket edges
(shell/metrics.py `LATENCY_BUCKETS`: 25, 50, 100, 250 ms, ...); a point with no answers has
none. Counters that went down (never, today: cells outlive reloads) count as 0.

Imports: the standard library only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Mirror outcomes that were a try on the shadow, and those of them that failed
# (shell/mirror.py `MirrorOutcome`; kept as strings: core does not import the shell).
MIRROR_TRIES = frozenset({"agree", "disagree", "missing", "sent", "primary_unreadable", "shadow_error",
                          "shadow_timeout"})
MIRROR_FAILED = frozenset({"shadow_error", "shadow_timeout"})


@dataclass(slots=True)
class Snapshot:
    """Cumulative counters and current gauges at one moment, as plain values.

    Keys are label tuples as in the metrics (docs/reference/metrics.md):
    `requests[(route, backend, code)]`, `durations[(route, backend)] = (bucket counts, not
    cumulative, the last one +Inf)`, `attempts[(route, backend, outcome, failed)]`,
    `mirrors[(route, backend, outcome)]`; gauges: `weights[(route, backend)]` (effective
    share 0-1), `agreement[(route, backend)]`, `feedback[(route, backend, metric)]`.
    """

    requests: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    durations: Mapping[tuple[str, str], Sequence[int]] = field(default_factory=dict)
    attempts: Mapping[tuple[str, str, str, bool], float] = field(default_factory=dict)
    mirrors: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    weights: Mapping[tuple[str, str], float] = field(default_factory=dict)
    agreement: Mapping[tuple[str, str], float] = field(default_factory=dict)
    feedback: Mapping[tuple[str, str, str], float] = field(default_factory=dict)


@dataclass(slots=True)
class BackendPoint:
    """One backend over one interval, all routes together; counts while `record` adds them
    up, per second once the point is made."""

    answers: float = 0.0                                    # answers it gave
    codes: dict[str, float] = field(default_factory=dict)   # status code -> answers
    tries: float = 0.0                                      # tries on it, mirror copies included
    failed: float = 0.0                                     # of which failed (docs/resilience.md)
    mirrored: float = 0.0                                   # mirror copies it answered or failed
    p50_s: float | None = None
    p99_s: float | None = None


@dataclass(slots=True)
class Recent:
    """A backend's counts over the last points (`History.recent`) and the seconds they cover."""

    answers: float = 0.0
    tries: float = 0.0
    failed: float = 0.0
    mirrored: float = 0.0
    span_s: float = 0.0


@dataclass(slots=True)
class RoutePoint:
    answers: float = 0.0
    codes: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Point:
    t: float           # wall clock (epoch seconds) at the end of the interval
    dt: float          # the interval's length, seconds
    backends: dict[str, BackendPoint]
    routes: dict[str, RoutePoint]
    weights: dict[tuple[str, str], float]
    agreement: dict[tuple[str, str], float]
    feedback: dict[tuple[str, str, str], float]


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """The q-quantile of observations counted per bucket (`counts[i]` in (bounds[i-1], bounds[i]],
    the last one above every bound), interpolated linearly within its bucket; None without any.

    As Prometheus: the first bucket starts at 0, and a quantile in the +Inf bucket is the
    highest finite bound.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    acc = 0.0
    for i, n in enumerate(counts):
        if n > 0 and acc + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = bounds[i - 1] if i > 0 else 0.0
            return float(lo + (bounds[i] - lo) * (rank - acc) / n)
        acc += n
    return float(bounds[-1])


def _delta(now: float, before: float | None) -> float:
    return max(0.0, now - (before or 0.0))


class History:
    """See the module docstring. `record` and the readers run on one thread (the event loop)."""

    def __init__(self, bounds: Sequence[float], every_s: float, keep_s: float) -> None:
        assert every_s > 0 and keep_s >= every_s
        self.bounds = tuple(bounds)
        self.every_s = every_s
        self.keep_s = keep_s
        self.points: deque[Point] = deque(maxlen=math.ceil(keep_s / every_s))
        self._last: Snapshot | None = None
        self._last_t = 0.0
        self.serial = 0   # points recorded so far: what a cache of `to_json` is keyed on

    def record(self, snap: Snapshot, t: float) -> Point | None:
        """Add the point between the previous snapshot and `snap` (taken at wall time `t`).
        The first snapshot only sets the start; returns the point made, if any."""
        last, last_t = self._last, self._last_t
        self._last, self._last_t = snap, t
        if last is None or t <= last_t:
            return None
        backends: dict[str, BackendPoint] = {}
        routes: dict[str, RoutePoint] = {}
        for (route, backend, code), n in snap.requests.items():
            d = _delta(n, last.requests.get((route, backend, code)))
            rp = routes.setdefault(route, RoutePoint())
            rp.answers += d
            rp.codes[code] = rp.codes.get(code, 0.0) + d
            if backend:   # "" is an answer the sidecar made with no backend (502, 504, 503)
                bp = backends.setdefault(backend, BackendPoint())
                bp.answers += d
                bp.codes[code] = bp.codes.get(code, 0.0) + d
        for (_route, backend, _outcome, failed), n in snap.attempts.items():
            d = _delta(n, last.attempts.get((_route, backend, _outcome, failed)))
            bp = backends.setdefault(backend, BackendPoint())
            bp.tries += d
            bp.failed += d if failed else 0.0
        for (route, backend, outcome), n in snap.mirrors.items():
            if outcome not in MIRROR_TRIES:
                continue
            d = _delta(n, last.mirrors.get((route, backend, outcome)))
            bp = backends.setdefault(backend, BackendPoint())
            bp.tries += d
            bp.mirrored += d
            bp.failed += d if outcome in MIRROR_FAILED else 0.0
        merged: dict[str, list[float]] = {}
        for (_route, backend), counts in snap.durations.items():
            before = last.durations.get((_route, backend))
            acc = merged.setdefault(backend, [0.0] * len(counts))
            for i, n in enumerate(counts):
                acc[i] += _delta(n, before[i] if before is not None else None)
        for backend, sums in merged.items():
            bp = backends.setdefault(backend, BackendPoint())
            bp.p50_s = histogram_quantile(0.5, self.bounds, sums)
            bp.p99_s = histogram_quantile(0.99, self.bounds, sums)
        dt = t - last_t
        for bp in backends.values():   # counts -> rates, once, so that reading costs no arithmetic
            bp.answers, bp.tries, bp.failed, bp.mirrored = bp.answers / dt, bp.tries / dt, bp.failed / dt, \
                bp.mirrored / dt
            bp.codes = {c: n / dt for c, n in bp.codes.items()}
        for rp in routes.values():
            rp.answers = rp.answers / dt
            rp.codes = {c: n / dt for c, n in rp.codes.items()}
        point = Point(t, dt, backends, routes, dict(snap.weights), dict(snap.agreement), dict(snap.feedback))
        self.serial += 1
        self.points.append(point)
        return point

    def recent(self, backend: str, now: float, over_s: float) -> Recent | None:
        """A backend's traffic over the points that ended within `over_s` of wall time `now`;
        None when no point is that recent (the history just started)."""
        r = Recent()
        seen = False
        for p in reversed(self.points):
            if p.t < now - over_s:
                break
            seen = True
            r.span_s += p.dt
            if (bp := p.backends.get(backend)) is not None:
                r.answers += bp.answers * p.dt
                r.tries += bp.tries * p.dt
                r.failed += bp.failed * p.dt
                r.mirrored += bp.mirrored * p.dt
        return r if seen else None

    def to_json(self, backends: Sequence[str], routes: Sequence[str]) -> dict[str, Any]:
        """Columns for charts: `time` and, per series, one value per point (null: none then).

        Rates are per second over each point's interval. `backends` and `routes` (the running
        config's names, in config order) are listed even before they saw traffic.
        """
        pts = list(self.points)
        empty_b, empty_r = BackendPoint(), RoutePoint()

        def codes_of(items: list[dict[str, float]]) -> dict[str, list[float]]:
            names = sorted({c for d in items for c in d})
            return {c: [d.get(c, 0.0) for d in items] for c in names}

        b_doc: dict[str, Any] = {}
        for name in backends:
            bps = [p.backends.get(name, empty_b) for p in pts]
            b_doc[name] = {
                "answers_per_s": [bp.answers for bp in bps],
                "codes_per_s": codes_of([bp.codes for bp in bps]),
                "tries_per_s": [bp.tries for bp in bps],
                "failed_tries_per_s": [bp.failed for bp in bps],
                "mirrored_per_s": [bp.mirrored for bp in bps],
                "p50_s": [bp.p50_s for bp in bps],
                "p99_s": [bp.p99_s for bp in bps],
            }
        r_doc: dict[str, Any] = {}
        weight_keys = sorted({k for p in pts for k in p.weights})
        for name in routes:
            rps = [p.routes.get(name, empty_r) for p in pts]
            r_doc[name] = {
                "answers_per_s": [rp.answers for rp in rps],
                "codes_per_s": codes_of([rp.codes for rp in rps]),
                "weights": {b: [p.weights.get((r, b)) for p in pts] for r, b in weight_keys if r == name},
            }
        return {
            "every_s": self.every_s,
            "keep_s": self.keep_s,
            "time": [p.t for p in pts],
            "backends": b_doc,
            "routes": r_doc,
            "mirrors": [{"route": r, "backend": b, "agreement": [p.agreement.get((r, b)) for p in pts]}
                        for r, b in sorted({k for p in pts for k in p.agreement})],
            "feedback": [{"route": r, "backend": b, "metric": m, "values": [p.feedback.get((r, b, m)) for p in pts]}
                         for r, b, m in sorted({k for p in pts for k in p.feedback})],
        }
