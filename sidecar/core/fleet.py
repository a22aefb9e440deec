"""The fleet's decisions, pure: leadership with fencing epochs, membership, pooled gate data,
config skew, and what a replica does while the store is away (docs/fleet.md).

The shell (shell/fleet.py) talks to Redis and feeds what it read in here; every decision it
acts on comes out of these functions. Nothing here does I/O, sleeps or reads a clock.

    View            what one replica knows of the fleet: the store's health, the lease holder
                    and epoch, whether it leads and until when it may judge
    synced(...)     a sync round came back: the lease script's reply -> (View, signals)
    failed(...)     a sync round (or any store call) failed -> (View, signals)
    may_judge(...)  "" when this replica may judge rollouts now, else why not
    take_afresh(..) the leader's once-after-an-outage duty: judge the step afresh
    alive(...)      membership: who synced within 3 x sync_every
    pool(...)       the step's data of the whole fleet: counts summed, latency samples pooled
    bounded(...)    a replica's latency sample: at most SHARED_LATENCIES, uniform
    skew(...)       routes whose rollout config differs from the fleet's

Leadership (docs/fleet.md#how-it-works). A lease in the store with a time to live of
`lease - sync_every` (so that a dead leader's successor is found within `lease`); its holder
renews it every `sync_every`. Each new holder gets a higher epoch. Every leader write carries
"holder|epoch" and the store refuses it unless the lease still reads exactly that (the
fencing token: a deposed or partitioned leader's late write is refused). Independently, a
leader stops judging `sync_every` before its lease could have expired, counted from when it
*sent* the renewal that succeeded, on its monotonic clock: a leader cut off from the store
(partitioned, or paused) stops before anybody else may start.

Store faults. HEALTHY -> DOWN on a failed call, DOWN -> HEALTHY on the next round that
succeeds. While DOWN nobody judges (the rollout pauses with the reason), the weights stay
as they were, and admin changes are refused. Coming back raises `StoreBack`; after an outage
of at least 2 x sync_every, the replica that leads within `lease` of it judges each rollout's
current step afresh (`afresh`): its interval starts again, so that no judgement is made on a
step cut in two by the outage. A single failed round (one slow answer) pauses nothing beyond it.

Time: `now` is monotonic seconds except where named `wall` (Unix seconds: member records
and rollout state are shared between hosts, whose monotonic clocks mean nothing to each other).

Imports: the standard library, numpy, and sidecar.core (gates, rollout).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, TypeAlias

import numpy as np

from sidecar.core.gates import BackendData, StepData
from sidecar.core.rollout import RolloutPolicy, RolloutState, State

FloatArray: TypeAlias = np.ndarray[Any, np.dtype[np.float64]]

# A replica publishes at most this many latencies per backend and step (a uniform sample of
# its own): the leader judges on at most SHARED_LATENCIES x replicas (docs/fleet.md#pooled-data).
SHARED_LATENCIES: Final = 1000
# A member not seen for this many sync periods is gone (SPEC 10).
GONE_AFTER_SYNCS: Final = 3
# An outage this many sync periods long (or longer) makes the step be judged afresh; a single
# failed round (a slow answer) does not: the replicas' counts are cumulative, none was lost.
AFRESH_AFTER_SYNCS: Final = 2


@dataclass(frozen=True, slots=True)
class FleetPolicy:
    """`fleet`, compiled: who I am and the two periods."""

    name: str
    replica: str
    lease_s: float
    sync_every_s: float

    def __post_init__(self) -> None:
        if not (self.sync_every_s > 0 and self.lease_s >= 3 * self.sync_every_s):
            raise ValueError(f"lease ({self.lease_s}s) must be at least 3 x sync_every ({self.sync_every_s}s)")
        if "|" in self.replica or not self.replica:
            raise ValueError(f"replica id {self.replica!r} must be non-empty and without '|'")

    @property
    def ttl_s(self) -> float:
        """The lease's time to live in the store: a successor is found within `lease` of a death."""
        return self.lease_s - self.sync_every_s

    @property
    def gone_after_s(self) -> float:
        return GONE_AFTER_SYNCS * self.sync_every_s


class StoreHealth(StrEnum):
    UNKNOWN = "unknown"     # no round finished yet
    HEALTHY = "healthy"
    DOWN = "down"


class LeaseOutcome(StrEnum):
    """What the lease script did (shell/fleet.py `LEASE_LUA`)."""

    RENEWED = "renewed"     # I held it with this epoch: its time to live starts again
    ACQUIRED = "acquired"   # it was free: mine now, with a new epoch
    HELD = "held"           # somebody else holds it (or I do, under an older epoch: refused)


@dataclass(frozen=True, slots=True)
class LeaseReply:
    outcome: LeaseOutcome
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class View:
    """What this replica knows of the fleet; a value (each round makes a new one)."""

    store: StoreHealth = StoreHealth.UNKNOWN
    error: str = ""                  # the last store error while DOWN
    down_since: float | None = None  # monotonic
    holder: str = ""                 # the lease's holder as last read ("" none)
    epoch: int = 0                   # its epoch
    leading: bool = False
    judge_until: float = -math.inf   # monotonic: a leader judges only before this
    max_epoch: int = 0               # the highest epoch seen (refills a store that came back empty)
    afresh_until: float | None = None  # after an outage: a leader before this judges afresh once

    @property
    def fence(self) -> str:
        """The token every leader write carries; the store compares it with the lease."""
        return f"{self.holder}|{self.epoch}"


@dataclass(frozen=True, slots=True)
class BecameLeader:
    epoch: int


@dataclass(frozen=True, slots=True)
class LostLead:
    reason: str


@dataclass(frozen=True, slots=True)
class StoreDown:
    error: str


@dataclass(frozen=True, slots=True)
class StoreBack:
    down_s: float


Signal: TypeAlias = BecameLeader | LostLead | StoreDown | StoreBack


def synced(policy: FleetPolicy, view: View, reply: LeaseReply, sent_at: float,
           now: float) -> tuple[View, tuple[Signal, ...]]:
    """A round succeeded; `sent_at` is when its lease call was sent (monotonic)."""
    signals: list[Signal] = []
    v = view
    if v.store is StoreHealth.DOWN:
        down_s = now - (v.down_since if v.down_since is not None else now)
        signals.append(StoreBack(down_s))
        if down_s >= AFRESH_AFTER_SYNCS * policy.sync_every_s:
            v = replace(v, afresh_until=now + policy.lease_s)
    v = replace(v, store=StoreHealth.HEALTHY, error="", down_since=None, holder=reply.holder, epoch=reply.epoch,
                max_epoch=max(v.max_epoch, reply.epoch))
    leading = reply.outcome is not LeaseOutcome.HELD and reply.holder == policy.replica
    if leading:
        # the store set the time to live when the call arrived, after sent_at: stop a period early
        v = replace(v, leading=True, judge_until=sent_at + policy.ttl_s - policy.sync_every_s)
        if not view.leading or reply.outcome is LeaseOutcome.ACQUIRED:
            signals.append(BecameLeader(reply.epoch))
    else:
        v = replace(v, leading=False, judge_until=-math.inf)
        if view.leading:
            signals.append(LostLead(f"the lease is held by {reply.holder or 'nobody'} (epoch {reply.epoch})"))
    if v.afresh_until is not None and now >= v.afresh_until:
        v = replace(v, afresh_until=None)
    return v, tuple(signals)


def failed(policy: FleetPolicy, view: View, error: str, now: float) -> tuple[View, tuple[Signal, ...]]:
    """A store call failed (timeout, refused, an error reply). A leader keeps its `judge_until`
    (it may not judge anyway while the store is DOWN) so that a quick recovery keeps the lead."""
    signals: list[Signal] = []
    if view.store is not StoreHealth.DOWN:
        signals.append(StoreDown(error))
    v = replace(view, store=StoreHealth.DOWN, error=error,
                down_since=view.down_since if view.store is StoreHealth.DOWN else now)
    if v.leading and now >= v.judge_until:
        v = replace(v, leading=False)
        signals.append(LostLead(f"could not renew the lease: {error}"))
    return v, tuple(signals)


def may_judge(view: View, now: float) -> str:
    """"" when this replica may judge rollouts now; otherwise the reason it may not."""
    if view.store is StoreHealth.DOWN:
        return f"fleet store unreachable: {view.error}"
    if view.store is StoreHealth.UNKNOWN:
        return "fleet store not reached yet"
    if not view.leading:
        return f"not the leader (the leader is {view.holder or 'not elected yet'})"
    if now >= view.judge_until:
        return "the leader's lease was not renewed in time"
    return ""


def take_afresh(view: View, now: float) -> tuple[View, bool]:
    """After an outage, the first leader (within `lease`) judges afresh, once."""
    if view.afresh_until is None:
        return view, False
    if now >= view.afresh_until:
        return replace(view, afresh_until=None), False
    if may_judge(view, now):
        return view, False
    return replace(view, afresh_until=None), True


def afresh(policy: RolloutPolicy, st: RolloutState, now_wall: float) -> RolloutState | None:
    """The step being judged starts its interval again (after an outage); None: nothing to redo."""
    if st.state not in (State.PROGRESSING, State.BAKING):
        return None
    judge_at = now_wall + policy.interval_s
    if st.state is State.BAKING and st.bake_started_at is not None:
        judge_at = min(judge_at, max(now_wall, st.bake_started_at + policy.bake_s))
    elif policy.progress_deadline_s is not None:
        judge_at = min(judge_at, now_wall + policy.progress_deadline_s)
    return replace(st, step_started_at=now_wall, judge_at=judge_at, seen=(0, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# Membership and skew


def alive(members: Mapping[str, float], now_wall: float, policy: FleetPolicy) -> tuple[list[str], list[str]]:
    """(alive, gone): members by last sync (wall seconds); gone: not seen for 3 x sync_every."""
    cutoff = now_wall - policy.gone_after_s
    live = sorted(r for r, t in members.items() if t >= cutoff)
    gone = sorted(r for r, t in members.items() if t < cutoff)
    return live, gone


def skew(local: Mapping[str, str], fleet: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Routes whose rollout key here differs from the fleet's: {route: (local key, fleet key)}.
    A route the fleet has no state for yet is not skewed (this replica will fill it)."""
    return {r: (k, fleet[r]) for r, k in sorted(local.items()) if r in fleet and fleet[r] != k}


# ---------------------------------------------------------------------------------------------
# Pooled gate data


def step_id(st: RolloutState) -> str:
    """Identifies the step's run: the data of another run (an earlier step, before a resume or
    an outage) is never pooled with it."""
    return f"{st.key}/{st.step}/{st.step_started_at!r}"


@dataclass(frozen=True, slots=True)
class Part:
    """One replica's data for one route's step: counts since its step began, and a bounded
    latency sample per backend. `canary`/`baseline`: (requests, tries, failed_tries)."""

    step: str
    canary: tuple[int, int, int]
    baseline: tuple[int, int, int]
    canary_latency_s: FloatArray
    baseline_latency_s: FloatArray

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "c": list(self.canary), "b": list(self.baseline),
                "cl": _pack(self.canary_latency_s), "bl": _pack(self.baseline_latency_s)}

    @classmethod
    def from_json(cls, d: Any) -> Part:
        """ValueError on any other shape (a peer of another version, or garbage)."""
        try:
            c = tuple(int(x) for x in d["c"])
            b = tuple(int(x) for x in d["b"])
            if len(c) != 3 or len(b) != 3 or min(*c, *b) < 0:
                raise ValueError(f"counts {c} {b}")
            return cls(str(d["step"]), (c[0], c[1], c[2]), (b[0], b[1], b[2]),
                       _unpack(d["cl"]), _unpack(d["bl"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"replica data: {e!r}") from e


def _pack(a: FloatArray) -> str:
    # float32 keeps a latency to ~7 digits, ample for percentiles and ranks; 5.3 bytes a value in base64
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode()


def _unpack(s: Any) -> FloatArray:
    raw = base64.b64decode(str(s), validate=True)
    if len(raw) % 4 or len(raw) > 4 * SHARED_LATENCIES:
        raise ValueError(f"latency sample of {len(raw)} bytes")
    a = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("latency sample with a negative or non-finite value")
    return a


def bounded(latency_s: Sequence[float] | FloatArray, rng: np.random.Generator) -> FloatArray:
    """At most SHARED_LATENCIES of `latency_s`, drawn uniformly without replacement."""
    a = np.asarray(latency_s, dtype=np.float64)
    if a.size <= SHARED_LATENCIES:
        return a
    return rng.choice(a, size=SHARED_LATENCIES, replace=False)


def pool(step: str, local: StepData, parts: Sequence[Part]) -> StepData:
    """The fleet's step data: this replica's own `local` plus every other replica's part of the
    same step run. Counts are summed; latency samples are concatenated, each a uniform sample
    of at most SHARED_LATENCIES of one replica's latencies (`local`'s bounded the same way by
    the caller), so a busy replica weighs no more than SHARED_LATENCIES in the pool
    (docs/fleet.md#pooled-data). Drift and agreement are not pooled (those gates are not served)."""
    same = [p for p in parts if p.step == step]

    def merged(own: BackendData, counts: list[tuple[int, int, int]], lats: list[np.ndarray[Any, Any]]) -> BackendData:
        req = own.requests + sum(c[0] for c in counts)
        tries = own.tries + sum(c[1] for c in counts)
        failed = own.failed_tries + sum(min(c[2], c[1]) for c in counts)
        return BackendData(requests=req, tries=tries, failed_tries=min(failed, tries),
                           latency_s=np.concatenate([own.latency_s, *lats]) if lats else own.latency_s)

    return replace(local,
                   canary=merged(local.canary, [p.canary for p in same], [p.canary_latency_s for p in same]),
                   baseline=merged(local.baseline, [p.baseline for p in same], [p.baseline_latency_s for p in same]))
