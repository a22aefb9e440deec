"""The model registry (docs/registry.md): backends' aliases resolved, answers attributed, rollouts' ends written.

Two parts:

- `RegistryClient`, the small interface a registry implements (one HTTP call per method, no
  retries, every failure a `RegistryCallError` with a `CallOutcome`), and `MlflowRegistry`,
  MLflow's REST API over aiohttp (no MLflow library in the sidecar). Another registry is
  one more class and one more key beside `registry.mlflow`.
- `Registry`, one per process (a field of shell/services.py `Services`), which owns:
    * the resolved versions of the aliases the backends name, `(model, alias) -> version`,
      resolved before the sidecar is ready (bounded by `registry.mlflow.timeout`), then
      every `refresh` (every `UNRESOLVED_RETRY_S` while one is unresolved) by `run`;
    * `models`, backend -> `ModelRef`, swapped whole when anything changes, and pushed to
      whoever attributes records off the loop (`on_change`: the access log, the sample
      log, feedback): the proxy's hot path reads nothing of it;
    * a bounded queue of the writes rollouts ask for (`rollout_event`) and one writer that
      makes them in order, `WRITE_TRIES` tries each with backoff; what each came to is kept
      per route and shown in the rollout's state (`rollout_json`).

Every call is counted in `sidecar_registry_calls_total{operation,outcome}`, each rollout
write in `sidecar_registry_writes_total{route,outcome}`; repeated failures are logged at most
once a minute per (operation, model). Failures never refuse a config, never delay readiness
past `timeout`, never hold up a rollout: an unresolved alias shows `version: null`.

Errors: aiohttp's exceptions become a `CallOutcome` in `MlflowRegistry._call` and nowhere
else in this module (as shell/upstream.py does for the data path).

NOTE (approximations): the access and sample logs attribute a record when it is written (at
most a flush, 0.2 s, after the answer), so an alias that moved in between is attributed to
its new version. Writes still queued when the process stops are lost (a promotion's alias
then stays where it was): they are not part of the rollout's saved state.

Imports: stdlib, aiohttp, orjson, sidecar.config.plan, sidecar.core (registry, throttle), sidecar.shell.metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import aiohttp
import orjson

from sidecar.config.plan import Plan, RegistryPlan
from sidecar.core.registry import (
    WRITE_TRIES,
    CallOutcome,
    ModelRef,
    Operation,
    RolloutEnd,
    Write,
    backoff_s,
    classify_status,
    rollout_writes,
)
from sidecar.core.throttle import Throttle
from sidecar.shell.metrics import Metrics

log = logging.getLogger("sidecar.registry")

UNRESOLVED_RETRY_S: Final = 10.0   # while an alias is unresolved, it is tried this often instead of `refresh`
MAX_WRITE_QUEUE: Final = 100       # rollout events waiting for the writer; past it, dropped and counted
MAX_ANSWER_BYTES: Final = 1 << 20  # a registry answer larger than this is an error, not read
LOG_EVERY_S: Final = 60.0
MAX_VERSION_CHARS: Final = 64       # as a configured `model.version`
UNRESOLVED: Final = "unresolved"   # backend_info's version label while an alias is unresolved


class RegistryCallError(Exception):
    """One call failed; `outcome` says how (and whether another try may help)."""

    def __init__(self, outcome: CallOutcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class RegistryClient(Protocol):
    """A model registry: one call per method, no retries; a failure raises RegistryCallError."""

    async def resolve_alias(self, name: str, alias: str) -> str:
        """The version that `alias` of model `name` points at."""
        ...

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `alias` of model `name` at `version` (created or moved)."""
        ...

    async def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        """Set tag `key` to `value` on version `version` of model `name`."""
        ...


class MlflowRegistry:
    """MLflow's model registry over its REST API (`/api/2.0/mlflow/...`), with a bearer token
    when one is set (as MLFLOW_TRACKING_TOKEN is sent by MLflow's own client)."""

    def __init__(self, session: aiohttp.ClientSession, plan: RegistryPlan) -> None:
        self._session = session
        self._base = f"{plan.url}/api/2.0/mlflow"
        self._headers = {"accept": "application/json"}
        if plan.token:
            self._headers["authorization"] = f"Bearer {plan.token}"
        self._timeout = aiohttp.ClientTimeout(total=plan.timeout_s)

    async def resolve_alias(self, name: str, alias: str) -> str:
        doc = await self._call("GET", "registered-models/alias", params={"name": name, "alias": alias})
        version = doc.get("model_version", {}).get("version") if isinstance(doc.get("model_version"), dict) else None
        text = str(version) if isinstance(version, str | int) and not isinstance(version, bool) else ""
        # a label value of backend_info: short and printable, whatever the registry sends
        if not text or len(text) > MAX_VERSION_CHARS or not text.isprintable():
            raise RegistryCallError(CallOutcome.ERROR, f"answer without a usable model_version.version: "
                                                       f"{str(doc)[:200]}")
        return text

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        await self._call("POST", "registered-models/alias", json={"name": name, "alias": alias, "version": version})

    async def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        await self._call("POST", "model-versions/set-tag",
                         json={"name": name, "version": version, "key": key, "value": value})

    async def _call(self, method: str, path: str, params: Mapping[str, str] | None = None,
                    json: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            async with self._session.request(method, f"{self._base}/{path}", params=params, json=json,
                                             headers=self._headers, timeout=self._timeout,
                                             allow_redirects=False) as resp:
                body = b""
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise RegistryCallError(CallOutcome.ERROR, f"answer larger than {MAX_ANSWER_BYTES} bytes")
                status = resp.status
        except TimeoutError:
            raise RegistryCallError(CallOutcome.TIMEOUT, f"no answer within {self._timeout.total}s") from None
        except aiohttp.ClientResponseError as e:
            raise RegistryCallError(CallOutcome.ERROR, f"bad answer: {e.message}") from None
        except aiohttp.ClientError as e:
            raise RegistryCallError(CallOutcome.UNREACHABLE, f"{type(e).__name__}: {e}") from None
        try:
            doc = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise RegistryCallError(CallOutcome.ERROR if status < 300 else classify_status(status),
                                    f"status {status}, not a JSON object: {body[:200]!r}")
        outcome = classify_status(status)
        if outcome is not CallOutcome.OK:
            code = doc.get("error_code")
            if code == "RESOURCE_DOES_NOT_EXIST":
                outcome = CallOutcome.NOT_FOUND
            raise RegistryCallError(outcome, f"status {status} {code or ''}: {str(doc.get('message', ''))[:300]}")
        return doc


@dataclass(slots=True)
class _WriteState:
    """One write of a rollout event, as shown in the rollout's state."""

    write: Write
    outcome: str = "pending"       # pending | written | failed
    tries: int = 0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.write.to_json(), "outcome": self.outcome, "tries": self.tries, "error": self.error}


@dataclass(slots=True)
class _RolloutWrites:
    """The registry's side of a route's last promotion or rollback."""

    event: RolloutEnd
    alias: str
    model: ModelRef | None
    time: float
    writes: list[_WriteState] = field(default_factory=list)
    error: str | None = None       # why nothing (or not everything) could be written

    def to_json(self) -> dict[str, Any]:
        return {"event": str(self.event), "alias": self.alias, "time": self.time,
                "model": None if self.model is None else self.model.to_json(),
                "writes": [w.to_json() for w in self.writes], "error": self.error}


class Registry:
    """See the module docstring. Built by shell/services.py; `run()` lives in the server's TaskGroup."""

    def __init__(self, metrics: Metrics, plan: Plan, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.on_change: Callable[[Mapping[str, ModelRef]], None] = lambda models: None
        self.models: Mapping[str, ModelRef] = {}        # backend -> what it serves, versions resolved
        self._plan: RegistryPlan | None = None
        self._configured: dict[str, ModelRef] = {}     # backend -> its `model` as configured
        self._resolved: dict[tuple[str, str], str | None] = {}   # (model, alias) -> version; None: unresolved
        self._errors: dict[tuple[str, str], str] = {}   # (model, alias) -> why it is unresolved (or stale)
        self._session: aiohttp.ClientSession | None = None
        self._client: RegistryClient | None = None
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[tuple[str, _RolloutWrites]] = asyncio.Queue(MAX_WRITE_QUEUE)
        self._by_route: dict[str, _RolloutWrites] = {}
        self._throttle = Throttle(LOG_EVERY_S)
        self.refreshed_at: float | None = None
        self.apply(plan)

    # -- config -------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        """Follow a (new) config, sync: keep the versions of aliases still named, forget the others."""
        if plan.registry != self._plan:
            self._plan = plan.registry
            self._client = None     # made again by `_client_now` with the new address or token
        self._configured = {name: b.model for name, b in plan.backends.items() if b.model is not None}
        wanted = {(m.name, m.alias) for m in self._configured.values() if m.alias is not None}
        self._resolved = {k: self._resolved.get(k) for k in wanted}
        self._errors = {k: v for k, v in self._errors.items() if k in wanted}
        self._publish()
        if any(v is None for v in self._resolved.values()):
            self._wake.set()

    def _publish(self) -> None:
        models: dict[str, ModelRef] = {}
        for backend, m in self._configured.items():
            version = m.version if m.alias is None else self._resolved.get((m.name, m.alias))
            models[backend] = ModelRef(m.name, version, m.alias)
        if models != self.models:
            for backend, m in models.items():
                old = self.models.get(backend)
                if old is not None and old.version != m.version and old.alias == m.alias and m.alias is not None:
                    log.info("registry: backend %s serves %s version %s (alias %s moved from version %s)",
                             backend, m.name, m.version, m.alias, old.version)
            self.models = models
            self.on_change(models)

    def model_of(self, backend: str) -> ModelRef | None:
        return self.models.get(backend)

    def _client_now(self) -> RegistryClient | None:
        if self._client is None and self._plan is not None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self._client = MlflowRegistry(self._session, self._plan)
        return self._client

    # -- calls --------------------------------------------------------------------------------

    async def _call(self, operation: Operation, what: str, call: Callable[[RegistryClient], Any]) -> Any:
        """One try of one call, counted; RegistryCallError on failure (logged at most once a minute per `what`)."""
        client = self._client_now()
        if client is None:
            raise RegistryCallError(CallOutcome.REFUSED, "no registry configured")
        try:
            result = await call(client)
        except RegistryCallError as e:
            self.metrics.registry_calls.labels(str(operation), str(e.outcome)).value += 1
            if self._throttle.try_pass(time.monotonic(), (operation, what)):
                log.warning("registry: %s %s: %s (%s)", operation, what, e, e.outcome)
            raise
        self.metrics.registry_calls.labels(str(operation), str(CallOutcome.OK)).value += 1
        return result

    async def _resolve(self, key: tuple[str, str]) -> None:
        name, alias = key
        try:
            version: str = await self._call(Operation.RESOLVE_ALIAS, f"{name}@{alias}",
                                            lambda c: c.resolve_alias(name, alias))
        except RegistryCallError as e:
            if key in self._resolved:   # a reload may have dropped it meanwhile
                # the registry says there is no such alias: unresolved; no answer: the last version stays
                if e.outcome in (CallOutcome.NOT_FOUND, CallOutcome.REFUSED):
                    self._resolved[key] = None
                self._errors[key] = f"{e.outcome}: {e}"
            return
        if key in self._resolved:
            self._resolved[key] = version
            self._errors.pop(key, None)

    async def refresh(self) -> None:
        """Resolve every alias once (concurrently), then publish what changed."""
        keys = list(self._resolved)
        if keys:
            async with asyncio.TaskGroup() as tg:
                for key in keys:
                    tg.create_task(self._resolve(key))
            self.refreshed_at = self.clock()
        self._publish()

    async def start(self) -> None:
        """Before the sidecar is ready: resolve the aliases, waiting at most `timeout` (one try each)."""
        if self._plan is None or not self._resolved:
            return
        try:
            async with asyncio.timeout(self._plan.timeout_s):
                await self.refresh()
        except TimeoutError:
            pass
        except Exception:   # never keeps the sidecar from starting
            log.exception("registry: resolving the aliases at start failed; tried again every %gs",
                          UNRESOLVED_RETRY_S)
        for key, version in self._resolved.items():
            if version is None:
                log.warning("registry: alias %s of model %s unresolved at start (%s); tried again every %gs",
                            key[1], key[0], self._errors.get(key, "no answer in time"), UNRESOLVED_RETRY_S)
        self._publish()

    # -- background ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh the aliases and make the rollouts' writes, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._refresh_loop(), name="registry-refresh")
                tg.create_task(self._write_loop(), name="registry-writes")
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the HTTP session (the server calls it too: `start` opens it before `run` may ever run)."""
        if self._session is not None:
            session, self._session, self._client = self._session, None, None
            await session.close()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                plan = self._plan
                if plan is None or not self._resolved:
                    delay = None
                elif any(v is None for v in self._resolved.values()):
                    delay = min(plan.refresh_s, UNRESOLVED_RETRY_S)
                else:
                    delay = plan.refresh_s
                self._wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry: refresh failed; carrying on")
                await asyncio.sleep(UNRESOLVED_RETRY_S)

    # -- rollouts -----------------------------------------------------------------------------

    def rollout_event(self, route: str, end: RolloutEnd, canary: str, alias: str, reason: str) -> None:
        """A rollout of `route` was promoted or rolled back: queue its writes; never waits."""
        model = self.model_of(canary)
        job = _RolloutWrites(end, alias, model, self.clock())
        self._by_route[route] = job
        writes = rollout_writes(end, model, alias, reason) if model is not None else ()
        if not writes:
            job.error = (f"the canary {canary!r} has no model version to write to: "
                         + ("no `model` configured" if model is None else
                            f"alias {model.alias} of {model.name} is unresolved"))
            self.metrics.registry_writes.labels(route, "skipped").value += 1
            log.error("registry: %s of route %s not written: %s", end, route, job.error)
            return
        job.writes = [_WriteState(w) for w in writes]
        try:
            self._queue.put_nowait((route, job))
        except asyncio.QueueFull:
            job.error = "the registry writer's queue is full: dropped"
            for w in job.writes:
                w.outcome = "failed"
            self.metrics.registry_writes.labels(route, "dropped").value += len(job.writes)
            log.error("registry: %s of route %s dropped: %d events wait for the registry", end, route,
                      MAX_WRITE_QUEUE)

    async def _write_loop(self) -> None:
        while True:
            route, job = await self._queue.get()
            try:
                await self._write(route, job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry: writing %s of route %s failed; carrying on", job.event, route)

    async def _write(self, route: str, job: _RolloutWrites) -> None:
        """Each write in order, WRITE_TRIES tries while its failure is transient. A write that the
        registry refuses (a 4xx) does not stop the next; one it never answered does: the rest
        are not tried (the registry is down), and show it."""
        for i, ws in enumerate(job.writes):
            w = ws.write
            while True:
                ws.tries += 1
                try:
                    await self._call(w.operation, f"{w.name}/{w.version}", partial(_make, w=w))
                except RegistryCallError as e:
                    ws.error = f"{e.outcome}: {e}"
                    if e.outcome.retryable and ws.tries < WRITE_TRIES:
                        await asyncio.sleep(backoff_s(ws.tries))
                        continue
                    ws.outcome = "failed"
                    job.error = f"{w.describe()} not written after {ws.tries} tries: {ws.error}"
                    self.metrics.registry_writes.labels(route, "failed").value += 1
                    log.error("registry: route %s: %s", route, job.error)
                    if e.outcome.retryable:
                        for rest in job.writes[i + 1:]:
                            rest.outcome, rest.error = "failed", "not tried: the registry did not answer"
                            self.metrics.registry_writes.labels(route, "failed").value += 1
                        return
                    break
                ws.outcome, ws.error = "written", None
                self.metrics.registry_writes.labels(route, "written").value += 1
                log.info("registry: route %s %s: %s", route, job.event, w.describe())
                if w.operation is Operation.SET_ALIAS and (w.name, w.key) in self._resolved:
                    self._resolved[(w.name, w.key)] = w.version   # the backends naming it follow at once
                    self._errors.pop((w.name, w.key), None)
                    self._publish()
                break

    # -- reports ------------------------------------------------------------------------------

    def rollout_json(self, route: str) -> dict[str, Any] | None:
        """The registry's side of the route's last promotion or rollback; None before one."""
        job = self._by_route.get(route)
        return None if job is None else job.to_json()

    def model_json(self, backend: str) -> dict[str, Any] | None:
        """`model` of a backend in /admin/status: {name, version, alias}; null when none is configured."""
        m = self.models.get(backend)
        return None if m is None else m.to_json()

    def status_json(self) -> dict[str, Any]:
        """The `registry` section of /admin/status (absent without a registry): the aliases and why any is
        unresolved."""
        plan = self._plan
        if plan is None:
            return {}
        return {"registry": {"kind": plan.kind, "refreshed_at": self.refreshed_at,
                             "aliases": [{"model": n, "alias": a, "version": v, "error": self._errors.get((n, a))}
                                         for (n, a), v in sorted(self._resolved.items())]}}

    def info_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """backend_info{backend,model,version,alias}: 1 for every backend with a `model`."""
        for backend, m in self.models.items():
            yield (backend, m.name, m.version if m.version is not None else UNRESOLVED, m.alias or ""), 1.0


async def _make(client: RegistryClient, w: Write) -> None:
    if w.operation is Operation.SET_ALIAS:
        await client.set_alias(w.name, w.key, w.version)
    else:
        await client.set_version_tag(w.name, w.version, w.key, w.value)
