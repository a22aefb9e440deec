"""Lifecycle: listeners, the one TaskGroup, signals and the SIGTERM drain (docs/reference/cli.md#signals-and-exit).

    run()   bind the proxy and admin sockets -> start background tasks in the TaskGroup ->
            ready -> wait for stop (SIGTERM/SIGINT or request_stop()) -> drain -> cancel
            the tasks -> close pools -> exit code
    drain   /readyz 503 at once; serve on for drain.delay (keep-alive included); then stop
            accepting, answer with `Connection: close`, close idle connections; in-flight
            requests get drain.grace to finish. Exit 0 when all finished, 1 when some had
            to be cut (logged).

    adopt() a reload's new Runtime starts serving: one sync step (services follow the new plan,
            the proxy's reference is swapped, health checks restart)

Owns, one each: the `Services` (shell/services.py: what outlives a config), the `Proxy` and
the `Runtime` it serves, the `Reloader`, the listeners and the TaskGroup. Every long-lived
task is created in `Sidecar.run`'s TaskGroup and cancelled on shutdown. Nothing in shell/
imports this module (tests/test_layering.py): the admin API and the reloader see the server
through their own small Protocols (`AdminHost`, `ReloadHost`).

Imports: stdlib, aiohttp, sidecar.config, sidecar.shell.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.config.load import LoadedConfig
from sidecar.config.plan import Plan
from sidecar.shell.admin import StatusProvider, build_admin_app
from sidecar.shell.history import EVERY_S
from sidecar.shell.listener import FairSite, Listener
from sidecar.shell.proxy import Proxy
from sidecar.shell.reload import Reloader
from sidecar.shell.runtime import Runtime
from sidecar.shell.services import Services

log = logging.getLogger("sidecar.server")


class ListenError(Exception):
    """A listener could not be opened (address in use, permission, no such address)."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


ROLLOUT_DECISIONS_SHOWN = 20   # per route, in /admin/status's rollout_decisions


class Sidecar:
    """One sidecar process's serving state. `await run()` serves until stopped."""

    def __init__(self, loaded: LoadedConfig, *, install_signals: bool = False,
                 access_log_fd: int | None = None, config_poll_s: float | None = None,
                 history_every_s: float = EVERY_S) -> None:
        self.config_path: Path | None = loaded.path
        plan = Plan.build(loaded)
        self.services = Services(plan, loaded.path, random.random, access_log_fd, history_every_s)
        self.proxy = Proxy(Runtime.build(plan), self.services, random.random)
        self.services.bind_gauges(lambda: self.proxy.runtime)
        self.ready = asyncio.Event()
        self.draining = False
        self.proxy_port = 0
        self.admin_port = 0
        self._install_signals = install_signals
        self._stop: asyncio.Event = asyncio.Event()
        self.health_tasks: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        # operations: reload, and the parts /admin/status is made of
        self.started_at = time.time()
        self.reloader = Reloader(self, self.services.metrics, poll_s=config_poll_s)
        # each capability adds one callable: () -> {"mirrors": ...}, or (backend) -> {"circuit": ...}
        self.status_providers: list[StatusProvider] = [self._mirror_status, self._drift_status,
                                                       self._feedback_status, self._rollout_status,
                                                       self.services.registry.status_json]

    def _mirror_status(self) -> dict[str, Any]:
        """Mirrors in /admin/status: one row per (route, shadow); disagreements stay in /admin/mirrors."""
        rows = self.services.mirrors.status_json(self.proxy.runtime.plan)
        return {"mirrors": [{k: v for k, v in row.items() if k != "disagreements"} for row in rows]}

    def _drift_status(self) -> dict[str, Any]:
        """Drift in /admin/status: one row per (route, backend, feature) of the last pass."""
        return {"drift": [row.to_json() for row in self.services.monitor.drift_rows()]}

    def _rollout_status(self) -> dict[str, Any]:
        """Rollouts in /admin/status (and the page's table): each rollout's recent decisions, newest first."""
        rows = [{"route": name, "time": d.time, "step": d.step,
                 "canary_weight": d.weights.get(ro.plan.policy.canary), "verdict": str(d.verdict),
                 "action": str(d.action), "state": str(d.state), "reason": d.reason}
                for name, ro in self.services.rollouts.by_route.items()
                for d in reversed(ro.state.decisions[-ROLLOUT_DECISIONS_SHOWN:])]
        return {"rollout_decisions": rows}

    def _feedback_status(self) -> dict[str, Any]:
        """Feedback in /admin/status: per route and backend, the metric, count, score mean, segments."""
        return {"feedback": self.services.feedback.status_rows()}

    @property
    def runtime(self) -> Runtime:
        """The runtime serving now (each request captures its own)."""
        return self.proxy.runtime

    def adopt(self, runtime: Runtime) -> list[str]:
        """Make `runtime` (built by the reloader from a validated config) the one serving.

        Sync from start to end, so no request or admin call sees half of it: the services
        follow the new plan (weight overrides of changed routes are cleared, and returned),
        the proxy's reference is swapped (a request in flight keeps the Runtime it captured),
        and the health checks restart for the new backends (kept ones keep their state).
        """
        cleared = self.services.adopt(runtime)
        self.proxy.runtime = runtime
        self.start_health_checks()
        return cleared

    async def save_overrides(self) -> None:
        """Persist the weight overrides (after `adopt` cleared some) and the rollouts' state."""
        await self.services.overrides.save()
        await self.services.rollouts.persist()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def request_stop(self) -> None:
        """Begin the drain, as SIGTERM does."""
        if not self._stop.is_set():
            log.info("stop requested: draining")
            self.draining = True
            self._stop.set()

    async def run(self) -> int:
        plan = self.proxy.runtime.plan
        limits = plan.limits
        proxy_server = Listener(  # web.Server + max_connections and header_timeout
            self.proxy, metrics=self.services.metrics, max_connections=limits.max_connections,
            header_timeout_s=limits.header_timeout,
            write_timeout_s=lambda: self.proxy.runtime.plan.limits.stream_idle_timeout,
            access_log=None, keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_header_bytes, max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers, lingering_time=2.0)
        proxy_runner = web.ServerRunner(proxy_server, handle_signals=False, shutdown_timeout=0.5)
        admin_runner = web.AppRunner(build_admin_app(self), handle_signals=False, access_log=None,
                                     shutdown_timeout=0.5)
        await proxy_runner.setup()
        await admin_runner.setup()
        loop = asyncio.get_running_loop()
        if self._install_signals:
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.reloader.request, "SIGHUP")
        code = 0
        try:
            await self._restore_state()
            await self.services.monitor.prepare()  # scipy, if drift is judged: before serving
            proxy_sock = bind(*plan.listen)
            admin_sock = bind(*plan.admin_listen)
            self.proxy_port = proxy_sock.getsockname()[1]
            self.admin_port = admin_sock.getsockname()[1]
            proxy_site = FairSite(proxy_runner, proxy_sock, backlog=4096)  # its own accept loop
            await proxy_site.start()
            await web.SockSite(admin_runner, admin_sock).start()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.reloader.run(), name="config-watcher"),
                         *(tg.create_task(coro, name=name) for name, coro in self.services.tasks().items())]
                self._tg = tg
                self.start_health_checks()
                self.ready.set()
                log.info("serving on %s:%d, admin on %s:%d, config %s",
                         plan.listen[0], self.proxy_port, plan.admin_listen[0], self.admin_port, plan.version)
                await self._stop.wait()
                code = await self._drain(proxy_site, proxy_server)
                self._tg = None
                for task in [*tasks, *self.health_tasks]:
                    task.cancel()
        finally:
            if self._install_signals:
                loop.remove_signal_handler(signal.SIGTERM)
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGHUP)
            await proxy_runner.cleanup()
            await admin_runner.cleanup()
            await self.services.mirrors.drain(0)  # none may outlive the pools (no-op after _drain)
            await self.proxy.runtime.close()
            await self.services.registry.close()
            await self.reloader.close_retired()
        log.info("stopped (exit code %d)", code)
        return code

    def start_health_checks(self) -> None:
        """(Re)start the active health checks of the running config (shell/health.py) in the
        TaskGroup; a reload calls it after the swap (kept backends keep their health state)."""
        for task in self.health_tasks:
            task.cancel()
        tg = self._tg
        if tg is None:  # not serving yet (or any more): run() starts them
            self.health_tasks = []
            return
        self.health_tasks = [tg.create_task(hc.run(), name=f"health-{hc.backend.name}")
                             for hc in self.proxy.runtime.health_checkers()]

    async def _restore_state(self) -> None:
        """Weight overrides from state_dir; those of routes changed since are dropped (docs/operations.md)."""
        overrides = self.services.overrides
        await asyncio.to_thread(overrides.load, self.proxy.runtime.plan)
        overrides.apply(self.proxy.runtime, "config changed since the state was saved")
        # backends' model aliases, waiting at most registry.mlflow.timeout
        # (docs/registry.md#start-up-and-an-unreachable-registry)
        await self.services.registry.start()
        # rollouts resume (or start) and apply their weights over the overrides
        await self.services.rollouts.start(lambda: self.proxy.runtime)
        await self.services.join_fleet(lambda: self.proxy.runtime)   # with `fleet`: follow the fleet at once
        if overrides.dirty:
            await overrides.save()

    async def _drain(self, proxy_site: FairSite, proxy_server: web.Server) -> int:
        drain = self.proxy.runtime.plan.drain
        self.draining = True
        await asyncio.sleep(drain.delay)
        self.proxy.closing = True
        await proxy_site.stop()          # no new connections
        proxy_server.pre_shutdown()      # idle keep-alive connections close, busy ones after their answer
        grace_end = asyncio.get_running_loop().time() + drain.grace  # mirrors share the grace
        try:
            async with asyncio.timeout(drain.grace):
                await self.proxy.wait_idle()
        except TimeoutError:
            log.error("drain: %d requests still in flight after %.1fs grace; cutting them",
                      self.proxy.inflight, drain.grace)
            self.services.metrics.drain_cut.labels().value += self.proxy.inflight
            return 1
        finally:  # mirrors in flight get the rest of the grace, then are cancelled
            await self.services.mirrors.drain(grace_end - asyncio.get_running_loop().time())
        return 0
