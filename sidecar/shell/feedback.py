"""Feedback, the shell part: captures from the proxy, `POST {feedback.path}`, snapshots (docs/feedback.md).

Owns, per process (one `Feedback`, owned by shell/services.py; a reload calls `apply`):

- the trackers: one `core.feedback.FeedbackTracker` per route with `feedback`, owned by ONE
  worker thread (a single-thread executor), which parses bodies (orjson), captures, adds,
  joins and expires. A 1000-item join is ~10 ms of Python: never on the event loop.
- captures: the proxy's `offer` appends (plan, backend, request id, monotonic time, request
  body, answer body) to a bounded loop-side list (full, by count or bytes: dropped and
  counted `queue_full`); `miss` counts an answer that cannot be captured (streamed, or an
  error status). The list goes to the worker every TICK_S, and before every join.
- joins: `join` hands the raw body to the worker, which parses it, judges it and joins it.
  At most MAX_JOINS run or wait at once; past that the POST gets 503 `overloaded`.
- publishing: each worker pass returns immutable summaries (`FeedbackSummary`) and outcome
  counts; metrics callbacks and `/admin/status` read only those. `GET /admin/feedback` asks
  the worker for fresh ones.

Ordering invariant (why a feedback never misses its own prediction): the proxy offers the
capture in `_respond`, before the answer is written, so before the client can know the id.
A join first hands every capture offered so far to the worker, then its own job; the
executor runs jobs in submission order, so those captures are added before the join reads
the store. One queue (the executor's) for both, in order.

Threading invariants (why no locks):
- `_w_*` attributes and methods belong to the worker thread; the loop never touches them
  after construction. Config changes reach it as a job (`_w_apply`), ordered with the rest.
- `_pending`, counters, the published snapshots and the metric callbacks are loop-only.

Memory: a pending prediction costs about 250 bytes of RSS (210 by tracemalloc), measured by
`python3 bench/feedback_memory.py` (docs/feedback.md#memory); the capture queue holds at
most MAX_PENDING answers and MAX_PENDING_BYTES of their bodies.

Reload: a route's tracker is kept while its `FeedbackPlan.fingerprint` is the same, and
dropped (its pending predictions and metrics with it) otherwise.

Imports: stdlib, redis (typing only), sidecar.config, sidecar.core (feedback, registry), sidecar.errors,
sidecar.shell (feedback_share, formats).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from sidecar.config.model import FleetConfig
from sidecar.config.plan import FeedbackPlan, Plan
from sidecar.core.feedback import (
    FeedbackBodyError,
    FeedbackMark,
    FeedbackSummary,
    FeedbackTracker,
    JoinOutcome,
    LocalPendingStore,
    Pending,
    StepFeedback,
    feedback_items,
    results_json,
)
from sidecar.core.registry import ModelRef
from sidecar.errors import Overloaded
from sidecar.shell.feedback_share import ErrorCount, SharedPendingStore, connect
from sidecar.shell.formats import load_json

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger("sidecar.feedback")

TICK_S: Final = 0.1                       # how often captures go to the worker (and expiry runs)
MAX_PENDING: Final = 10_000               # captures waiting for the worker (offered or queued) ...
MAX_PENDING_BYTES: Final = 64 * 1024**2   # ... and their bodies' bytes
MAX_JOINS: Final = 16                     # feedback POSTs joining or waiting for the worker at once

# (plan, backend, request id, monotonic time, request body or None, answer body)
Capture = tuple[FeedbackPlan, str, str, float, bytes | None, bytes]
# what a worker pass publishes: per route, (summary, outcome counts)
Published = dict[str, tuple[FeedbackSummary, dict[tuple[str | None, JoinOutcome], int]]]


class BadFeedback(ValueError):
    """A feedback body that is not JSON, or not one item or a list of at most 1000: a 400."""


class Feedback:
    """See the module docstring. Built by shell/services.py; `run()` lives in the server's TaskGroup.

    For the rollout (judging a step on feedback): `await mark(route)` at the step's start,
    `await since(route, mark)` when judging; both run on the worker thread, so they see every
    join the worker has done, and return immutable values (None: the route has no feedback).
    `tracker(route)` is the route's `FeedbackTracker` itself, for identity checks (a reload
    keeps it or not); its state belongs to the worker thread, so read it only through
    `mark`/`since`/`snapshot`, never directly from the loop.
    """

    def __init__(self) -> None:
        # loop-side
        self._plans: dict[str, FeedbackPlan] = {}           # route -> plan, of the serving config
        self._pending: list[Capture] = []
        self._pending_bytes = 0
        self._queued = 0                                    # captures handed to the worker, not yet added
        self._queued_bytes = 0
        self._joins = 0                                     # joins running or waiting
        self._missed: dict[tuple[str, str], int] = {}       # (route, reason) -> captures missed
        self._published: Published = {}
        self.errors = 0
        self.models: Mapping[str, ModelRef] = {}            # backend -> ModelRef, set by shell/services.py
        # worker-side
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback")
        self._w_trackers: dict[str, FeedbackTracker] = {}
        self._w_plans: dict[str, FeedbackPlan] = {}
        # with `fleet` only (`share`): the fleet's store for the pending predictions
        self._fleet: FleetConfig | None = None
        self._client: Redis | None = None                   # worker-side after `share`
        self._store_errors = ErrorCount()                   # written by the worker
        self._store_errors_seen = 0                         # loop-side
        self.on_store_errors: Callable[[int], None] | None = None   # loop: called with new failures' count

    # -- config (loop) ------------------------------------------------------------------------

    def share(self, fleet: FleetConfig) -> None:
        """With `fleet`: keep the pending predictions in the fleet's store (shell/feedback_share.py).
        Before the first `apply`; the client connects on its first call, in the worker."""
        self._fleet = fleet
        self._client = connect(fleet.redis, fleet.sync_every / 2, fleet.name)

    def apply(self, plan: Plan) -> None:
        """Take a new plan (initial or reload); keep the trackers whose fingerprint is the same."""
        self._plans = {fp.route: fp for fp in plan.feedback_by_path.values()}
        backends = {r.name: r.backends for r in plan.routes}
        self._missed = {k: n for k, n in self._missed.items() if k[0] in self._plans}
        self._published = {r: p for r, p in self._published.items() if r in self._plans}
        self._submit(self._w_apply, dict(self._plans), backends)

    def _submit(self, fn: Any, *args: Any) -> None:
        fut = self._executor.submit(fn, *args)
        fut.add_done_callback(_log_failure)

    # -- captures (loop, per request) -----------------------------------------------------------

    def offer(self, plan: FeedbackPlan, backend: str, request_id: str, body: bytes, answer: bytes) -> None:
        """Hand an answered request to the worker: one bounded append, no parsing."""
        request = body if plan.needs_request else None
        size = len(answer) + (len(request) if request is not None else 0)
        if len(self._pending) + self._queued >= MAX_PENDING or \
                self._pending_bytes + self._queued_bytes + size > MAX_PENDING_BYTES:
            self.miss(plan.route, "queue_full")
            return
        self._pending_bytes += size
        self._pending.append((plan, backend, request_id, time.monotonic(), request, answer))

    def miss(self, route: str, reason: str) -> None:
        """An answer whose prediction could not be captured (`streamed`, `error_status`, `queue_full`)."""
        key = (route, reason)
        self._missed[key] = self._missed.get(key, 0) + 1

    def _flush(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Published]:
        """Hand every offered capture to the worker (in order with later jobs)."""
        batch, size = self._pending, self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        self._queued += len(batch)
        self._queued_bytes += size
        fut = loop.run_in_executor(self._executor, self._w_add, batch)

        def done(f: asyncio.Future[Published]) -> None:
            self._queued -= len(batch)
            self._queued_bytes -= size
            if not f.cancelled() and f.exception() is not None:  # retrieved here: a flush nobody awaits
                self.errors += 1
                log.error("feedback captures failed: %r", f.exception())

        fut.add_done_callback(done)
        return fut

    # -- joins (loop) ---------------------------------------------------------------------------

    def would_accept_join(self) -> bool:
        return self._joins < MAX_JOINS

    async def join(self, plan: FeedbackPlan, body: bytes) -> dict[str, Any]:
        """`POST {plan.path}`: the 200 document. Raises BadFeedback (400), and Overloaded (503)
        past MAX_JOINS (the caller also asks `would_accept_join` before it reads the body)."""
        if not self.would_accept_join():
            raise Overloaded("too many feedback posts being joined")
        loop = asyncio.get_running_loop()
        self._joins += 1
        try:
            if self._pending:
                _ = self._flush(loop)   # its captures are added before this join runs (same executor, FIFO)
            doc, published = await loop.run_in_executor(self._executor, self._w_join, plan, body)
        finally:
            self._joins -= 1
        self._publish(published)
        return doc

    # -- the background task (loop) -----------------------------------------------------------

    async def run(self) -> None:
        """Every TICK_S: captures to the worker, expiry, fresh snapshots; forever (TaskGroup)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                try:
                    await self.tick(loop)
                except Exception:
                    self.errors += 1
                    log.exception("feedback pass failed; carrying on")
                    await asyncio.sleep(1.0)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._client is not None:   # sockets only: a worker call in flight fails, its pass is dropped
                self._client.connection_pool.disconnect()

    async def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._plans:
            return
        self._publish(await self._flush(loop))

    async def snapshot(self) -> Published:
        """Fresh summaries from the worker (every capture offered so far included)."""
        loop = asyncio.get_running_loop()
        if self._pending:
            _ = self._flush(loop)
        published = await loop.run_in_executor(self._executor, self._w_publish)
        self._publish(published)
        return published

    def _publish(self, published: Published) -> None:
        self._published = {r: p for r, p in published.items() if r in self._plans}
        failed = self._store_errors.n
        if failed != self._store_errors_seen and self.on_store_errors is not None:
            self.on_store_errors(failed - self._store_errors_seen)
        self._store_errors_seen = failed

    # -- for the rollout ------------------------------------------------------------------------

    def tracker(self, route: str) -> FeedbackTracker | None:
        """The route's tracker (worker-owned: see the class docstring), or None."""
        return self._w_trackers.get(route)

    async def mark(self, route: str) -> FeedbackMark | None:
        """The route's cumulative tallies now (a rollout step's start), read on the worker."""
        loop = asyncio.get_running_loop()
        if self._pending:
            _ = self._flush(loop)

        def read() -> FeedbackMark | None:
            t = self._w_trackers.get(route)
            return t.mark(time.monotonic()) if t is not None else None

        return await loop.run_in_executor(self._executor, read)

    async def since(self, route: str, mark: FeedbackMark) -> StepFeedback | None:
        """Feedback joined on the route since `mark` (from `mark(route)`), read on the worker.
        A reload that replaced the tracker makes the step's tallies start from zero again."""
        loop = asyncio.get_running_loop()

        def read() -> StepFeedback | None:
            t = self._w_trackers.get(route)
            return t.since(mark) if t is not None else None

        return await loop.run_in_executor(self._executor, read)

    # -- worker thread ------------------------------------------------------------------------

    def _w_apply(self, plans: dict[str, FeedbackPlan], backends: dict[str, tuple[str, ...]]) -> None:
        new: dict[str, FeedbackTracker] = {}
        for route, fp in plans.items():
            old, old_plan = self._w_trackers.get(route), self._w_plans.get(route)
            if old is not None and old_plan is not None and old_plan.fingerprint == fp.fingerprint:
                new[route] = old
            else:
                new[route] = FeedbackTracker(fp.policy, self._w_store(fp), backends=backends.get(route, ()))
        self._w_trackers, self._w_plans = new, dict(plans)

    def _w_store(self, fp: FeedbackPlan) -> SharedPendingStore | None:
        """With `fleet`, the route's store in the fleet's Redis; else None (the tracker's local one)."""
        if self._fleet is None or self._client is None:
            return None
        local = LocalPendingStore(fp.policy.keep_s, fp.policy.max_pending)
        prefix = f"sidecar:fleet:{{{self._fleet.name}}}:fb:{fp.route}:{fp.fingerprint}:"
        return SharedPendingStore(local, self._client, prefix, self._fleet.sync_every, self._store_errors)

    def _w_tracker(self, plan: FeedbackPlan) -> FeedbackTracker | None:
        """The tracker for work made under `plan`; None when a reload changed the route since."""
        current = self._w_plans.get(plan.route)
        if current is None or current.fingerprint != plan.fingerprint:
            return None
        return self._w_trackers.get(plan.route)

    def _w_add(self, batch: list[Capture]) -> Published:
        now = time.monotonic()
        by_route: dict[str, tuple[FeedbackTracker, list[tuple[str, Pending]]]] = {}
        for plan, backend, request_id, at, request, answer in batch:
            tracker = self._w_tracker(plan)
            if tracker is None:
                continue  # captured under a config that has since changed
            req_doc = load_json(request) if request is not None else None
            pending = tracker.capture(backend, at, req_doc, load_json(answer))
            by_route.setdefault(plan.route, (tracker, []))[1].append((request_id, pending))
        for tracker, items in by_route.values():
            tracker.add_many(items, now)
        for tracker in self._w_trackers.values():
            tracker.expire(now)
            if isinstance(tracker.store, SharedPendingStore):
                tracker.store.publish(now)
        return self._w_publish()

    def _w_join(self, plan: FeedbackPlan, body: bytes) -> tuple[dict[str, Any], Published]:
        tracker = self._w_tracker(plan)
        if tracker is None:  # the route was reloaded between the match and now: its new tracker
            tracker = self._w_trackers.get(plan.route)
        if tracker is None:
            raise BadFeedback(f"route {plan.route!r} no longer takes feedback")
        doc = load_json(body)
        if doc is None:
            raise BadFeedback("the feedback body is not JSON")
        try:
            items = feedback_items(doc)
        except FeedbackBodyError as e:
            raise BadFeedback(str(e)) from None
        results = tracker.join_many(items, time.monotonic())
        return results_json(results), self._w_publish()

    def _w_publish(self) -> Published:
        return {r: (t.summary(), t.outcome_counts()) for r, t in self._w_trackers.items()}

    # -- reading (loop) -----------------------------------------------------------------------

    def routes_json(self, published: Published | None = None) -> list[dict[str, Any]]:
        """Per route: its path, summary (core/feedback.py `FeedbackSummary.to_json`), capture misses."""
        published = self._published if published is None else published
        out = []
        for route, plan in self._plans.items():
            got = published.get(route)
            doc: dict[str, Any] = {"route": route, "path": plan.path}
            if got is not None:
                doc.update(got[0].to_json())
                for b in doc["backends"]:
                    b["model"] = self._model_json(b["backend"])
            doc["captures_missed"] = {reason: n for (r, reason), n in self._missed.items() if r == route}
            out.append(doc)
        return out

    def status_rows(self) -> list[dict[str, Any]]:
        """The `/admin/status` section (a table on the status page, beside drift): one row per
        (route, backend): the metric's name and value, its count, the score mean, and per
        segment value the metric, count and too_small flag (published snapshot)."""
        return [{"route": route, "backend": b.backend, "model": self._model_json(b.backend),
                 "metric": str(summary.metric), "value": b.metric, "count": b.count, "score_mean": b.score_mean,
                 "segments": [s.to_json() for s in b.segments]}
                for route, (summary, _) in self._published.items() for b in summary.backends]

    def _model_json(self, backend: str) -> dict[str, Any] | None:
        """The backend's model and version now (docs/registry.md); the metrics join `backend_info` instead."""
        m = self.models.get(backend)
        return None if m is None else m.to_json()

    # -- metrics (scrape time, loop; bound by shell/services.py) -----------------------------------

    def total_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for route, (_, counts) in self._published.items():
            for (backend, outcome), n in counts.items():
                yield (route, backend or "", str(outcome)), float(n)

    def metric_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for route, (summary, _) in self._published.items():
            for b in summary.backends:
                if b.metric is not None:
                    yield (route, b.backend, str(summary.metric)), b.metric

    def segment_metric_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for route, (summary, _) in self._published.items():
            for b in summary.backends:
                for s in b.segments:
                    if s.metric is not None:
                        yield (route, b.backend, s.segment, s.value, str(summary.metric)), s.metric

    def score_mean_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for route, (summary, _) in self._published.items():
            for b in summary.backends:
                if b.score_mean is not None:
                    yield (route, b.backend), b.score_mean

    def pending_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((route, ), float(s.store.pending)) for route, (s, _) in self._published.items())

    def pending_dropped_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((route, ), float(s.store.dropped_total)) for route, (s, _) in self._published.items())

    def missed_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return ((k, float(n)) for k, n in self._missed.items())


def _log_failure(fut: Any) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("feedback worker job failed: %r", exc, exc_info=exc)
