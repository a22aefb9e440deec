"""The fleet's decisions on a fake clock: leadership and fencing, store faults, membership,
pooled gate data and skew (sidecar/core/fleet.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.fleet import (
    SHARED_LATENCIES,
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
    afresh,
    alive,
    bounded,
    failed,
    may_judge,
    pool,
    skew,
    step_id,
    synced,
    take_afresh,
)
from sidecar.core.gates import BackendData, GatePolicy, StepData
from sidecar.core.rollout import Admin, AdminAction, RolloutPolicy, State, handle, start

P = FleetPolicy(name="f", replica="a", lease_s=10.0, sync_every_s=1.0)


def mine(epoch: int = 1, outcome: LeaseOutcome = LeaseOutcome.RENEWED) -> LeaseReply:
    return LeaseReply(outcome, "a", epoch)


def theirs(epoch: int = 2) -> LeaseReply:
    return LeaseReply(LeaseOutcome.HELD, "b", epoch)


def test_policy_refuses_a_lease_shorter_than_three_syncs():
    """A lease under 3 x sync_every leaves no time to renew it: refused."""
    with pytest.raises(ValueError, match="at least 3"):
        FleetPolicy(name="f", replica="a", lease_s=2.0, sync_every_s=1.0)
    with pytest.raises(ValueError, match="replica"):
        FleetPolicy(name="f", replica="a|b", lease_s=10.0, sync_every_s=1.0)
    assert P.ttl_s == 9.0 and P.gone_after_s == 3.0


def test_acquiring_the_lease_makes_a_leader_that_judges_until_a_period_before_its_ttl():
    """The replica that gets the lease leads, and may judge until ttl - sync_every after it sent the call."""
    v, sig = synced(P, View(), mine(1, LeaseOutcome.ACQUIRED), sent_at=100.0, now=100.1)
    assert sig == (BecameLeader(1),)
    assert v.leading and v.fence == "a|1" and v.store is StoreHealth.HEALTHY
    assert v.judge_until == 100.0 + 9.0 - 1.0
    assert may_judge(v, 107.9) == ""
    assert "not renewed" in may_judge(v, 108.0)
    # renewed: the window moves on, no new signal
    v2, sig2 = synced(P, v, mine(1), sent_at=101.0, now=101.0)
    assert sig2 == () and v2.judge_until == 109.0


def test_a_follower_never_judges_and_a_deposed_leader_stops():
    """Another holder: not leading; a leader that reads another holder loses the lead at once."""
    v, sig = synced(P, View(), theirs(), sent_at=0.0, now=0.0)
    assert sig == () and not v.leading and "not the leader (the leader is b)" in may_judge(v, 0.0)
    lead, _ = synced(P, View(), mine(1, LeaseOutcome.ACQUIRED), sent_at=0.0, now=0.0)
    v, sig = synced(P, lead, theirs(2), sent_at=12.0, now=12.0)
    assert sig == (LostLead("the lease is held by b (epoch 2)"),) and not v.leading
    assert v.max_epoch == 2 and v.fence == "b|2"


def test_partitioned_leader_stops_judging_before_its_lease_could_end():
    """A leader whose renewals fail stops judging at once (store down) and loses the lead by judge_until."""
    lead, _ = synced(P, View(), mine(3, LeaseOutcome.ACQUIRED), sent_at=0.0, now=0.0)
    v, sig = failed(P, lead, "Timeout", now=1.0)
    assert sig == (StoreDown("Timeout"),)
    assert v.leading and may_judge(v, 1.0) == "fleet store unreachable: Timeout"
    v, sig = failed(P, v, "Timeout", now=8.0)
    assert sig == (LostLead("could not renew the lease: Timeout"),) and not v.leading
    # the store would let another replica take the lease only at ttl (9 s) after the last renewal
    assert lead.judge_until < P.ttl_s


def test_store_back_raises_a_signal_and_the_first_leader_judges_afresh_once():
    """Back after an outage: StoreBack with how long it was down; the leader judges afresh once, within lease."""
    lead, _ = synced(P, View(), mine(1, LeaseOutcome.ACQUIRED), sent_at=0.0, now=0.0)
    down, _ = failed(P, lead, "ConnectionError", now=1.0)
    down, sig = failed(P, down, "ConnectionError", now=2.0)
    assert sig == () and down.down_since == 1.0
    back, sig = synced(P, down, mine(1), sent_at=5.0, now=5.0)
    assert sig == (StoreBack(4.0),) and back.store is StoreHealth.HEALTHY and back.error == ""
    back, yes = take_afresh(back, 5.0)
    assert yes
    _, again = take_afresh(back, 5.5)
    assert not again


def test_one_slow_round_does_not_restart_the_step():
    """A single failed round (down for less than 2 x sync_every) is back without judging afresh."""
    lead, _ = synced(P, View(), mine(1, LeaseOutcome.ACQUIRED), sent_at=0.0, now=0.0)
    down, _ = failed(P, lead, "TimeoutError", now=1.0)
    back, sig = synced(P, down, mine(1), sent_at=2.0, now=2.5)
    assert sig == (StoreBack(1.5),)
    assert take_afresh(back, 2.5) == (back, False)


def test_afresh_is_dropped_by_a_follower_after_a_lease():
    """A follower that comes back does not carry the duty for ever: a lease later it is gone."""
    v, _ = synced(P, View(), theirs(), sent_at=0.0, now=0.0)
    v, _ = failed(P, v, "x", now=1.0)
    v, _ = synced(P, v, theirs(), sent_at=3.0, now=3.0)
    v, yes = take_afresh(v, 3.0)
    assert not yes and v.afresh_until == 13.0
    v, _ = synced(P, v, mine(3, LeaseOutcome.ACQUIRED), sent_at=13.0, now=13.0)
    assert v.afresh_until is None
    assert take_afresh(v, 13.0) == (v, False)


def rollout_policy() -> RolloutPolicy:
    return RolloutPolicy(key="k", canary="c", baseline="s", steps=(10, 50, 100), interval_s=60.0,
                         gates=GatePolicy(min_requests=10, max_error_rate=0.1))


def test_afresh_restarts_the_steps_interval_and_not_a_terminal_rollout():
    """The interrupted step's interval starts again from now; a promoted or paused rollout is left alone."""
    rp = rollout_policy()
    st0 = start(rp, 1000.0).state
    again = afresh(rp, st0, 1030.0)
    assert again is not None and again.step == 0 and again.step_started_at == 1030.0 and again.judge_at == 1090.0
    assert step_id(again) != step_id(st0)
    paused = handle(rp, st0, Admin(AdminAction.PAUSE), 1001.0).state
    assert paused.state is State.PAUSED and afresh(rp, paused, 1030.0) is None
    promoted = handle(rp, st0, Admin(AdminAction.PROMOTE), 1001.0).state
    assert afresh(rp, promoted, 1030.0) is None


def test_members_not_seen_for_three_syncs_are_gone():
    live, gone = alive({"a": 100.0, "b": 97.5, "c": 96.9}, 100.0, P)
    assert live == ["a", "b"] and gone == ["c"]


def test_skew_names_routes_whose_rollout_config_differs():
    """Only routes the fleet has state for can be skewed."""
    assert skew({"r1": "k1", "r2": "k2", "r3": "k3"}, {"r1": "k1", "r2": "kX"}) == {"r2": ("k2", "kX")}


def data(c: tuple[int, int, int], b: tuple[int, int, int], cl: list[float], bl: list[float]) -> StepData:
    return StepData(canary=BackendData(*c, latency_s=np.array(cl)), baseline=BackendData(*b, latency_s=np.array(bl)))


def part(step: str, c: tuple[int, int, int], b: tuple[int, int, int], cl: list[float], bl: list[float]) -> Part:
    return Part(step, c, b, np.array(cl), np.array(bl))


def test_pool_sums_counts_and_pools_samples_of_the_same_step_only():
    """Counts add up over replicas; another step's data (a replica that has not caught up) is left out."""
    local = data((10, 11, 1), (90, 90, 0), [0.1], [0.2])
    parts = [part("s1", (5, 5, 5), (50, 51, 2), [0.3, 0.4], [0.5]),
             part("s0", (1000, 1000, 1000), (0, 0, 0), [9.0], [])]
    got = pool("s1", local, parts)
    assert (got.canary.requests, got.canary.tries, got.canary.failed_tries) == (15, 16, 6)
    assert (got.baseline.requests, got.baseline.tries, got.baseline.failed_tries) == (140, 141, 2)
    assert sorted(got.canary.latency_s.tolist()) == [0.1, 0.3, 0.4]
    assert got.baseline.latency_s.tolist() == [0.2, 0.5]


def test_a_canary_failing_on_one_replica_only_fails_the_pooled_error_gate():
    """The leader's own traffic is clean; the pool carries the other replica's failures to the gate."""
    from sidecar.core.gates import Verdict, judge, step_verdict
    gates = GatePolicy(min_requests=10, max_error_rate=0.1)
    local = data((20, 20, 0), (200, 200, 0), [], [])
    assert step_verdict(judge(gates, local, relative=True)) is Verdict.PASS
    pooled = pool("s", local, [part("s", (20, 20, 20), (200, 200, 0), [], [])])
    assert step_verdict(judge(gates, pooled, relative=True)) is Verdict.FAIL


@given(st.lists(st.floats(min_value=0, max_value=60, allow_nan=False, width=32), max_size=50))
def test_part_survives_its_json_form(lat):
    """A replica's part reads back as it was written (latencies as float32)."""
    p = part("k/0/1.5", (3, 4, 1), (7, 8, 2), lat, lat[::-1])
    q = Part.from_json(p.to_json())
    assert q.step == p.step and q.canary == p.canary and q.baseline == p.baseline
    assert q.canary_latency_s.tolist() == pytest.approx(lat)


@pytest.mark.parametrize("bad", [
    {}, {"step": "s", "c": [1, 2], "b": [1, 2, 3], "cl": "", "bl": ""},
    {"step": "s", "c": [1, 2, -3], "b": [1, 2, 3], "cl": "", "bl": ""},
    {"step": "s", "c": [1, 2, 3], "b": [1, 2, 3], "cl": "!!", "bl": ""},
    {"step": "s", "c": [1, 2, 3], "b": [1, 2, 3], "cl": "AAD", "bl": ""},
    {"step": "s", "c": [1, 2, 3], "b": [1, 2, 3], "cl": "AADA/w==", "bl": ""},   # NaN
])
def test_part_refuses_a_broken_shape(bad):
    with pytest.raises(ValueError, match="replica data"):
        Part.from_json(bad)


def test_bounded_sample_is_uniform_and_capped():
    rng = np.random.default_rng(1)
    assert bounded([0.1, 0.2], rng).tolist() == [0.1, 0.2]
    big = np.arange(20_000, dtype=np.float64)
    b = bounded(big.tolist(), rng)
    assert b.size == SHARED_LATENCIES and len(set(b.tolist())) == SHARED_LATENCIES
    assert math.isclose(float(np.mean(b)), float(np.mean(big)), rel_tol=0.05)


Delays = st.lists(st.tuples(st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0, 6)), min_size=1, max_size=25)


@given(st.lists(Delays, min_size=3, max_size=3))
def test_two_replicas_never_judge_at_the_same_time(schedules):
    """Against a model of the lease script, three replicas each doing rounds with any delays on the way to
    the store and back (a reply up to 6 s late: a paused process), no two replicas' judging windows overlap."""
    import heapq

    ps = [FleetPolicy(name="f", replica=r, lease_s=3.0, sync_every_s=1.0) for r in "abc"]
    views = [View(), View(), View()]
    holder, epoch, expires = "", 0, -1.0
    windows: list[tuple[int, float, float]] = []
    # (arrival at the store, replica, round index, sent at)
    heap = [(to_store + 0.1 * i, i, 0, 0.1 * i) for i, ((to_store, _, _), *_) in enumerate(schedules)]
    while heap:
        at_store, who, k, sent = heapq.heappop(heap)
        p, v = ps[who], views[who]
        if holder == p.replica and epoch == v.epoch and v.leading and at_store < expires:
            outcome, expires = LeaseOutcome.RENEWED, at_store + p.ttl_s
        elif at_store >= expires:
            holder, epoch, expires = p.replica, epoch + 1, at_store + p.ttl_s
            outcome = LeaseOutcome.ACQUIRED
        else:
            outcome = LeaseOutcome.HELD
        _, back, pause = schedules[who][k]
        now = at_store + back + pause
        views[who], _ = synced(p, v, LeaseReply(outcome, holder, epoch), sent, now)
        if may_judge(views[who], now) == "":
            windows.append((who, now, views[who].judge_until))
        if k + 1 < len(schedules[who]):
            nxt = now + p.sync_every_s
            heapq.heappush(heap, (nxt + schedules[who][k + 1][0], who, k + 1, nxt))
    for i, (a, s1, e1) in enumerate(windows):
        for b, s2, e2 in windows[i + 1:]:
            assert a == b or e1 <= s2 or e2 <= s1, (a, s1, e1, b, s2, e2)
