"""Rollout webhooks (docs/rollout.md#notifications): one POST per event, in order per route, off every path.

What it owns: a bounded queue of events and one sender task (`run`, in the server's
TaskGroup, cancelled on shutdown) with its aiohttp session. `send` never waits: when the
queue is full the event is dropped and counted (`rollout_notify_total{outcome="dropped"}`).
One sender for all routes keeps each route's events in order. Each event is tried up to
`TRIES` times, `timeout` each, with backoff between tries; outcomes counted as `sent`,
`failed` (all tries failed; logged) or `dropped`.

Imports: stdlib, aiohttp, sidecar.config, sidecar.shell.metrics.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import aiohttp
import orjson

from sidecar.config.plan import NotifyPlan
from sidecar.shell.metrics import Metrics

log = logging.getLogger("sidecar.notify")

MAX_QUEUE: Final = 1000
TRIES: Final = 3
BACKOFF_S: Final = (0.2, 1.0)
OUTCOMES: Final = ("sent", "failed", "dropped")


class Notifier:
    """See the module docstring. Built by shell/services.py."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._queue: asyncio.Queue[tuple[str, NotifyPlan, dict[str, Any]]] = asyncio.Queue(MAX_QUEUE)

    def send(self, route: str, plan: NotifyPlan | None, body: dict[str, Any]) -> None:
        """Queue one event; never blocks (full: dropped and counted)."""
        if plan is None:
            return
        try:
            self._queue.put_nowait((route, plan, body))
        except asyncio.QueueFull:
            self.metrics.rollout_notify.labels(route, "dropped").value += 1
            log.warning("notify: queue full, %s event of route %s dropped", body.get("event"), route)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                route, plan, body = await self._queue.get()
                ok = await self._post(session, plan, body)
                self.metrics.rollout_notify.labels(route, "sent" if ok else "failed").value += 1

    async def _post(self, session: aiohttp.ClientSession, plan: NotifyPlan, body: dict[str, Any]) -> bool:
        data = orjson.dumps(body)
        headers = {"content-type": "application/json", **dict(plan.headers)}
        last = ""
        for i in range(TRIES):
            try:
                async with session.post(plan.webhook, data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=plan.timeout_s)) as resp:
                    await resp.read()
                    if resp.status < 300:
                        return True
                    last = f"status {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                last = repr(e)
            if i < TRIES - 1:
                await asyncio.sleep(BACKOFF_S[min(i, len(BACKOFF_S) - 1)])
        log.error("notify: %s event of route %s not delivered to its webhook after %d tries: %s",
                  body.get("event"), body.get("route"), TRIES, last)
        return False
