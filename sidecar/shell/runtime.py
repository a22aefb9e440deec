"""The live Runtime: a Plan plus the stateful objects built from it (pools, effective splits).

A request captures `proxy.runtime` once and uses it to the end, so a reload (which builds a
new Runtime and swaps the reference) never changes the config under a request in flight.
`Runtime.build(plan, previous)` carries over the state of backends whose config did not
change (same fingerprint): their pools, and later their breakers and statistics (SPEC 4).

Imports: stdlib, sidecar.config, sidecar.core, sidecar.shell.metrics/upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

from sidecar.config.plan import Plan
from sidecar.core.split import Split
from sidecar.shell.metrics import Metrics
from sidecar.shell.monitor import Monitor
from sidecar.shell.upstream import UpstreamPool


class Runtime:
    __slots__ = ("metrics", "monitor", "plan", "pools", "route_pools", "splits")

    def __init__(self, plan: Plan, metrics: Metrics, pools: dict[str, UpstreamPool],
                 monitor: Monitor | None = None) -> None:
        self.plan = plan
        self.metrics = metrics
        self.pools = pools
        # the split each route uses now: the config's, or a runtime override (admin API)
        self.splits: dict[str, Split] = {r.name: r.split for r in plan.routes}
        # each route's pools in split order, to judge availability without name lookups
        self.route_pools: dict[str, tuple[UpstreamPool, ...]] = {
            r.name: tuple(pools[b] for b in r.backends) for r in plan.routes}
        # issue 6: one Monitor per process, carried across reloads; it keeps unchanged windows
        self.monitor = monitor if monitor is not None else Monitor(metrics)
        self.monitor.apply(plan)

    def available(self, route: str) -> list[bool] | None:
        """Which of a route's backends may take a new request; None when all may (fast path)."""
        pools = self.route_pools[route]
        if all(p.available for p in pools):
            return None
        return [p.available for p in pools]

    @classmethod
    def build(cls, plan: Plan, metrics: Metrics, previous: Runtime | None = None) -> Runtime:
        pools: dict[str, UpstreamPool] = {}
        for name, backend in plan.backends.items():
            old = previous.pools.get(name) if previous else None
            if old is not None and old.plan == backend and previous is not None \
                    and previous.plan.limits.buffer_response_bytes == plan.limits.buffer_response_bytes:
                pools[name] = old
            else:
                pools[name] = UpstreamPool(backend, plan.limits.buffer_response_bytes)
        rt = cls(plan, metrics, pools, previous.monitor if previous is not None else None)  # issue 6
        metrics.inflight.read = rt._inflight_samples
        metrics.route_weight.read = rt._weight_samples
        metrics.config_info.read = lambda: [((plan.version,), 1.0)]
        return rt

    def retired_pools(self, new: Runtime) -> list[UpstreamPool]:
        """Pools of this runtime that `new` does not use (close them once their requests end)."""
        kept = {id(p) for p in new.pools.values()}
        return [p for p in self.pools.values() if id(p) not in kept]

    def _inflight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for name, pool in self.pools.items():
            yield (name,), float(pool.inflight)

    def _weight_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for route in self.plan.routes:
            split = self.splits[route.name]
            for name, share in zip(split.names, split.shares(), strict=True):
                yield (route.name, name), share

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
