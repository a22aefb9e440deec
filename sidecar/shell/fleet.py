"""The fleet through Redis: membership, the leader's lease with epochs, shared rollout state and
weights, pooled gate data, notifications (docs/fleet.md, SPEC 10).

One `Fleet` per process, built by shell/services.py only when the config has `fleet`; the
`redis` package is imported in `run`/`join`, so a sidecar without `fleet` never loads it.
Decisions come from sidecar.core.fleet; this module reads and writes the store and carries
them out.

The store, under `sidecar:fleet:{NAME}:` (the braces make it one Redis Cluster hash slot):

    lease     "replica|epoch", with a time to live of lease - sync_every (LEASE_LUA)
    epoch     the last epoch handed out (INCR; refilled from the replicas' highest seen)
    members   hash replica -> {"last_sync": unix s, "keys": {route: rollout key}}
    state     hash: rollout:ROUTE -> the rollout's state (core/rollout.py to_dict), rev:ROUTE
              -> its revision (COMMIT_LUA compares it), weights:ROUTE -> the runtime override
              {"fingerprint", "weights"} ("null": cleared)
    data      hash ROUTE|replica -> that replica's step data (core/fleet.py `Part`)
    notify    list of webhook events written with the state that made them; the leader sends them

One owned task (`run`, in the server's TaskGroup) does one round every `sync_every`: a single
pipeline of 5 commands (the leader adds 2), whatever the traffic and the number of routes
(the hashes carry every route in one command). Then, in order: the lease reply into the
View; membership (the leader prunes members gone for 3 x sync_every); the weights; each
rollout (follow the store, refill what it lost, a leader's config wins); the leader sends
the queued notifications and, after an outage, judges afresh. Admin changes and rollout
writes go straight to the store (`commit`, `put_weights`, `refresh`) with the same timeout.

Every store call is bounded by `sync_every` (asyncio.timeout over the client's own socket
timeouts, no client-side retries); a failure turns the View DOWN (core/fleet.py), is counted
(`fleet_sync_errors_total`) and logged at most every 10 s. Nothing here is on the request path.

Imports: stdlib, numpy, orjson, redis (lazily), sidecar.config, sidecar.core, sidecar.errors,
sidecar.shell (metrics, notify, rollout_driver, runtime, state).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import numpy as np
import orjson

from sidecar.config.model import FleetConfig
from sidecar.core.fleet import (
    BecameLeader,
    FleetPolicy,
    LeaseOutcome,
    LeaseReply,
    LostLead,
    Part,
    StoreBack,
    StoreDown,
    StoreHealth,
    View,
    alive,
    bounded,
    failed,
    may_judge,
    pool,
    skew,
    synced,
    take_afresh,
)
from sidecar.core.gates import BackendData, StepData
from sidecar.core.throttle import Throttle
from sidecar.errors import StoreUnavailable
from sidecar.shell.metrics import Metrics
from sidecar.shell.notify import Notifier
from sidecar.shell.rollout_driver import RolloutDriver
from sidecar.shell.runtime import Runtime
from sidecar.shell.state import InvalidWeights, Overrides, merge_weights

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("sidecar.fleet")

LOG_EVERY_S: Final = 10.0
NOTIFY_BATCH: Final = 100     # events the leader takes from the queue per round
NOTIFY_KEEP: Final = 1000     # the queue's bound in the store (older events are trimmed)

# KEYS: lease, epoch; ARGV: me, my epoch, ttl ms, highest epoch seen. Replica ids have no '|'.
LEASE_LUA: Final = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  local holder, ep = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
  if holder == ARGV[1] and ep == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {'renewed', holder, ep}
  end
  return {'held', holder, ep}
end
local ep = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4]) + 1
if ep < floor then
  ep = floor
  redis.call('SET', KEYS[2], ep)
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ep, 'PX', ARGV[3])
return {'acquired', ARGV[1], tostring(ep)}
"""

# KEYS: state, lease, notify; ARGV: route, expected rev, state JSON, fence ('' = none), events...
# -1: the fence does not match the lease (a deposed leader); -2: another write came first.
COMMIT_LUA: Final = f"""
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return -1 end
local revf = 'rev:' .. ARGV[1]
local rev = tonumber(redis.call('HGET', KEYS[1], revf) or '0')
if rev ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[1], 'rollout:' .. ARGV[1], ARGV[3], revf, rev + 1)
for i = 5, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
if #ARGV >= 5 then redis.call('LTRIM', KEYS[3], -{NOTIFY_KEEP}, -1) end
return rev + 1
"""

# KEYS: lease, notify; ARGV: fence, count. Only the lease's holder takes events.
POP_LUA: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {} end
local items = redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
if #items > 0 then redis.call('LTRIM', KEYS[2], #items, -1) end
return items
"""


async def _pipeline(c: Redis, cmds: list[tuple[Any, ...]]) -> list[Any]:
    """Commands in one round trip (not a transaction: each answers on its own)."""
    pipe = c.pipeline(transaction=False)
    for cmd in cmds:
        _ = pipe.execute_command(*cmd)   # queued; the answers come from execute()
    return list(await pipe.execute())


def replica_id() -> str:
    """`SIDECAR_REPLICA_ID`, else hostname-pid (SPEC 10)."""
    return os.environ.get("SIDECAR_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}"


class Fleet:
    """See the module docstring. Loop-owned: every method runs on the event loop."""

    def __init__(self, cfg: FleetConfig, metrics: Metrics, rollouts: RolloutDriver, overrides: Overrides,
                 notifier: Notifier) -> None:
        self.cfg = cfg
        self.policy = FleetPolicy(name=cfg.name, replica=replica_id(), lease_s=cfg.lease, sync_every_s=cfg.sync_every)
        self.metrics = metrics
        self.rollouts = rollouts
        self.overrides = overrides
        self.notifier = notifier
        self.timeout_s = cfg.sync_every
        self.view = View()
        prefix = f"sidecar:fleet:{{{cfg.name}}}:"
        self.k_lease, self.k_epoch, self.k_members = prefix + "lease", prefix + "epoch", prefix + "members"
        self.k_state, self.k_data, self.k_notify = prefix + "state", prefix + "data", prefix + "notify"
        self.members: dict[str, dict[str, Any]] = {}      # as last read, alive ones only
        self.parts: dict[str, list[Part]] = {}            # route -> other replicas' data (leader)
        self.fleet_keys: dict[str, str] = {}              # route -> the store's rollout key
        self.weights_applied: dict[str, str] = {}         # route -> the store's value last applied here
        self.last_sync: float | None = None               # unix s of the last good round
        self._client: Redis | None = None
        self._live: Callable[[], Runtime] | None = None
        self._rng = np.random.default_rng()
        self._throttle = Throttle(LOG_EVERY_S)
        rollouts.fleet = self

    # -- lifecycle ----------------------------------------------------------------------------

    def _connect(self) -> Redis:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        t = self.timeout_s
        no_retry = Retry(NoBackoff(), 0)   # a failed call is a fault to see, not to hide for a while
        pool = BlockingConnectionPool.from_url(
            self.cfg.redis, max_connections=4, timeout=t, socket_timeout=t, socket_connect_timeout=t,
            retry=no_retry, decode_responses=True, client_name=f"sidecar-{self.cfg.name}")
        return Redis(connection_pool=pool, retry=no_retry)

    async def join(self, live: Callable[[], Runtime]) -> None:
        """At start, after the rollouts booted: one round, so that a replica serves the fleet's
        weights from its first request when the store is there (and serves on when it is not)."""
        self._live = live
        self._client = self._connect()
        log.info("fleet %s: replica %s, store %s, lease %gs, sync every %gs", self.cfg.name, self.policy.replica,
                 self._masked_url(), self.cfg.lease, self.cfg.sync_every)
        await self.sync_once()

    async def run(self) -> None:
        """A round every sync_every until cancelled; the client is closed on the way out."""
        try:
            while True:
                t0 = time.monotonic()
                try:
                    await self.sync_once()
                except asyncio.CancelledError:
                    raise
                except Exception:   # a bug, not a store fault (those are handled in sync_once)
                    self.metrics.fleet_sync_errors.labels().value += 1
                    log.exception("fleet: sync round failed; carrying on")
                await asyncio.sleep(max(0.0, self.cfg.sync_every - (time.monotonic() - t0)))
        finally:
            if self._client is not None:
                client, self._client = self._client, None
                async with asyncio.timeout(self.timeout_s):
                    await client.aclose(close_connection_pool=True)

    def _masked_url(self) -> str:
        """The store's URL without its credentials (for logs and /admin/fleet)."""
        u = urlsplit(self.cfg.redis)
        where = u.path if u.scheme == "unix" else f"{u.hostname}:{u.port or 6379}{u.path}"
        return f"{u.scheme}://{where}"

    # -- what the rollout driver asks ---------------------------------------------------------

    def why_not_judge(self) -> str:
        return may_judge(self.view, time.monotonic())

    def pooled(self, route: str, step: str, local: StepData) -> StepData:
        return pool(step, self._bounded(local), self.parts.get(route, []))

    def _bounded(self, d: StepData) -> StepData:
        def b(x: BackendData) -> BackendData:
            return BackendData(x.requests, x.tries, x.failed_tries, bounded(x.latency_s, self._rng))
        return StepData(canary=b(d.canary), baseline=b(d.baseline))

    async def commit(self, route: str, expected_rev: int, state: Mapping[str, Any], notify: list[dict[str, Any]],
                     fenced: bool) -> int | None:
        """COMMIT_LUA; the new revision, or None when refused (counted by reason)."""
        fence = self.view.fence if fenced else ""
        if fenced and not self.view.leading:
            self.metrics.fleet_writes_refused.labels("not_leader").value += 1
            return None
        args: list[str | bytes | int] = [route, expected_rev, orjson.dumps(state), fence,
                *(orjson.dumps({"route": route, "body": n}) for n in notify)]
        got = int(await self._call(lambda c: c.eval(COMMIT_LUA, 3, self.k_state, self.k_lease, self.k_notify, *args)))
        if got > 0:
            return got
        reason = "epoch" if got == -1 else "conflict"
        self.metrics.fleet_writes_refused.labels(reason).value += 1
        log.warning("fleet: write of route %s's rollout refused (%s)", route,
                    f"the lease is no longer {fence}: deposed" if got == -1 else "another replica wrote it first")
        return None

    async def refresh(self, route: str) -> None:
        """The store's state of one route, followed now (an admin action starts from it)."""
        doc, rev = await self._call(lambda c: c.hmget(self.k_state, f"rollout:{route}", f"rev:{route}"))
        if doc is not None:
            self.rollouts.follow_shared(route, orjson.loads(doc), int(rev or 0), force=True)

    def note(self, route: str) -> dict[str, Any]:
        """The rollout's fleet part of /admin/routes/{route}/rollout."""
        ro = self.rollouts.by_route.get(route)
        why = self.why_not_judge()
        paused = why if self.view.store is not StoreHealth.HEALTHY else None
        return {"leader": self.view.holder or None, "judged_here": not why, "paused": paused,
                "skew": None if ro is None or ro.skew is None else {"key": ro.skew[0], "fleet_key": ro.skew[1]}}

    # -- what the admin API asks --------------------------------------------------------------

    async def put_weights(self, runtime: Runtime, route: str, weights: Mapping[str, float] | None) -> None:
        """A runtime override (None: cleared) for every replica; applied here at once, elsewhere
        within sync_every. StoreUnavailable when the store cannot take it (nothing changes)."""
        plan = runtime.plan.routes_by_name[route]
        value = orjson.dumps(None if weights is None else {"fingerprint": plan.fingerprint,
                                                           "weights": dict(weights)}).decode()
        await self._call(lambda c: c.hset(self.k_state, f"weights:{route}", value))
        self.weights_applied[route] = value

    # -- one round ------------------------------------------------------------------------------

    async def _call(self, fn: Callable[[Redis], Any]) -> Any:
        """One store call (or pipeline) within the timeout; a fault becomes StoreUnavailable."""
        from redis.exceptions import RedisError

        client = self._client
        if client is None:
            raise StoreUnavailable("the fleet's store is not connected yet")
        task = asyncio.current_task()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn(client)
        except (RedisError, OSError, TimeoutError) as e:
            if task is not None and task.cancelling():
                # the client turned our cancellation into an error of its own (a connection cut
                # mid-reply): cancelled it stays, or the task that owns this call never stops
                raise asyncio.CancelledError from e
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self._fault(why)
            raise StoreUnavailable(f"the fleet's store cannot be reached: {why}") from None
        if task is not None and task.cancelling():
            raise asyncio.CancelledError   # cancelled as the answer came: the answer is dropped
        return result

    def _fault(self, why: str) -> None:
        self.metrics.fleet_sync_errors.labels().value += 1
        self.view, signals = failed(self.policy, self.view, why, time.monotonic())
        self._signals(signals)
        if self._throttle.try_pass(time.monotonic(), "fault"):
            log.error("fleet %s: store %s: %s; serving on with the weights applied, rollouts paused, "
                      "admin changes refused", self.cfg.name, self._masked_url(), why)

    def _signals(self, signals: tuple[Any, ...]) -> None:
        for s in signals:
            if isinstance(s, BecameLeader):
                log.info("fleet %s: %s leads now (epoch %d)", self.cfg.name, self.policy.replica, s.epoch)
            elif isinstance(s, LostLead):
                log.warning("fleet %s: %s no longer leads: %s", self.cfg.name, self.policy.replica, s.reason)
            elif isinstance(s, StoreDown):
                pass   # `_fault` logs it (at most every LOG_EVERY_S)
            elif isinstance(s, StoreBack):
                log.warning("fleet %s: store back after %.1fs", self.cfg.name, s.down_s)

    async def sync_once(self) -> None:
        """One round (module docstring). Store faults are counted and turn the View DOWN."""
        if self._client is None or self._live is None:
            return
        p, me, was_leading = self.policy, self.policy.replica, self.view.leading
        keys = {name: ro.plan.policy.key for name, ro in self.rollouts.by_route.items()}
        data = {f"{name}|{me}": orjson.dumps(part.to_json()) for name in keys
                if (part := self._part(name)) is not None}
        member = orjson.dumps({"last_sync": time.time(), "keys": keys})

        cmds: list[tuple[Any, ...]] = [
            ("EVAL", LEASE_LUA, 2, self.k_lease, self.k_epoch, me, self.view.epoch if was_leading else 0,
             int(p.ttl_s * 1000), self.view.max_epoch),
            ("HSET", self.k_members, me, member)]
        if data:
            cmds.append(("HSET", self.k_data, *(x for kv in data.items() for x in kv)))
        cmds += [("HGETALL", self.k_state), ("HGETALL", self.k_members)]
        if was_leading:
            cmds += [("HGETALL", self.k_data),
                     ("EVAL", POP_LUA, 2, self.k_lease, self.k_notify, self.view.fence, NOTIFY_BATCH)]
        sent = time.monotonic()
        try:
            replies = await self._call(lambda c: _pipeline(c, cmds))
        except StoreUnavailable:
            return
        lease = replies.pop(0)
        replies = replies[2:] if data else replies[1:]
        state, members = replies[0], replies[1]
        reply = LeaseReply(LeaseOutcome(lease[0]), lease[1], int(lease[2]))
        if was_leading and reply.outcome is LeaseOutcome.HELD:
            # a renewal under an epoch that is no longer the lease's: the store refused a deposed leader
            self.metrics.fleet_writes_refused.labels("lease").value += 1
        self.view, signals = synced(p, self.view, reply, sent, time.monotonic())
        self._signals(signals)
        self.last_sync = time.time()
        try:
            await self._members(members)
            await self._refill_weights(self._weights(state))
            await self._rollouts(state)
            if was_leading:
                self._take_parts(replies[2])
                self._send(replies[3])
            self.view, again = take_afresh(self.view, time.monotonic())
            if again:
                await self.rollouts.judge_afresh()
        except StoreUnavailable:
            return

    def _part(self, route: str) -> Part | None:
        got = self.rollouts.local_step_data(route)
        if got is None:
            return None
        step, d = got
        return Part(step, (d.canary.requests, d.canary.tries, d.canary.failed_tries),
                    (d.baseline.requests, d.baseline.tries, d.baseline.failed_tries),
                    bounded(d.canary.latency_s, self._rng), bounded(d.baseline.latency_s, self._rng))

    async def _members(self, raw: Mapping[str, str]) -> None:
        records: dict[str, dict[str, Any]] = {}
        for replica, doc in raw.items():
            try:
                rec = orjson.loads(doc)
                records[replica] = {"last_sync": float(rec["last_sync"]), "keys": dict(rec.get("keys") or {})}
            except (ValueError, KeyError, TypeError):
                continue
        live, gone = alive({r: m["last_sync"] for r, m in records.items()}, time.time(), self.policy)
        self.members = {r: records[r] for r in live}
        if gone and self.view.leading:
            fields = [f"{route}|{r}" for r in gone for route in self.rollouts.by_route]

            prune: list[tuple[Any, ...]] = [("HDEL", self.k_members, *gone)]
            if fields:
                prune.append(("HDEL", self.k_data, *fields))
            await self._call(lambda c: _pipeline(c, prune))
            log.info("fleet %s: member(s) gone (not seen for %gs): %s", self.cfg.name, self.policy.gone_after_s,
                     ", ".join(gone))

    def _weights(self, state: Mapping[str, str]) -> list[tuple[str, str]]:
        """Apply the fleet's weight overrides that changed since this replica last applied them;
        returns those this replica applied that the store lacks (it came back empty)."""
        live = self._live
        assert live is not None
        rt = live()
        for route in rt.plan.routes:
            value = state.get(f"weights:{route.name}")
            if value is None or value == self.weights_applied.get(route.name):
                continue
            if self.rollouts.steers_weights(route.name):
                continue   # the rollout's weights win while it steers (it refuses PUTs meanwhile)
            try:
                doc = orjson.loads(value)
                if doc is None:
                    self.overrides.clear(rt, route)
                elif doc.get("fingerprint") != route.fingerprint:
                    if self._throttle.try_pass(time.monotonic(), ("weights", route.name)):
                        log.warning("fleet: weight override of route %s not applied: the route's config differs "
                                    "from the replica that set it", route.name)
                    continue
                else:
                    weights = merge_weights(route, self.overrides.weights_of(route), doc["weights"])
                    self.overrides.set(rt, route, weights)
            except (ValueError, KeyError, TypeError, AttributeError, InvalidWeights) as e:
                log.warning("fleet: weight override of route %s unreadable: %s", route.name, e)
            self.weights_applied[route.name] = value
        return [(r, v) for r, v in self.weights_applied.items() if f"weights:{r}" not in state]

    async def _refill_weights(self, refill: list[tuple[str, str]]) -> None:
        """A store that came back empty gets the weights this replica applied last (first one wins)."""
        if not refill:
            return

        await self._call(lambda c: _pipeline(c, [("HSETNX", self.k_state, f"weights:{r}", v) for r, v in refill]))
        log.info("fleet %s: weight overrides written to the store (it had none): %s", self.cfg.name,
                 ", ".join(r for r, _ in refill))

    async def _rollouts(self, state: Mapping[str, str]) -> None:
        self.fleet_keys = {}
        for route in list(self.rollouts.by_route):
            raw = state.get(f"rollout:{route}")
            rev = int(state.get(f"rev:{route}") or 0)
            if raw is None:
                await self.rollouts.claim(route, None, rev, fenced=False)
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                doc = {}
            self.fleet_keys[route] = str(doc.get("key", "")) if isinstance(doc, dict) else ""
            self.rollouts.follow_shared(route, doc, rev)
            ro = self.rollouts.by_route.get(route)
            if ro is not None and ro.skew is not None:
                if not self.why_not_judge():
                    await self.rollouts.claim(route, doc, rev, fenced=True)
                elif self._throttle.try_pass(time.monotonic(), ("skew", route)):
                    log.warning("fleet: rollout of route %s: this replica's config (key %s) differs from the "
                                "fleet's (key %s); nothing of it is applied here", route, ro.skew[0], ro.skew[1])

    def _take_parts(self, raw: Mapping[str, str]) -> None:
        parts: dict[str, list[Part]] = {}
        me, live = self.policy.replica, set(self.members)
        for field_, doc in raw.items():
            route, _, replica = field_.rpartition("|")
            if replica == me or replica not in live:
                continue
            try:
                parts.setdefault(route, []).append(Part.from_json(orjson.loads(doc)))
            except ValueError as e:
                if self._throttle.try_pass(time.monotonic(), ("part", replica)):
                    log.warning("fleet: data of replica %s for route %s ignored: %s", replica, route, e)
        self.parts = parts

    def _send(self, events: list[str]) -> None:
        for raw in events:
            try:
                ev = orjson.loads(raw)
                route, body = str(ev["route"]), dict(ev["body"])
            except (ValueError, KeyError, TypeError):
                continue
            ro = self.rollouts.by_route.get(route)
            if ro is not None:
                self.notifier.send(route, ro.plan.notify, body)

    # -- reports --------------------------------------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        """GET /admin/fleet (docs/reference/admin-api.md)."""
        local = {name: ro.plan.policy.key for name, ro in self.rollouts.by_route.items()}
        mine = skew(local, self.fleet_keys)
        members = []
        for r, m in sorted(self.members.items()):
            theirs = skew({k: str(v) for k, v in m["keys"].items()}, self.fleet_keys)
            members.append({"replica": r, "last_sync": m["last_sync"], "skew": sorted(theirs)})
        v = self.view
        return {
            "name": self.cfg.name,
            "replica": self.policy.replica,
            "leader": v.holder or None,
            "epoch": v.epoch,
            "leading": v.leading,
            "judging": not self.why_not_judge(),
            "members": members,
            "store": {"healthy": v.store is StoreHealth.HEALTHY, "state": str(v.store), "error": v.error or None,
                      "url": self._masked_url(), "last_sync": self.last_sync},
            "skew": [{"route": r, "key": a, "fleet_key": b} for r, (a, b) in mine.items()],
            "lease_s": self.cfg.lease,
            "sync_every_s": self.cfg.sync_every,
        }

    def leader_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), 1.0 if self.view.leading else 0.0)]

    def member_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(len(self.members)))]
