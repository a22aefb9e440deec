"""Monitoring: rolling latency per (route, backend), payload sampling, drift, the sample log.

Owns, per process (one `Monitor`, owned by shell/services.py; a reload calls `apply`):

- latency windows: `core.window.LatencyWindow` per (route, backend) and per backend, fed by
  EVERY request from the proxy's log phase (`record`: one dict lookup, two ring writes);
  summarised only when read (`/admin/status`, `/admin/drift`, a scrape).
- sampling: `draw` decides once per request with one rng() compare whether its payloads are
  read whole; `offer` appends (route, backend, bodies) to a bounded pending list (full, by
  count or bytes: dropped and counted). No JSON is parsed on the event loop.
- the worker: ONE dedicated thread (a single-thread executor) that, every TICK_S, parses the
  pending samples with orjson, extracts features with compiled JSON paths into
  `core.window.FeatureWindow`s, counts missing/wrong-typed samples and hands redacted
  records to the sample logs (shell/samplelog.py: serialised there, queued within
  `max_queue_bytes`, else dropped and counted); and, every route's `drift.every`, runs
  `core.drift.judge` over all (backend, feature). scipy is imported and warmed up at start,
  before the sidecar is ready (`prepare`), in a process whose config judges drift, and
  never in one that judges none. Importing it holds the GIL for long stretches (C
  extensions initialising: the event loop stalled up to ~270 ms when it happened under
  load), so it must not happen while serving; a reload that adds the first drift judgement
  imports it in the worker then, a one-time stall, logged.
- publishing: the loop awaits each worker pass and stores its results (drift rows, counts)
  as plain snapshots; metrics callbacks and admin JSON read only those snapshots.

Threading invariants (why no locks):
- `_w_*` attributes and methods belong to the worker thread; the loop never touches them
  after construction. Config changes reach the worker as a job (`_w_apply`) on the same
  single-thread executor, so they are ordered with ingest and drift passes.
- Latency windows, `_pending`, the published snapshots and the metric cells are loop-only.
- A SampleLog's `put` is called from the worker only; its writer is its own thread.

Reload (docs/monitoring.md#reload): windows are keyed by names and kept when what they depend on did not
change: latency windows when the backend's fingerprint is the same and the route still
uses it; feature windows when the feature's config, the window size, the reference and the
backend are the same. A reference file is re-read on every reload.

Imports: stdlib, numpy, orjson, sidecar.config, sidecar.core, sidecar.shell.formats/reference/samplelog.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

from sidecar.config.plan import FeaturePlan, MonitorPlan, Plan, RoutePlan
from sidecar.core.drift import DriftResult, judge
from sidecar.core.jsonpath import redact_all
from sidecar.core.outcome import Outcome
from sidecar.core.registry import ModelRef
from sidecar.core.window import FeatureWindow, LatencySummary, LatencyWindow, as_category, as_number
from sidecar.shell.formats import load_json, utc_iso
from sidecar.shell.reference import REDACTED
from sidecar.shell.samplelog import SampleLog

log = logging.getLogger("sidecar.monitor")

TICK_S: Final = 0.1                       # how often the worker ingests pending samples
LATENCY_WINDOW: Final = 2048              # requests per (route, backend) latency window
MAX_PENDING: Final = 10_000               # samples waiting for the worker ...
MAX_PENDING_BYTES: Final = 64 * 1024**2   # ... and their bodies' bytes
QUANTILES: Final = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))
_EMPTY: Final = np.empty(0, dtype=np.float64)

# (monitor plan, backend, request id, wall time, request body, status, response body or None, draw)
Sample = tuple[MonitorPlan, str, str, float, bytes, int, bytes | None, float]


@dataclass(frozen=True, slots=True)
class DriftRow:
    """One (route, backend, feature) as the last drift pass saw it (admin JSON, metrics)."""

    route: str
    backend: str
    feature: str
    categorical: bool
    reference: str           # "backend:stable" | "file" | "warmup"
    status: str              # "ok" (judged) | "pending" (too few samples) | "no_reference"
    n_ref: int
    n_cur: int
    result: DriftResult | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "route": self.route, "backend": self.backend, "feature": self.feature,
            "kind": "categorical" if self.categorical else "numeric", "reference": self.reference,
            "status": self.status, "n_ref": self.n_ref, "n_cur": self.n_cur,
            "test": None, "statistic": None, "p_value": None, "psi": None, "drifted": None,
        }
        if self.result is not None:
            r = self.result
            doc.update(test=r.test, statistic=r.statistic, p_value=r.p_value, psi=r.psi, drifted=r.drifted)
        return doc


@dataclass(slots=True)
class _LatencyCell:
    route_window: LatencyWindow
    backend_window: LatencyWindow


@dataclass(slots=True)
class _FeatureState:
    """Worker-owned: the current window and, for `{warmup: N}`, the frozen first N samples."""

    signature: str
    backend_fp: str
    cur: FeatureWindow
    ref: FeatureWindow | None


@dataclass(slots=True)
class _MonitoredRoute:
    """Worker-owned state of one monitored route (not the proxy's runtime RouteState)."""

    plan: MonitorPlan
    backends: tuple[str, ...]
    backend_fps: dict[str, str]
    log: SampleLog | None
    windows: dict[tuple[str, str], _FeatureState] = field(default_factory=dict)
    file_ref: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    file_error: str | None = None


def load_reference_file(path: Path, features: tuple[FeaturePlan, ...]) -> dict[str, npt.NDArray[Any]]:
    """A reference file's samples per feature, converted as windows convert them (blocking).

    Format (docs/monitoring.md#references): a JSON object `{"feature": [values, ...], ...}`. Values that are not a
    sample of the feature's kind are skipped, as a window would count them missing. Features
    absent from the file get no entry (reported as `no_reference`). Raises OSError or
    ValueError for an unreadable or malformed file.
    """
    doc = orjson.loads(path.read_bytes())
    if not isinstance(doc, dict):
        raise ValueError('a reference file is a JSON object {"feature": [values, ...]}')
    out: dict[str, npt.NDArray[Any]] = {}
    for f in features:
        values = doc.get(f.name)
        if values is None:
            continue
        if not isinstance(values, list):
            raise ValueError(f"feature {f.name!r}: expected a list of values")
        if f.categorical:
            cats = [c for c in map(as_category, values) if c is not None]
            arr = np.empty(len(cats), dtype=object)
            arr[:] = cats
            out[f.name] = arr
        else:
            out[f.name] = np.array([x for x in map(as_number, values) if x is not None], dtype=np.float64)
    return out


def _warm_up_scipy() -> None:
    """Import scipy.stats and run each test once, so the first real pass is not late.

    In a process that froze its start-up heap (`sidecar run`, cli.freeze_heap), scipy's
    modules are frozen too, so full collections do not walk them from now on."""
    from sidecar.core.drift import DriftPolicy

    policy = DriftPolicy(min_samples=1)
    judge("warmup", [0.0, 1.0, 2.0], [0.5, 1.5, 2.5], False, policy)
    judge("warmup", ["a", "b"], ["a", "a"], True, policy)
    if gc.get_freeze_count():
        gc.freeze()


class Monitor:
    """See the module docstring. Built by shell/services.py; `run()` lives in the server's TaskGroup."""

    def __init__(self, rng: Callable[[], float] = random.random) -> None:
        self._scipy_ready = False
        self._rng = rng
        # loop-side
        self._plan: Plan | None = None
        self._latency: dict[tuple[str, str], _LatencyCell] = {}
        self._latency_fp: dict[tuple[str, str], str] = {}
        self._backend_latency: dict[str, LatencyWindow] = {}
        self._backend_fp: dict[str, str] = {}
        self._valid: dict[tuple[str, str], str] = {}        # (route, backend) -> backend fingerprint
        self._monitored: dict[str, MonitorPlan] = {}
        self._next_drift: dict[str, float] = {}
        self._pending: list[Sample] = []
        self._pending_bytes = 0
        self._dropped: dict[str, int] = {}                  # route -> samples dropped (pending full)
        self._logs: dict[str, SampleLog] = {}
        self._rows: dict[str, list[DriftRow]] = {}          # published drift rows per route
        self._computed_at: dict[str, float] = {}            # route -> wall time of its last pass
        self._samples: dict[tuple[str, str], int] = {}      # published copies of worker counters
        self._missing: dict[tuple[str, str, str], int] = {}
        self.last_drift_s = 0.0                             # worker time of the last drift pass
        # backend -> ModelRef (shell/registry.py via services): swapped whole, read by the worker
        self.models: Mapping[str, ModelRef] = {}
        self.errors = 0
        # worker-side
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor")
        self._w_routes: dict[str, _MonitoredRoute] = {}
        self._w_samples: dict[tuple[str, str], int] = {}
        self._w_missing: dict[tuple[str, str, str], int] = {}

    # -- config (loop) ------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Take a new plan (initial or reload); keep what did not change. Sync, never blocks."""
        self._plan = plan
        valid = {(r.name, b): plan.backends[b].fingerprint for r in plan.routes for b in r.backends}
        self._latency = {k: c for k, c in self._latency.items() if self._latency_fp.get(k) == valid.get(k)}
        self._latency_fp = {k: valid[k] for k in self._latency}
        self._backend_latency = {b: w for b, w in self._backend_latency.items()
                                 if b in plan.backends and self._backend_fp.get(b) == plan.backends[b].fingerprint}
        self._backend_fp = {b: plan.backends[b].fingerprint for b in self._backend_latency}
        self._valid = valid
        now = time.monotonic()
        monitored = {r.name: r.monitor for r in plan.routes if r.monitor is not None}
        for name, m in monitored.items():
            old = self._monitored.get(name)
            if old is None or old.fingerprint != m.fingerprint:
                self._next_drift[name] = now + m.every_s
                self._rows.pop(name, None)
        for name in list(self._next_drift):
            if name not in monitored:
                del self._next_drift[name]
                self._rows.pop(name, None)
        self._monitored = monitored
        # sample logs: keep a writer whose config did not change (max_queue_bytes aside)
        logs: dict[str, SampleLog] = {}
        for name, m in monitored.items():
            if m.log is None:
                continue
            old_log = self._logs.get(name)
            if old_log is not None and old_log.plan.fingerprint == m.log.fingerprint:
                old_log.retune(m.log)   # max_queue_bytes is outside the fingerprint: applied in place
                logs[name] = old_log
            else:
                logs[name] = SampleLog(name, m.log)
        for name, old_log in self._logs.items():
            if logs.get(name) is not old_log:
                old_log.close()
        self._logs = logs
        routes = [(r, {b: plan.backends[b].fingerprint for b in r.backends}) for r in plan.routes
                  if r.monitor is not None]
        self._submit(self._w_apply, routes, dict(logs))

    def _submit(self, fn: Callable[..., object], *args: object) -> None:
        fut: Future[object] = self._executor.submit(fn, *args)
        fut.add_done_callback(_log_failure)

    # -- hot path (loop) ----------------------------------------------------------------------

    def draw(self, route: RoutePlan) -> float | None:
        """One rng() compare: the draw when this request's payloads are sampled, else None."""
        m = route.monitor
        if m is None:
            return None
        u = self._rng()
        return u if u < m.draw_below else None

    def offer(self, route: RoutePlan, backend: str, request_id: str, body: bytes, status: int,
              response: bytes | None, draw: float) -> None:
        """Hand a sampled exchange to the worker: one bounded append, no parsing."""
        m = route.monitor
        assert m is not None
        size = len(body) + (len(response) if response is not None else 0)
        if len(self._pending) >= MAX_PENDING or self._pending_bytes + size > MAX_PENDING_BYTES:
            self._dropped[route.name] = self._dropped.get(route.name, 0) + 1
            return
        self._pending_bytes += size
        self._pending.append((m, backend, request_id, time.time(), body, status, response, draw))

    def record(self, route: str, backend: str, duration_s: float, outcome: Outcome) -> None:
        """Every answered request: latency, and whether it failed (core/outcome.py says: a 5xx,
        the backend's or the sidecar's 502/503/504, or a stream that broke after it started; a
        4xx is the model's answer, not a failure), into the rolling windows."""
        cell = self._latency.get((route, backend))
        if cell is None:
            cell = self._new_cell(route, backend)
            if cell is None:
                return
        failed = outcome.failed
        cell.route_window.record(duration_s, failed)
        cell.backend_window.record(duration_s, failed)

    def _new_cell(self, route: str, backend: str) -> _LatencyCell | None:
        fp = self._valid.get((route, backend))
        if fp is None:  # no such pair in the current config (unmatched, or a stale request)
            return None
        bw = self._backend_latency.get(backend)
        if bw is None:
            bw = self._backend_latency[backend] = LatencyWindow(LATENCY_WINDOW)
            self._backend_fp[backend] = fp
        cell = self._latency[(route, backend)] = _LatencyCell(LatencyWindow(LATENCY_WINDOW), bw)
        self._latency_fp[(route, backend)] = fp
        return cell

    # -- the background task (loop) -----------------------------------------------------------

    async def prepare(self) -> None:
        """Before serving: import and warm up scipy when the config judges drift (see above)."""
        if any(m.reference_kind is not None for m in self._monitored.values()):
            await self._load_scipy()

    async def _load_scipy(self) -> None:
        if not self._scipy_ready:
            await asyncio.get_running_loop().run_in_executor(self._executor, _warm_up_scipy)
            self._scipy_ready = True

    async def run(self) -> None:
        """Ingest every TICK_S and judge drift when due, in the worker; forever (TaskGroup)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(TICK_S)
                try:
                    await self.tick(loop)
                except Exception:
                    self.errors += 1
                    log.exception("monitor pass failed; carrying on")
                    await asyncio.sleep(1.0)
        finally:
            for sample_log in self._logs.values():
                sample_log.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """One pass: hand pending samples to the worker, then run the due drift judgements."""
        if self._pending:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            self._samples, self._missing = await loop.run_in_executor(self._executor, self._w_ingest, batch)
        now = time.monotonic()
        due = [name for name, m in self._monitored.items()
               if m.reference_kind is not None and now >= self._next_drift.get(name, 0.0)]
        if not due:
            return
        for name in due:
            self._next_drift[name] = now + self._monitored[name].every_s
        if not self._scipy_ready:
            # a reload added the first drift judgement: scipy now, while serving (prepare did not)
            log.warning("importing scipy for the first drift pass; the event loop may stall for a moment")
            await self._load_scipy()
        rows, elapsed = await loop.run_in_executor(self._executor, self._w_drift, due)
        self.last_drift_s = elapsed
        wall = time.time()
        for name, route_rows in rows.items():
            if name in self._monitored:
                self._rows[name] = route_rows
                self._computed_at[name] = wall

    # -- worker thread ------------------------------------------------------------------------

    def _w_apply(self, routes: list[tuple[RoutePlan, dict[str, str]]], logs: dict[str, SampleLog]) -> None:
        new: dict[str, _MonitoredRoute] = {}
        for route, backend_fps in routes:
            m = route.monitor
            assert m is not None
            st = _MonitoredRoute(plan=m, backends=route.backends, backend_fps=backend_fps, log=logs.get(route.name))
            old = self._w_routes.get(route.name)
            if old is not None:
                signatures = {f.name: f.signature for f in m.features}
                st.windows = {k: fs for k, fs in old.windows.items()
                              if signatures.get(k[1]) == fs.signature and backend_fps.get(k[0]) == fs.backend_fp}
            if m.reference_file is not None:
                try:
                    st.file_ref = load_reference_file(m.reference_file, m.features)
                except (OSError, ValueError) as e:
                    st.file_error = f"{m.reference_file}: {e}"
                    log.error("route %s: cannot use the reference file: %s", route.name, st.file_error)
            new[route.name] = st
        self._w_routes = new
        self._w_samples = {k: n for k, n in self._w_samples.items()
                           if k[0] in new and k[1] in new[k[0]].backend_fps}
        self._w_missing = {k: n for k, n in self._w_missing.items() if (k[0], k[1]) in self._w_samples}

    def _w_ingest(self, batch: list[Sample]) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, str], int]]:
        for m, backend, request_id, wall, body, status, response, u in batch:
            st = self._w_routes.get(m.route)
            if st is None or st.plan.fingerprint != m.fingerprint or backend not in st.backend_fps:
                continue  # sampled under a config that has since changed
            stats = u < m.sample and bool(m.features)
            to_log = st.log is not None and u < st.log.plan.sample
            # parsed only when something reads it; None: not JSON (features missing, logged as null)
            req_doc = load_json(body) if to_log or (stats and m.request_features) else None
            resp_doc = load_json(response) if to_log or (stats and m.response_features) else None
            if stats:
                key = (m.route, backend)
                self._w_samples[key] = self._w_samples.get(key, 0) + 1
                for f in m.request_features:
                    self._w_add(st, backend, f, req_doc)
                # response features only from answers read whole; an error answer has none to give
                if response is not None and status < 400:
                    for f in m.response_features:
                        self._w_add(st, backend, f, resp_doc)
            if to_log:
                assert st.log is not None
                redact = st.log.plan.redact
                model = self.models.get(backend)
                st.log.put({
                    "time": utc_iso(wall), "request_id": request_id, "route": m.route, "backend": backend,
                    "model": model.name if model is not None else None,
                    "version": model.version if model is not None else None,
                    "status": status,
                    "request": None if req_doc is None else redact_all(req_doc, redact, REDACTED),
                    "response": None if resp_doc is None else redact_all(resp_doc, redact, REDACTED),
                })
        return dict(self._w_samples), dict(self._w_missing)

    def _w_add(self, st: _MonitoredRoute, backend: str, f: FeaturePlan, doc: Any) -> None:
        fs = st.windows.get((backend, f.name))
        if fs is None:
            m = st.plan
            warm = FeatureWindow(m.reference_warmup, f.categorical) if m.reference_warmup is not None else None
            fs = st.windows[(backend, f.name)] = _FeatureState(
                f.signature, st.backend_fps[backend], FeatureWindow(m.window, f.categorical), warm)
        values = f.path.find(doc)
        missing = 0 if values else 1
        ref = fs.ref
        for v in values:
            target = ref if ref is not None and ref.count < ref.size else fs.cur
            if not target.add(v):
                missing += 1
        if missing:
            key = (st.plan.route, backend, f.name)
            self._w_missing[key] = self._w_missing.get(key, 0) + missing

    def _w_drift(self, names: list[str]) -> tuple[dict[str, list[DriftRow]], float]:
        t0 = time.perf_counter()
        out: dict[str, list[DriftRow]] = {}
        for name in names:
            st = self._w_routes.get(name)
            if st is not None:
                out[name] = self._w_judge_route(st)
        return out, time.perf_counter() - t0

    def _w_judge_route(self, st: _MonitoredRoute) -> list[DriftRow]:
        m = st.plan
        rows: list[DriftRow] = []
        kind = m.reference_kind
        label = f"backend:{m.reference_backend}" if kind == "backend" else str(kind)
        for backend in st.backends:
            if kind == "backend" and backend == m.reference_backend:
                continue  # docs/monitoring.md#references: the reference backend is not compared with itself
            for f in m.features:
                fs = st.windows.get((backend, f.name))
                cur = fs.cur.values() if fs is not None else _EMPTY
                ref: npt.NDArray[Any] | None
                if kind == "backend":
                    rs = st.windows.get((str(m.reference_backend), f.name))
                    ref = rs.cur.values() if rs is not None else _EMPTY
                elif kind == "warmup":
                    ref = fs.ref.values() if fs is not None and fs.ref is not None else _EMPTY
                    if fs is not None and fs.ref is not None and fs.ref.count < fs.ref.size:
                        ref = _EMPTY  # the warm-up is not complete yet
                else:
                    ref = st.file_ref.get(f.name)
                if ref is None:
                    rows.append(DriftRow(m.route, backend, f.name, f.categorical, label, "no_reference", 0, len(cur)))
                    continue
                result = judge(f.name, ref, cur, f.categorical, m.policy)
                rows.append(DriftRow(m.route, backend, f.name, f.categorical, label,
                                     "pending" if result is None else "ok", len(ref), len(cur), result))
        return rows

    # -- reading (loop) -----------------------------------------------------------------------

    def drift_json(self) -> dict[str, Any]:
        """`GET /admin/drift`: per route, backend and feature, the last pass's verdict."""
        routes = []
        for name, m in self._monitored.items():
            routes.append({
                "route": name,
                "reference": _reference_json(m),
                "every_s": m.every_s,
                "sample": m.sample,
                "policy": {"p_value": m.policy.p_value, "psi": m.policy.psi, "min_samples": m.policy.min_samples,
                           "rule": "drifted = p_value < policy.p_value and (policy.psi == 0 or psi > policy.psi)"},
                "computed_at": self._computed_at.get(name),
                "dropped": self._dropped.get(name, 0),
                "features": [row.to_json() for row in self._rows.get(name, [])],
            })
        return {"routes": routes, "last_pass_s": self.last_drift_s}

    def status_json(self) -> dict[str, Any]:
        """Latency and errors for `/admin/status`: per (route, backend) and per backend."""
        per_route: dict[str, dict[str, Any]] = {}
        for (route, backend), cell in self._latency.items():
            per_route.setdefault(route, {})[backend] = cell.route_window.summary().to_json()
        return {
            "routes": per_route,
            "backends": {b: w.summary().to_json() for b, w in self._backend_latency.items()},
        }

    def backend_summary(self, backend: str) -> LatencySummary | None:
        """Latency and errors of a backend over all routes (for `/admin/status`)."""
        w = self._backend_latency.get(backend)
        return w.summary() if w is not None else None

    def drift_rows(self) -> list[DriftRow]:
        return [row for rows in self._rows.values() for row in rows]

    def sample_log(self, route: str) -> SampleLog | None:
        return self._logs.get(route)

    # -- metrics (scrape time, loop; bound by shell/services.py) -----------------------------------

    def sampled_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r, b), float(n)) for (r, b), n in self._samples.items())

    def missing_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return ((k, float(n)) for k, n in self._missing.items())

    def dropped_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r,), float(n)) for r, n in self._dropped.items())

    def sample_log_line_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r,), float(s.written)) for r, s in self._logs.items())

    def sample_log_dropped_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r, reason), float(n)) for r, s in self._logs.items() for reason, n in s.dropped_by_reason().items())

    def sample_log_queue_bytes_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r,), float(s.queued_bytes)) for r, s in self._logs.items())

    def sample_log_error_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        return (((r,), float(s.errors)) for r, s in self._logs.items())

    def drift_statistic_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for row in self.drift_rows():
            if row.result is not None:
                yield (row.route, row.backend, row.feature, row.result.test), row.result.statistic
                yield (row.route, row.backend, row.feature, "psi"), row.result.psi

    def drift_p_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for row in self.drift_rows():
            if row.result is not None:
                yield (row.route, row.backend, row.feature, row.result.test), row.result.p_value

    def drift_detected_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for row in self.drift_rows():
            if row.result is not None:
                yield (row.route, row.backend, row.feature), 1.0 if row.result.drifted else 0.0

    def latency_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for (route, backend), cell in list(self._latency.items()):
            s = cell.route_window.summary()
            for label, attr in QUANTILES:
                value = getattr(s, attr)
                if value is not None:
                    yield (route, backend, label), float(value)

    def error_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for (route, backend), cell in list(self._latency.items()):
            s = cell.route_window.summary()
            if s.error_rate is not None:
                yield (route, backend), s.error_rate


def _reference_json(m: MonitorPlan) -> dict[str, Any] | None:
    if m.reference_kind == "backend":
        return {"kind": "backend", "backend": m.reference_backend}
    if m.reference_kind == "file":
        return {"kind": "file", "file": str(m.reference_file)}
    if m.reference_kind == "warmup":
        return {"kind": "warmup", "warmup": m.reference_warmup}
    return None


def _log_failure(fut: Future[object]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("monitor worker job failed: %r", exc, exc_info=exc)
