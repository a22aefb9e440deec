"""The rollout driver: carries out what sidecar.core.rollout decides, for every route with a `rollout`.

What it owns (one per process, a field of shell/services.py `Services`):

- per route with a rollout: its compiled plan, its `RolloutState`, when to tick next, the
  step's data (counter snapshots at the step's start and a bounded list of latencies), the
  weights it would apply in dry run;
- one background loop (`run`, in the server's TaskGroup, cancelled on shutdown) that sleeps
  until the earliest `next_check_at` (at most `POLL_S`, to see a canary's circuit open),
  builds each due route's `StepData`, calls `handle` off the loop (`asyncio.to_thread`: the
  comparisons call scipy) and carries out the actions in order;
- the state file `rollouts.json` in state_dir, rewritten atomically at every change.

Actions carried out:
    SetWeights      applied through the runtime weight overrides (shell/state.py), the same
                    mechanism as `PUT /admin/routes/{route}/weights`: routing follows at once;
                    in dry run only kept to be shown
    ResetStepData   snapshot the counters the proxy already keeps (requests_total and
                    upstream_attempts_total cells of the canary and the baseline) and empty
                    the step's latency lists
    Record          log one JSON line, count `rollout_decisions_total{verdict}`
    Notify          queue the webhook event (shell/notify.py): never waits for it; a promotion or
                    rollback with `registry` also queues the registry's writes (shell/registry.py)
    DiscardedState  log why saved state was not resumed

Per request the proxy calls `record(route, backend, duration)`: one dict lookup and, for the
canary and baseline of a rolled-out route, one list append.

NOTE (approximations): `latency_s` holds request latencies (retries included), not try
latencies; at most `MAX_LATENCIES` per backend and step are kept, the first ones of the
step. Counts are the process's own, unless a fleet pools them (below).

In a fleet (`fleet`, shell/fleet.py, set as `self.fleet`): only the leader ticks, and only
while `fleet.why_not_judge()` is ""; it judges the fleet's pooled data and every change of
state is written to the store (`_commit`, fenced by the lease's epoch) *before* it is carried
out; a refused write is carried out nowhere. Notifications travel with that write and the
leader sends them. Every replica follows the store's state (`follow_shared`): its weights,
and its step (a new step run restarts the local step data). Admin actions read the store's
state first and write with a compare-and-set; a store that cannot be reached raises
`StoreUnavailable` (503).

Concurrency: every change to a route's state happens on the loop under `self._lock`
(ticks, admin actions, reloads), so an admin action never interleaves with a judgement.

Every result is stamped with the canary's model version before it is written to the fleet's
store or carried out (core/rollout.py `attribute`), so decisions and webhook events say which
version was judged.

Imports: stdlib, numpy, orjson, sidecar.config, sidecar.core, sidecar.errors, sidecar.shell (files, metrics,
notify, registry, runtime, state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import orjson

from sidecar.config.plan import RolloutPlan
from sidecar.core.breaker import CircuitState
from sidecar.core.fleet import afresh, step_id
from sidecar.core.gates import BackendData, StepData
from sidecar.core.outcome import Outcome
from sidecar.core.registry import RolloutEnd
from sidecar.core.rollout import (
    Action,
    Admin,
    AdminAction,
    CircuitOpened,
    Conflict,
    DiscardedState,
    Event,
    Notify,
    NotifyEvent,
    Record,
    ResetStepData,
    Result,
    RolloutState,
    SetWeights,
    State,
    Tick,
    attribute,
    boot,
    handle,
    next_check_at,
    would_allow,
)
from sidecar.errors import StoreUnavailable
from sidecar.shell.files import Snapshots
from sidecar.shell.metrics import Metrics
from sidecar.shell.notify import Notifier
from sidecar.shell.registry import Registry
from sidecar.shell.runtime import Runtime
from sidecar.shell.state import Overrides

log = logging.getLogger("sidecar.rollout")

STATE_FILE: Final = "rollouts.json"
FORMAT: Final = 1
POLL_S: Final = 1.0          # the longest sleep: a canary's circuit opening is seen within it
MAX_LATENCIES: Final = 20_000
_FAILED: Final = frozenset(str(o) for o in Outcome if o.failed)
_REGISTRY_ENDS: Final = {NotifyEvent.PROMOTED: RolloutEnd.PROMOTED, NotifyEvent.ROLLED_BACK: RolloutEnd.ROLLED_BACK}


class FleetLink(Protocol):
    """The fleet as the driver sees it (shell/fleet.py `Fleet`); absent without `fleet`."""

    def why_not_judge(self) -> str: ...

    def pooled(self, route: str, step: str, local: StepData) -> StepData: ...

    async def commit(self, route: str, expected_rev: int, state: Mapping[str, Any],
                     notify: list[dict[str, Any]], fenced: bool) -> int | None: ...

    async def refresh(self, route: str) -> None: ...

    def note(self, route: str) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Rollout:
    """One route's rollout (loop-owned)."""

    route: str
    plan: RolloutPlan
    state: RolloutState
    next_check_at: float | None
    since: float = 0.0
    base: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # backend -> counts at step start
    latency: dict[str, list[float]] = field(default_factory=dict)
    would_weights: dict[str, int] | None = None     # dry run: what it would have applied
    circuit_open: bool = False
    # in a fleet: the store's revision of this state, the skew (local key, fleet key) when the
    # fleet's rollout config differs, and notifications waiting for the state's first write
    rev: int = 0
    skew: tuple[str, str] | None = None
    pending: list[Notify] = field(default_factory=list)


class RolloutDriver:
    """See the module docstring."""

    def __init__(self, metrics: Metrics, overrides: Overrides, state_dir: Path | None,
                 notifier: Notifier, clock: Callable[[], float] = time.time, registry: Registry | None = None) -> None:
        self.metrics = metrics
        self.overrides = overrides
        self.state_dir = state_dir
        self.notifier = notifier
        self.registry = registry
        self.clock = clock
        self.by_route: dict[str, _Rollout] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}   # what the proxy appends to
        self._live: Callable[[], Runtime] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._saved: dict[str, Any] = {}
        self._snapshots = Snapshots()
        self.errors = 0
        self.fleet: FleetLink | None = None

    @property
    def path(self) -> Path | None:
        return self.state_dir / STATE_FILE if self.state_dir is not None else None

    # -- hot path -----------------------------------------------------------------------------

    def record(self, route: str, backend: str, duration_s: float) -> None:
        """Every answered request: one lookup; an append for a rolled-out route's canary or baseline."""
        lat = self._latency.get((route, backend))
        if lat is not None and len(lat) < MAX_LATENCIES:
            lat.append(duration_s)

    # -- lifecycle ----------------------------------------------------------------------------

    def load(self) -> None:
        """Read rollouts.json (blocking: through asyncio.to_thread, at start)."""
        path = self.path
        if path is None or not path.exists():
            return
        try:
            doc = orjson.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("rollouts"), dict):
                raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
            self._saved = dict(doc["rollouts"])
        except (OSError, ValueError) as e:
            log.error("rollout: cannot use %s (%s); rollouts start at step 0", path, e)
            self._saved = {}

    async def start(self, live: Callable[[], Runtime]) -> None:
        """At start, after the weight overrides were restored: boot every rollout (resume saved state)."""
        self._live = live
        await asyncio.to_thread(self.load)
        async with self._lock:
            self._follow(live(), initial=True)
        await self.persist()

    def adopt(self, runtime: Runtime) -> None:
        """A reload (sync, from Services.adopt): keep rollouts whose key is the same, start changed
        ones anew, drop those whose route lost its rollout. Their weights are applied again (the
        overrides of changed routes were just cleared)."""
        self._follow(runtime, initial=False)
        self._wake.set()

    def _follow(self, runtime: Runtime, initial: bool) -> None:
        now = self.clock()
        routes = {r.name: r for r in runtime.plan.routes if r.rollout is not None}
        for name in list(self.by_route):
            if name not in routes:
                del self.by_route[name]
                self._snapshots.changed()
                log.info("rollout of route %s dropped: the route or its rollout section is gone", name)
        self._latency = {}
        for name, route in routes.items():
            rp = route.rollout
            assert rp is not None
            old = self.by_route.get(name)
            if old is not None and old.state.key == rp.policy.key:
                old.plan = rp
                self._latency[(name, rp.policy.canary)] = old.latency.setdefault(rp.policy.canary, [])
                self._latency[(name, rp.policy.baseline)] = old.latency.setdefault(rp.policy.baseline, [])
                if not rp.policy.dry_run and old.skew is None:
                    self._set_weights(runtime, old, old.state.weights(rp.policy))
                continue
            saved = self._saved.pop(name, None) if initial else None
            if old is not None:
                log.info("rollout of route %s starts anew: its rollout config changed (key %s -> %s)",
                         name, old.state.key, rp.policy.key)
            res = boot(rp.policy, saved, now)
            ro = _Rollout(name, rp, res.state, res.next_check_at)
            self.by_route[name] = ro
            if self.fleet is not None:   # sent with the state's first write to the store (`claim`)
                ro.pending = [a for a in res.actions if isinstance(a, Notify)]
            self._carry_out(runtime, ro, res)
        for name in self._saved:
            log.warning("saved rollout state of route %s dropped: the route has no rollout now", name)
        self._saved = {}

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick each rollout at its next_check_at; watch the canaries' circuits. Until cancelled."""
        while True:
            try:
                due = [ro.next_check_at for ro in self.by_route.values() if ro.next_check_at is not None]
                delay = POLL_S if not due else max(0.0, min(POLL_S, min(due) - self.clock()))
                self._wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                await self.tick()
                await self.persist()   # a no-op unless something changed (a reload starting a rollout anew)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("rollout: tick failed; carrying on")
                await asyncio.sleep(POLL_S)

    async def tick(self) -> None:
        live = self._live
        if live is None:
            return
        if self.fleet is not None and self.fleet.why_not_judge():
            return   # a follower, or the store is away: the rollout is paused (fleet.note says why)
        for name in list(self.by_route):
            async with self._lock:
                ro = self.by_route.get(name)
                if ro is None:
                    continue
                rt = live()
                event: Event | None = None
                if self._circuit_opened(rt, ro):
                    event = CircuitOpened()
                elif ro.next_check_at is not None and self.clock() >= ro.next_check_at:
                    event = Tick(self._step_data(ro))
                if event is None:
                    continue
                state, policy = ro.state, ro.plan.policy
                res = self._attributed(ro, await asyncio.to_thread(handle, policy, state, event, self.clock()))
                if self.by_route.get(name) is not ro or ro.state is not state:
                    continue   # a reload replaced it meanwhile (adopt is sync, outside the lock)
                if self.fleet is not None and res.state != state:
                    try:
                        if not await self._commit(ro, res.state, res.actions, fenced=True):
                            continue   # refused (deposed): carried out nowhere
                    except StoreUnavailable:
                        continue       # counted and logged by the fleet; judged again once it is back
                self._carry_out(live(), ro, res)
            await self.persist()

    def _circuit_opened(self, rt: Runtime, ro: _Rollout) -> bool:
        backend = rt.backends.get(ro.plan.policy.canary)
        is_open = backend is not None and backend.circuit_state(time.monotonic()) is CircuitState.OPEN
        opened = is_open and not ro.circuit_open
        ro.circuit_open = is_open
        return opened and not ro.state.state.terminal

    # -- admin --------------------------------------------------------------------------------

    async def admin(self, route: str, action: AdminAction, reason: str = "admin") -> Result:
        """Carry out an admin action; KeyError when the route has no rollout (any more: a reload)."""
        async with self._lock:
            ro = self.by_route[route]    # looked up under the lock: a reload may have replaced it
            if self.fleet is not None:
                await self.fleet.refresh(route)   # the fleet's state now; StoreUnavailable: 503
                if ro.skew is not None:
                    return Result(ro.state, (), ro.next_check_at, Conflict(
                        action, ro.state.state, f"this replica's rollout config of route {route!r} differs from "
                        f"the fleet's (key {ro.skew[0]}, fleet {ro.skew[1]}): steer it on an up-to-date replica"))
            res = self._attributed(ro, handle(ro.plan.policy, ro.state, Admin(action, reason), self.clock()))
            if res.error is None and self.fleet is not None \
                    and not await self._commit(ro, res.state, res.actions, fenced=False):
                return Result(ro.state, (), ro.next_check_at, Conflict(
                    action, ro.state.state, "the rollout changed on another replica meanwhile: try again"))
            if res.error is None and self._live is not None:
                self._carry_out(self._live(), ro, res)
        await self.persist()
        return res

    def steers_weights(self, route: str) -> bool:
        ro = self.by_route.get(route)
        return ro is not None and ro.state.state.steers_weights and not ro.plan.policy.dry_run

    # -- actions ------------------------------------------------------------------------------

    def _attributed(self, ro: _Rollout, res: Result) -> Result:
        """`res` with the canary's model version on its decisions and events, once, right after
        `handle` made them (before a fleet write). `boot` makes no decision: nothing to stamp."""
        return res if self.registry is None else attribute(res, self.registry.model_of(ro.plan.policy.canary))

    def _carry_out(self, rt: Runtime, ro: _Rollout, res: Result) -> None:
        ro.state = res.state
        ro.next_check_at = res.next_check_at
        self._snapshots.changed()
        for action in res.actions:
            if isinstance(action, SetWeights):
                if action.applied:
                    self._set_weights(rt, ro, action.weights)
                    ro.would_weights = None
                else:
                    ro.would_weights = dict(action.weights)
            elif isinstance(action, ResetStepData):
                self._reset(ro, action.since)
            elif isinstance(action, Record):
                d = action.decision
                self.metrics.rollout_decisions.labels(ro.route, str(d.verdict)).value += 1
                log.info("%s", orjson.dumps({"rollout": ro.route, **d.to_json()}).decode())
            elif isinstance(action, Notify):
                if self.fleet is None:   # in a fleet it went with the state's write; the leader sends it
                    self.notifier.send(ro.route, ro.plan.notify, action.to_json(ro.route))
                end = _REGISTRY_ENDS.get(action.event)   # written by the replica that decided
                if end is not None and ro.plan.promote_alias is not None and self.registry is not None \
                        and not action.dry_run:
                    self.registry.rollout_event(ro.route, end, ro.plan.policy.canary, ro.plan.promote_alias,
                                                action.reason)
            elif isinstance(action, DiscardedState):
                log.warning("rollout of route %s: %s; starting at step 0", ro.route, action.reason)

    def _set_weights(self, rt: Runtime, ro: _Rollout, weights: Mapping[str, int]) -> None:
        route = rt.plan.routes_by_name.get(ro.route)
        if route is None:
            return
        merged = self.overrides.weights_of(route)
        merged.update({b: float(w) for b, w in weights.items()})
        if sum(merged.values()) <= 0:
            return
        self.overrides.set(rt, route, merged)
        log.info("rollout of route %s sets weights %s", ro.route,
                 ", ".join(f"{b}={w:g}" for b, w in merged.items()))

    def _counts(self, route: str, backend: str) -> tuple[int, int, int]:
        """(requests, tries, failed tries) of (route, backend) since the process started."""
        requests = sum(int(c.value) for (r, b, _code), c in self.metrics.requests.items()
                       if r == route and b == backend)
        tries = failed = 0
        for (r, b, outcome), c in self.metrics.upstream_attempts.items():
            if r == route and b == backend:
                tries += int(c.value)
                if outcome in _FAILED:
                    failed += int(c.value)
        return requests, tries, failed

    def _reset(self, ro: _Rollout, since: float) -> None:
        ro.since = since
        p = ro.plan.policy
        for b in (p.canary, p.baseline):
            ro.base[b] = self._counts(ro.route, b)
            lat = ro.latency.setdefault(b, [])
            lat.clear()
            self._latency[(ro.route, b)] = lat

    def _step_data(self, ro: _Rollout) -> StepData:
        data = self._local_data(ro)
        return data if self.fleet is None else self.fleet.pooled(ro.route, step_id(ro.state), data)

    def local_step_data(self, route: str) -> tuple[str, StepData] | None:
        """This process's own data of the route's current step run, with the run's id (what a
        fleet replica publishes); None without a rollout or while skewed."""
        ro = self.by_route.get(route)
        if ro is None or ro.skew is not None:
            return None
        return step_id(ro.state), self._local_data(ro)

    def _local_data(self, ro: _Rollout) -> StepData:
        p = ro.plan.policy

        def backend_data(b: str) -> BackendData:
            now_counts = self._counts(ro.route, b)
            base = ro.base.get(b, (0, 0, 0))
            req, tries, failed = (max(0, x - y) for x, y in zip(now_counts, base, strict=True))
            return BackendData(requests=req, tries=tries, failed_tries=min(failed, tries),
                               latency_s=np.asarray(ro.latency.get(b, ()), dtype=np.float64))

        return StepData(canary=backend_data(p.canary), baseline=backend_data(p.baseline))

    # -- fleet --------------------------------------------------------------------------------

    async def _commit(self, ro: _Rollout, state: RolloutState, actions: tuple[Action, ...] | list[Notify],
                      fenced: bool) -> bool:
        """Write `state` to the fleet's store over revision `ro.rev` (with the lease's epoch when
        `fenced`), with its notifications. False when refused; StoreUnavailable propagates."""
        assert self.fleet is not None
        notify = [a.to_json(ro.route) for a in actions if isinstance(a, Notify)]
        rev = await self.fleet.commit(ro.route, ro.rev, state.to_dict(), notify, fenced)
        if rev is None:
            return False
        ro.rev = rev
        return True

    def follow_shared(self, route: str, doc: Mapping[str, Any], rev: int, *, force: bool = False) -> None:
        """The store holds `doc` at revision `rev` for the route: make it this replica's state,
        apply its weights, and restart the local step data when the step run changed. Refused
        (and kept as `skew`) when the fleet's rollout config is not this replica's. Skipped
        while a judgement or an admin action is under way (the next round follows), unless `force`."""
        ro = self.by_route.get(route)
        if ro is None or (self._lock.locked() and not force) or (rev == ro.rev and ro.skew is None):
            return
        p = ro.plan.policy
        try:
            st = RolloutState.from_dict(doc)
        except ValueError as e:
            ro.skew = (p.key, f"unreadable: {e}")
            return
        if st.key != p.key:
            if ro.skew is None:
                log.warning("rollout of route %s: the fleet's rollout config (key %s) differs from this replica's "
                            "(key %s); nothing of it is applied here", route, st.key, p.key)
                # nor of this replica's own rollout: the route goes back to its configured split
                if self._live is not None and (plan := self._live().plan.routes_by_name.get(route)) is not None:
                    self.overrides.clear(self._live(), plan)
            ro.skew = (p.key, st.key)
            return
        prev, ro.skew, ro.pending = ro.state, None, []
        ro.state, ro.rev = st, rev
        now = self.clock()
        ro.next_check_at = next_check_at(p, st, now)
        self._snapshots.changed()
        if step_id(prev) != step_id(st):
            self._reset(ro, st.step_started_at)
        if not p.dry_run and self._live is not None:
            rt = self._live()
            plan = rt.plan.routes_by_name.get(route)
            want = st.weights(p)
            if plan is not None and any(self.overrides.weights_of(plan).get(b) != float(w) for b, w in want.items()):
                self._set_weights(rt, ro, want)

    async def claim(self, route: str, doc: Mapping[str, Any] | None, rev: int, fenced: bool) -> None:
        """Write this replica's state of the route over the store's revision `rev`: a refill
        (`doc` None: the store lost the state or never had it; any replica, first one wins) or,
        `fenced`, a leader whose rollout config differs from the fleet's (its own config wins:
        the rollout starts anew, as a reload that changes its key does)."""
        async with self._lock:
            ro = self.by_route.get(route)
            if ro is None or self._live is None:
                return
            if doc is None:
                ro.rev = rev
                if await self._commit(ro, ro.state, ro.pending, fenced=False):
                    log.info("rollout of route %s: written to the fleet's store (it had none)", route)
                ro.pending = []
                return
            res = boot(ro.plan.policy, doc, self.clock())
            ro.rev = rev
            if await self._commit(ro, res.state, res.actions, fenced=True):
                ro.skew = None
                self._carry_out(self._live(), ro, res)

    async def judge_afresh(self) -> None:
        """The store came back: the leader restarts the interval of every step being judged."""
        now = self.clock()
        for name in list(self.by_route):
            async with self._lock:
                ro = self.by_route.get(name)
                if ro is None or ro.skew is not None or self._live is None:
                    continue
                st = afresh(ro.plan.policy, ro.state, now)
                if st is None or not await self._commit(ro, st, (), fenced=True):
                    continue
                log.info("rollout of route %s: the fleet's store is back; step %d is judged afresh from now",
                         name, st.step)
                self._carry_out(self._live(), ro, Result(st, (ResetStepData(st.step, now),),
                                                         next_check_at(ro.plan.policy, st, now)))

    # -- persistence --------------------------------------------------------------------------

    async def persist(self) -> bool:
        """Write rollouts.json if any state changed since the last write (atomic, off the loop),
        and the weight overrides the rollout set (state.json, shell/state.py)."""
        if self.overrides.dirty:
            await self.overrides.save()
        path = self.path
        try:
            await self._snapshots.save(path, self._render)
        except OSError as e:
            self.errors += 1
            log.error("rollout: cannot write %s: %s (the rollout goes on, but will not survive a restart)", path, e)
            return False
        return True

    def _render(self) -> bytes:
        doc = {"format": FORMAT, "rollouts": {n: ro.state.to_dict() for n, ro in sorted(self.by_route.items())}}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    # -- reports ------------------------------------------------------------------------------

    def status_json(self, route: str) -> dict[str, Any] | None:
        ro = self.by_route.get(route)
        if ro is None:
            return None
        p, st = ro.plan.policy, ro.state
        return {
            "route": route,
            "state": str(st.state),
            "step": st.step,
            "steps": list(p.steps),
            "canary": p.canary,
            "baseline": p.baseline,
            "reason": st.reason,
            "dry_run": p.dry_run,
            "weights": st.weights(p),
            "would_weights": ro.would_weights,
            "started_at": st.started_at,
            "step_started_at": st.step_started_at,
            "next_check_at": ro.next_check_at,
            "key": st.key,
            "actions": [str(a) for a in AdminAction if would_allow(st.state, a)],
            "decisions": [d.to_json() for d in st.decisions],
            # the canary's model now, and what the last promotion or rollback wrote to the registry
            "canary_model": self.registry.model_json(p.canary) if self.registry is not None else None,
            "registry": self.registry.rollout_json(route) if self.registry is not None else None,
            **({} if self.fleet is None else {"fleet": self.fleet.note(route)}),
        }

    def summary_json(self, route: str) -> dict[str, Any] | None:
        """The short form in /admin/status: the last decision only."""
        doc = self.status_json(route)
        if doc is None:
            return None
        decisions = doc.pop("decisions")
        doc["last_decision"] = decisions[-1] if decisions else None
        return doc

    def step_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for name, ro in self.by_route.items():
            yield (name,), float(ro.state.step)

    def state_samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for name, ro in self.by_route.items():
            for s in State:
                yield (name, str(s)), 1.0 if ro.state.state is s else 0.0
