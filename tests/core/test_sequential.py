"""The sequential error test: its formula, its state, and simulated rollouts that show its two promises.

The simulations (docs/rollout.md#simulated-rollouts) run thousands of whole rollouts at once on
a seeded numpy generator, looking every second, through the same `log_lr_increments` and
`log_mixture` that `SequentialState.update` uses. `python -m tests.core.test_sequential` prints
the figures the docs quote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.sequential import (
    DEFAULT_RATIOS,
    SequentialPolicy,
    SequentialState,
    log_lr_increments,
    log_mixture,
)

ALPHA = 0.01
STEPS = (5, 10, 25, 50, 100)  # canary weight per step, as in the config example
STEP_S = 60                   # interval: one judged minute per step, a 5-minute rollout


# ---------------------------------------------------------------------------------------------
# The formula and the state


def test_increment_is_the_binomial_likelihood_ratio():
    """Each second adds log(theta(r)/theta0) per canary failure and log((1-theta(r))/(1-theta0)) per baseline one."""
    p = SequentialPolicy(ALPHA)
    n_c, f_c, n_b, f_b = 50, 3, 950, 7
    theta0 = n_c / (n_c + n_b)
    want = []
    for r in DEFAULT_RATIOS:
        theta = n_c * r / (n_c * r + n_b)
        want.append(f_c * math.log(theta / theta0) + f_b * math.log((1 - theta) / (1 - theta0)))
    assert log_lr_increments(p, n_c, f_c, n_b, f_b) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("n_c", "f_c", "n_b", "f_b"), [(10, 3, 0, 0), (0, 0, 10, 3), (0, 0, 0, 0), (40, 0, 60, 0)])
def test_a_second_without_information_adds_nothing(n_c, f_c, n_b, f_b):
    """A second where one side had no tries, or nobody failed, leaves the evidence exactly as it was."""
    assert np.array_equal(log_lr_increments(SequentialPolicy(ALPHA), n_c, f_c, n_b, f_b), np.zeros(len(DEFAULT_RATIOS)))


def test_state_accumulates_and_rejects_a_clearly_worse_canary():
    """A canary failing 20 of 50 tries a second while its baseline fails 1 of 950 is rejected within seconds."""
    p = SequentialPolicy(ALPHA)
    s = SequentialState.new(p)
    assert s.p_value == 1.0 and s.e_value(p) == pytest.approx(1.0)
    seconds = 0
    while not s.rejected(p):
        s = s.update(p, 50, 20, 950, 1)
        seconds += 1
    assert seconds <= 2
    assert s.p_value <= ALPHA
    assert (s.canary_tries, s.canary_failures, s.baseline_tries, s.baseline_failures) == (
        50 * seconds, 20 * seconds, 950 * seconds, seconds)


def test_p_value_never_goes_back_up():
    """Once evidence has been seen, a good stretch afterwards does not erase it: the p-value only falls."""
    p = SequentialPolicy(ALPHA)
    s = SequentialState.new(p)
    s = s.update(p, 50, 5, 950, 5)
    low = s.p_value
    for _ in range(30):
        s = s.update(p, 50, 0, 950, 20)  # the canary now looks far better
        assert s.p_value == low
    assert s.e_value(p) < 1.0 / low


@given(batches=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(0, 5), st.integers(0, 5)),
                        max_size=20))
@settings(deadline=None, max_examples=60)
def test_state_round_trips_and_stays_in_range(batches):
    """Whatever the counts, the p-value is in (0, 1] and the saved state reads back the same."""
    p = SequentialPolicy(ALPHA)
    s = SequentialState.new(p)
    for n_c, n_b, f_c, f_b in batches:
        s = s.update(p, n_c, min(f_c, n_c), n_b, min(f_b, n_b))
    assert 0.0 < s.p_value <= 1.0
    assert SequentialState.from_dict(s.to_dict()) == s


def test_broken_counts_and_state_are_refused():
    """Counts with more failures than tries, or a saved state of the wrong shape, raise ValueError."""
    p = SequentialPolicy(ALPHA)
    with pytest.raises(ValueError, match="failures <= tries"):
        SequentialState.new(p).update(p, 1, 2, 0, 0)
    with pytest.raises(ValueError, match="sequential"):
        SequentialState.from_dict({"log_lr": [0.0]})
    with pytest.raises(ValueError, match="components"):
        SequentialState(log_lr=(0.0,)).update(p, 1, 0, 1, 0)


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.0}, {"alpha": 0.01, "ratios": (1.0, 2.0)},
                                    {"alpha": 0.01, "ratios": (2.0,), "weights": (0.5,)}])
def test_policy_rejects_nonsense(kwargs):
    """A test unable to hold its level (alpha outside (0, 1), a ratio <= 1, weights not summing to 1) is refused."""
    with pytest.raises(ValueError, match="must be"):
        SequentialPolicy(**kwargs)


# ---------------------------------------------------------------------------------------------
# Simulated rollouts


@dataclass(frozen=True)
class Scenario:
    name: str
    rate_per_s: float      # requests per second to the route, Poisson
    p_baseline: float
    p_canary: float
    rollouts: int
    burst: float = 1.0     # >1: in a random tenth of the seconds both sides fail this many times as often


def simulate(sc: Scenario, seed: int, alpha: float = ALPHA) -> np.ndarray:
    """Seconds until the test rejects, per simulated rollout (inf: never, over the whole rollout).

    Each second: Poisson(rate) requests, each to the canary with the step's weight; each try
    fails with its backend's probability (times `burst` in burst seconds, for both). The
    evidence is summed over the seconds and the mixture is looked at every second.
    """
    policy = SequentialPolicy(alpha)
    rng = np.random.default_rng(seed)
    seconds = len(STEPS) * STEP_S
    weight = np.repeat(np.asarray(STEPS, dtype=np.float64) / 100.0, STEP_S)
    tries = rng.poisson(sc.rate_per_s, size=(sc.rollouts, seconds))
    n_c = rng.binomial(tries, weight)
    n_b = tries - n_c
    scale = np.where(rng.random((sc.rollouts, seconds)) < 0.1, sc.burst, 1.0)
    f_c = rng.binomial(n_c, np.minimum(1.0, sc.p_canary * scale))
    f_b = rng.binomial(n_b, np.minimum(1.0, sc.p_baseline * scale))
    log_m = log_mixture(policy, np.cumsum(log_lr_increments(policy, n_c, f_c, n_b, f_b), axis=1))
    hit = log_m >= policy.threshold
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1.0, np.inf)


NULL = [
    Scenario("equal error rates, 1%, 100 req/s", 100, 0.01, 0.01, 4000),
    Scenario("equal error rates, 1%, 1000 req/s", 1000, 0.01, 0.01, 2000),
    Scenario("equal error rates, 0.1%, 1000 req/s, bursts x20", 1000, 0.001, 0.001, 2000, burst=20.0),
]
WORSE = [
    Scenario("canary 5x: 5% vs 1%, 1000 req/s", 1000, 0.01, 0.05, 2000),
    Scenario("canary 5x: 5% vs 1%, 100 req/s", 100, 0.01, 0.05, 2000),
]


@pytest.mark.parametrize("sc", NULL, ids=lambda sc: sc.name)
def test_a_canary_no_worse_fails_at_most_alpha_of_rollouts(sc):
    """A canary as good as its baseline fails at most 1% of simulated 5-minute rollouts, looked at every second."""
    first = simulate(sc, seed=15)
    false_failures = float(np.isfinite(first).mean())
    assert false_failures <= ALPHA, f"{sc.name}: {false_failures:.4f} of {sc.rollouts} rollouts failed"


def test_a_better_canary_almost_never_fails():
    """A canary that fails half as often as its baseline is (nearly) never failed by the test."""
    first = simulate(Scenario("better", 1000, 0.01, 0.005, 1000), seed=16)
    assert np.isfinite(first).mean() <= ALPHA / 10


@pytest.mark.parametrize(("sc", "median_s", "p95_s"), [(WORSE[0], 10, 20), (WORSE[1], 60, 120)],
                         ids=lambda x: getattr(x, "name", str(x)))
def test_a_canary_5x_worse_fails_fast(sc, median_s, p95_s):
    """A canary failing 5x as often as its baseline is caught in seconds at 1000 req/s, in the first steps at 100."""
    first = simulate(sc, seed=17)
    assert np.isfinite(first).all(), f"{sc.name}: some rollouts never caught it"
    assert np.median(first) <= median_s
    assert np.percentile(first, 95) <= p95_s


def peeking_z_test(sc: Scenario, seed: int, alpha: float = ALPHA) -> float:
    """Share of rollouts a fixed-horizon two-proportion z-test fails when it is looked at every second.

    The counterfactual behind `errors: sequential`: the same simulated traffic, the canary's
    and baseline's cumulative failure rates compared by the pooled one-sided z-test at
    level alpha after each second (once every expected cell is at least 5, as the
    two_proportion gate requires), failing the first time it is significant.
    """
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    seconds = len(STEPS) * STEP_S
    weight = np.repeat(np.asarray(STEPS, dtype=np.float64) / 100.0, STEP_S)
    tries = rng.poisson(sc.rate_per_s, size=(sc.rollouts, seconds))
    n_c = rng.binomial(tries, weight)
    n_b = tries - n_c
    x_c = np.cumsum(rng.binomial(n_c, sc.p_canary), axis=1).astype(np.float64)
    x_b = np.cumsum(rng.binomial(n_b, sc.p_baseline), axis=1).astype(np.float64)
    c, b = np.cumsum(n_c, axis=1).astype(np.float64), np.cumsum(n_b, axis=1).astype(np.float64)
    c, b = c[:, :-STEP_S], b[:, :-STEP_S]  # the last step has no baseline
    x_c, x_b = x_c[:, :-STEP_S], x_b[:, :-STEP_S]
    pooled = (x_c + x_b) / (c + b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / np.maximum(c, 1) + 1 / np.maximum(b, 1)))
    z = np.divide(x_c / np.maximum(c, 1) - x_b / np.maximum(b, 1), se, out=np.zeros_like(se), where=se > 0)
    # Only where the z-test's own rule (every expected cell >= 5) lets it judge: no small-count excuse.
    valid = np.minimum(c, b) * np.minimum(x_c + x_b, c + b - x_c - x_b) / (c + b) >= 5
    return float(((norm.sf(z) < alpha) & valid).any(axis=1).mean())


def test_a_fixed_horizon_test_looked_at_every_second_does_not_hold_alpha():
    """Why the sequential test exists: a z-test peeked at every second fails an equal canary far too often."""
    assert peeking_z_test(Scenario("peek", 1000, 0.01, 0.01, 1000), seed=18) > 3 * ALPHA


def test_simulation_runs_the_states_code():
    """The vectorised simulation and SequentialState.update, second by second, reach the same evidence."""
    policy = SequentialPolicy(ALPHA)
    rng = np.random.default_rng(3)
    n_c = rng.poisson(5, 120)
    n_b = rng.poisson(95, 120)
    f_c, f_b = rng.binomial(n_c, 0.05), rng.binomial(n_b, 0.01)
    log_m = log_mixture(policy, np.cumsum(log_lr_increments(policy, n_c, f_c, n_b, f_b), axis=0))
    s = SequentialState.new(policy)
    for i in range(120):
        s = s.update(policy, int(n_c[i]), int(f_c[i]), int(n_b[i]), int(f_b[i]))
        assert math.log(s.e_value(policy)) == pytest.approx(float(log_m[i]), abs=1e-9)
    assert s.max_log_m == pytest.approx(float(log_m.max()), abs=1e-9)


def main() -> None:
    """Print the figures docs/rollout.md quotes (same seeds as the tests)."""
    print(f"alpha {ALPHA}; steps {list(STEPS)} at {STEP_S}s each; looked at every second")
    for sc in NULL:
        first = simulate(sc, seed=15)
        rate = float(np.isfinite(first).mean())
        half = 1.96 * math.sqrt(max(rate, 1e-12) * (1 - rate) / sc.rollouts)
        print(f"null  | {sc.name:50s} | {sc.rollouts} rollouts | false failures {rate:.4f} (+-{half:.4f})")
    for sc in WORSE:
        first = simulate(sc, seed=17)
        print(f"worse | {sc.name:50s} | {sc.rollouts} rollouts | caught {np.isfinite(first).mean():.4f} | "
              f"median {np.median(first):.0f}s, p95 {np.percentile(first, 95):.0f}s, max {first.max():.0f}s")
    peek = Scenario("equal error rates, 1%, 1000 req/s", 1000, 0.01, 0.01, 1000)
    print(f"peek  | {peek.name:50s} | {peek.rollouts} rollouts | a z-test looked at every second fails "
          f"{peeking_z_test(peek, seed=18):.4f}")


if __name__ == "__main__":
    main()
