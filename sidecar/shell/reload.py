"""Hot reload (docs/operations.md#hot-reload): watch the config file, SIGHUP, `POST /admin/reload`; validate, then swap.

    reload(reason)   read + validate the whole file (worker thread) -> same version? "unchanged"
                     -> compile a Plan -> settings that need a restart changed? reject
                     -> Runtime.build(plan, previous=current) (unchanged backends keep
                        their pools, and with them their connections and state)
                     -> hand it to the server: `host.adopt(runtime)` (one sync step: weight
                        overrides of changed routes dropped, services follow, the swap; a
                        request in flight keeps the Runtime it captured)
                     -> retire the backends nobody uses any more
    run()            the watcher: every `poll_s` compares the file's (realpath, mtime_ns, size,
                     inode), so an edit, a rename over the file and a Kubernetes ConfigMap
                     update (the `..data` symlink swapped to a new timestamped folder) are all
                     seen; also wakes at once for SIGHUP (`request`), and closes retired pools.

Every reload is serialised by one lock, counted in `config_reloads_total{result}` and kept
as `last` for `/admin/status`. A rejected config changes nothing: the running one stays.

Retired backends: a request that captured the old Runtime may still be using a backend the
new one dropped, so a retired backend's pools are closed only once its in-flight count is 0, checked on
each watcher tick (NOTE: so closing lags up to `poll_s`), or after `RETIRE_MAX_S` at the
latest (a stream still running then is cut). A request that captured the old Runtime but
had not reached its try yet still works: a closed pool opens a connection for it and
closes that afterwards.

The reloader validates and builds; it changes nothing of the server's itself. It sees the
server through `ReloadHost`, so it does not import shell/server.py (which owns it).

Imports: stdlib, sidecar.config, sidecar.errors, sidecar.shell (backend, metrics, runtime).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol

from sidecar.config.load import LoadedConfig, load_config
from sidecar.config.plan import Plan
from sidecar.errors import ConfigError
from sidecar.shell.backend import Backend
from sidecar.shell.metrics import Metrics
from sidecar.shell.runtime import Runtime

log = logging.getLogger("sidecar.reload")

DEFAULT_POLL_S: Final = 1.0
POLL_ENV: Final = "SIDECAR_CONFIG_POLL_S"   # e.g. 0.2 to see edits sooner; 0 turns the watcher off
RETIRE_MAX_S: Final = 300.0

FileSignature = tuple[str, int, int, int]   # realpath, mtime_ns, size, inode


class Result(StrEnum):
    OK = "ok"
    UNCHANGED = "unchanged"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    at: float                     # wall clock (time.time()), for people
    reason: str                   # "admin", "SIGHUP", "file changed"
    result: Result
    version: str                  # the version running after this reload
    previous_version: str
    errors: tuple[str, ...] = ()  # why a config was rejected, each naming its place
    warnings: tuple[str, ...] = ()
    cleared_overrides: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"at": self.at, "reason": self.reason, "result": str(self.result), "version": self.version,
                "previous_version": self.previous_version, "errors": list(self.errors),
                "warnings": list(self.warnings), "cleared_overrides": list(self.cleared_overrides)}


def file_signature(path: Path) -> FileSignature | None:
    """What changes when the file (or what its symlinks point to) changes; None when unreadable."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, st.st_mtime_ns, st.st_size, st.st_ino


def _read(path: Path) -> tuple[FileSignature | None, LoadedConfig]:
    return file_signature(path), load_config(path)


def restart_only_changes(old: Plan, new: Plan) -> tuple[list[str], list[str]]:
    """(errors, warnings) for settings a running process cannot change.

    The listeners are bound sockets: a new address is an error (the reload is rejected, so
    the file and the process never silently disagree on where traffic goes). Server
    parser limits, `state_dir` and `fleet` are fixed at start: a change is accepted with a warning.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if new.config.listen != old.config.listen:
        errors.append(f"listen: cannot change from {old.config.listen} to {new.config.listen} "
                      "without a restart")
    if new.config.admin.listen != old.config.admin.listen:
        errors.append(f"admin.listen: cannot change from {old.config.admin.listen} to {new.config.admin.listen} "
                      "without a restart")
    warnings.extend(f"limits.{key}: the new value applies after a restart"
                    for key in ("idle_timeout", "max_header_bytes", "max_headers")
                    if getattr(new.limits, key) != getattr(old.limits, key))
    if new.config.state_dir != old.config.state_dir:
        warnings.append("state_dir: the new folder is used after a restart")
    if new.config.fleet != old.config.fleet:
        warnings.append("fleet: the new block is used after a restart (docs/fleet.md)")
    return errors, warnings


class ReloadHost(Protocol):
    """What the reloader needs of the server that owns it (shell/server.py `Sidecar`)."""

    config_path: Path | None

    @property
    def runtime(self) -> Runtime:
        """The runtime serving now: what a new config is compared with and built from."""
        ...

    def adopt(self, runtime: Runtime) -> list[str]:
        """Serve `runtime` from now on (sync); the routes whose weight overrides it cleared."""
        ...

    async def save_overrides(self) -> None: ...


@dataclass(slots=True)
class _Retired:
    backend: Backend
    deadline: float               # loop time: close even if still busy


class Reloader:
    """Owned by the server (`host`); `run()` lives in its TaskGroup."""

    def __init__(self, host: ReloadHost, metrics: Metrics, *, poll_s: float | None = None) -> None:
        self.host = host
        if poll_s is None:
            poll_s = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
        self.poll_s = poll_s
        self.last: ReloadResult | None = None
        self.count = 0                       # reloads finished, any result
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._kick_reasons: list[str] = []
        self._changed = asyncio.Event()      # set after every result (tests wait on it)
        self._seen: FileSignature | None = None
        self._retired: list[_Retired] = []
        self._counters = {r: metrics.config_reloads.labels(str(r)) for r in Result}

    # -- triggers ----------------------------------------------------------------------------

    def request(self, reason: str) -> None:
        """Ask the watcher to reload soon (sync: usable from a signal handler)."""
        log.info("reload requested (%s)", reason)
        self._kick_reasons.append(reason)
        self._kick.set()

    async def reload(self, reason: str) -> ReloadResult:
        async with self._lock:
            return await self._reload(reason)

    async def _reload(self, reason: str) -> ReloadResult:
        host = self.host
        current = host.runtime
        path = host.config_path
        if path is None:
            return self._record(reason, Result.ERROR, current, errors=(
                "no config file to reload: this sidecar was started from a config held in memory",))
        try:
            signature, loaded = await asyncio.to_thread(_read, path)
        except ConfigError as e:
            return self._record(reason, Result.ERROR, current, errors=tuple(str(i) for i in e.issues))
        self._seen = signature
        if loaded.version == current.plan.version:
            return self._record(reason, Result.UNCHANGED, current)
        try:
            plan = Plan.build(loaded)
        except Exception as e:  # a validated config that does not compile is a bug; keep serving
            log.exception("reload: cannot compile config %s", loaded.version)
            return self._record(reason, Result.ERROR, current, errors=(f"cannot compile the config: {e}",))
        errors, warnings = restart_only_changes(current.plan, plan)
        if errors:
            return self._record(reason, Result.ERROR, current, errors=tuple(errors))
        # from here to the swap nothing awaits: no request or admin call sees half a reload
        new = Runtime.build(plan, previous=current)
        cleared = host.adopt(new)
        deadline = asyncio.get_running_loop().time() + RETIRE_MAX_S
        self._retired.extend(_Retired(b, deadline) for b in current.retired_backends(new))
        result = self._record(reason, Result.OK, new, previous=current, warnings=tuple(warnings),
                              cleared=tuple(cleared))
        if cleared:
            await host.save_overrides()
        return result

    def _record(self, reason: str, result: Result, running: Runtime, *, previous: Runtime | None = None,
                errors: tuple[str, ...] = (), warnings: tuple[str, ...] = (),
                cleared: tuple[str, ...] = ()) -> ReloadResult:
        res = ReloadResult(at=time.time(), reason=reason, result=result, version=running.plan.version,
                           previous_version=(previous or running).plan.version, errors=errors,
                           warnings=warnings, cleared_overrides=cleared)
        self._counters[result].value += 1
        if result is Result.ERROR:
            log.error("config rejected (%s), still running %s: %s", reason, res.version, "; ".join(errors))
        elif result is Result.OK:
            log.info("config reloaded (%s): %s -> %s%s", reason, res.previous_version, res.version,
                     "".join(f"; {w}" for w in warnings))
            if cleared:
                log.info("weight overrides cleared by the reload: %s", ", ".join(cleared))
        else:
            log.info("reload (%s): config unchanged (%s)", reason, res.version)
        self.last = res
        self.count += 1
        self._changed.set()
        return res

    async def wait_count(self, n: int, timeout_s: float = 10.0) -> ReloadResult:
        """Wait until `n` reloads have finished; the last result (for tests and tooling)."""
        async with asyncio.timeout(timeout_s):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()
        assert self.last is not None
        return self.last

    # -- the watcher ---------------------------------------------------------------------------

    async def run(self) -> None:
        path = self.host.config_path
        watch = path is not None and self.poll_s > 0
        if path is not None:
            self._seen = await asyncio.to_thread(file_signature, path)
        tick = self.poll_s if self.poll_s > 0 else DEFAULT_POLL_S
        while True:
            try:
                async with asyncio.timeout(tick):
                    await self._kick.wait()
            except TimeoutError:
                pass
            try:
                if self._kick.is_set():
                    self._kick.clear()
                    reasons, self._kick_reasons = self._kick_reasons, []
                    await self.reload(", ".join(dict.fromkeys(reasons)) or "requested")
                elif watch and path is not None:
                    signature = await asyncio.to_thread(file_signature, path)
                    if signature != self._seen:
                        self._seen = signature
                        await self.reload("file changed")
                await self._close_retired(asyncio.get_running_loop().time())
            except Exception:  # keep watching; the next change gets another try
                log.exception("config watcher failed; retrying in %.1fs", tick)

    async def _close_retired(self, now: float) -> None:
        done = [r for r in self._retired if r.backend.inflight == 0 or now >= r.deadline]
        if not done:
            return
        self._retired = [r for r in self._retired if r not in done]   # before awaiting anything
        for r in done:
            if r.backend.inflight:
                log.warning("closing the retired pool of %s with %d requests still in flight",
                            r.backend.name, r.backend.inflight)
            await r.backend.close()

    @property
    def retired(self) -> list[Backend]:
        return [r.backend for r in self._retired]

    async def close_retired(self) -> None:
        """At shutdown: close every retired pool (the drain already waited for requests)."""
        retired, self._retired = self._retired, []
        for r in retired:
            await r.backend.close()


__all__ = ["ReloadHost", "ReloadResult", "Reloader", "Result", "file_signature", "restart_only_changes"]
