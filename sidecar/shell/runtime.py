"""The live Runtime: a Plan plus the stateful objects built from it (backends, route state, splits).

A request captures `proxy.runtime` once and uses it to the end, so a reload (which builds a
new Runtime and hands it to `Sidecar.adopt`, one reference swap) never changes the config
under a request in flight. `Runtime.build(plan, previous)` carries over the state of
backends whose config did not change (same fingerprint): the whole `Backend` (pools,
circuit breaker, outlier ejections, health), and the `RouteState` (retry budget) of routes
whose fingerprint did not change (docs/operations.md#hot-reload).

A Runtime lives for one config; what outlives configs (metrics, mirrors, the monitor,
weight overrides) is shell/services.py's. The `*_samples` methods are what the gauges read
at scrape time (bound in `Services.bind_gauges`).

Imports: stdlib, sidecar.config, sidecar.core, sidecar.shell.backend/health.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from sidecar.config.plan import Plan, RoutePlan
from sidecar.core.budget import RetryBudget
from sidecar.core.split import Split
from sidecar.shell.backend import Backend
from sidecar.shell.health import HealthChecker


class RouteState:
    """What a route keeps between requests: its backends in split order and its retry budget."""

    __slots__ = ("backends", "budget", "fallback", "fingerprint")

    def __init__(self, plan: RoutePlan, backends: dict[str, Backend], budget: RetryBudget | None) -> None:
        self.fingerprint = plan.fingerprint   # a reload keeps the budget while this is the same
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
    __slots__ = ("backends", "plan", "route_states", "splits")

    def __init__(self, plan: Plan, backends: dict[str, Backend], route_states: dict[str, RouteState]) -> None:
        self.plan = plan
        self.backends = backends
        self.route_states = route_states
        # the split each route uses now: the config's, or a runtime override (admin API)
        self.splits: dict[str, Split] = {r.name: r.split for r in plan.routes}

    @classmethod
    def build(cls, plan: Plan, previous: Runtime | None = None) -> Runtime:
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
            if old_state is not None and old_state.fingerprint == route.fingerprint:
                budget = old_state.budget
            else:
                budget = RetryBudget(route.retry_budget) if route.retry_budget is not None else None
            routes[route.name] = RouteState(route, backends, budget)
        return cls(plan, backends, routes)

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

    def inflight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for name, backend in self.backends.items():
            yield (name,), float(backend.inflight)

    def circuit_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            yield (name,), float(backend.circuit_state(now).gauge)

    def healthy_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            yield (name,), 1.0 if backend.endpoints.available(now) else 0.0

    def ejected_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for name, backend in self.backends.items():
            if backend.plan.outlier is None:
                continue
            for i in range(backend.endpoints.n):
                yield (name, str(i)), 1.0 if backend.endpoints.is_ejected(i, now) else 0.0

    def weight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        now = self._now()
        for route in self.plan.routes:
            split = self.splits[route.name]
            available = self.route_states[route.name].available(now)
            for name, share in zip(split.names, split.shares(available), strict=True):
                yield (route.name, name), share

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()
