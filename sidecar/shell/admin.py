"""Admin listener (docs/reference/admin-api.md): liveness, readiness, metrics, status, config, reload, weights, page.

    GET    /healthz                          200 while the process serves          (no auth)
    GET    /readyz                           200 when ready, 503 while draining    (no auth)
    GET    /metrics                          Prometheus text                       (no auth)
    GET    /                                 the status page (static HTML; its data needs the token)
    GET    /admin/status                     everything an operator looks at, as JSON
    GET    /admin/config                     the running config, secrets masked, with its version
    POST   /admin/reload                     reload the file now: 200 + version, or 400 + errors
    PUT    /admin/routes/{route}/weights     runtime weight override (partial body)
    DELETE /admin/routes/{route}/weights     drop the override: back to the config's weights
                                             (both 409 while the route's rollout steers its weights)
    GET    /admin/routes/{route}/rollout     the rollout: state, step, weights, decisions
    POST   /admin/routes/{route}/rollout/{action}  pause, resume, promote, rollback, restart (409: not allowed)
    GET    /admin/fleet                      the fleet: leader, epoch, members, store health, skew (name null without)
                                             (with `fleet`, weight and rollout changes go through its store: 503
                                             while it cannot be reached)
    GET    /admin/feedback                   feedback per route, backend and segment value
    GET    /admin/history                    the status page's charts: rates, codes, p50/p99, weights over time
    GET    /admin/openapi.json               OpenAPI 3.1 of all of the above

Guard (one middleware, `_guard`), its checks in this order; the first that fails answers:

1. Host (DNS rebinding), only when no `admin.token` is set and the listener is on loopback:
   every request, public paths included, must name a loopback host (`localhost`, or a
   loopback address such as 127.0.0.1 or [::1]) with the listener's port (no port: only
   when it listens on 80), else 421 `misdirected_request`. A page on a name the attacker
   rebinds to 127.0.0.1 sends `Host: evil.example:PORT`; loopback names cannot be rebound.
   A request with no Host header at all (HTTP/1.0 tools; never a browser) passes.
2. Origin (cross-site requests), on every listener, token or not: a mutating call (any
   method but GET/HEAD/OPTIONS) whose `Origin` is not the origin it was sent to
   (`http(s)://` + its Host), `null` included, or whose `Sec-Fetch-Site` is `cross-site` or
   `same-site`, answers 403 `forbidden`. Browsers send these on every cross-origin POST,
   `<form>`s and `text/plain` fetches included; the CLI and scripts send neither.
3. Token: with `admin.token` set, every path but /healthz, /readyz, /metrics and the page
   itself needs `Authorization: Bearer <token>`, else 401. The token is compared as bytes
   (the header's raw bytes, the config's UTF-8), in constant time over SHA-256 digests, so
   neither a non-UTF-8 header nor the token's length changes the answer or its timing.
4. Without a token, a listener that is not on loopback answers 403 to every mutating call.

The token is read from the running config on every call, so a reload can set or rotate it.
The listener's port is the bound one (`Sidecar.admin_port`), and "on loopback" is the
running config's `admin.listen` host, as for rule 4.

Errors are JSON as docs/reference/admin-api.md#errors says: `{"error": {"type", "message", ...}}`;
an unexpected exception in a handler is logged and answered with a JSON 500 `internal_error`,
without a traceback.

`/healthz` and `/readyz` never depend on a backend's health (docs/reference/admin-api.md#readiness-and-liveness).

/admin/status: routes and backends (health, circuit, inflight, latency) are built here;
`sidecar.status_providers` (() -> {"mirrors": ...}) add the top-level sections of the
capabilities (mirrors, drift). A failing provider is logged and left out; the rest still
answers.

The server is seen through `AdminHost`, so this module does not import shell/server.py.

Imports: stdlib, aiohttp, orjson, prometheus_client, sidecar.config, sidecar.shell.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar import __version__
from sidecar.config.load import place_of
from sidecar.config.plan import Plan, RoutePlan
from sidecar.core.rollout import AdminAction
from sidecar.errors import StoreUnavailable
from sidecar.shell.fleet import replica_id
from sidecar.shell.openapi import openapi_document
from sidecar.shell.proxy import Proxy
from sidecar.shell.reload import Reloader, Result
from sidecar.shell.runtime import Runtime
from sidecar.shell.services import Services
from sidecar.shell.state import InvalidWeights, merge_weights

log = logging.getLogger("sidecar.admin")

StatusProvider = Callable[[], Mapping[str, Any]]


class AdminHost(Protocol):
    """What the admin API reads and drives of the server (shell/server.py `Sidecar`)."""

    proxy: Proxy                  # the runtime serving now; requests in flight
    services: Services            # metrics, mirrors, monitor, weight overrides
    reloader: Reloader            # POST /admin/reload and the last result
    ready: asyncio.Event
    draining: bool
    started_at: float
    admin_port: int               # the bound port (the Host check compares with it)
    config_path: Path | None
    status_providers: list[StatusProvider]


SIDECAR_KEY: web.AppKey[AdminHost] = web.AppKey("sidecar")
PAGE_KEY: web.AppKey[bytes] = web.AppKey("status_page")

PUBLIC_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics", "/"})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
MASK: Final = "***"
# scheme://userinfo@ : the authority ends at the first / ? # or space, and its userinfo at the
# LAST @ before that (greedy), so a raw @ inside a password stays inside the userinfo
_URL_USERINFO = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
# Host: name or [v6], then an optional port
_HOST = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[0-9]{1,5}))?")
_FOREIGN_FETCH: Final = frozenset({"cross-site", "same-site"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json",
                        headers=headers)


def admin_error(status: int, type_: str, message: str, **extra: Any) -> web.Response:
    headers = {"www-authenticate": 'Bearer realm="sidecar-admin"'} if status == 401 else None
    return json_response({"error": {"type": type_, "message": message, **extra}}, status, headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False            # "" (every interface) or a host name: not loopback


# -- guard: Host, Origin, token ------------------------------------------------------------------


def would_accept_host(host: str, port: int) -> bool:
    """Whether a Host header names this loopback listener: a loopback name or address, its port.

    Case-insensitive; `localhost.` (the absolute name) too. No port only for port 80.
    """
    m = _HOST.fullmatch(host.strip().lower())
    if m is None:
        return False
    name = m.group("v6") if m.group("v6") is not None else m.group("name").removesuffix(".")
    if m.group("name") is not None and not (name == "localhost" or _is_ipv4_literal(name)):
        return False            # any other name can be rebound to 127.0.0.1 by its owner
    if not is_loopback(name):
        return False
    given = m.group("port")
    return int(given) == port if given is not None else port == 80


def _is_ipv4_literal(name: str) -> bool:
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def would_accept_origin(headers: Mapping[str, str]) -> bool:
    """Whether a mutating call comes from the admin's own origin (or from no browser at all).

    `Origin` must be `http://` or `https://` + the request's own Host (a TLS proxy in front
    keeps the Host); `Sec-Fetch-Site` must not be cross-site or same-site. Absent headers
    pass: the CLI, curl and scripts send neither, and browsers send Origin on every
    cross-origin POST, PUT and DELETE.
    """
    if headers.get("sec-fetch-site", "").strip().lower() in _FOREIGN_FETCH:
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    host = headers.get("host", "").strip().lower()
    scheme, sep, authority = origin.strip().lower().partition("://")
    return bool(host) and sep == "://" and scheme in ("http", "https") and authority == host


def token_matches(authorization: str, token: str) -> bool:
    """`Bearer <token>`, compared as bytes in constant time (any header bytes, any token length).

    aiohttp decodes header bytes as UTF-8 with surrogateescape, so encoding back the same way
    gives the bytes as sent; `token` (from YAML or the environment) likewise.
    """
    scheme, _, given = authorization.partition(" ")
    given_digest = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
    token_digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    # both compared whatever the scheme: no early return on a wrong one
    same = hmac.compare_digest(given_digest, token_digest)
    return same and scheme.lower() == "bearer"


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    sidecar = request.app[SIDECAR_KEY]
    plan = sidecar.proxy.runtime.plan
    loopback = is_loopback(plan.admin_listen[0])
    if not plan.admin_token and loopback:
        host = request.headers.get("host")
        if host is not None and not would_accept_host(host, sidecar.admin_port):
            return admin_error(421, "misdirected_request",
                               f"this admin listener answers only to a loopback Host with its port, e.g. "
                               f"127.0.0.1:{sidecar.admin_port} or localhost:{sidecar.admin_port} "
                               f"(no admin.token is set; DNS rebinding protection)")
    mutating = request.method not in SAFE_METHODS
    if mutating and not would_accept_origin(request.headers):
        return admin_error(403, "forbidden", "changes are refused from another origin (Origin or "
                                             "Sec-Fetch-Site of a web page that is not this admin's own)")
    if request.path not in PUBLIC_PATHS or mutating:
        if plan.admin_token:
            if not token_matches(request.headers.get("authorization", ""), plan.admin_token):
                return admin_error(401, "unauthorized", "this admin API needs 'Authorization: Bearer <token>'")
        elif mutating and not loopback:
            return admin_error(403, "forbidden", "the admin listener is not on loopback and no admin.token is "
                                                 "set: changes are refused; set admin.token")
    try:
        return await handler(request)
    except web.HTTPException as e:   # aiohttp's own 404/405: JSON like every other admin error
        if e.status < 400:
            raise
        return admin_error(e.status, "not_found" if e.status == 404 else "method_not_allowed"
                           if e.status == 405 else "bad_request", e.reason)
    except ConnectionError:   # the client went away: aiohttp drops it quietly
        raise
    except Exception:   # a bug: logged with its traceback, answered as JSON without it
        log.exception("admin %s %s failed", request.method, request.path)
        return admin_error(500, "internal_error", "the admin API failed on this request; see the sidecar's log")


# -- liveness, readiness, metrics -------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    if sidecar.draining:
        return json_response({"status": "draining"}, status=503)
    if not sidecar.ready.is_set():
        return json_response({"status": "starting"}, status=503)
    return json_response({"status": "ready", "version": sidecar.proxy.runtime.plan.version})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SIDECAR_KEY].services.metrics.render()
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def mirrors(request: web.Request) -> web.Response:
    """GET /admin/mirrors: per route and shadow, see shell/mirror.py `Mirrors.status_json`."""
    sidecar = request.app[SIDECAR_KEY]
    return web.json_response({"mirrors": sidecar.services.mirrors.status_json(sidecar.proxy.runtime.plan)})


async def feedback(request: web.Request) -> web.Response:
    """GET /admin/feedback: per route and backend, outcome counts, the metric overall and per
    segment value, the confidence signal (shell/feedback.py; fresh from its worker)."""
    fb = request.app[SIDECAR_KEY].services.feedback
    return web.json_response({"routes": fb.routes_json(await fb.snapshot())})


async def drift(request: web.Request) -> web.Response:
    """Per route, backend and feature, the last drift pass (shell/monitor.py)."""
    return web.json_response(request.app[SIDECAR_KEY].services.monitor.drift_json())


# -- status ---------------------------------------------------------------------------------------------


def mask_url(value: str) -> str:
    """`http://user:pass@host` -> `http://user:***@host` (docs/reference/admin-api.md#masking),
    for every URL in `value`.

    The userinfo runs to the LAST `@` of the authority (`http://u:p@ss@host` masks `p@ss`),
    and the password from the first `:` in it; a URL with no password is left as it is.
    """
    return _URL_USERINFO.sub(_mask_userinfo, value)


def _mask_userinfo(m: re.Match[str]) -> str:
    user, colon, _password = m.group("userinfo").partition(":")
    return m.group(0) if not colon else f"{m.group('pre')}{user}:{MASK}@"


def route_status(sidecar: AdminHost, rt: Runtime, route: RoutePlan) -> dict[str, Any]:
    split = rt.splits[route.name]
    shares = split.shares(rt.available(route.name))
    override = sidecar.services.overrides.by_route.get(route.name)
    return {
        "name": route.name,
        "match": {"path_prefix": route.path_prefix,
                  "methods": sorted(route.methods) if route.methods is not None else None,
                  "headers": dict(route.headers)},
        "backends": list(route.backends),
        "weights": dict(zip(route.split.names, route.split.weights, strict=True)),   # configured
        "override": override is not None and override.fingerprint == route.fingerprint,
        "override_weights": dict(override.weights) if override is not None else None,
        "current_weights": dict(zip(split.names, split.weights, strict=True)),
        "effective": dict(zip(split.names, shares, strict=True)),
        "sticky": route.sticky_header,
        "override_header": route.override_header,
        "timeout_s": route.timeout_s,
        "rollout": sidecar.services.rollouts.summary_json(route.name),   # None: no rollout
        "fingerprint": route.fingerprint,
    }


def backend_status(sidecar: AdminHost, rt: Runtime, name: str) -> dict[str, Any]:
    plan = rt.plan.backends[name]
    backend = rt.backends[name]
    now = asyncio.get_running_loop().time()
    latency = sidecar.services.monitor.backend_summary(name)
    endpoints = backend.endpoints
    doc: dict[str, Any] = {
        "name": name,
        "url": mask_url(plan.endpoints[0].url) if len(plan.endpoints) == 1 else None,
        "endpoints": [{"url": mask_url(ep.url), "inflight": backend.pools[i].inflight,
                       "healthy": endpoints.healthy[i], "ejected": endpoints.is_ejected(i, now)}
                      for i, ep in enumerate(plan.endpoints)],
        "inflight": backend.inflight,
        "max_inflight": plan.max_inflight,
        "max_connections": plan.max_connections,
        "available": backend.available(now),
        "healthy": endpoints.available(now),
        "circuit": str(backend.circuit_state(now)),
        # rolling window of the last requests (shell/monitor.py), every route together
        "p50_s": latency.p50 if latency else None,
        "p95_s": latency.p95 if latency else None,
        "p99_s": latency.p99 if latency else None,
        "error_rate": latency.error_rate if latency else None,
        "requests": latency.count if latency else 0,
        **backend_health(sidecar, name, checked=plan.health_check is not None,
                         available=endpoints.available(now)),
        "fingerprint": plan.fingerprint,
        "model": sidecar.services.registry.model_json(name),   # {name, version, alias}; null: none configured
    }
    return doc


def backend_health(sidecar: AdminHost, name: str, *, checked: bool, available: bool) -> dict[str, Any]:
    """`health` says "healthy" only of a backend whose health checks pass; without a health
    check it is "not checked" (or "ejected" when outlier detection took out every endpoint),
    and `recent_error_rate` (failed tries over the last minute, mirror copies included) is
    what tells how it does (docs/reference/admin-api.md#backend-health). With its answers
    since start and per second over the last minute (shell/history.py)."""
    health = ("healthy" if available else "unhealthy") if checked else ("not checked" if available else "ejected")
    return {"health": health, "health_checked": checked, **sidecar.services.history.recent(name)}


def status_document(sidecar: AdminHost) -> dict[str, Any]:
    rt = sidecar.proxy.runtime
    plan = rt.plan
    last = sidecar.reloader.last
    now = time.time()
    doc: dict[str, Any] = {
        "sidecar_version": __version__,
        "version": plan.version,
        "config_path": str(sidecar.config_path) if sidecar.config_path else None,
        "state_dir": str(state_dir) if (state_dir := sidecar.services.overrides.state_dir) else None,
        "started_at": sidecar.started_at,
        "uptime_s": round(now - sidecar.started_at, 3),
        "ready": sidecar.ready.is_set(),
        "draining": sidecar.draining,
        "inflight": sidecar.proxy.inflight,
        "last_reload": last.as_json() if last is not None else None,
        "routes": [route_status(sidecar, rt, r) for r in plan.routes],
        "backends": [backend_status(sidecar, rt, name) for name in plan.backends],
    }
    for provide in sidecar.status_providers:
        try:
            doc.update(provide())
        except Exception:
            log.exception("status provider %r failed", provide)
    return doc


async def status(request: web.Request) -> web.Response:
    return json_response(status_document(request.app[SIDECAR_KEY]))


# -- config ---------------------------------------------------------------------------------------------


def masked_config(plan: Plan) -> dict[str, Any]:
    """The running config as JSON with admin.token, registry.mlflow.token, URL passwords and
    `${*TOKEN*}`-like values masked."""
    secret = plan.secret_places

    def walk(node: Any, loc: list[int | str]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, [*loc, k]) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, [*loc, i]) for i, v in enumerate(node)]
        if secret and place_of(loc) in secret and node not in (None, ""):
            return MASK
        if isinstance(node, str):
            return mask_url(node)
        return node

    doc: dict[str, Any] = walk(plan.config.model_dump(mode="json"), [])
    if doc["admin"]["token"]:
        doc["admin"]["token"] = MASK
    if doc.get("registry") and doc["registry"]["mlflow"]["token"]:
        doc["registry"]["mlflow"]["token"] = MASK
    return doc


async def config(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    plan = sidecar.proxy.runtime.plan
    return json_response({"version": plan.version,
                          "path": str(sidecar.config_path) if sidecar.config_path else None,
                          "config": masked_config(plan)})


# -- reload and weights -------------------------------------------------------------------------------------


async def reload(request: web.Request) -> web.Response:
    res = await request.app[SIDECAR_KEY].reloader.reload("admin")
    if res.result is Result.ERROR:
        return admin_error(400, "invalid_config", f"config rejected; still running {res.version}",
                           errors=list(res.errors), reload=res.as_json())
    return json_response(res.as_json())


def _route_or_404(sidecar: AdminHost, name: str) -> RoutePlan | web.Response:
    plan = sidecar.proxy.runtime.plan
    route = plan.routes_by_name.get(name)
    if route is None:
        return admin_error(404, "not_found", f"unknown route {name!r} (known: {', '.join(plan.routes_by_name)})")
    return route


async def put_weights(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    unknown = _route_or_404(sidecar, request.match_info["route"])
    if isinstance(unknown, web.Response):
        return unknown  # 404 before the body is judged
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return admin_error(400, "invalid_weights", f"the body is not JSON: {e}")
    # from here to `set` nothing awaits: the route and runtime are the ones now serving
    route = _route_or_404(sidecar, request.match_info["route"])  # again: a reload may have run meanwhile
    if isinstance(route, web.Response):
        return route
    if (refused := _steered(sidecar, route)) is not None:
        return refused
    rt = sidecar.proxy.runtime
    try:
        weights = merge_weights(route, sidecar.services.overrides.weights_of(route), body)
    except InvalidWeights as e:
        return admin_error(400, "invalid_weights", str(e), route=route.name)
    if sidecar.services.fleet is not None:   # every replica's, through the store (docs/fleet.md)
        try:
            await sidecar.services.fleet.put_weights(rt, route.name, weights)
        except StoreUnavailable as e:
            return _store_error(e, route.name)
        rt = sidecar.proxy.runtime
        again = _route_or_404(sidecar, route.name)   # a reload may have run while the store answered
        if isinstance(again, web.Response):
            return again
        route = again
    sidecar.services.overrides.set(rt, route, weights)
    log.info("weights of route %s set by the admin API: %s", route.name,
             ", ".join(f"{b}={w:g}" for b, w in weights.items()))
    persisted = await sidecar.services.overrides.save()
    return json_response({**route_status(sidecar, rt, route), "persisted": persisted})


async def delete_weights(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    route = _route_or_404(sidecar, request.match_info["route"])
    if isinstance(route, web.Response):
        return route
    if (refused := _steered(sidecar, route)) is not None:
        return refused
    if sidecar.services.fleet is not None:
        try:
            await sidecar.services.fleet.put_weights(sidecar.proxy.runtime, route.name, None)
        except StoreUnavailable as e:
            return _store_error(e, route.name)
        again = _route_or_404(sidecar, route.name)   # a reload may have run while the store answered
        if isinstance(again, web.Response):
            return again
        route = again
    rt = sidecar.proxy.runtime
    if sidecar.services.overrides.clear(rt, route):
        log.info("weight override of route %s cleared by the admin API", route.name)
    persisted = await sidecar.services.overrides.save()
    return json_response({**route_status(sidecar, rt, route), "persisted": persisted})


def _store_error(e: StoreUnavailable, route: str | None = None) -> web.Response:
    """503 while the fleet's store cannot take an admin change (docs/fleet.md#faults)."""
    resp = admin_error(e.status, e.type, e.message, **({} if route is None else {"route": route}))
    resp.headers["Retry-After"] = str(e.retry_after_s)
    return resp


def _steered(sidecar: AdminHost, route: RoutePlan) -> web.Response | None:
    """409 while the route's rollout steers its weights (progressing or baking; docs/rollout.md#admin-actions)."""
    rollouts = sidecar.services.rollouts
    if not rollouts.steers_weights(route.name):
        return None
    state = rollouts.by_route[route.name].state.state
    return admin_error(409, "rollout_conflict", f"the rollout of route {route.name!r} is {state} and steers its "
                                                "weights: pause it first", route=route.name)


# -- rollouts -----------------------------------------------------------------------------------------------


def _rollout_or_404(sidecar: AdminHost, name: str) -> RoutePlan | web.Response:
    route = _route_or_404(sidecar, name)
    if isinstance(route, web.Response):
        return route
    if name not in sidecar.services.rollouts.by_route:
        return admin_error(404, "not_found", f"route {name!r} has no rollout")
    return route


async def get_rollout(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    route = _rollout_or_404(sidecar, request.match_info["route"])
    if isinstance(route, web.Response):
        return route
    return json_response(sidecar.services.rollouts.status_json(route.name))


async def post_rollout(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR_KEY]
    route = _rollout_or_404(sidecar, request.match_info["route"])
    if isinstance(route, web.Response):
        return route
    try:
        action = AdminAction(request.match_info["action"])
    except ValueError:
        return admin_error(404, "not_found", f"unknown rollout action {request.match_info['action']!r} "
                                             f"(known: {', '.join(a.value for a in AdminAction)})")
    rollouts = sidecar.services.rollouts
    try:
        res = await rollouts.admin(route.name, action)
    except KeyError:
        return admin_error(404, "not_found", f"route {route.name!r} has no rollout")
    except StoreUnavailable as e:
        return _store_error(e, route.name)
    if res.error is not None:
        return admin_error(res.error.status, res.error.type, res.error.message, route=route.name)
    log.info("rollout of route %s: %s by the admin API", route.name, action)
    return json_response(rollouts.status_json(route.name))


# -- fleet --------------------------------------------------------------------------------------------------


async def fleet(request: web.Request) -> web.Response:
    """GET /admin/fleet: this replica's view of its fleet (without `fleet`: a fleet of one, `name` null)."""
    f = request.app[SIDECAR_KEY].services.fleet
    if f is None:
        return json_response({"name": None, "replica": replica_id(), "leader": None, "epoch": 0, "leading": False,
                              "judging": False, "members": [], "store": None, "skew": []})
    return json_response(f.status_json())


# -- page and API description ---------------------------------------------------------------------------


def status_page() -> bytes:
    """static/status.html with the vendored chart library (uPlot, MIT: static/uPlot.LICENSE)
    inlined where its markers stand: one public path, no other request, works offline."""
    static = resources.files("sidecar.shell").joinpath("static")
    html = static.joinpath("status.html").read_bytes()
    css = static.joinpath("uPlot.min.css").read_bytes()
    js = static.joinpath("uPlot.iife.min.js").read_bytes()
    assert b"</script" not in js.lower() and b"</style" not in css.lower()
    return (html.replace(b"<!-- uPlot.min.css -->", b"<style>" + css + b"</style>", 1)
                .replace(b"<!-- uPlot.iife.min.js -->", b"<script>" + js + b"</script>", 1))


async def page(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGE_KEY], content_type="text/html", charset="utf-8",
                        headers={"cache-control": "no-store"})


async def history(request: web.Request) -> web.Response:
    """GET /admin/history: the status page's charts, a point per 5 s over 15 minutes (shell/history.py)."""
    sidecar = request.app[SIDECAR_KEY]
    return web.Response(body=sidecar.services.history.to_json_bytes(sidecar.proxy.runtime),
                        content_type="application/json")


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def build_admin_app(sidecar: AdminHost) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[SIDECAR_KEY] = sidecar
    app[PAGE_KEY] = status_page()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", page)
    app.router.add_get("/admin/status", status)
    app.router.add_get("/admin/config", config)
    app.router.add_post("/admin/reload", reload)
    app.router.add_put("/admin/routes/{route}/weights", put_weights)
    app.router.add_delete("/admin/routes/{route}/weights", delete_weights)
    app.router.add_get("/admin/routes/{route}/rollout", get_rollout)
    app.router.add_get("/admin/fleet", fleet)
    app.router.add_post("/admin/routes/{route}/rollout/{action}", post_rollout)
    app.router.add_get("/admin/openapi.json", openapi)
    app.router.add_get("/admin/mirrors", mirrors)
    app.router.add_get("/admin/drift", drift)
    app.router.add_get("/admin/feedback", feedback)
    app.router.add_get("/admin/history", history)
    return app
