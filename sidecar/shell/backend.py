"""One configured backend, live: its endpoint pools, balancer, circuit breaker, health and bulkhead.

A `Backend` is what a route's split picks. It owns:

- one `UpstreamPool` per endpoint (a model's replicas; one for a plain `url`);
- an `EndpointSet` (core/balance.py): least-request / round-robin / random over the usable
  endpoints, per-endpoint inflight counts, passive outlier ejection and the health flags the
  active checks (shell/health.py) set;
- a `Breaker` (core/breaker.py), or None when the backend has no `circuit_breaker`;
- the bulkhead: `max_inflight` over all of its endpoints.

`available(now)` says whether a new try may be picked here (docs/reference/http.md#the-split): breaker allows,
bulkhead not full, some endpoint healthy and not ejected. It spends nothing and allocates
nothing. `try_` makes one try on a given endpoint and records its outcome for the breaker and
the outlier detector (docs/resilience.md#circuit-breaker: every try, on any endpoint, counts). A shadow
copy (shell/mirror.py) is a try like any other: it is skipped while its backend is not
available and its outcome feeds the breaker and outlier detection, so a hanging shadow with a
`circuit_breaker` or `health_check` stops costing connections. Nothing
here awaits except the try itself; the decisions are the pure core's.

Approximation (NOTE): a streamed answer is recorded when its head arrives (an OK); a stream
that breaks later is counted in the metrics but not fed to the breaker again, so that one try
never counts twice.

A reload keeps a Backend whose plan fingerprint did not change (shell/runtime.py), with its
pools, breaker, ejections and health: docs/operations.md#hot-reload.

Imports: stdlib, sidecar.core, sidecar.config.plan, sidecar.shell.upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from sidecar.config.plan import BackendPlan
from sidecar.core.balance import EndpointSet
from sidecar.core.breaker import Breaker, CircuitState
from sidecar.core.health import HealthTracker
from sidecar.core.outcome import Outcome
from sidecar.shell.upstream import Answer, UpstreamFailure, UpstreamPool

log = logging.getLogger("sidecar.backend")


class CircuitRefused(UpstreamFailure):
    """A try refused unsent: the half-open circuit's probe slots were taken meanwhile."""

    def __init__(self, backend: str) -> None:
        super().__init__(Outcome.CONNECT_ERROR, f"circuit of {backend} is not letting tries through")
        self.backend = backend


class Backend:
    """The live state of one configured backend."""

    __slots__ = ("_cap", "breaker", "endpoints", "health", "name", "plan", "pools")

    def __init__(self, plan: BackendPlan, buffer_response_bytes: int) -> None:
        self.plan = plan
        self.name = plan.name
        self.pools: tuple[UpstreamPool, ...] = tuple(
            UpstreamPool(plan, buffer_response_bytes, i) for i in range(len(plan.endpoints)))
        self.endpoints = EndpointSet(len(plan.endpoints), plan.balance, plan.outlier)
        self.breaker = Breaker(plan.breaker) if plan.breaker is not None else None
        hc = plan.health_check
        # per endpoint, fed by shell/health.py; None without active checks
        self.health: tuple[HealthTracker, ...] | None = tuple(
            HealthTracker(hc.unhealthy_after, hc.healthy_after) for _ in plan.endpoints) if hc else None
        self._cap = plan.max_inflight
        for i, pool in enumerate(self.pools):
            pool.on_stream_done = partial(self._stream_done, i)

    def __repr__(self) -> str:
        return f"<Backend {self.name} inflight={self.inflight} {self.breaker!r} {self.endpoints!r}>"

    @property
    def inflight(self) -> int:
        """Tries and streams in flight over all endpoints (the bulkhead's count)."""
        pools = self.pools
        if len(pools) == 1:
            return pools[0].inflight
        return sum(p.inflight for p in pools)

    def available(self, now: float) -> bool:
        """Whether a new try may be picked here now (docs/reference/http.md#the-split); spends nothing."""
        cap = self._cap
        if cap is not None:  # the `inflight` property, inline: this runs for every backend of every pick
            pools = self.pools
            if (pools[0].inflight if len(pools) == 1 else sum(p.inflight for p in pools)) >= cap:
                return False
        breaker = self.breaker
        if breaker is not None and not breaker.would_allow(now):
            return False
        return self.endpoints.available(now)

    def circuit_state(self, now: float) -> CircuitState:
        breaker = self.breaker
        return breaker.state(now) if breaker is not None else CircuitState.CLOSED

    def pick(self, now: float, rng: Callable[[], float], avoid: int | None = None) -> int | None:
        """The endpoint for the next try (avoiding `avoid` while another is usable), or None."""
        return self.endpoints.pick(now, rng, avoid)

    async def try_(self, i: int, method: str, raw_path: str, block: bytes, body: bytes,
                   headers_deadline: float, try_deadline: float, buffer_limit: int | None = None) -> Answer:
        """One try on endpoint i; records the outcome. Raises UpstreamFailure.

        The caller checked `available(now)`; a try that starts later (a hedge's task) may find
        the half-open circuit's probe slots taken by then: that try fails at once, unsent, as a
        connect error (retryable elsewhere), and is not recorded for the breaker.
        """
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        if breaker is not None and not breaker.try_acquire(loop.time()):
            raise CircuitRefused(self.name)
        endpoints = self.endpoints
        endpoints.on_start(i)
        try:
            answer = await self.pools[i].attempt(method, raw_path, block, body, headers_deadline, try_deadline,
                                                 buffer_limit)
        except UpstreamFailure as f:
            self._record(i, True, loop.time())
            f.backend = self.name
            raise
        except BaseException:
            # cancelled: a hedge that lost, or the client left. Neither success nor failure.
            endpoints.on_cancel(i)
            if breaker is not None:
                breaker.release(loop.time())
            raise
        answer.backend = self.name
        self._record(i, answer.outcome.failed, loop.time())
        if answer.streaming:  # still in flight for least_request until the stream ends (_stream_done)
            endpoints.inflight[i] += 1
        return answer

    def _stream_done(self, i: int) -> None:
        self.endpoints.inflight[i] -= 1

    def set_buffer_response_bytes(self, n: int) -> None:
        """A reload changed `limits.buffer_response_bytes`; pools, breaker and health stay."""
        for pool in self.pools:
            pool.set_buffer_response_bytes(n)

    def _record(self, i: int, failed: bool, now: float) -> None:
        if self.endpoints.on_finish(i, failed, now):
            assert self.plan.outlier is not None
            log.warning("backend %s: endpoint %d (%s) ejected for %.1fs after %d failures in a row",
                        self.name, i, self.plan.endpoints[i].url, self.plan.outlier.eject_for_s,
                        self.plan.outlier.consecutive_failures)
        breaker = self.breaker
        if breaker is not None:
            before = breaker.opened_total
            breaker.record(failed, now)
            if breaker.opened_total != before:
                log.warning("backend %s: circuit opened for %.1fs", self.name, breaker.policy.open_for_s)

    def set_endpoint_health(self, i: int, ok: bool) -> None:
        """An active health check flipped endpoint i (shell/health.py)."""
        self.endpoints.set_healthy(i, ok)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()

