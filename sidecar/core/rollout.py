"""Progressive rollout as a pure state machine: (policy, state, event, now) -> (state, actions, next_check_at).

All of a rollout's decisions live in this file (h11's rule for `_state.py`); the shell
(shell/rollout_driver.py) only carries out what `handle` returns, in order, and sleeps until
`next_check_at`. Nothing here sleeps, logs, reads a clock or knows which route it serves.

    boot(policy, saved, now)          -> Result   on config load / process start: resume or start
    handle(policy, state, event, now) -> Result   for every event afterwards

Events in: `Tick(data)` (time passed; the current step's data so far), `CircuitOpened()`
(the canary's breaker opened), `Admin(action)` (pause, resume, promote, rollback, restart).
Actions out, to carry out in order: `SetWeights` (apply, or in dry run only show, the canary's
and baseline's weights), `ResetStepData` (start the step's data afresh), `Record` (keep and
log a decision), `Notify` (send a webhook event), `DiscardedState` (log why saved state was
not resumed). An admin action that the state does not allow returns `Result.error`, a
`Conflict` (HTTP 409), and changes nothing.

States and what moves them (docs/rollout.md#states):

    PROGRESSING --step passes, not last-------------> PROGRESSING (step + 1)
    PROGRESSING --last step passes, bake > 0--------> BAKING
    PROGRESSING --last step passes, no bake---------> PROMOTED
    PROGRESSING --inconclusive past progress_deadline-> PAUSED (reason: the gate, what it lacks)
    PROGRESSING, BAKING --a gate fails, circuit opens, sequential test rejects
                         --> ROLLED_BACK (on_failure: rollback) | PAUSED (on_failure: pause)
    BAKING      --bake over without a failure-------> PROMOTED
    PAUSED      --resume--> PROGRESSING | BAKING (where it paused; the step or bake starts again)
    any but terminal --promote--> PROMOTED;  --rollback--> ROLLED_BACK;  PROGRESSING, BAKING --pause--> PAUSED
    any         --restart--> PROGRESSING at step 0
    PROMOTED, ROLLED_BACK: terminal; only `restart` (or a config change: a new policy key) leaves them.

Invariants, each checked by tests/core/test_rollout.py's state machine:
- while PROGRESSING, the canary's weight only goes up (steps are strictly increasing);
- ROLLED_BACK is canary 0 / baseline 100; PROMOTED is canary 100 / baseline 0;
- every non-terminal state has a `next_check_at` (a tick will come) and an admin way out;
  terminal states accept `restart`.

Clock. `now` is **wall-clock** seconds (time.time()), not the monotonic clock the rest of
core uses: a rollout's state outlives the process (state_dir) and is shared by a fleet's
replicas, whose monotonic clocks mean nothing to each other. A clock stepped back only
delays a judgement; stepped forward, it ends an interval early.

Judging. Gates run at `judge_at` (every `interval`) on the step's data (sidecar.core.gates).
With `compare.errors: sequential`, every tick (at most `sequential.EVERY_S` apart) also feeds
the per-second counts into the sequential test: the shell passes the step's cumulative counts
and the difference from the last tick is what the test sees (when counts go down, the shell's
counters were restarted and the counts are taken whole).

Imports: the standard library and sidecar.core (gates, sequential).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeAlias

from sidecar.core.gates import (
    GatePolicy,
    GateResult,
    Samples,
    StepData,
    Verdict,
    errors_sequential,
    judge,
    step_verdict,
)
from sidecar.core.registry import ModelRef
from sidecar.core.sequential import EVERY_S, SequentialState

# Version of RolloutState.to_dict's shape; from_dict refuses any other.
STATE_VERSION = 1
# Decisions kept with the state (docs/rollout.md#decisions).
KEEP_DECISIONS = 50


class State(StrEnum):
    """The rollout's state; the value is the `state` label of `sidecar_rollout_state`."""

    PROGRESSING = "progressing"
    PAUSED = "paused"
    BAKING = "baking"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in (State.PROMOTED, State.ROLLED_BACK)

    @property
    def steers_weights(self) -> bool:
        """While True, `PUT .../weights` on the route answers 409 (pause the rollout first)."""
        return self in (State.PROGRESSING, State.BAKING)


class OnFailure(StrEnum):
    ROLLBACK = "rollback"
    PAUSE = "pause"


class AdminAction(StrEnum):
    """`POST /admin/routes/{route}/rollout/{action}`; the value is the path segment."""

    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    RESTART = "restart"


class NotifyEvent(StrEnum):
    """The webhook's `event` field."""

    STARTED = "started"
    STEPPED = "stepped"
    PAUSED = "paused"
    RESUMED = "resumed"
    BAKING = "baking"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    RESTARTED = "restarted"


class DecisionVerdict(StrEnum):
    """A decision's verdict: the step's, or `manual` for an admin action."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    MANUAL = "manual"


class Move(StrEnum):
    """What a decision did (its `action` field)."""

    ADVANCE = "advance"     # to the next step
    EXTEND = "extend"       # inconclusive: judged again after another interval
    BAKE = "bake"           # last step passed: baking starts
    CONTINUE = "continue"   # baking goes on
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    PAUSE = "pause"
    HOLD = "hold"           # judged while paused: acts on nothing
    RESUME = "resume"
    RESTART = "restart"


# ---------------------------------------------------------------------------------------------
# Policy


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """`routes[].rollout`, compiled; `key` identifies the rollout config (docs/rollout.md#state-and-restarts).

    The shell computes `key` as a hash of the canonical dump of the rollout section and of
    the canary's and baseline's backend definitions (`config_key` helps): saved state with
    another key is not resumed.
    """

    key: str
    canary: str
    baseline: str
    steps: tuple[int, ...]
    interval_s: float
    gates: GatePolicy
    progress_deadline_s: float | None = None
    bake_s: float = 0.0
    dry_run: bool = False
    on_failure: OnFailure = OnFailure.ROLLBACK

    def __post_init__(self) -> None:
        if self.canary == self.baseline:
            raise ValueError(f"canary and baseline must differ, both are {self.canary!r}")
        if not self.steps or not all(0 < s <= 100 for s in self.steps) \
                or any(a >= b for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must be strictly increasing weights in (0, 100], got {list(self.steps)}")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.progress_deadline_s is not None and not self.progress_deadline_s > 0:
            raise ValueError(f"progress_deadline_s must be > 0, got {self.progress_deadline_s}")
        if not (math.isfinite(self.bake_s) and self.bake_s >= 0):
            raise ValueError(f"bake_s must be >= 0, got {self.bake_s}")

    @property
    def last_step(self) -> int:
        return len(self.steps) - 1

    def weights(self, canary: int) -> dict[str, int]:
        """The split's weights for the two backends; other backends of the split keep theirs."""
        return {self.canary: canary, self.baseline: 100 - canary}


def config_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (sorted keys): the shell's `RolloutPolicy.key`."""
    import hashlib
    import json

    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed. `data` is the current step's data since the step (or ResetStepData) began."""

    data: StepData


@dataclass(frozen=True, slots=True)
class CircuitOpened:
    """The canary's circuit breaker opened: the step fails at once (docs/rollout.md#judging)."""


@dataclass(frozen=True, slots=True)
class Admin:
    """An admin call; `reason` is shown (e.g. "admin" or the caller's note)."""

    action: AdminAction
    reason: str = "admin"


Event: TypeAlias = Tick | CircuitOpened | Admin


# ---------------------------------------------------------------------------------------------
# Decisions and actions


@dataclass(frozen=True, slots=True)
class Decision:
    """One judgement (or admin action), as kept, logged and shown (docs/rollout.md#decisions)."""

    time: float
    step: int
    weights: Mapping[str, int]
    verdict: DecisionVerdict
    action: Move
    state: State           # the state after the decision
    reason: str            # one line
    gates: tuple[GateResult, ...] = ()
    canary_model: ModelRef | None = None   # stamped by the shell (`attribute`): core does not know versions

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "step": self.step,
            "weights": dict(self.weights),
            "verdict": str(self.verdict),
            "action": str(self.action),
            "state": str(self.state),
            "reason": self.reason,
            "gates": [g.to_json() for g in self.gates],
            "canary_model": None if self.canary_model is None else self.canary_model.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Decision:
        try:
            m = d.get("canary_model")   # absent in state saved before the registry was wired in
            return cls(
                time=float(d["time"]),
                step=int(d["step"]),
                weights={str(k): int(v) for k, v in d["weights"].items()},
                verdict=DecisionVerdict(d["verdict"]),
                action=Move(d["action"]),
                state=State(d["state"]),
                reason=str(d["reason"]),
                gates=tuple(GateResult.from_json(g) for g in d["gates"]),
                canary_model=None if m is None else ModelRef(str(m["name"]), None if m["version"] is None
                                                             else str(m["version"]), m["alias"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"decision: {e!r}") from e


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Set these backends' weights in the route's split. `applied` is False in dry run:
    show them beside the weights in use, change nothing."""

    weights: Mapping[str, int]
    applied: bool


@dataclass(frozen=True, slots=True)
class ResetStepData:
    """Start the step's data (counts, latency samples, feedback, agreement, drift) afresh now."""

    step: int
    since: float


@dataclass(frozen=True, slots=True)
class Record:
    """Keep and log this decision; count it in `sidecar_rollout_decisions_total{verdict}`."""

    decision: Decision


@dataclass(frozen=True, slots=True)
class Notify:
    """Send one webhook event (docs/rollout.md#notifications); `to_json(route)` is the body."""

    event: NotifyEvent
    state: State
    step: int
    weights: Mapping[str, int]
    dry_run: bool
    reason: str
    decision: Decision | None
    time: float
    summary: str  # the one-line text, without the route
    canary_model: ModelRef | None = None   # stamped by the shell (`attribute`)

    def to_json(self, route: str) -> dict[str, Any]:
        return {
            "route": route,
            "event": str(self.event),
            "state": str(self.state),
            "step": self.step,
            "weights": dict(self.weights),
            "dry_run": self.dry_run,
            "reason": self.reason,
            "decision": None if self.decision is None else self.decision.to_json(),
            "time": self.time,
            "text": f"{route}: {self.summary}",
            "canary_model": None if self.canary_model is None else self.canary_model.to_json(),
        }


@dataclass(frozen=True, slots=True)
class DiscardedState:
    """Saved state was not resumed (another rollout config, or unreadable): log this reason."""

    reason: str


Action: TypeAlias = SetWeights | ResetStepData | Record | Notify | DiscardedState


@dataclass(frozen=True, slots=True)
class Conflict:
    """An admin action the rollout's state does not allow; the admin API answers `status`."""

    action: AdminAction
    state: State
    message: str
    status: int = 409
    type: str = "rollout_conflict"


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Everything a rollout remembers; a value (each event makes a new one), saved with `to_dict`.

    step_started_at   when the current step (or, resumed, its new run) began: progress_deadline
                      counts from here
    judge_at          when the gates are judged next (also while paused, to show them)
    bake_started_at   while baking (or paused from baking)
    paused_from       PROGRESSING or BAKING while paused: where `resume` returns
    seen              the step's (canary tries, canary failed, baseline tries, baseline failed)
                      at the last tick, to difference the counts for the sequential test
    """

    key: str
    state: State
    step: int
    started_at: float
    step_started_at: float
    judge_at: float
    bake_started_at: float | None = None
    paused_from: State | None = None
    reason: str = ""
    sequential: SequentialState | None = None
    seen: tuple[int, int, int, int] = (0, 0, 0, 0)
    decisions: tuple[Decision, ...] = field(default=())

    def weights(self, policy: RolloutPolicy) -> dict[str, int]:
        """The weights this state holds (in dry run: would hold)."""
        if self.state is State.PROMOTED:
            return policy.weights(100)
        if self.state is State.ROLLED_BACK:
            return policy.weights(0)
        return policy.weights(policy.steps[self.step])

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict with a `version`, for state_dir or the fleet's store."""
        return {
            "version": STATE_VERSION,
            "key": self.key,
            "state": str(self.state),
            "step": self.step,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "judge_at": self.judge_at,
            "bake_started_at": self.bake_started_at,
            "paused_from": None if self.paused_from is None else str(self.paused_from),
            "reason": self.reason,
            "sequential": None if self.sequential is None else self.sequential.to_dict(),
            "seen": list(self.seen),
            "decisions": [d.to_json() for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        """Inverse of to_dict; ValueError on another version or a broken shape."""
        if not isinstance(d, Mapping) or d.get("version") != STATE_VERSION:
            version = d.get("version") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"rollout state version {version!r}, expected {STATE_VERSION}")
        try:
            seq = d["sequential"]
            seen = tuple(int(x) for x in d["seen"])
            if len(seen) != 4:
                raise ValueError(f"seen has {len(seen)} counts")
            bake = d["bake_started_at"]
            paused_from = d["paused_from"]
            st = cls(
                key=str(d["key"]),
                state=State(d["state"]),
                step=int(d["step"]),
                started_at=float(d["started_at"]),
                step_started_at=float(d["step_started_at"]),
                judge_at=float(d["judge_at"]),
                bake_started_at=None if bake is None else float(bake),
                paused_from=None if paused_from is None else State(paused_from),
                reason=str(d["reason"]),
                sequential=None if seq is None else SequentialState.from_dict(seq),
                seen=(seen[0], seen[1], seen[2], seen[3]),
                decisions=tuple(Decision.from_json(x) for x in d["decisions"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:   # int(inf): OverflowError
            raise ValueError(f"rollout state: {e}") from e
        if st.step < 0:
            raise ValueError(f"rollout state: step {st.step}")
        times = (st.started_at, st.step_started_at, st.judge_at, st.bake_started_at or 0.0)
        if not all(math.isfinite(t) for t in times):
            raise ValueError(f"rollout state: times must be finite, got {times}")
        if min(st.seen) < 0:
            raise ValueError(f"rollout state: seen {st.seen}")
        if (st.state is State.PAUSED) != (st.paused_from in (State.PROGRESSING, State.BAKING)):
            raise ValueError(f"rollout state: {st.state} with paused_from {st.paused_from}")
        return st


@dataclass(frozen=True, slots=True)
class Result:
    """What an event came to: the new state, the actions to carry out in order, when to tick next.

    `next_check_at` is None in a terminal state (nothing to judge). `error` is set (and
    state and actions unchanged/empty) when an admin action was refused.
    """

    state: RolloutState
    actions: tuple[Action, ...]
    next_check_at: float | None
    error: Conflict | None = None


def attribute(result: Result, canary_model: ModelRef | None) -> Result:
    """`result` with the canary's model stamped on the decisions and notifications it made.

    Which version a backend serves is the shell's knowledge (a registry alias resolved at
    run time), so `handle` leaves `canary_model` empty and the shell calls this before
    carrying the result out: the decision kept in the state, its Record and its Notify then
    say the same version.
    """
    if canary_model is None:
        return result
    made = {id(a.decision): replace(a.decision, canary_model=canary_model)
            for a in result.actions if isinstance(a, Record)}
    if not made:
        return result
    decisions = tuple(made.get(id(d), d) for d in result.state.decisions)
    actions: list[Action] = []
    for a in result.actions:
        if isinstance(a, Record):
            a = Record(made[id(a.decision)])
        elif isinstance(a, Notify):
            decision = None if a.decision is None else made.get(id(a.decision), a.decision)
            a = replace(a, decision=decision, canary_model=canary_model)
        actions.append(a)
    return replace(result, state=replace(result.state, decisions=decisions), actions=tuple(actions))


# ---------------------------------------------------------------------------------------------
# Entry points


def start(policy: RolloutPolicy, now: float) -> Result:
    """A new rollout at step 0 (config first loaded, or its rollout config changed)."""
    st = _at_step(policy, None, 0, now, ())
    return _result(policy, st, now, [
        _set_weights(policy, st),
        ResetStepData(0, now),
        _notify(policy, st, NotifyEvent.STARTED, now, "", None,
                f"rollout started: {policy.canary} at {policy.steps[0]}% (step 0 of {len(policy.steps)})"),
    ])


def boot(policy: RolloutPolicy, saved: Mapping[str, Any] | None, now: float) -> Result:
    """On process start or config load: resume saved state for this rollout config, else start.

    Resuming keeps state, step, step start, bake start, reason, sequential evidence and
    decisions; it re-applies the state's weights and starts the step's data afresh (the
    process's counters are new). The next judgement is at least an interval away, so it sees
    an interval of data. No notification: nothing changed for the outside.
    """
    if saved is None:
        return start(policy, now)
    try:
        st = RolloutState.from_dict(saved)
    except ValueError as e:
        r = start(policy, now)
        return replace(r, actions=(DiscardedState(f"saved rollout state unreadable: {e}"), *r.actions))
    why = _not_resumable(policy, st)
    if why:
        r = start(policy, now)
        return replace(r, actions=(DiscardedState(why), *r.actions))
    st = replace(st, seen=(0, 0, 0, 0), judge_at=max(st.judge_at, now + policy.interval_s))
    if st.state.terminal:
        return _result(policy, st, now, [_set_weights(policy, st)])
    return _result(policy, st, now, [_set_weights(policy, st), ResetStepData(st.step, now)])


def _not_resumable(policy: RolloutPolicy, st: RolloutState) -> str:
    """Why saved state cannot go on under this policy ("" when it can)."""
    if st.key != policy.key:
        return f"saved rollout state is for another rollout config (key {st.key}, now {policy.key})"
    # The checks below cannot fail for state saved under the same key; they guard against a
    # key computed from less than the whole rollout config.
    if st.step > policy.last_step:
        return f"saved rollout state is at step {st.step}, the config has {len(policy.steps)} steps"
    sp = policy.gates.sequential
    if (sp is None) != (st.sequential is None) or (
            sp is not None and st.sequential is not None and len(st.sequential.log_lr) != len(sp.ratios)):
        return "saved rollout state's sequential test does not match the config's compare.errors"
    return ""


def handle(policy: RolloutPolicy, state: RolloutState, event: Event, now: float) -> Result:
    """The one transition function: every event but the first goes through here."""
    assert state.key == policy.key, "a policy with another key means a new rollout: boot() it"
    if isinstance(event, Tick):
        return _tick(policy, state, event.data, now)
    if isinstance(event, CircuitOpened):
        return _circuit_opened(policy, state, now)
    return _admin(policy, state, event, now)


def next_check_at(policy: RolloutPolicy, state: RolloutState, now: float) -> float | None:
    """When the shell should tick next: the next judgement, or a second away for the sequential test."""
    if state.state.terminal:
        return None
    # The sequential test learns nothing at a step without baseline traffic: no ticks for it.
    if policy.gates.sequential is not None and policy.steps[state.step] < 100:
        return min(state.judge_at, now + EVERY_S)
    return state.judge_at


# ---------------------------------------------------------------------------------------------
# Ticks: the sequential test every second, the gates every interval


def _tick(policy: RolloutPolicy, st: RolloutState, data: StepData, now: float) -> Result:
    if st.state.terminal:
        return _result(policy, st, now, [])
    if st.sequential is not None:
        st = _observe(policy, st, data)
        sp = policy.gates.sequential
        assert sp is not None
        # A rejection stands until restart: resumed after one, the rollout fails again at once.
        if st.sequential is not None and st.sequential.rejected(sp) and st.state is not State.PAUSED:
            gate = errors_sequential(policy.gates, data, st.sequential)
            return _failed(policy, st, now, (gate,))
    if now < st.judge_at:
        return _result(policy, st, now, [])
    relative = policy.steps[st.step] < 100
    results = judge(policy.gates, data, relative=relative, sequential=st.sequential)
    verdict = step_verdict(results)
    if st.state is State.PAUSED:
        st = replace(st, judge_at=now + policy.interval_s)
        return _decide(policy, st, now, verdict, Move.HOLD, results,
                       f"judged while paused ({verdict}); acts on nothing", [])
    if verdict is Verdict.FAIL:
        return _failed(policy, st, now, results)
    if st.state is State.BAKING:
        assert st.bake_started_at is not None
        bake_end = st.bake_started_at + policy.bake_s
        if now >= bake_end:
            return _promote(policy, st, now, DecisionVerdict(verdict), results,
                            f"bake of {policy.bake_s:g}s ended without a failure")
        st = replace(st, judge_at=min(now + policy.interval_s, bake_end))
        return _decide(policy, st, now, verdict, Move.CONTINUE, results, f"baking ({verdict})", [])
    # PROGRESSING
    if verdict is Verdict.PASS:
        if st.step < policy.last_step:
            nxt = _at_step(policy, st, st.step + 1, now, st.decisions)
            summary = (f"step {nxt.step} of {len(policy.steps)}: {policy.canary} at {policy.steps[nxt.step]}% "
                       f"(step {st.step} passed)")
            return _decide(policy, nxt, now, verdict, Move.ADVANCE, results, f"step {st.step} passed",
                           [_set_weights(policy, nxt), ResetStepData(nxt.step, now)],
                           notify=(NotifyEvent.STEPPED, summary))
        if policy.bake_s > 0:
            nxt = replace(st, state=State.BAKING, bake_started_at=now, step_started_at=now,
                          judge_at=min(now + policy.interval_s, now + policy.bake_s), seen=(0, 0, 0, 0),
                          reason="")
            return _decide(policy, nxt, now, verdict, Move.BAKE, results, f"last step passed; baking "
                           f"{policy.bake_s:g}s", [ResetStepData(nxt.step, now)],
                           notify=(NotifyEvent.BAKING, f"baking {policy.canary} at {policy.steps[st.step]}% "
                                   f"for {policy.bake_s:g}s"))
        return _promote(policy, st, now, DecisionVerdict.PASS, results, "last step passed")
    # INCONCLUSIVE
    first = next(r for r in results if r.verdict is Verdict.INCONCLUSIVE)
    deadline = None if policy.progress_deadline_s is None else st.step_started_at + policy.progress_deadline_s
    if deadline is not None and now >= deadline:
        reason = f"inconclusive: {first.gate}: {first.reason}"
        nxt = replace(st, state=State.PAUSED, paused_from=st.state, reason=reason,
                      judge_at=now + policy.interval_s)
        return _decide(policy, nxt, now, verdict, Move.PAUSE, results, reason, [],
                       notify=(NotifyEvent.PAUSED, f"paused at step {st.step} ({policy.steps[st.step]}%) after "
                               f"progress_deadline {policy.progress_deadline_s:g}s: {reason}"))
    judge_at = now + policy.interval_s
    if deadline is not None:
        judge_at = min(judge_at, deadline)
    nxt = replace(st, judge_at=judge_at)
    return _decide(policy, nxt, now, verdict, Move.EXTEND, results,
                   f"inconclusive: {first.gate}: {first.reason}; judged again", [])


def _observe(policy: RolloutPolicy, st: RolloutState, data: StepData) -> RolloutState:
    """Feed the counts since the last tick to the sequential test (module docstring: differencing)."""
    sp = policy.gates.sequential
    assert sp is not None and st.sequential is not None
    cur = (data.canary.tries, data.canary.failed_tries, data.baseline.tries, data.baseline.failed_tries)
    seen = st.seen
    delta = [c - s for c, s in zip(cur, seen, strict=True)] if all(
        c >= s for c, s in zip(cur, seen, strict=True)) else list(cur)
    # Counts read at two moments may disagree by a try in flight: failures never exceed tries.
    delta[1] = min(delta[1], delta[0])
    delta[3] = min(delta[3], delta[2])
    if not any(delta):
        return replace(st, seen=cur)
    seq = st.sequential.update(sp, delta[0], delta[1], delta[2], delta[3])
    return replace(st, sequential=seq, seen=cur)


def _circuit_opened(policy: RolloutPolicy, st: RolloutState, now: float) -> Result:
    if st.state.terminal:
        return _result(policy, st, now, [])
    gate = GateResult("circuit", Verdict.FAIL, None, None, Samples(None, None),
                      f"the circuit breaker of {policy.canary} opened")
    if st.state is State.PAUSED:
        return _decide(policy, st, now, Verdict.FAIL, Move.HOLD, (gate,),
                       f"failed while paused: circuit: {gate.reason}; acts on nothing", [])
    return _failed(policy, st, now, (gate,))


def _failed(policy: RolloutPolicy, st: RolloutState, now: float, results: tuple[GateResult, ...]) -> Result:
    """A gate failed in PROGRESSING or BAKING: on_failure decides between rollback and pause."""
    first = next(r for r in results if r.verdict is Verdict.FAIL)
    reason = f"failed: {first.gate}: {first.reason}"
    where = f"step {st.step} ({policy.steps[st.step]}%)" + (" while baking" if st.state is State.BAKING else "")
    if policy.on_failure is OnFailure.PAUSE:
        nxt = replace(st, state=State.PAUSED, paused_from=st.state, reason=reason,
                      judge_at=now + policy.interval_s)
        return _decide(policy, nxt, now, Verdict.FAIL, Move.PAUSE, results, reason, [],
                       notify=(NotifyEvent.PAUSED, f"paused at {where}: {reason}"))
    nxt = replace(st, state=State.ROLLED_BACK, paused_from=None, reason=reason)
    return _decide(policy, nxt, now, Verdict.FAIL, Move.ROLLBACK, results, reason, [_set_weights(policy, nxt)],
                   notify=(NotifyEvent.ROLLED_BACK, f"rolled back {policy.canary} at {where}: {reason}"))


def _promote(policy: RolloutPolicy, st: RolloutState, now: float, verdict: DecisionVerdict,
             results: tuple[GateResult, ...], reason: str) -> Result:
    nxt = replace(st, state=State.PROMOTED, paused_from=None, reason=reason)
    return _decide(policy, nxt, now, verdict, Move.PROMOTE, results, reason, [_set_weights(policy, nxt)],
                   notify=(NotifyEvent.PROMOTED, f"promoted {policy.canary} to 100%: {reason}"))


# ---------------------------------------------------------------------------------------------
# Admin actions: the table, then the moves


# Which admin actions each state allows (docs/rollout.md#admin-actions); others are a Conflict.
ALLOWED: Mapping[State, frozenset[AdminAction]] = {
    State.PROGRESSING: frozenset({AdminAction.PAUSE, AdminAction.PROMOTE, AdminAction.ROLLBACK, AdminAction.RESTART}),
    State.BAKING: frozenset({AdminAction.PAUSE, AdminAction.PROMOTE, AdminAction.ROLLBACK, AdminAction.RESTART}),
    State.PAUSED: frozenset({AdminAction.RESUME, AdminAction.PROMOTE, AdminAction.ROLLBACK, AdminAction.RESTART}),
    State.PROMOTED: frozenset({AdminAction.RESTART}),
    State.ROLLED_BACK: frozenset({AdminAction.RESTART}),
}


def would_allow(state: State, action: AdminAction) -> bool:
    """Whether `action` is allowed in `state` (for the status page's buttons)."""
    return action in ALLOWED[state]


def _admin(policy: RolloutPolicy, st: RolloutState, event: Admin, now: float) -> Result:
    action, who = event.action, event.reason
    if not would_allow(st.state, action):
        allowed = " or ".join(str(s) for s in State if action in ALLOWED[s])
        conflict = Conflict(action, st.state, f"cannot {action} a rollout that is {st.state} "
                                              f"({action} needs it {allowed})")
        return Result(st, (), next_check_at(policy, st, now), conflict)
    manual = DecisionVerdict.MANUAL
    if action is AdminAction.PAUSE:
        reason = f"paused by {who}"
        nxt = replace(st, state=State.PAUSED, paused_from=st.state, reason=reason)
        return _decide(policy, nxt, now, manual, Move.PAUSE, (), reason, [],
                       notify=(NotifyEvent.PAUSED, f"paused at step {st.step} ({policy.steps[st.step]}%) by {who}"))
    if action is AdminAction.RESUME:
        assert st.paused_from is not None
        back = st.paused_from
        # The step (or the bake) runs again from now: its data, interval and deadline (or bake) restart.
        if back is State.BAKING:
            nxt = replace(st, bake_started_at=now, judge_at=now + min(policy.interval_s, policy.bake_s))
        else:
            nxt = _at_step(policy, st, st.step, now, st.decisions)
        nxt = replace(nxt, state=back, paused_from=None, reason="", step_started_at=now, seen=(0, 0, 0, 0))
        return _decide(policy, nxt, now, manual, Move.RESUME, (), f"resumed by {who}",
                       [ResetStepData(nxt.step, now)],
                       notify=(NotifyEvent.RESUMED, f"resumed at step {st.step} ({policy.steps[st.step]}%)"
                               + (", baking again" if back is State.BAKING else "") + f" by {who}"))
    if action is AdminAction.PROMOTE:
        return _promote(policy, st, now, manual, (), f"promoted by {who}")
    if action is AdminAction.ROLLBACK:
        reason = f"rolled back by {who}"
        nxt = replace(st, state=State.ROLLED_BACK, paused_from=None, reason=reason)
        return _decide(policy, nxt, now, manual, Move.ROLLBACK, (), reason, [_set_weights(policy, nxt)],
                       notify=(NotifyEvent.ROLLED_BACK, f"rolled back {policy.canary} at step {st.step} by {who}"))
    # RESTART, from any state: step 0, fresh evidence, the decisions kept.
    nxt = _at_step(policy, None, 0, now, st.decisions)
    return _decide(policy, nxt, now, manual, Move.RESTART, (), f"restarted by {who}",
                   [_set_weights(policy, nxt), ResetStepData(0, now)],
                   notify=(NotifyEvent.RESTARTED, f"restarted: {policy.canary} at {policy.steps[0]}% (step 0) "
                           f"by {who}"))


# ---------------------------------------------------------------------------------------------
# Building blocks


def _at_step(policy: RolloutPolicy, prev: RolloutState | None, step: int, now: float,
             decisions: tuple[Decision, ...]) -> RolloutState:
    """PROGRESSING at `step`, starting now; the sequential evidence carries over from `prev`."""
    judge_at = now + policy.interval_s
    if policy.progress_deadline_s is not None:
        judge_at = min(judge_at, now + policy.progress_deadline_s)
    sp = policy.gates.sequential
    if prev is not None and prev.sequential is not None:
        seq: SequentialState | None = prev.sequential
    else:
        seq = SequentialState.new(sp) if sp is not None else None
    return RolloutState(
        key=policy.key,
        state=State.PROGRESSING,
        step=step,
        started_at=prev.started_at if prev is not None else now,
        step_started_at=now,
        judge_at=judge_at,
        sequential=seq,
        decisions=decisions,
    )


def _set_weights(policy: RolloutPolicy, st: RolloutState) -> SetWeights:
    return SetWeights(st.weights(policy), applied=not policy.dry_run)


def _notify(policy: RolloutPolicy, st: RolloutState, event: NotifyEvent, now: float, reason: str,
            decision: Decision | None, summary: str) -> Notify:
    prefix = "[dry run] " if policy.dry_run else ""
    return Notify(event=event, state=st.state, step=st.step, weights=st.weights(policy), dry_run=policy.dry_run,
                  reason=reason, decision=decision, time=now, summary=prefix + summary)


def _decide(
    policy: RolloutPolicy,
    st: RolloutState,
    now: float,
    verdict: Verdict | DecisionVerdict,
    move: Move,
    results: tuple[GateResult, ...],
    reason: str,
    actions: list[Action],
    notify: tuple[NotifyEvent, str] | None = None,
) -> Result:
    """Record a decision on the new state `st`, then the actions, then the notification."""
    decision = Decision(time=now, step=st.step, weights=st.weights(policy), verdict=DecisionVerdict(str(verdict)),
                        action=move, state=st.state, reason=reason, gates=results)
    st = replace(st, decisions=(*st.decisions, decision)[-KEEP_DECISIONS:])
    out: list[Action] = [*actions, Record(decision)]
    if notify is not None:
        event, summary = notify
        out.append(_notify(policy, st, event, now, reason, decision, summary))
    return _result(policy, st, now, out)


def _result(policy: RolloutPolicy, st: RolloutState, now: float, actions: list[Action]) -> Result:
    return Result(st, tuple(actions), next_check_at(policy, st, now))
