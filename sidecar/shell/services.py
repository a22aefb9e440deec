"""The long-lived objects of one sidecar process: what outlives a config, with one owner.

A `Runtime` (shell/runtime.py) lives for one config, and a reload builds the next one. What
must outlive configs lives here instead, built once by the server (shell/server.py `Sidecar`,
the one owner) and handed to whoever uses it (the proxy, the admin API, the reloader):

    metrics      every metric family (shell/metrics.py)
    access_log   the access log writer (shell/accesslog.py)
    mirrors      shadow tasks, their cap and statistics (shell/mirror.py)
    monitor      latency windows, payload sampling, drift, sample logs (shell/monitor.py)
    overrides    runtime weight overrides and their file (shell/state.py)
    feedback     the feedback trackers, their worker thread and snapshots (shell/feedback.py)
    notifier     rollout webhooks (shell/notify.py)
    rollouts     the rollout driver: state, judging, its file (shell/rollout_driver.py)
    history      the status page's charts: counters sampled every 5 s (shell/history.py)
    registry     the model registry: backends' versions, rollouts' writes (shell/registry.py)
    fleet        with `fleet` only: the replicas' shared store (shell/fleet.py); None otherwise,
                 and then nothing of it runs (its `fleet` block is read at start only)

Their lifecycle, each step in one place:

    build    `Services(plan, ...)`: from the first config
    adopt    `adopt(runtime)`: a new config is about to serve; each keeps what did not change
    run      `tasks()`: the background loops, for the server's TaskGroup
    gauges   `bind_gauges(live)`: every callback gauge, bound once; they read the runtime that
             serves at scrape time, so a reload rebinds nothing
    stop     the server drains the mirrors and cancels the tasks (`Sidecar.run`)

A capability that must outlive a reload (the rollout driver, fleet membership, notifications)
becomes a field here and joins these steps; everything else reaches it as `services.<name>`.

Imports: stdlib, sidecar.config, sidecar.core.registry, sidecar.shell (accesslog, feedback, fleet, history,
metrics, mirror, monitor, notify, registry, rollout_driver, runtime, state).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from sidecar.config.plan import Plan
from sidecar.core.registry import ModelRef
from sidecar.shell.accesslog import AccessLog
from sidecar.shell.feedback import Feedback
from sidecar.shell.fleet import Fleet
from sidecar.shell.history import EVERY_S, HistorySampler
from sidecar.shell.metrics import Metrics, loop_task_samples
from sidecar.shell.mirror import Mirrors
from sidecar.shell.monitor import Monitor
from sidecar.shell.notify import Notifier
from sidecar.shell.registry import Registry
from sidecar.shell.rollout_driver import RolloutDriver
from sidecar.shell.runtime import Runtime
from sidecar.shell.state import Overrides, resolve_state_dir


class Services:
    """See the module docstring. One per `Sidecar`."""

    def __init__(self, plan: Plan, config_path: Path | None, rng: Callable[[], float],
                 access_log_fd: int | None = None, history_every_s: float = EVERY_S) -> None:
        self.metrics = Metrics()
        self.access_log = AccessLog(self.metrics.access_log_dropped.labels(), access_log_fd)
        self.mirrors = Mirrors(self.metrics, rng)
        self.monitor = Monitor(rng)
        # `services.feedback.mark(route)` / `.since(route, mark)`: a rollout step's feedback
        self.feedback = Feedback()
        # state_dir is read once, at start (a reload that changes it warns: shell/reload.py)
        self.overrides = Overrides(resolve_state_dir(plan.config.state_dir, config_path))
        self.notifier = Notifier(self.metrics)
        # backend -> model version; records written off the loop are attributed from `models`
        self.registry = Registry(self.metrics, plan)
        self.registry.on_change = self._attribute
        self._attribute(self.registry.models)
        self.rollouts = RolloutDriver(self.metrics, self.overrides, self.overrides.state_dir, self.notifier,
                                      registry=self.registry)
        self.history = HistorySampler(self.metrics, self.mirrors, self.feedback, history_every_s)
        fleet = plan.config.fleet
        self.fleet = None if fleet is None else Fleet(fleet, self.metrics, self.rollouts, self.overrides,
                                                      self.notifier)
        if fleet is not None:          # pending predictions shared through the fleet's store
            self.feedback.share(fleet)
            self.feedback.on_store_errors = self._count_store_errors
        self._follow(plan)

    def _attribute(self, models: Mapping[str, ModelRef]) -> None:
        """The registry's versions changed: what logs and feedback attribute records to (swapped whole)."""
        self.access_log.models = models
        self.monitor.models = models
        self.feedback.models = models

    def _count_store_errors(self, n: int) -> None:
        self.metrics.fleet_sync_errors.labels().value += n

    def _follow(self, plan: Plan) -> None:
        self.mirrors.retain(plan)      # statistics of unchanged (route, shadow) pairs stay
        self.monitor.apply(plan)       # windows whose config did not change stay
        self.feedback.apply(plan)      # trackers whose FeedbackPlan.fingerprint did not change stay
        self.registry.apply(plan)      # versions of aliases still named stay

    def adopt(self, runtime: Runtime) -> list[str]:
        """`runtime` is about to serve (a reload). Sync, so that no request or admin call sees
        half of it. Returns the routes whose weight overrides its config cleared (docs/operations.md)."""
        cleared = self.overrides.apply(runtime, "reload")
        self._follow(runtime.plan)
        self.rollouts.adopt(runtime)   # after the overrides: it applies its weights again
        return cleared

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The background loops, by task name; each runs until cancelled."""
        tasks = {"access-log": self.access_log.run(), "monitor": self.monitor.run(), "feedback": self.feedback.run(),
                 "rollouts": self.rollouts.run(), "notify": self.notifier.run(),
                 "history": self.history.run(), "registry": self.registry.run()}
        if self.fleet is not None:
            tasks["fleet"] = self.fleet.run()
        return tasks

    async def join_fleet(self, live: Callable[[], Runtime]) -> None:
        """At start, once the rollouts booted: the first round with the fleet's store (no-op without `fleet`)."""
        if self.fleet is not None:
            await self.fleet.join(live)

    def bind_gauges(self, live: Callable[[], Runtime]) -> None:
        """The one place where callback gauges are bound to what they read at scrape time.

        `live()` is the runtime serving at that moment, so a reload rebinds nothing.
        """
        m, monitor, mirrors, feedback = self.metrics, self.monitor, self.mirrors, self.feedback
        # the running config's backends and routes
        m.inflight.read = lambda: live().inflight_samples()
        m.route_weight.read = lambda: live().weight_samples()
        m.circuit_state.read = lambda: live().circuit_samples()
        m.backend_healthy.read = lambda: live().healthy_samples()
        m.endpoint_ejected.read = lambda: live().ejected_samples()
        m.config_info.read = lambda: [((live().plan.version,), 1.0)]
        self.history.bind(live)
        m.backend_info.read = self.registry.info_samples
        # rollouts
        m.rollout_step.read = self.rollouts.step_samples
        m.rollout_state.read = self.rollouts.state_samples
        if self.fleet is not None:
            m.fleet_leader.read = self.fleet.leader_samples
            m.fleet_members.read = self.fleet.member_samples
        # shadows
        m.mirror_agreement.read = mirrors.agreement_samples
        # the monitor's published snapshots
        m.drift_statistic.read = monitor.drift_statistic_samples
        m.drift_p_value.read = monitor.drift_p_samples
        m.drift_detected.read = monitor.drift_detected_samples
        m.route_latency.read = monitor.latency_samples
        m.route_error_ratio.read = monitor.error_samples
        m.monitor_samples.read = monitor.sampled_samples
        m.monitor_missing.read = monitor.missing_samples
        m.monitor_dropped.read = monitor.dropped_samples
        m.sample_log_lines.read = monitor.sample_log_line_samples
        m.sample_log_dropped.read = monitor.sample_log_dropped_samples
        m.sample_log_queue_bytes.read = monitor.sample_log_queue_bytes_samples
        m.sample_log_errors.read = monitor.sample_log_error_samples
        # feedback: the worker's published snapshots (shell/feedback.py)
        m.feedback_total.read = feedback.total_samples
        m.feedback_metric.read = feedback.metric_samples
        m.feedback_segment_metric.read = feedback.segment_metric_samples
        m.feedback_score_mean.read = feedback.score_mean_samples
        m.feedback_pending.read = feedback.pending_samples
        m.feedback_pending_dropped.read = feedback.pending_dropped_samples
        m.feedback_captures_missed.read = feedback.missed_samples
        # the process
        m.event_loop_tasks.read = loop_task_samples
