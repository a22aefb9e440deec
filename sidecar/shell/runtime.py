"""The live Runtime: a Plan plus the stateful objects built from it (backends, route state, splits).

A request captures `proxy.runtime` once and uses it to the end, so a reload (which builds a
new Runtime and swaps the reference) never changes the config under a request in flight.
`Runtime.build(plan, metrics, previous)` carries over the state of backends whose config did
not change (same fingerprint): the whole `Backend` (pools, circuit breaker, outlier
ejections, health), and the `RouteState` (retry budget) of routes whose fingerprint did not
change (docs/operations.md#hot-reload).

Imports: stdlib, sidecar.config, sidecar.core, sidecar.shell.metrics/backend/health/monitor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from sidecar.config.plan import Plan, RoutePlan
from sidecar.core.budget import RetryBudget
from sidecar.core.split import Split
from sidecar.shell.backend import Backend
from sidecar.shell.health import HealthChecker
from sidecar.shell.metrics import Metrics
from sidecar.shell.monitor import Monitor


class RouteState:
    """What a route keeps between requests: its backends in split order and its retry budget."""

    __slots__ = ("backends", "budget", "fallback", "plan")

    def __init__(self, plan: RoutePlan, backends: dict[str, Backend], budget: RetryBudget | None) -> None:
        self.plan = plan
        self.backends: tuple[Backend, ...] = tuple(backends[b] for b in plan.backends)
        # the Backend of each fallback step (None for the static response), in chain order
        self.fallback: tuple[Backend | None, ...] = tuple(
            backends[f.backend] if f.backend is not None else None for f in plan.fallback)
        self.budget = budget

    def available(self, now: float) -> list[bool] | None:
        """Which of the split's backends may take a new try; None when all may (fast path)."""
        for b in self.backends:
            if not b.available(now):
                return [b.available(now) for b in self.backends]
        return None


class Runtime:
    __slots__ = ("backends", "metrics", "monitor", "plan", "route_states", "splits")

    def __init__(self, plan: Plan, metrics: Metrics, backends: dict[str, Backend],
                 route_states: dict[str, RouteState], monitor: Monitor | None = None) -> None:
        self.plan = plan
        self.metrics = metrics
        self.backends = backends
        self.route_states = route_states
        # the split each route uses now: the config's, or a runtime override (admin API)
        self.splits: dict[str, Split] = {r.name: r.split for r in plan.routes}
        # one Monitor per process, carried across reloads; it keeps unchanged windows
        self.monitor = monitor if monitor is not None else Monitor(metrics)
        self.monitor.apply(plan)

    @classmethod
    def build(cls, plan: Plan, metrics: Metrics, previous: Runtime | None = None) -> Runtime:
        buffer_bytes = plan.limits.buffer_response_bytes
        backends: dict[str, Backend] = {}
        for name, bp in plan.backends.items():
            old = previous.backends.get(name) if previous is not None else None
            if old is not None and old.plan.fingerprint == bp.fingerprint:
                old.set_buffer_response_bytes(buffer_bytes)
                backends[name] = old
            else:
                backends[name] = Backend(bp, buffer_bytes)
        routes: dict[str, RouteState] = {}
        for route in plan.routes:
            old_state = previous.route_states.get(route.name) if previous is not None else None
            if old_state is not None and old_state.plan.fingerprint == route.fingerprint:
                budget = old_state.budget
            else:
                budget = RetryBudget(route.retry_budget) if route.retry_budget is not None else None
            routes[route.name] = RouteState(route, backends, budget)
        rt = cls(plan, metrics, backends, routes, previous.monitor if previous is not None else None)
        metrics.inflight.read = rt._inflight_samples
        metrics.route_weight.read = rt._weight_samples
        metrics.circuit_state.read = rt._circuit_samples
        metrics.backend_healthy.read = rt._healthy_samples
        metrics.endpoint_ejected.read = rt._ejected_samples
        metrics.config_info.read = lambda: [((plan.version,), 1.0)]
        return rt

    def available(self, route: str) -> list[bool] | None:
        """Which of a route's backends may take a new request; None when all may."""
        return self.route_states[route].available(asyncio.get_running_loop().time())

    def health_checkers(self) -> list[HealthChecker]:
        """One checker per backend with `health_check`; `Sidecar.run` runs them in its TaskGroup.

        After a reload, the checkers of the previous runtime are cancelled and these started
        (a kept Backend keeps its health state, so nothing flaps).
        """
        return [HealthChecker(b) for b in self.backends.values() if b.plan.health_check is not None]

    def retired_backends(self, new: Runtime) -> list[Backend]:
        """Backends of this runtime that `new` does not use (close them once their requests end)."""
        kept = {id(b) for b in new.backends.values()}
        return [b for b in self.backends.values() if id(b) not in kept]

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _inflight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for name, backend in self.backends.items():
            yield (name,), float(backend.inflight)

    def _circuit_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            yield (name,), float(backend.circuit_state(now).gauge)

    def _healthy_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            yield (name,), 1.0 if backend.endpoints.available(now) else 0.0

    def _ejected_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            if backend.plan.outlier is None:
                continue
            for i in range(backend.endpoints.n):
                yield (name, str(i)), 1.0 if backend.endpoints.is_ejected(i, now) else 0.0

    def _weight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for route in self.plan.routes:
            split = self.splits[route.name]
            available = self.route_states[route.name].available(now)
            for name, share in zip(split.names, split.shares(available), strict=True):
                yield (route.name, name), share

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
