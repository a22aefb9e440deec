"""Every metric family (docs/reference/metrics.md) is declared here; label children are cached cells.

Why not prometheus_client's Counter/Histogram objects on the hot path: each `inc` and
`observe` takes a threading lock and walks the buckets in Python, ~1-3 us apiece, several
per request. All our writers run on the one event loop thread, so a child here is a slotted
cell updated with `+=` (a histogram adds one `bisect`), and prometheus_client is used for
what it is best at: exposition. `SidecarCollector` turns the cells into metric families at
scrape time, and gauges that mirror live state (inflight, circuit state, weights) are read
from callbacks then, costing nothing per request. The callbacks are bound in one place,
shell/services.py `Services.bind_gauges`; a `CallbackGauge` reads nothing until then.

NOTE: the cells are not thread-safe. Only the event loop thread may update them; worker
threads (drift, file writes) report back through the loop.

Label values come from config names or fixed enumerations, never from request data.
Imports: stdlib, prometheus_client.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PREFIX = "sidecar_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Cell:
    """A counter or gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class HistCell:
    """Per-bucket (non-cumulative) counts; the last slot is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


C = TypeVar("C", Cell, HistCell)


class _Family(Generic[C]):
    __slots__ = ("_children", "_make", "doc", "labelnames", "name")

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], make: Callable[[], C]) -> None:
        self.name, self.doc, self.labelnames = PREFIX + name, doc, labelnames
        self._children: dict[tuple[str, ...], C] = {}
        self._make: Callable[[], C] = make

    def labels(self, *values: str) -> C:
        """The cached cell for these label values; callers keep it, not look it up per request."""
        cell = self._children.get(values)
        if cell is None:
            assert len(values) == len(self.labelnames), (self.name, values)
            cell = self._children[values] = self._make()
        return cell

    def items(self) -> list[tuple[tuple[str, ...], C]]:
        return list(self._children.items())


class CounterFamily(_Family[Cell]):
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        super().__init__(name, doc, labelnames, Cell)

    def collect(self) -> Metric:
        m = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, cell in self.items():
            m.add_metric(values, cell.value)
        return m


class GaugeFamily(_Family[Cell]):
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        super().__init__(name, doc, labelnames, Cell)

    def collect(self) -> Metric:
        m = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, cell in self.items():
            m.add_metric(values, cell.value)
        return m


class HistogramFamily(_Family[HistCell]):
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...],
                 bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(name, doc, labelnames, lambda: HistCell(bounds))
        self.bounds = bounds

    def collect(self) -> Metric:
        m = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, cell in self.items():
            acc, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), cell.counts, strict=True):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            m.add_metric(values, buckets, cell.sum)
        return m


GaugeCallback = Callable[[], Iterable[tuple[tuple[str, ...], float]]]


class CallbackGauge:
    """A gauge whose samples are read from live state at scrape time."""

    __slots__ = ("doc", "labelnames", "name", "read")

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.doc, self.labelnames = PREFIX + name, doc, labelnames
        self.read: GaugeCallback = lambda: ()

    def collect(self) -> Metric:
        m = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, value in self.read():
            m.add_metric(values, value)
        return m


class CallbackCounter(CallbackGauge):
    """A counter whose samples are read from live state at scrape time."""

    __slots__ = ()

    def collect(self) -> Metric:
        m = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, value in self.read():
            m.add_metric(values, value)
        return m


class Metrics:
    """The sidecar's metric families. One instance per process (tests: one per sidecar)."""

    def __init__(self) -> None:
        rb = ("route", "backend")
        self.requests = CounterFamily("requests_total", "Requests answered, by route, backend and status code.",
                                      ("route", "backend", "code"))
        self.request_duration = HistogramFamily(
            "request_duration_seconds", "Time from request arrival to the end of the answer.", rb)
        self.ttfb = HistogramFamily(
            "time_to_first_byte_seconds", "Time from an upstream try's start to its response headers.", rb)
        self.shed = CounterFamily("shed_requests_total", "Requests refused to protect the sidecar.", ("reason",))
        self.override_ignored = CounterFamily(
            "override_ignored_total", "Override headers naming no backend of the route (normal split used).",
            ("route",))
        self.access_log_dropped = CounterFamily(
            "access_log_dropped_total", "Access log lines dropped because the writer fell behind.", ())
        self.drain_cut = CounterFamily(
            "drain_cut_requests_total", "Requests still in flight when drain.grace ended (cut; exit code 1).", ())
        self.stream_broken = CounterFamily(
            "streams_broken_total", "Streamed answers cut because the backend broke or went idle.", rb)
        self.client_disconnects = CounterFamily(
            "client_disconnects_total", "Clients that went away before their answer was written.", ("route",))
        self.upstream_attempts = CounterFamily(
            "upstream_attempts_total", "Upstream tries (hedges and fallbacks included), by outcome.",
            ("route", "backend", "outcome"))
        self.retries = CounterFamily("retries_total", "Retries and hedges sent, by the backend they went to.", rb)
        self.retry_budget_exhausted = CounterFamily(
            "retry_budget_exhausted_total", "Retries or hedges not made because the route's retry budget was spent.",
            ("route",))
        self.retries_skipped = CounterFamily(
            "retries_skipped_total", "Failed tries that `retry.on` covers but were not retried, by reason.",
            ("route", "reason"))
        self.fallbacks = CounterFamily(
            "fallbacks_total", "Requests answered by the fallback chain, by kind (backend or response).",
            ("route", "kind"))
        self.circuit_state = CallbackGauge(
            "circuit_state", "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open.", ("backend",))
        self.backend_healthy = CallbackGauge(
            "backend_healthy", "1 while some endpoint of the backend passes health checks and is not ejected.",
            ("backend",))
        self.endpoint_ejected = CallbackGauge(
            "endpoint_ejected", "1 while an endpoint (its index in `endpoints`) is ejected as an outlier.",
            ("backend", "endpoint"))
        self.inflight = CallbackGauge("inflight_requests", "Upstream requests in flight, per backend.", ("backend",))
        self.route_weight = CallbackGauge(
            "route_weight", "Effective share (0-1) of a route's traffic per backend, after overrides and exclusions.",
            rb)
        self.config_info = CallbackGauge("config_info", "The running config's version (value is always 1).",
                                         ("version",))
        self.config_reloads = CounterFamily(
            "config_reloads_total", "Config reloads by result: ok, unchanged, error (rejected).", ("result",))
        self.families: list[CounterFamily | GaugeFamily | HistogramFamily | CallbackGauge] = [
            self.requests, self.request_duration, self.ttfb, self.shed, self.override_ignored,
            self.access_log_dropped, self.drain_cut, self.stream_broken, self.client_disconnects, self.inflight,
            self.route_weight, self.config_info, self.upstream_attempts, self.retries,
            self.retry_budget_exhausted, self.retries_skipped, self.fallbacks, self.circuit_state,
            self.backend_healthy, self.endpoint_ejected, self.config_reloads,
        ]
        # shadow copies (shell/mirror.py documents the outcome values)
        self.mirror_requests = CounterFamily(
            "mirror_requests_total", "Mirrored (or not mirrored by a rule) requests, by route, shadow and outcome.",
            ("route", "backend", "outcome"))
        self.mirror_agreement = CallbackGauge(
            "mirror_agreement_ratio", "Rolling share (0-1) of compared mirror requests whose answers agree.", rb)
        self.families += [self.mirror_requests, self.mirror_agreement]
        # rollouts (shell/rollout_driver.py, shell/notify.py)
        self.rollout_step = CallbackGauge("rollout_step", "Index of the rollout's current step in `steps`.",
                                          ("route",))
        self.rollout_state = CallbackGauge(
            "rollout_state", "1 for the rollout's current state (progressing, paused, baking, promoted, "
            "rolled_back), else 0.", ("route", "state"))
        self.rollout_decisions = CounterFamily(
            "rollout_decisions_total", "Rollout decisions by verdict: pass, fail, inconclusive, manual.",
            ("route", "verdict"))
        self.rollout_notify = CounterFamily(
            "rollout_notify_total", "Rollout webhook events by outcome: sent, failed (every try failed), "
            "dropped (queue full).", ("route", "outcome"))
        self.families += [self.rollout_step, self.rollout_state, self.rollout_decisions, self.rollout_notify]
        # the model registry (shell/registry.py)
        self.backend_info = CallbackGauge(
            "backend_info", "1 for each backend with a `model`: the model and version it serves (version "
            "'unresolved' while its alias is not resolved; alias empty for a static version).",
            ("backend", "model", "version", "alias"))
        self.registry_calls = CounterFamily(
            "registry_calls_total", "Calls to the model registry (each try), by operation (resolve_alias, "
            "set_alias, set_tag) and outcome (ok, not_found, refused, error, timeout, unreachable).",
            ("operation", "outcome"))
        self.registry_writes = CounterFamily(
            "registry_writes_total", "Registry writes of rollouts (alias moves, version tags) by outcome: written, "
            "failed (every try failed), skipped (the canary's version unresolved), dropped (queue full).",
            ("route", "outcome"))
        self.families += [self.backend_info, self.registry_calls, self.registry_writes]
        # fleet (shell/fleet.py): without `fleet` the gauges read nothing and the counters stay 0
        self.fleet_leader = CallbackGauge("fleet_leader", "1 while this replica leads its fleet, else 0.", ())
        self.fleet_members = CallbackGauge("fleet_members", "Members of the fleet seen within 3 x sync_every.", ())
        self.fleet_sync_errors = CounterFamily(
            "fleet_sync_errors_total", "Calls to the fleet's store that failed (timeout, refused, error reply).", ())
        self.fleet_writes_refused = CounterFamily(
            "fleet_writes_refused_total", "Leader and rollout writes the store refused, by reason: lease (a deposed "
            "leader's renewal), epoch (a deposed leader's rollout write), conflict (another replica wrote first), "
            "not_leader (not sent: this replica no longer leads).", ("reason",))
        self.families += [self.fleet_leader, self.fleet_members, self.fleet_sync_errors, self.fleet_writes_refused]
        # monitor: read from shell/monitor.py's published snapshots at scrape time
        rbf = ("route", "backend", "feature")
        self.drift_statistic = CallbackGauge(
            "drift_statistic", "Last drift pass: KS statistic (test=ks), chi-square statistic (test=chi2) "
            "and PSI (test=psi) of a feature against its reference.", (*rbf, "test"))
        self.drift_p_value = CallbackGauge(
            "drift_p_value", "Last drift pass: p-value of the feature's test (ks or chi2).", (*rbf, "test"))
        self.drift_detected = CallbackGauge(
            "drift_detected", "1 when the feature drifted (p-value under p_value and PSI over psi), else 0.", rbf)
        self.route_latency = CallbackGauge(
            "route_latency_seconds", "Latency percentiles over the last 2048 requests of a route and backend.",
            ("route", "backend", "quantile"))
        self.route_error_ratio = CallbackGauge(
            "route_error_ratio", "Failed share (5xx, broken streams) of the last 2048 requests of a route and "
            "backend.", rb)
        self.monitor_samples = CallbackCounter(
            "monitor_samples_total", "Sampled exchanges whose features were extracted.", rb)
        self.monitor_missing = CallbackCounter(
            "monitor_missing_total", "Feature samples missing: the path found nothing, the value had the wrong "
            "type, or the body was not JSON.", rbf)
        self.monitor_dropped = CallbackCounter(
            "monitor_dropped_total", "Sampled exchanges dropped because the monitor worker fell behind.",
            ("route",))
        self.sample_log_lines = CallbackCounter("sample_log_lines_total", "Lines written to the sample log.",
                                                ("route",))
        self.sample_log_dropped = CallbackCounter(
            "sample_log_dropped_total", "Sample log lines lost, by reason: queue_full (10000 lines wait), "
            "queue_bytes (monitor.log.max_queue_bytes would be passed), write_error, closed (during a reload).",
            ("route", "reason"))
        self.sample_log_queue_bytes = CallbackGauge(
            "sample_log_queue_bytes", "Bytes of sample log lines waiting for the writer (at most "
            "monitor.log.max_queue_bytes).", ("route",))
        self.sample_log_errors = CallbackCounter(
            "sample_log_errors_total", "Failed sample log file operations (disk full, read-only, ...).", ("route",))
        self.families += [self.drift_statistic, self.drift_p_value, self.drift_detected, self.route_latency,
                          self.route_error_ratio, self.monitor_samples, self.monitor_missing, self.monitor_dropped,
                          self.sample_log_lines, self.sample_log_dropped, self.sample_log_queue_bytes,
                          self.sample_log_errors]

        # feedback: read from shell/feedback.py's published snapshots at scrape time
        self.feedback_total = CallbackCounter(
            "feedback_total", "Posted feedback items, by outcome (joined, unknown, expired, duplicate, invalid); "
            "backend is empty for unknown and invalid items.", ("route", "backend", "outcome"))
        self.feedback_metric = CallbackGauge(
            "feedback_metric", "The route's feedback metric (accuracy, mae, rmse, mean) over the backend's last "
            "`monitor.window` joined items.", ("route", "backend", "metric"))
        self.feedback_segment_metric = CallbackGauge(
            "feedback_segment_metric", "The feedback metric per segment value (a value of the config's list, or "
            "other) over its last `monitor.window` joined items.", ("route", "backend", "segment", "value", "metric"))
        self.feedback_score_mean = CallbackGauge(
            "feedback_score_mean", "Mean predicted score over the backend's last `monitor.window` captured "
            "predictions: the confidence signal, known at answer time.", rb)
        self.feedback_pending = CallbackGauge(
            "feedback_pending", "Predictions waiting for their feedback.", ("route",))
        self.feedback_pending_dropped = CallbackCounter(
            "feedback_pending_dropped_total", "Pending predictions pushed out by feedback.max_pending before "
            "their feedback came.", ("route",))
        self.feedback_captures_missed = CallbackCounter(
            "feedback_captures_missed_total", "Answers whose prediction was not captured, by reason: streamed "
            "(not read whole), error_status (4xx/5xx), queue_full (the feedback worker fell behind).",
            ("route", "reason"))
        self.families += [self.feedback_total, self.feedback_metric, self.feedback_segment_metric,
                          self.feedback_score_mean, self.feedback_pending, self.feedback_pending_dropped,
                          self.feedback_captures_missed]

        # connection guards (shell/listener.py) and leak watching
        self.client_timeouts = CounterFamily(
            "client_timeouts_total", "Client connections closed for being too slow, by phase (header, write).",
            ("phase",))
        self.malformed_requests = CounterFamily(
            "malformed_requests_total", "Requests refused by the HTTP parser (400, connection closed).", ())
        self.open_connections = CallbackGauge("open_connections", "Open client connections on the proxy listener.", ())
        self.event_loop_tasks = CallbackGauge("event_loop_tasks", "asyncio tasks alive in the event loop.", ())
        self.families += [self.client_timeouts, self.malformed_requests, self.open_connections, self.event_loop_tasks]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_SidecarCollector(self))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def loop_task_samples() -> list[tuple[tuple[str, ...], float]]:
    """asyncio tasks alive at scrape time (the scrape runs on the loop); a leak shows as growth."""
    try:
        return [((), float(len(asyncio.all_tasks())))]
    except RuntimeError:  # no running loop (a scrape from another thread)
        return []


class _SidecarCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for family in self._metrics.families:
            yield family.collect()
