"""Drift statistics against scipy, their properties, and the verdict rule (docs/monitoring.md#drift)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import scipy.stats  # imported eagerly here so hypothesis never times drift's lazy import
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.core.drift import (
    DriftPolicy,
    DriftResult,
    chi2_categorical,
    judge,
    ks_2samp,
    psi_categorical,
    psi_numeric,
)
from sidecar.core.window import FeatureWindow

finite = st.floats(allow_nan=False, allow_infinity=False)
samples = st.lists(finite, min_size=1, max_size=60)
labels = st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=1, max_size=60)


def normal(seed: int, n: int, loc: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, 1.0, size=n)


def draw(seed: int, n: int, shares: list[float]) -> list[str]:
    cats = np.array(["a", "b", "c", "d"][: len(shares)], dtype=object)
    return list(cats[np.random.default_rng(seed).choice(len(shares), size=n, p=shares)])


# ---------------------------------------------------------------------------------------------
# KS


@pytest.mark.parametrize(
    ("n_ref", "n_cur"), [(5, 7), (20, 20), (50, 80), (200, 350), (1000, 1000), (2000, 1500), (3, 900)]
)
@pytest.mark.parametrize("ties", [False, True])
def test_ks_matches_scipy_asymp(n_ref, n_cur, ties):
    """The KS statistic equals scipy's, and the p-value matches scipy's asymptotic one to 1e-6."""
    rng = np.random.default_rng(n_ref * 7919 + n_cur)
    ref = rng.normal(0.0, 1.0, n_ref)
    cur = rng.normal(0.2, 1.2, n_cur)
    if ties:  # coarse values: many equal points within and across samples
        ref, cur = np.round(ref), np.round(cur)
    statistic, p = ks_2samp(ref, cur)
    expected = scipy.stats.ks_2samp(ref, cur, method="asymp")
    assert statistic == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, abs=1e-6)


@given(ref=samples, cur=samples)
@settings(deadline=None)
def test_ks_statistic_and_p_value_are_in_range(ref, cur):
    """Whatever the samples, KS reports a statistic and a p-value between 0 and 1."""
    statistic, p = ks_2samp(np.array(ref), np.array(cur))
    assert 0.0 <= statistic <= 1.0
    assert 0.0 <= p <= 1.0


@given(ref=samples, seed=st.integers(0, 2**32 - 1))
@settings(deadline=None)
def test_ks_is_zero_on_identical_samples(ref, seed):
    """A backend that sees exactly the reference values, in any order, shows no KS distance."""
    shuffled = np.random.default_rng(seed).permutation(ref)
    statistic, p = ks_2samp(np.array(ref), shuffled)
    assert statistic == 0.0
    assert p == 1.0


def test_ks_rejects_empty_or_nan_samples():
    """Broken inputs are refused with a message instead of a meaningless number."""
    with pytest.raises(ValueError, match="ref: empty"):
        ks_2samp(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="cur: sample holds NaN"):
        ks_2samp(np.array([1.0]), np.array([math.nan]))


# ---------------------------------------------------------------------------------------------
# Chi-square


@given(counts=st.lists(st.tuples(st.integers(30, 300), st.integers(30, 300)), min_size=2, max_size=6))
@settings(deadline=None, max_examples=60)
def test_chi2_matches_scipy_contingency(counts):
    """On tables without small cells, statistic, p-value and dof equal scipy's chi2_contingency."""
    ref = [f"k{j}" for j, (r, _) in enumerate(counts) for _ in range(r)]
    cur = [f"k{j}" for j, (_, c) in enumerate(counts) for _ in range(c)]
    statistic, p, dof = chi2_categorical(ref, cur)
    expected = scipy.stats.chi2_contingency(np.array(counts).T, correction=False)
    assert dof == expected.dof
    assert statistic == pytest.approx(expected.statistic, rel=1e-9, abs=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)


def test_chi2_pools_rare_categories():
    """Categories too rare for the chi-square approximation are pooled before testing."""
    ref = ["a"] * 500 + ["b"] * 500 + ["x"] * 2
    cur = ["a"] * 470 + ["b"] * 530 + ["y"] * 1
    # x and y (3 in all) are under the limit; the pool then takes "a", the next smallest.
    statistic, p, dof = chi2_categorical(ref, cur)
    pooled = np.array([[500, 502], [530, 471]])
    expected = scipy.stats.chi2_contingency(pooled, correction=False)
    assert dof == 1
    assert statistic == pytest.approx(expected.statistic, rel=1e-9)
    assert p == pytest.approx(expected.pvalue, rel=1e-9)


def test_chi2_single_category_shows_no_drift():
    """A feature with one value on both sides reports statistic 0 and p-value 1."""
    assert chi2_categorical(["US"] * 300, ["US"] * 250) == (0.0, 1.0, 0)


# ---------------------------------------------------------------------------------------------
# PSI


@given(ref=samples, cur=samples)
@settings(deadline=None)
def test_psi_numeric_is_never_negative(ref, cur):
    """PSI on any two numeric samples is a finite number >= 0."""
    psi = psi_numeric(np.array(ref), np.array(cur))
    assert psi >= 0.0
    assert math.isfinite(psi)


@given(ref=samples, seed=st.integers(0, 2**32 - 1))
@example(ref=[-1.7976931348623157e308, 1.7976931348623157e308], seed=0)  # quantiles overflow
@settings(deadline=None)
def test_psi_numeric_is_zero_on_identical_samples(ref, seed):
    """A backend that sees exactly the reference values shows a PSI of 0."""
    shuffled = np.random.default_rng(seed).permutation(ref)
    assert psi_numeric(np.array(ref), shuffled) == pytest.approx(0.0, abs=1e-12)


@given(ref=labels, cur=labels)
@settings(deadline=None)
def test_psi_categorical_is_never_negative_and_zero_on_same(ref, cur):
    """Categorical PSI is >= 0, and 0 when both sides are the same values."""
    assert psi_categorical(ref, cur) >= 0.0
    assert psi_categorical(ref, list(reversed(ref))) == pytest.approx(0.0, abs=1e-12)


def test_psi_formula_by_hand():
    """PSI is sum((c - r) * ln(c / r)) over bins cut at the reference's quantiles."""
    # bins=2: the edge is the median 1.5; ref shares (.5, .5), cur shares (.75, .25).
    psi = psi_numeric([0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 3.0], bins=2)
    assert psi == pytest.approx(0.25 * math.log(1.5) - 0.25 * math.log(0.5), rel=1e-3)


def test_psi_outer_bins_are_open_ended():
    """Values far outside the reference's range land in the outer bins and show a large PSI."""
    ref = normal(1, 1000)
    assert psi_numeric(ref, ref + 100.0) > 5.0
    assert psi_numeric(ref, ref - 100.0) > 5.0


def test_psi_handles_a_mostly_constant_reference():
    """A reference that is mostly one value (duplicate quantiles) still gives a sensible PSI."""
    ref = np.concatenate([np.zeros(900), np.arange(1.0, 101.0)])
    assert psi_numeric(ref, ref) == 0.0
    assert psi_numeric(ref, np.arange(1.0, 1001.0)) > 1.0


# ---------------------------------------------------------------------------------------------
# judge


def test_same_distribution_is_not_drifted():
    """Two seeded normal samples of 2000 from the same distribution are not flagged."""
    result = judge("amount", normal(42, 2000), normal(43, 2000), categorical=False, policy=DriftPolicy())
    assert result is not None
    assert result.test == "ks"
    assert not result.drifted
    assert result.p_value > 0.01
    assert result.psi < 0.2


def test_half_sd_shift_is_drifted():
    """A normal shifted by half a standard deviation is flagged at 500 samples a side."""
    result = judge("amount", normal(42, 500), normal(43, 500, loc=0.5), categorical=False,
                   policy=DriftPolicy())
    assert result is not None
    assert result.drifted
    assert result.p_value < 1e-6
    assert result.psi > 0.2


def test_categorical_shift_is_drifted():
    """A category mix moving from 50/30/20 to 20/30/50 is flagged by chi-square and PSI."""
    ref = draw(1, 1000, [0.5, 0.3, 0.2])
    cur = draw(2, 1000, [0.2, 0.3, 0.5])
    result = judge("country", ref, cur, categorical=True, policy=DriftPolicy())
    assert result is not None
    assert result.test == "chi2"
    assert result.drifted
    same = judge("country", ref, draw(3, 1000, [0.5, 0.3, 0.2]), categorical=True, policy=DriftPolicy())
    assert same is not None
    assert not same.drifted


def test_judge_waits_for_min_samples():
    """No verdict is given until both sides have min_samples values."""
    policy = DriftPolicy(min_samples=200)
    assert judge("x", normal(1, 199), normal(2, 5000, loc=3.0), categorical=False, policy=policy) is None
    assert judge("x", normal(1, 5000), normal(2, 199, loc=3.0), categorical=False, policy=policy) is None
    assert judge("x", normal(1, 200), normal(2, 200, loc=3.0), categorical=False, policy=policy) is not None


def test_significant_but_small_shift_needs_psi_zero_to_count():
    """A tiny but significant shift is drifted only under `psi: 0`, which judges by p alone."""
    ref, cur = normal(42, 5000), normal(43, 5000, loc=0.15)
    strict = judge("x", ref, cur, categorical=False, policy=DriftPolicy())
    p_only = judge("x", ref, cur, categorical=False, policy=DriftPolicy(psi=0))
    assert strict is not None
    assert p_only is not None
    assert strict.p_value < 0.01
    assert strict.psi < 0.2
    assert not strict.drifted
    assert p_only.drifted


def test_large_psi_alone_is_not_drift():
    """With few samples PSI is noisy; without a significant test there is no drift (docs/monitoring.md#drift: AND)."""
    result = judge("x", normal(42, 30), normal(43, 30), categorical=False, policy=DriftPolicy(min_samples=20))
    assert result is not None
    assert result.psi > 0.2
    assert result.p_value > 0.01
    assert not result.drifted


def test_judge_accepts_feature_window_snapshots():
    """Window snapshots (float and object arrays) go straight into the judge."""
    num, cat = FeatureWindow(300, categorical=False), FeatureWindow(300, categorical=True)
    for i in range(300):
        num.add(float(i % 17))
        cat.add(["US", "FR", True][i % 3])
    assert judge("n", num.values(), num.values(), categorical=False, policy=DriftPolicy()) is not None
    result = judge("c", cat.values(), cat.values(), categorical=True, policy=DriftPolicy())
    assert result is not None
    assert (result.statistic, result.p_value, result.psi, result.drifted) == (0.0, 1.0, 0.0, False)


def test_result_json_is_plain_numbers():
    """The admin API shows a verdict as plain JSON numbers and a boolean."""
    result = judge("amount", normal(42, 500), normal(43, 500, loc=0.5), categorical=False,
                   policy=DriftPolicy())
    assert isinstance(result, DriftResult)
    doc = json.loads(json.dumps(result.to_json()))
    assert doc == {
        "feature": "amount", "test": "ks", "statistic": result.statistic, "p_value": result.p_value,
        "psi": result.psi, "n_ref": 500, "n_cur": 500, "drifted": True,
    }
    assert all(type(doc[k]) is float for k in ("statistic", "p_value", "psi"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"numeric_test": "t"}, "numeric_test"),
        ({"categorical_test": "g"}, "categorical_test"),
        ({"p_value": 0.0}, "p_value"),
        ({"psi": -0.1}, "psi"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_policy_rejects_nonsense(kwargs, message):
    """A policy that could never judge sensibly is refused when built."""
    with pytest.raises(ValueError, match=message):
        DriftPolicy(**kwargs)


# ---------------------------------------------------------------------------------------------
# Cost, measured by hand (no timed asserts): `python tests/core/test_drift.py`


def bench_judge(features: int = 20, n: int = 2000, rounds: int = 20) -> None:
    """Print the time to judge `features` numeric features of `n` samples a side."""
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=n), rng.normal(0.3 * (i % 2), 1.0, size=n)) for i in range(features)]
    policy = DriftPolicy()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for i, (ref, cur) in enumerate(pairs):
            judge(f"f{i}", ref, cur, categorical=False, policy=policy)
        best = min(best, time.perf_counter() - start)
    print(f"judge: {features} numeric features x {n} samples: {best * 1e3:.1f} ms (best of {rounds})")
    cats = [draw(i, n, [0.4, 0.3, 0.2, 0.1]) for i in range(2 * features)]
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(features):
            judge(f"c{i}", cats[2 * i], cats[2 * i + 1], categorical=True, policy=policy)
        best = min(best, time.perf_counter() - start)
    print(f"judge: {features} categorical features x {n} samples: {best * 1e3:.1f} ms (best of {rounds})")


if __name__ == "__main__":
    bench_judge()
