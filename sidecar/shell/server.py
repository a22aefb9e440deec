"""Lifecycle: listeners, the one TaskGroup, signals and the SIGTERM drain (docs/reference/cli.md#signals-and-exit).

    run()   bind the proxy and admin sockets -> start background tasks in the TaskGroup ->
            ready -> wait for stop (SIGTERM/SIGINT or request_stop()) -> drain -> cancel
            the tasks -> close pools -> exit code
    drain   /readyz 503 at once; serve on for drain.delay (keep-alive included); then stop
            accepting, answer with `Connection: close`, close idle connections; in-flight
            requests get drain.grace to finish. Exit 0 when all finished, 1 when some had
            to be cut (logged).

Every long-lived task is created in `Sidecar.run`'s TaskGroup and cancelled on shutdown.
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
from sidecar.shell.accesslog import AccessLog
from sidecar.shell.admin import StatusProvider, build_admin_app
from sidecar.shell.listener import Listener
from sidecar.shell.metrics import Metrics
from sidecar.shell.mirror import Mirrors
from sidecar.shell.proxy import Proxy
from sidecar.shell.reload import Reloader
from sidecar.shell.runtime import Runtime
from sidecar.shell.state import Overrides, resolve_state_dir

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


class Sidecar:
    """One sidecar process's serving state. `await run()` serves until stopped."""

    def __init__(self, loaded: LoadedConfig, *, install_signals: bool = False,
                 access_log_fd: int | None = None, config_poll_s: float | None = None) -> None:
        self.loaded = loaded
        self.config_path: Path | None = loaded.path
        self.metrics = Metrics()
        plan = Plan.build(loaded)
        self.access_log = AccessLog(self.metrics.access_log_dropped.labels(), access_log_fd)
        self.mirrors = Mirrors(self.metrics, random.random, plan)  # owns shadow tasks and stats
        self.proxy = Proxy(Runtime.build(plan, self.metrics), self.access_log, random.random, self.mirrors)
        self.ready = asyncio.Event()
        self.draining = False
        self.proxy_port = 0
        self.admin_port = 0
        self._install_signals = install_signals
        self._stop: asyncio.Event = asyncio.Event()
        self.health_tasks: list[asyncio.Task[None]] = []
        self._tg: asyncio.TaskGroup | None = None
        # operations: reload, weight overrides, and the parts /admin/status is made of
        self.started_at = time.time()
        self.overrides = Overrides(resolve_state_dir(plan.config.state_dir, loaded.path))
        self.reloader = Reloader(self, poll_s=config_poll_s)
        # each capability adds one callable: () -> {"mirrors": ...}, or (backend) -> {"circuit": ...}
        self.status_providers: list[StatusProvider] = [self._mirror_status, self._drift_status]

    def _mirror_status(self) -> dict[str, Any]:
        """Mirrors in /admin/status: one row per (route, shadow); disagreements stay in /admin/mirrors."""
        rows = self.mirrors.status_json(self.proxy.runtime.plan)
        return {"mirrors": [{k: v for k, v in row.items() if k != "disagreements"} for row in rows]}

    def _drift_status(self) -> dict[str, Any]:
        """Drift in /admin/status: one row per (route, backend, feature) of the last pass."""
        return {"drift": [row.to_json() for row in self.proxy.runtime.monitor.drift_rows()]}

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
            self.proxy, metrics=self.metrics, max_connections=limits.max_connections,
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
            await self.proxy.runtime.monitor.prepare()  # scipy, if drift is judged: before serving
            proxy_sock = bind(*plan.listen)
            admin_sock = bind(*plan.admin_listen)
            self.proxy_port = proxy_sock.getsockname()[1]
            self.admin_port = admin_sock.getsockname()[1]
            proxy_site = web.SockSite(proxy_runner, proxy_sock, backlog=4096)
            await proxy_site.start()
            await web.SockSite(admin_runner, admin_sock).start()
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self.access_log.run(), name="access-log"),
                         tg.create_task(self.reloader.run(), name="config-watcher"),
                         tg.create_task(self.proxy.runtime.monitor.run(), name="monitor")]
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
            await self.mirrors.drain(0)  # none may outlive the pools (no-op after _drain)
            await self.proxy.runtime.close()
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
        await asyncio.to_thread(self.overrides.load, self.proxy.runtime.plan)
        self.overrides.apply(self.proxy.runtime, "config changed since the state was saved")
        if self.overrides.dirty:
            await self.overrides.save()

    async def _drain(self, proxy_site: web.SockSite, proxy_server: web.Server) -> int:
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
            self.metrics.drain_cut.labels().value += self.proxy.inflight
            return 1
        finally:  # mirrors in flight get the rest of the grace, then are cancelled
            await self.mirrors.drain(grace_end - asyncio.get_running_loop().time())
        return 0
