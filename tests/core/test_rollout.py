"""Rollout state machine: scripted scenarios (events in, actions out, fake clock) and a model-checked state machine.

The scripts read as mitmproxy's Playbook: `playbook >> event` sends an event at the playbook's
clock, `<< action` expects the next action out, and `assert playbook` checks that no action
was left unexpected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sidecar.core.gates import (
    BackendData,
    CompareErrors,
    FeedbackMetric,
    GatePolicy,
    MetricValue,
    StepData,
    Verdict,
)
from sidecar.core.rollout import (
    ALLOWED,
    KEEP_DECISIONS,
    Action,
    Admin,
    AdminAction,
    CircuitOpened,
    Conflict,
    Decision,
    DecisionVerdict,
    DiscardedState,
    Event,
    Move,
    Notify,
    NotifyEvent,
    OnFailure,
    Record,
    ResetStepData,
    Result,
    RolloutPolicy,
    RolloutState,
    SetWeights,
    State,
    Tick,
    boot,
    config_key,
    handle,
    would_allow,
)

STEPS = (5, 10, 25, 50, 100)


def policy(**kw: Any) -> RolloutPolicy:
    gates = kw.pop("gates", GatePolicy(min_requests=200, max_error_rate=0.01, max_p99_s=0.5))
    base: dict[str, Any] = {"key": "k1", "canary": "canary", "baseline": "stable", "steps": STEPS,
                            "interval_s": 60.0, "gates": gates, "progress_deadline_s": 600.0}
    base.update(kw)
    return RolloutPolicy(**base)


def side(requests: int = 1000, failed: int = 0, latency_s: float = 0.1, feedback: MetricValue | None = None,
         ) -> BackendData:
    return BackendData(requests=requests, tries=requests, failed_tries=failed,
                       latency_s=np.full(min(requests, 500), latency_s), feedback=feedback)


def healthy() -> StepData:
    return StepData(canary=side(), baseline=side())


def failing() -> StepData:
    """5% of the canary's tries fail, against max_error_rate 1%."""
    return StepData(canary=side(failed=50), baseline=side())


def thin() -> StepData:
    """10 canary requests: every gate waits for min_requests."""
    return StepData(canary=side(10), baseline=side(190))


def w(canary: int) -> dict[str, int]:
    return {"canary": canary, "stable": 100 - canary}


# ---------------------------------------------------------------------------------------------
# Playbook


@dataclass(frozen=True)
class Like:
    """An expected action: of this type, with these attributes (nested with '__': decision__verdict)."""

    type: type
    attrs: dict[str, Any]

    def matches(self, got: Action) -> bool:
        if not isinstance(got, self.type):
            return False
        for name, want in self.attrs.items():
            value: Any = got
            for part in name.split("__"):
                value = getattr(value, part)
            if value != want:
                return False
        return True


def like(t: type, **attrs: Any) -> Like:
    return Like(t, attrs)


class Playbook:
    """Events in (>>), actions out (<<), on a fake clock that only `at` moves."""

    def __init__(self, p: RolloutPolicy, saved: dict[str, Any] | None = None, now: float = 0.0) -> None:
        self.policy = p
        self.now = now
        self.result = boot(p, saved, now)
        self.state = self.result.state
        self.out = list(self.result.actions)
        self.seen: list[Action] = list(self.out)

    def skip(self) -> Playbook:
        """Drop the pending actions unchecked (a scenario's set-up)."""
        self.out.clear()
        return self

    def at(self, t: float) -> Playbook:
        assert not self.out, f"unexpected actions before t={t}: {self.out}"
        assert t >= self.now, "the fake clock never goes back"
        self.now = t
        return self

    def __rshift__(self, event: Event) -> Playbook:
        assert not self.out, f"unexpected actions before {event}: {self.out}"
        self.result = handle(self.policy, self.state, event, self.now)
        self.state = self.result.state
        self.out = list(self.result.actions)
        self.seen += self.out
        return self

    def __lshift__(self, want: Action | Like | type) -> Playbook:
        assert self.out, f"expected {want}, but no action is left"
        got = self.out.pop(0)
        if isinstance(want, Like):
            ok = want.matches(got)
        elif isinstance(want, type):
            ok = isinstance(got, want)
        else:
            ok = got == want
        assert ok, f"expected {want}, got {got}"
        return self

    def __bool__(self) -> bool:
        assert not self.out, f"unexpected actions: {self.out}"
        return True

    # Methods, not attributes: every event changes them, so a type checker must not narrow them.
    def next_check(self) -> float | None:
        return self.result.next_check_at

    def phase(self) -> State:
        return self.state.state

    def walk_to(self, step: int, data: StepData | None = None) -> Playbook:
        """Pass steps until the rollout is at `step` (index), one interval each; the actions are not checked."""
        self.out.clear()
        while self.state.step < step:
            t = self.next_check()
            assert t is not None
            self.at(t) >> Tick(data or healthy())
            self.out.clear()
        return self


def started(pb: Playbook) -> Playbook:
    return pb << SetWeights(w(5), True) << ResetStepData(0, pb.now) << like(Notify, event=NotifyEvent.STARTED)


# ---------------------------------------------------------------------------------------------
# Scenarios


def test_healthy_canary_walks_every_step_to_promoted():
    """A healthy canary is judged once per interval, goes 5, 10, 25, 50, 100 and ends promoted at 100/0."""
    pb = Playbook(policy())
    assert started(pb)
    assert pb.next_check() == 60.0
    assert pb.at(30) >> Tick(healthy())  # mid-interval: nothing to judge yet
    assert pb.result.actions == () and pb.next_check() == 60.0
    for i, weight in enumerate(STEPS[1:], start=1):
        t = 60.0 * i
        assert (pb.at(t) >> Tick(healthy())
                << SetWeights(w(weight), True) << ResetStepData(i, t)
                << like(Record, decision__verdict=DecisionVerdict.PASS, decision__action=Move.ADVANCE,
                        decision__step=i)
                << like(Notify, event=NotifyEvent.STEPPED, step=i, weights=w(weight)))
        assert pb.phase() is State.PROGRESSING and pb.next_check() == t + 60
    # The last step (100) is judged on the absolute gates; relative ones would be skipped.
    assert (pb.at(300) >> Tick(StepData(canary=side(), baseline=side(0)))
            << SetWeights(w(100), True)
            << like(Record, decision__action=Move.PROMOTE, decision__state=State.PROMOTED)
            << like(Notify, event=NotifyEvent.PROMOTED))
    assert pb.phase() is State.PROMOTED and pb.next_check() is None
    assert pb.state.weights(pb.policy) == {"canary": 100, "stable": 0}
    assert [d.action for d in pb.state.decisions] == [Move.ADVANCE] * 4 + [Move.PROMOTE]


def test_failure_at_step_2_rolls_back_naming_the_gate():
    """A canary failing its error gate at step 2 goes to canary 0 at once, and the decision says which gate and why."""
    pb = Playbook(policy()).walk_to(2)
    t = pb.next_check()
    assert t == 180.0
    assert (pb.at(t) >> Tick(failing())
            << SetWeights(w(0), True)
            << like(Record, decision__verdict=DecisionVerdict.FAIL, decision__action=Move.ROLLBACK, decision__step=2)
            << like(Notify, event=NotifyEvent.ROLLED_BACK, state=State.ROLLED_BACK, weights=w(0)))
    d = pb.state.decisions[-1]
    failed = [g for g in d.gates if g.verdict is Verdict.FAIL]
    assert [g.gate for g in failed] == ["max_error_rate"]
    assert failed[0].value == 0.05 and failed[0].threshold == 0.01
    assert pb.state.reason == "failed: max_error_rate: 50 of 1000 canary tries failed (0.05 > 0.01)"
    assert pb.phase() is State.ROLLED_BACK and pb.next_check() is None
    notify = pb.seen[-1]
    assert isinstance(notify, Notify)
    body = notify.to_json("fraud")
    assert body["text"] == ("fraud: rolled back canary at step 2 (25%): failed: max_error_rate: 50 of 1000 canary "
                            "tries failed (0.05 > 0.01)")
    assert set(body) == {"route", "event", "state", "step", "weights", "dry_run", "reason", "decision", "time", "text",
                         "canary_model"}
    assert body["decision"]["gates"][1]["gate"] == "max_error_rate"
    assert pb.at(1000) >> Tick(failing())  # a terminal state ignores ticks
    assert pb.result.actions == ()


def test_inconclusive_extends_until_progress_deadline_then_pauses():
    """Too little traffic extends the step every interval; at progress_deadline the rollout pauses, naming the gap."""
    pb = Playbook(policy(progress_deadline_s=150.0))
    assert started(pb)
    assert (pb.at(60) >> Tick(thin())
            << like(Record, decision__verdict=DecisionVerdict.INCONCLUSIVE, decision__action=Move.EXTEND))
    assert pb.next_check() == 120.0
    assert pb.at(120) >> Tick(thin()) << like(Record, decision__action=Move.EXTEND)
    assert pb.next_check() == 150.0  # the deadline comes before another interval
    assert (pb.at(150) >> Tick(thin())
            << like(Record, decision__action=Move.PAUSE, decision__state=State.PAUSED)
            << like(Notify, event=NotifyEvent.PAUSED, weights=w(5)))
    assert pb.phase() is State.PAUSED
    assert pb.state.reason == "inconclusive: min_requests: 10 of 200 canary requests"
    lacking = pb.state.decisions[-1].gates[0]
    assert (lacking.gate, lacking.needs is not None and lacking.needs.canary) == ("min_requests", 200)
    assert pb.next_check() == 210.0  # judging goes on while paused, to be shown


def test_deadline_pause_names_a_feedback_gate_and_what_it_lacks():
    """With traffic but few joined feedbacks, the pause reason names min_feedback and the feedbacks it still needs."""
    gates = GatePolicy(min_requests=200, min_feedback=0.9, feedback_metric=FeedbackMetric.ACCURACY)
    pb = Playbook(policy(gates=gates, progress_deadline_s=60.0))
    assert started(pb)
    data = StepData(canary=side(feedback=MetricValue(0.95, 12)), baseline=side())
    assert pb.at(60) >> Tick(data) << like(Record, decision__action=Move.PAUSE) << Notify
    assert pb.state.reason == "inconclusive: min_feedback: 12 of 30 joined feedbacks on the canary"


def test_bake_catches_a_failure_after_100_and_rolls_back():
    """After the last step the canary bakes; a failure during the bake still rolls back to canary 0."""
    pb = Playbook(policy(bake_s=300.0)).walk_to(4)
    assert (pb.at(300) >> Tick(healthy())
            << ResetStepData(4, 300.0)
            << like(Record, decision__action=Move.BAKE, decision__state=State.BAKING)
            << like(Notify, event=NotifyEvent.BAKING, weights=w(100)))
    assert pb.phase() is State.BAKING and pb.next_check() == 360.0
    assert pb.at(360) >> Tick(healthy()) << like(Record, decision__action=Move.CONTINUE)
    assert (pb.at(420) >> Tick(failing())
            << SetWeights(w(0), True)
            << like(Record, decision__verdict=DecisionVerdict.FAIL, decision__action=Move.ROLLBACK)
            << like(Notify, event=NotifyEvent.ROLLED_BACK))
    assert pb.phase() is State.ROLLED_BACK
    assert pb.state.reason.startswith("failed: max_error_rate:")


def test_bake_without_failure_promotes_at_its_end():
    """A bake without a failure promotes exactly when `bake` has passed, not an interval later."""
    pb = Playbook(policy(bake_s=90.0)).walk_to(4)
    assert pb.at(300) >> Tick(healthy()) << ResetStepData << Record << Notify
    assert pb.at(360) >> Tick(thin()) << like(Record, decision__action=Move.CONTINUE)
    assert pb.next_check() == 390.0
    assert (pb.at(390) >> Tick(healthy())
            << SetWeights(w(100), True) << like(Record, decision__action=Move.PROMOTE) << Notify)
    assert pb.phase() is State.PROMOTED
    assert pb.state.reason == "bake of 90s ended without a failure"


def test_dry_run_decides_the_same_and_applies_nothing():
    """In dry run every decision is made and notified as usual, but every weight is marked as not applied."""
    pb = Playbook(policy(dry_run=True))
    assert (pb << SetWeights(w(5), applied=False) << ResetStepData(0, 0.0)
            << like(Notify, event=NotifyEvent.STARTED, dry_run=True))
    assert (pb.at(60) >> Tick(healthy())
            << SetWeights(w(10), applied=False) << ResetStepData << Record
            << like(Notify, event=NotifyEvent.STEPPED, dry_run=True, weights=w(10)))
    assert (pb.at(120) >> Tick(failing())
            << SetWeights(w(0), applied=False) << Record << like(Notify, event=NotifyEvent.ROLLED_BACK))
    assert pb.phase() is State.ROLLED_BACK
    notify = pb.seen[-1]
    assert isinstance(notify, Notify) and notify.summary.startswith("[dry run] rolled back")


def test_circuit_open_fails_the_step_at_once():
    """When the canary's circuit opens mid-interval, the step fails at that moment, naming the circuit."""
    pb = Playbook(policy()).walk_to(1)
    assert (pb.at(75) >> CircuitOpened()
            << SetWeights(w(0), True)
            << like(Record, decision__verdict=DecisionVerdict.FAIL, decision__time=75.0)
            << like(Notify, event=NotifyEvent.ROLLED_BACK))
    assert pb.state.reason == "failed: circuit: the circuit breaker of canary opened"
    assert pb.at(80) >> CircuitOpened()  # already rolled back: nothing more
    assert pb.result.actions == ()


def test_on_failure_pause_holds_the_weights_then_resume_runs_the_step_again():
    """With on_failure: pause a failed step keeps its weights; resume runs that step again from now."""
    pb = Playbook(policy(on_failure=OnFailure.PAUSE)).walk_to(1)
    assert (pb.at(120) >> Tick(failing())
            << like(Record, decision__action=Move.PAUSE) << like(Notify, event=NotifyEvent.PAUSED, weights=w(10)))
    assert pb.phase() is State.PAUSED and pb.state.reason.startswith("failed: max_error_rate")
    # While paused, judging goes on and is recorded, and acts on nothing.
    assert pb.at(180) >> Tick(healthy()) << like(Record, decision__action=Move.HOLD, decision__verdict="pass")
    assert pb.at(185) >> CircuitOpened() << like(Record, decision__action=Move.HOLD, decision__verdict="fail")
    assert pb.phase() is State.PAUSED
    assert (pb.at(200) >> Admin(AdminAction.RESUME)
            << ResetStepData(1, 200.0) << like(Record, decision__verdict=DecisionVerdict.MANUAL)
            << like(Notify, event=NotifyEvent.RESUMED))
    assert pb.phase() is State.PROGRESSING and pb.state.step == 1
    assert pb.state.step_started_at == 200.0 and pb.next_check() == 260.0


def test_restart_after_rollback_starts_at_step_0():
    """After a rollback, `restart` starts from the first step again and keeps the history of decisions."""
    pb = Playbook(policy()).walk_to(2)
    assert pb.at(180) >> Tick(failing()) << SetWeights << Record << Notify
    before = len(pb.state.decisions)
    assert (pb.at(500) >> Admin(AdminAction.RESTART)
            << SetWeights(w(5), True) << ResetStepData(0, 500.0)
            << like(Record, decision__action=Move.RESTART)
            << like(Notify, event=NotifyEvent.RESTARTED, step=0))
    s = pb.state
    assert (s.state, s.step, s.step_started_at, s.started_at, s.reason) == (State.PROGRESSING, 0, 500.0, 500.0, "")
    assert len(s.decisions) == before + 1 and pb.next_check() == 560.0


def test_resume_from_saved_state_keeps_step_and_step_start():
    """A restarted process resumes the saved rollout at the same step and step start, re-applying its weights."""
    pb = Playbook(policy()).walk_to(2)
    assert pb.state.step_started_at == 120.0
    saved = json.loads(json.dumps(pb.state.to_dict()))
    again = Playbook(policy(), saved=saved, now=150.0)
    assert again << SetWeights(w(25), True) << ResetStepData(2, 150.0)
    s = again.state
    assert (s.state, s.step, s.step_started_at, s.started_at) == (State.PROGRESSING, 2, 120.0, 0.0)
    assert s.decisions == pb.state.decisions
    assert again.next_check() == 210.0  # a whole interval of the new process's data before judging


def test_saved_state_of_another_rollout_config_is_discarded():
    """State saved for another rollout config (or unreadable) is not resumed: the rollout starts and says why."""
    pb = Playbook(policy()).walk_to(3)
    saved = pb.state.to_dict()
    fresh = Playbook(policy(key="k2"), saved=saved, now=1000.0)
    assert fresh << like(DiscardedState) << SetWeights(w(5), True) << ResetStepData << like(
        Notify, event=NotifyEvent.STARTED)
    assert fresh.state.step == 0 and fresh.state.decisions == ()
    for broken in ({"version": 99}, {**saved, "state": "exploded"}, {**saved, "seen": [1]}):
        assert Playbook(policy(), saved=broken) << like(DiscardedState) << SetWeights << ResetStepData << Notify


def test_terminal_state_resumes_terminal():
    """A process restarted after a promotion keeps the promotion and its weights, and judges nothing."""
    pb = Playbook(policy()).walk_to(4)
    assert pb.at(300) >> Tick(healthy()) << SetWeights << Record << Notify
    again = Playbook(policy(), saved=pb.state.to_dict(), now=400.0)
    assert again << SetWeights(w(100), True)
    assert again.phase() is State.PROMOTED and again.next_check() is None


# -- admin actions in every state ---------------------------------------------------------------


def in_state(target: State) -> Playbook:
    """A playbook whose rollout is in `target` (baking at the last step, paused from step 1)."""
    if target is State.BAKING:
        pb = Playbook(policy(bake_s=300.0)).walk_to(4)
        pb.at(300) >> Tick(healthy())
    else:
        pb = Playbook(policy()).walk_to(1)
        pb.at(90)
        if target is State.PAUSED:
            pb >> Admin(AdminAction.PAUSE)
        elif target is State.PROMOTED:
            pb >> Admin(AdminAction.PROMOTE)
        elif target is State.ROLLED_BACK:
            pb >> Admin(AdminAction.ROLLBACK)
    pb.out.clear()
    assert pb.phase() is target
    return pb


EXPECTED = {  # (state, action) -> state after; absent: 409
    (State.PROGRESSING, AdminAction.PAUSE): State.PAUSED,
    (State.PROGRESSING, AdminAction.PROMOTE): State.PROMOTED,
    (State.PROGRESSING, AdminAction.ROLLBACK): State.ROLLED_BACK,
    (State.PROGRESSING, AdminAction.RESTART): State.PROGRESSING,
    (State.BAKING, AdminAction.PAUSE): State.PAUSED,
    (State.BAKING, AdminAction.PROMOTE): State.PROMOTED,
    (State.BAKING, AdminAction.ROLLBACK): State.ROLLED_BACK,
    (State.BAKING, AdminAction.RESTART): State.PROGRESSING,
    (State.PAUSED, AdminAction.RESUME): State.PROGRESSING,
    (State.PAUSED, AdminAction.PROMOTE): State.PROMOTED,
    (State.PAUSED, AdminAction.ROLLBACK): State.ROLLED_BACK,
    (State.PAUSED, AdminAction.RESTART): State.PROGRESSING,
    (State.PROMOTED, AdminAction.RESTART): State.PROGRESSING,
    (State.ROLLED_BACK, AdminAction.RESTART): State.PROGRESSING,
}


@pytest.mark.parametrize("action", list(AdminAction))
@pytest.mark.parametrize("state", list(State))
def test_admin_action_in_every_state(state, action):
    """Each admin action either moves the rollout as documented or is refused with a 409 that changes nothing."""
    pb = in_state(state)
    before = pb.state
    pb >> Admin(action, reason="alice")
    want = EXPECTED.get((state, action))
    assert would_allow(state, action) == (want is not None)
    if want is None:
        assert pb.result.error == Conflict(action, state, pb.result.error.message if pb.result.error else "")
        assert pb.result.error is not None and pb.result.error.status == 409
        assert pb.state == before and pb.result.actions == ()
        assert str(state) in pb.result.error.message
        return
    assert pb.result.error is None
    assert pb.phase() is want
    record = next(a for a in pb.result.actions if isinstance(a, Record))
    assert record.decision.verdict is DecisionVerdict.MANUAL and "by alice" in record.decision.reason
    notify = next(a for a in pb.result.actions if isinstance(a, Notify))
    assert str(notify.event) == {AdminAction.PAUSE: "paused", AdminAction.RESUME: "resumed",
                                 AdminAction.PROMOTE: "promoted", AdminAction.ROLLBACK: "rolled_back",
                                 AdminAction.RESTART: "restarted"}[action]
    weights = [a.weights for a in pb.result.actions if isinstance(a, SetWeights)]
    if want is State.PROMOTED:
        assert weights == [w(100)]
    elif want is State.ROLLED_BACK:
        assert weights == [w(0)]
    elif action is AdminAction.RESTART:
        assert weights == [w(5)] and pb.state.step == 0
    else:
        assert weights == []  # pause and resume hold the step's weights


def test_resume_while_baking_bakes_again():
    """Paused during the bake, a resumed rollout bakes again for the whole `bake`."""
    pb = in_state(State.BAKING)
    pb.at(320) >> Admin(AdminAction.PAUSE)
    pb.out.clear()
    assert pb.at(400) >> Admin(AdminAction.RESUME) << ResetStepData(4, 400.0) << Record << Notify
    assert pb.phase() is State.BAKING and pb.state.bake_started_at == 400.0


def test_weights_override_is_refused_while_the_rollout_steers():
    """PUT .../weights answers 409 while the rollout is progressing or baking, and is allowed otherwise."""
    assert [s for s in State if s.steers_weights] == [State.PROGRESSING, State.BAKING]


# -- the sequential test, every second ---------------------------------------------------------


def test_sequential_errors_fail_a_clearly_worse_canary_within_seconds():
    """With errors: sequential, a canary failing 10x as often as its baseline fails seconds into its step."""
    gates = GatePolicy(min_requests=200, compare_errors=CompareErrors.SEQUENTIAL, alpha=0.01)
    pb = Playbook(policy(gates=gates))
    assert started(pb)
    assert pb.next_check() == 1.0  # fed every second
    tries = failed_c = failed_b = 0
    t = 0.0
    while pb.phase() is State.PROGRESSING:
        t += 1.0
        tries += 50  # a second: 50 canary tries, 950 baseline tries
        failed_c += 5
        failed_b += 9
        c = BackendData(requests=tries, tries=tries, failed_tries=failed_c)
        b = BackendData(requests=19 * tries, tries=19 * tries, failed_tries=failed_b)
        pb.at(t) >> Tick(StepData(canary=c, baseline=b))
        if pb.phase() is State.PROGRESSING:
            assert pb.result.actions == () and pb.next_check() == t + 1.0
    assert t <= 10.0
    assert pb << SetWeights(w(0), True) << like(Record, decision__verdict=DecisionVerdict.FAIL) << Notify
    gate = pb.state.decisions[-1].gates[0]
    assert gate.gate == "compare.errors" and gate.value is not None and gate.value < 0.01
    assert gate.samples.canary == tries  # the counts were differenced, each try seen once
    assert pb.state.sequential is not None and pb.state.sequential.canary_tries == tries


def test_sequential_evidence_spans_steps_and_resets_on_restart():
    """The sequential test sees the rollout so far across steps, and a restart starts it afresh."""
    gates = GatePolicy(min_requests=0, compare_errors=CompareErrors.SEQUENTIAL, alpha=0.01)
    pb = Playbook(policy(gates=gates)).skip()
    for t in range(1, 61):
        pb.at(float(t)) >> Tick(StepData(canary=side(10 * t), baseline=side(190 * t)))
        pb.out.clear()
    assert pb.state.step == 1
    seq = pb.state.sequential
    assert seq is not None and seq.canary_tries == 600 and seq.baseline_tries == 11400
    pb.at(61) >> Tick(StepData(canary=side(5), baseline=side(5)))  # the new step's counters start at 0
    assert pb.state.sequential is not None and pb.state.sequential.canary_tries == 605
    pb >> Admin(AdminAction.RESTART)
    assert pb.state.sequential is not None and pb.state.sequential.canary_tries == 0


# -- shapes ------------------------------------------------------------------------------------


def test_state_round_trips_through_json():
    """The saved state is plain JSON with a version, and reads back equal."""
    gates = GatePolicy(min_requests=0, compare_errors=CompareErrors.SEQUENTIAL, max_error_rate=0.5)
    pb = Playbook(policy(gates=gates, bake_s=60.0)).walk_to(3)
    pb >> Admin(AdminAction.PAUSE)
    d = json.loads(json.dumps(pb.state.to_dict()))
    assert d["version"] == 1 and d["state"] == "paused" and d["paused_from"] == "progressing"
    assert RolloutState.from_dict(d) == pb.state
    with pytest.raises(ValueError, match="version"):
        RolloutState.from_dict({**d, "version": 2})
    with pytest.raises(ValueError, match="paused_from"):
        RolloutState.from_dict({**d, "paused_from": None})


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=5)


def _saved_state() -> dict[str, Any]:
    gates = GatePolicy(min_requests=0, compare_errors=CompareErrors.SEQUENTIAL, max_error_rate=0.5)
    pb = Playbook(policy(gates=gates)).walk_to(2)
    return pb.state.to_dict()


SAVED = _saved_state()


@given(key=st.sampled_from(sorted(SAVED)), value=json_values)
@settings(deadline=None, max_examples=200)
def test_a_damaged_saved_state_is_refused_or_read(key, value):
    """A saved state with any field replaced by any JSON value either reads back or is refused with ValueError."""
    damaged = {**SAVED, key: value}
    try:
        s = RolloutState.from_dict(damaged)
    except ValueError:
        return
    assert RolloutState.from_dict(s.to_dict()) == s
    r = boot(policy(gates=GatePolicy(min_requests=0, compare_errors=CompareErrors.SEQUENTIAL, max_error_rate=0.5)),
             damaged, 500.0)
    assert r.state.state in State


def test_decisions_are_bounded():
    """Only the last 50 decisions are kept with the state."""
    pb = Playbook(policy(progress_deadline_s=None)).skip()
    for i in range(1, 80):
        pb.at(60.0 * i) >> Tick(thin())
        pb.out.clear()
    assert len(pb.state.decisions) == KEEP_DECISIONS
    assert pb.state.decisions[-1].time == 60.0 * 79


def test_decision_json_shape():
    """A decision reads {time, step, weights, verdict, action, gates} (plus state, reason, canary_model), and reads
    back."""
    pb = Playbook(policy()).skip()
    pb.at(60) >> Tick(healthy())
    d = pb.state.decisions[-1]
    j = d.to_json()
    assert list(j) == ["time", "step", "weights", "verdict", "action", "state", "reason", "gates", "canary_model"]
    assert j["weights"] == w(10) and j["verdict"] == "pass" and j["action"] == "advance"
    assert Decision.from_json(j) == d


@pytest.mark.parametrize("kw", [{"steps": ()}, {"steps": (10, 5)}, {"steps": (0, 50)}, {"steps": (50, 101)},
                                {"interval_s": 0.0}, {"bake_s": -1.0}, {"progress_deadline_s": 0.0},
                                {"baseline": "canary"}])
def test_policy_rejects_nonsense(kw):
    """A rollout whose steps do not go up, or with no interval, is refused when it is built."""
    with pytest.raises(ValueError, match="must"):
        policy(**kw)


def test_config_key_is_stable():
    """The rollout config's key does not depend on key order, and changes with any value."""
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


# ---------------------------------------------------------------------------------------------
# State machine against a small model


def mixed(kind: str) -> StepData:
    return {"pass": healthy, "fail": failing, "thin": thin}[kind]()


class RolloutMachine(RuleBasedStateMachine):
    """Random events at random times; the rollout must agree with the model and keep its invariants."""

    @initialize(steps=st.sampled_from([STEPS, (50, 100), (20,)]), bake=st.sampled_from([0.0, 90.0]),
                on_failure=st.sampled_from(list(OnFailure)), deadline=st.sampled_from([None, 150.0]),
                dry_run=st.booleans())
    def setup(self, steps: tuple[int, ...], bake: float, on_failure: OnFailure, deadline: float | None,
              dry_run: bool) -> None:
        self.policy = policy(steps=steps, bake_s=bake, on_failure=on_failure, progress_deadline_s=deadline,
                             dry_run=dry_run)
        self.now = 0.0
        self.result = boot(self.policy, None, self.now)
        self.state = self.result.state
        self.canary = steps[0]  # the weight the shell would hold (or show, in dry run)
        self.check_actions(self.result, before=None)

    # -- the model ---------------------------------------------------------------------------

    def expect_tick(self, s: RolloutState, kind: str) -> tuple[State, int]:
        """Where a tick with data of this kind takes `s`, by the rules as docs/rollout.md writes them."""
        p = self.policy
        if s.state.terminal or self.now < s.judge_at:
            return s.state, s.step
        if s.state is State.PAUSED:
            return State.PAUSED, s.step
        failed_to = State.ROLLED_BACK if p.on_failure is OnFailure.ROLLBACK else State.PAUSED
        if kind == "fail":
            return failed_to, s.step
        if s.state is State.BAKING:
            assert s.bake_started_at is not None
            return (State.PROMOTED if self.now >= s.bake_started_at + p.bake_s else State.BAKING), s.step
        if kind == "pass":
            if s.step < p.last_step:
                return State.PROGRESSING, s.step + 1
            return (State.BAKING if p.bake_s > 0 else State.PROMOTED), s.step
        deadline = p.progress_deadline_s
        if deadline is not None and self.now >= s.step_started_at + deadline:
            return State.PAUSED, s.step
        return State.PROGRESSING, s.step

    def expect_admin(self, s: RolloutState, action: AdminAction) -> tuple[State, int]:
        if action not in ALLOWED[s.state]:
            return s.state, s.step
        if action is AdminAction.RESTART:
            return State.PROGRESSING, 0
        if action is AdminAction.RESUME:
            assert s.paused_from is not None
            return s.paused_from, s.step
        return {AdminAction.PAUSE: State.PAUSED, AdminAction.PROMOTE: State.PROMOTED,
                AdminAction.ROLLBACK: State.ROLLED_BACK}[action], s.step

    def send(self, event: Event, want: tuple[State, int]) -> None:
        before = self.state
        self.result = handle(self.policy, before, event, self.now)
        self.state = self.result.state
        assert (self.state.state, self.state.step) == want, (event, before, self.state)
        self.check_actions(self.result, before)

    def check_actions(self, result: Result, before: RolloutState | None) -> None:
        weights = [a for a in result.actions if isinstance(a, SetWeights)]
        for a in weights:
            assert a.applied is not self.policy.dry_run
            assert sum(a.weights.values()) == 100
            if before is not None and before.state is State.PROGRESSING and self.state.state is State.PROGRESSING \
                    and self.state.step > 0:
                # Weights only go up while progressing (a restart to step 0 is a new run).
                assert a.weights["canary"] > self.canary, (self.canary, a)
            self.canary = a.weights["canary"]
        if self.state.state is State.ROLLED_BACK and (before is None or before.state is not State.ROLLED_BACK):
            assert weights and weights[-1].weights == w(0)
        if self.state.state is State.PROMOTED and (before is None or before.state is not State.PROMOTED):
            assert weights and weights[-1].weights == w(100)
        assert self.canary == self.state.weights(self.policy)["canary"]

    # -- rules -------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.5, 1.0, 30.0, 59.9, 60.0, 61.0, 150.0]))
    def wait(self, dt: float) -> None:
        self.now += dt

    @rule(kind=st.sampled_from(["pass", "fail", "thin"]))
    def tick_when_due(self, kind: str) -> None:
        if self.result.next_check_at is not None:
            self.now = max(self.now, self.result.next_check_at)
        self.send(Tick(mixed(kind)), self.expect_tick(self.state, kind))

    @rule(n=st.integers(1, 5))
    def healthy_steps(self, n: int) -> None:
        for _ in range(n):
            self.tick_when_due("pass")

    @rule(kind=st.sampled_from(["pass", "fail", "thin"]))
    def tick_now(self, kind: str) -> None:
        self.send(Tick(mixed(kind)), self.expect_tick(self.state, kind))

    @rule()
    def circuit_opens(self) -> None:
        s = self.state
        if s.state in (State.PROGRESSING, State.BAKING):
            want = State.ROLLED_BACK if self.policy.on_failure is OnFailure.ROLLBACK else State.PAUSED
        else:
            want = s.state
        self.send(CircuitOpened(), (want, s.step))

    @rule(action=st.sampled_from(list(AdminAction)))
    def admin(self, action: AdminAction) -> None:
        allowed = action in ALLOWED[self.state.state]
        self.send(Admin(action), self.expect_admin(self.state, action))
        assert (self.result.error is None) == allowed

    @rule()
    def process_restarts(self) -> None:
        saved = json.loads(json.dumps(self.state.to_dict()))
        self.result = boot(self.policy, saved, self.now)
        resumed = self.result.state
        assert replace(resumed, seen=self.state.seen, judge_at=self.state.judge_at) == self.state
        assert not any(isinstance(a, (Notify, DiscardedState)) for a in self.result.actions)
        self.state = resumed
        self.check_actions(self.result, before=None)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def a_way_out(self) -> None:
        """No state is a dead end: non-terminal ones will be ticked and can be steered on; terminal ones restart."""
        s = self.state
        if s.state.terminal:
            assert self.result.next_check_at is None
            assert ALLOWED[s.state] == {AdminAction.RESTART}
            r = handle(self.policy, s, Admin(AdminAction.RESTART), self.now)
            assert r.state.state is State.PROGRESSING and r.state.step == 0
            assert [a.weights for a in r.actions if isinstance(a, SetWeights)] == [w(self.policy.steps[0])]
        else:
            assert self.result.next_check_at is not None
            onward = [a for a in ALLOWED[s.state] if a is not AdminAction.RESTART]
            assert onward
            for a in onward:
                assert handle(self.policy, s, Admin(a), self.now).state.state is not s.state

    @invariant()
    def rolled_back_is_canary_0(self) -> None:
        if self.state.state is State.ROLLED_BACK:
            assert self.state.weights(self.policy) == w(0)

    @invariant()
    def bounded_and_serialisable(self) -> None:
        assert len(self.state.decisions) <= KEEP_DECISIONS
        assert RolloutState.from_dict(self.state.to_dict()) == self.state
        assert self.state.paused_from is None or self.state.state is State.PAUSED


RolloutMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_rollout_matches_model = RolloutMachine.TestCase
