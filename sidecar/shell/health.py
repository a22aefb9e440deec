"""Active health checks: one loop per endpoint of a backend with `health_check`.

Each check is a plain `GET <base path><health_check.path>` with its own timeout, on a
dedicated one-connection pool per endpoint, so a check never waits behind model traffic for
a pooled connection (which would mark a busy replica down) and never blocks a request.
A 2xx or 3xx answer passes; anything else (status, connect error, timeout, reset) fails.
Results feed core/health.HealthTracker; a flip sets the endpoint's health in the Backend's
EndpointSet and is logged. A backend with no healthy endpoint is unavailable (docs/reference/http.md#the-split).
`/healthz` and `/readyz` never look at this (docs/reference/admin-api.md#readiness-and-liveness).

The loops run in the server's TaskGroup (`Sidecar.run` asks `Runtime.health_checkers()`);
they catch every Exception, log it and carry on; cancellation ends them.

Imports: stdlib, sidecar.shell.backend/upstream.
"""

from __future__ import annotations

import asyncio
import logging
import random

from sidecar.shell.backend import Backend
from sidecar.shell.upstream import UpstreamFailure, UpstreamPool, header_block

log = logging.getLogger("sidecar.health")

_HEADERS = header_block("GET", (("User-Agent", "model-sidecar-health-check"), ("Accept", "*/*")), b"")


class HealthChecker:
    """Runs the active checks of one backend's endpoints until cancelled."""

    def __init__(self, backend: Backend) -> None:
        assert backend.plan.health_check is not None and backend.health is not None
        self.backend = backend
        self.checks = 0  # checks done, all endpoints (tests wait on it)
        plan = backend.plan
        self._pools = tuple(UpstreamPool(plan, 64 * 1024, i, max_connections=1) for i in range(len(plan.endpoints)))

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(len(self._pools)):
                    tg.create_task(self._loop(i), name=f"health-{self.backend.name}-{i}")
        finally:
            for pool in self._pools:
                await pool.close()

    async def check_once(self, i: int) -> bool:
        """One check of endpoint i: True when it passed."""
        hc = self.backend.plan.health_check
        assert hc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hc.timeout_s
        try:
            answer = await self._pools[i].attempt("GET", hc.path, _HEADERS, b"", deadline, deadline)
        except UpstreamFailure as f:
            log.debug("health check of %s[%d] failed: %s", self.backend.name, i, f)
            return False
        answer.close()  # a streamed answer is not read; a buffered one is already done
        return 200 <= answer.status < 400

    async def _loop(self, i: int) -> None:
        backend = self.backend
        hc = backend.plan.health_check
        trackers = backend.health
        assert hc is not None and trackers is not None
        # spread the first checks of many endpoints over one interval
        await asyncio.sleep(random.random() * min(hc.interval_s, 1.0))
        while True:
            try:
                ok = await self.check_once(i)
                self.checks += 1
                flipped = trackers[i].record(ok)
                if flipped is not None:
                    backend.set_endpoint_health(i, flipped)
                    log.warning("backend %s: endpoint %d (%s) is now %s", backend.name, i,
                                backend.plan.endpoints[i].url, "healthy" if flipped else "unhealthy")
            except Exception:
                log.exception("health check loop of %s[%d] failed; carrying on", backend.name, i)
            await asyncio.sleep(hc.interval_s)
