"""Load balancing over endpoints and passive outlier ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.balance import Balance, EndpointSet, OutlierPolicy

OUTLIER = OutlierPolicy(consecutive_failures=3, eject_for_s=30.0, max_ejected=0.5)


def fail(es: EndpointSet, i: int, now: float, times: int = 1) -> list[bool]:
    """Run `times` failed tries on endpoint i; what on_finish said each time."""
    results = []
    for _ in range(times):
        es.on_start(i)
        results.append(es.on_finish(i, True, now))
    return results


def test_single_endpoint_fast_path():
    """A backend with one endpoint always uses it while it is healthy, and never ejects it."""
    es = EndpointSet(1, Balance.LEAST_REQUEST, OUTLIER)
    assert es.pick(0.0, random.random) == 0
    assert es.pick(0.0, random.random, avoid=0) == 0
    assert fail(es, 0, 0.0, times=10) == [False] * 10
    assert es.available(0.0)
    es.set_healthy(0, False)
    assert es.pick(0.0, random.random) is None
    assert not es.available(0.0)


def test_ejects_after_consecutive_failures_and_expires():
    """A replica failing 3 times in a row gets no traffic for eject_for, then comes back."""
    es = EndpointSet(2, Balance.ROUND_ROBIN, OUTLIER)
    assert fail(es, 0, 10.0, times=3) == [False, False, True]
    assert es.is_ejected(0, 10.0)
    assert es.ejected_count(10.0) == 1
    assert [es.pick(20.0, random.random) for _ in range(4)] == [1, 1, 1, 1]
    assert not es.is_ejected(0, 40.0)
    assert es.ejected_count(40.0) == 0
    assert {es.pick(40.0, random.random) for _ in range(2)} == {0, 1}


def test_success_resets_the_failure_count():
    """A replica that fails now and then, with successes in between, is never ejected."""
    es = EndpointSet(2, Balance.RANDOM, OUTLIER)
    for _ in range(10):
        fail(es, 0, 0.0, times=2)
        es.on_start(0)
        assert not es.on_finish(0, False, 0.0)
    assert not es.is_ejected(0, 0.0)


def test_a_cancelled_try_is_neither_success_nor_failure():
    """A hedge that lost its race frees its endpoint without resetting or adding to its failure count."""
    es = EndpointSet(2, Balance.RANDOM, OUTLIER)
    fail(es, 0, 0.0, times=2)
    es.on_start(0)
    es.on_cancel(0)
    assert es.inflight == [0, 0]
    assert fail(es, 0, 0.0) == [True]


def test_last_usable_endpoint_is_never_ejected():
    """When the other replica failed its health checks, the last one keeps serving even while failing."""
    es = EndpointSet(2, Balance.LEAST_REQUEST, OutlierPolicy(1, 30.0, 1.0))
    es.set_healthy(1, False)
    assert fail(es, 0, 0.0, times=5) == [False] * 5
    assert es.pick(0.0, random.random) == 0
    es.set_healthy(1, True)
    assert fail(es, 0, 0.0) == [True]  # once another is usable, the refused ejection happens
    assert es.pick(0.0, random.random) == 1


def test_max_ejected_is_a_share_rounded_down_but_at_least_one():
    """A 0.5 share of 5 replicas ejects at most 2; a 0.1 share of 3 still ejects 1."""
    assert OutlierPolicy(1, 1.0, 0.5).max_ejected_count(5) == 2
    assert OutlierPolicy(1, 1.0, 0.1).max_ejected_count(3) == 1
    assert OutlierPolicy(1, 1.0, 0.0).max_ejected_count(2) == 1
    assert OutlierPolicy(1, 1.0, 0.29).max_ejected_count(100) == 29
    assert OutlierPolicy(1, 1.0, 1.0).max_ejected_count(1) == 0
    es = EndpointSet(5, Balance.RANDOM, OutlierPolicy(1, 30.0, 0.5))
    assert [fail(es, i, 0.0)[0] for i in range(5)] == [True, True, False, False, False]
    assert es.ejected_count(0.0) == 2


def test_avoid_prefers_another_endpoint():
    """A retry goes to a different replica when one is usable, else back to the same one."""
    for balance in Balance:
        es = EndpointSet(3, balance, None)
        rng = random.Random(1).random
        assert all(es.pick(0.0, rng, avoid=1) != 1 for _ in range(50))
        es.set_healthy(0, False)
        es.set_healthy(2, False)
        assert es.pick(0.0, rng, avoid=1) == 1
        es.set_healthy(1, False)
        assert es.pick(0.0, rng, avoid=1) is None


def test_round_robin_cycles_and_skips_unusable():
    """Round robin visits replicas in turn and skips one that is down."""
    es = EndpointSet(3, Balance.ROUND_ROBIN, None)
    assert [es.pick(0.0, random.random) for _ in range(4)] == [0, 1, 2, 0]
    es.set_healthy(2, False)
    assert [es.pick(0.0, random.random) for _ in range(4)] == [1, 0, 1, 0]


def test_random_spreads_evenly():
    """Random balancing gives every replica about the same share."""
    es = EndpointSet(4, Balance.RANDOM, None)
    rng = random.Random(7).random
    counts = Counter(es.pick(0.0, rng) for _ in range(4000))
    assert all(900 < counts[i] < 1100 for i in range(4)), counts


def test_least_request_favours_the_less_loaded():
    """A replica with nothing in flight gets about 2/3 of the picks among three, by power of two choices."""
    es = EndpointSet(3, Balance.LEAST_REQUEST, None)
    es.inflight[:] = [0, 5, 5]
    rng = random.Random(3).random
    counts = Counter(es.pick(0.0, rng) for _ in range(3000))
    assert 0.62 < counts[0] / 3000 < 0.72, counts


def test_least_request_never_picks_the_busiest():
    """The replica with strictly the most requests in flight is never chosen while others are usable."""
    rng = random.Random(5).random
    es = EndpointSet(4, Balance.LEAST_REQUEST, None)
    es.inflight[:] = [1, 2, 3, 9]
    assert all(es.pick(0.0, rng) != 3 for _ in range(500))
    es.set_healthy(0, False)  # the slow path must keep the rule too
    assert all(es.pick(0.0, rng) != 3 for _ in range(500))
    es2 = EndpointSet(2, Balance.LEAST_REQUEST, None)
    es2.inflight[:] = [4, 1]
    assert all(es2.pick(0.0, rng) == 1 for _ in range(100))


def test_rng_at_its_top_stays_in_range():
    """A random draw just below 1 still picks a real replica."""
    top = 1.0 - 2**-53
    for balance in Balance:
        for n in (2, 3, 7, 1000):
            es = EndpointSet(n, balance, None)
            assert es.pick(0.0, lambda: top) in range(n)
            es.set_healthy(0, False)
            assert es.pick(0.0, lambda: top, avoid=1) in (range(2, n) or [1])


@pytest.mark.parametrize(
    "kwargs", [{"consecutive_failures": 0}, {"eject_for_s": 0.0}, {"max_ejected": 1.5}]
)
def test_outlier_policy_rejects_nonsense(kwargs):
    """An outlier policy that could never work is refused when it is built."""
    args = {"consecutive_failures": 3, "eject_for_s": 30.0, "max_ejected": 0.5} | kwargs
    with pytest.raises(ValueError, match="must be"):
        OutlierPolicy(**args)


# -- properties under random traffic ------------------------------------------------------

# Indexes are taken modulo n. The duplicated "try" and "health" entries bias scripts
# towards runs of failures and replicas going down, where ejection decisions happen.
endpoint = st.integers(0, 5)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("try"), endpoint, st.booleans()),  # on_start + on_finish at once
        st.tuples(st.just("try"), endpoint, st.just(True)),
        st.tuples(st.just("start"), endpoint),
        st.tuples(st.just("finish"), endpoint, st.booleans()),
        st.tuples(st.just("health"), endpoint, st.booleans()),
        st.tuples(st.just("health"), endpoint, st.just(False)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 5.0, 10.0, 30.0])),
        st.tuples(st.just("pick"), st.none() | endpoint),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 5),
    balance=st.sampled_from(list(Balance)),
    outlier=st.builds(
        OutlierPolicy,
        consecutive_failures=st.integers(1, 3),
        eject_for_s=st.sampled_from([1.0, 10.0, 60.0]),
        max_ejected=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    ),
    script=ops,
    seed=st.integers(0, 2**32),
)
def test_picks_and_ejections_under_any_failures(n, balance, outlier, script, seed):
    """Whatever fails, picks land on usable replicas, within max_ejected, and the last usable one stays."""
    es = EndpointSet(n, balance, outlier)
    rng = random.Random(seed).random
    now = 100.0
    limit = outlier.max_ejected_count(n)
    for op in script:
        match op:
            case ("start", int(i)):
                es.on_start(i % n)
            case ("finish" | "try", int(i), bool(failed)) if es.inflight[i % n] > 0 or op[0] == "try":
                if op[0] == "try":
                    es.on_start(i % n)
                before = es.available(now)
                ejected = es.on_finish(i % n, failed, now)
                assert failed or not ejected
                assert es.available(now) or not before  # never ejects the last usable endpoint
            case ("health", int(i), bool(ok)):
                es.set_healthy(i % n, ok)
            case ("advance", float(dt)):
                now += dt
            case ("pick", avoid):
                avoid = None if avoid is None else avoid % n
                got = es.pick(now, rng, avoid=avoid)
                usable = [j for j in range(n) if es.usable(j, now)]
                others = [j for j in usable if j != avoid]
                if not usable:
                    assert got is None
                else:
                    assert got in (others or usable), (got, usable, es)
        assert es.ejected_count(now) <= limit
        assert es.available(now) == any(es.usable(j, now) for j in range(n))
        assert es.ejected_count(now) == sum(es.is_ejected(j, now) for j in range(n))
