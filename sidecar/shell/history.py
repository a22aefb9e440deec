"""The history behind the status page's charts: every `every_s`, one snapshot of the metric
cells and live gauges goes into core/history.py's bounded ring (docs/reference/admin-api.md#history).

    run()        the loop, in the server's TaskGroup (shell/services.py `tasks`)
    sample()     read the counters (shell/metrics.py cells), the effective weights, mirror
                 agreement and the feedback metric; one `History.record`
    to_json_bytes()  GET /admin/history (cached until the next point)
    recent(backend)  its answers since start, and over the last minute its rate and the failed
                 share of its tries (/admin/status; what `health` leans on without a health check)

Cost: one pass over the label children of four counter families per `every_s` (a few
hundred cells for a large config), on the loop; nothing per request.

Imports: stdlib, orjson, sidecar.core, sidecar.shell (metrics, mirror, feedback, runtime).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from sidecar.core.history import History, Snapshot
from sidecar.core.outcome import Outcome
from sidecar.shell.feedback import Feedback
from sidecar.shell.metrics import LATENCY_BUCKETS, Metrics
from sidecar.shell.mirror import Mirrors
from sidecar.shell.runtime import Runtime

log = logging.getLogger("sidecar.history")

EVERY_S: Final = 5.0          # one point per 5 s ...
KEEP_S: Final = 900.0         # ... for the last 15 minutes: 180 points
RECENT_S: Final = 60.0        # /admin/status's recent error rate: the last minute


class HistorySampler:
    """Owns the `History`; sampled by its own loop, read by the admin API (same thread)."""

    def __init__(self, metrics: Metrics, mirrors: Mirrors, feedback: Feedback,
                 every_s: float = EVERY_S, keep_s: float = KEEP_S) -> None:
        self.metrics, self.mirrors, self.feedback = metrics, mirrors, feedback
        self.history = History(LATENCY_BUCKETS, every_s, max(keep_s, every_s))
        self._live: Callable[[], Runtime] | None = None
        self._cached: tuple[tuple[int, str], bytes] | None = None

    def bind(self, live: Callable[[], Runtime]) -> None:
        """`live()` is the runtime serving at sampling time (shell/services.py `bind_gauges`)."""
        self._live = live

    def snapshot(self) -> Snapshot:
        m = self.metrics
        requests = {(r, b, code): c.value for (r, b, code), c in m.requests.items()}
        durations = {(r, b): tuple(h.counts) for (r, b), h in m.request_duration.items()}
        attempts = {(r, b, o, Outcome(o).failed): c.value for (r, b, o), c in m.upstream_attempts.items()}
        mirrors = {(r, b, o): c.value for (r, b, o), c in m.mirror_requests.items()}
        weights = {(r, b): share for (r, b), share in self._live().weight_samples()} if self._live else {}
        agreement = {(r, b): ratio for (r, b), ratio in self.mirrors.agreement_samples()}
        feedback = {(r, b, metric): v for (r, b, metric), v in self.feedback.metric_samples()}
        return Snapshot(requests, durations, attempts, mirrors, weights, agreement, feedback)

    def sample(self) -> None:
        self.history.record(self.snapshot(), time.time())

    async def run(self) -> None:
        """Sample now (the start) and every `every_s` after, until cancelled; a failing
        sample is logged and the loop goes on."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("history sample failed; the status page's charts miss a point")
            next_at += self.history.every_s
            # late (a stalled loop): skip the missed ticks rather than sample in a burst
            while next_at <= loop.time():
                next_at += self.history.every_s
            await asyncio.sleep(next_at - loop.time())

    def recent(self, backend: str) -> dict[str, Any]:
        """What /admin/status says of a backend's traffic: its answers since start (read live
        from the counters), and over the last minute its answers and mirror copies per second
        and the failed share of its tries (None without tries, or before the first point)."""
        total = sum(c.value for (_, b, _), c in self.metrics.requests.items() if b == backend)
        r = self.history.recent(backend, time.time(), RECENT_S)
        if r is None or not r.span_s:
            return {"answers_total": round(total), "answers_per_s": None, "mirrored_per_s": None,
                    "recent_error_rate": None, "recent_tries": 0}
        return {"answers_total": round(total), "answers_per_s": round(r.answers / r.span_s, 3),
                "mirrored_per_s": round(r.mirrored / r.span_s, 3),
                "recent_error_rate": r.failed / r.tries if r.tries else None, "recent_tries": round(r.tries)}

    def to_json_bytes(self, rt: Runtime) -> bytes:
        """GET /admin/history's body; built at most once per point and config (a page open in
        several browsers, refreshing every 2 s, costs one build per `every_s`)."""
        plan = rt.plan
        key = (self.history.serial, plan.version)
        if self._cached is None or self._cached[0] != key:
            doc = self.history.to_json(list(plan.backends), [r.name for r in plan.routes])
            self._cached = (key, orjson.dumps(doc))
        return self._cached[1]
