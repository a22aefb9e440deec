"""The admin listener: liveness, readiness, Prometheus metrics.

`/healthz` is 200 while the process serves and `/readyz` 200 once config is loaded and the
listeners are up, 503 while draining; neither depends on a backend's health (SPEC 7), so a
sick model never restarts or unreadies the sidecar.

Imports: stdlib, aiohttp, prometheus_client, sidecar.shell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from sidecar.shell.server import Sidecar

SIDECAR_KEY: web.AppKey[Sidecar] = web.AppKey("sidecar")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    if sidecar.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not sidecar.ready.is_set():
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready", "version": sidecar.proxy.runtime.plan.version})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIDECAR_KEY].proxy.runtime.metrics.render()
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def mirrors(request: web.Request) -> web.Response:
    """GET /admin/mirrors: per route and shadow, see shell/mirror.py `Mirrors.status_json` (issue 5)."""
    sidecar = request.app[SIDECAR_KEY]
    return web.json_response({"mirrors": sidecar.mirrors.status_json(sidecar.proxy.runtime.plan)})
async def drift(request: web.Request) -> web.Response:
    """Issue 6: per route, backend and feature, the last drift pass (shell/monitor.py)."""
    return web.json_response(request.app[SIDECAR_KEY].proxy.runtime.monitor.drift_json())


def build_admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/mirrors", mirrors)  # mirror
    app.router.add_get("/admin/drift", drift)  # issue 6
    return app
