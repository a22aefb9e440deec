"""Drift statistics: is a backend's feature distribution different from its reference?

Owns the tests (`ks_2samp` for numeric features, `chi2_categorical` for categorical ones),
the effect size (`psi_numeric`, `psi_categorical`), and the one rule that turns them into a
verdict (`judge`, under a `DriftPolicy`, giving a `DriftResult`). Everything is a function
on arrays: the caller (shell/monitor.py) snapshots `FeatureWindow.values()` on the loop and
may run `judge` in a worker thread, on a schedule, never per request.

Inputs: numeric samples are 1-D float arrays (or sequences) of finite values; categorical
samples are sequences or object arrays of `str` (as produced by `window.as_category`). Both
sides must be non-empty; a broken input raises ValueError.

Imports: the standard library and numpy; scipy.stats only lazily, inside the functions that
need a p-value, so importing this module (and the whole of `sidecar.core`) stays cheap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]
NumericSample: TypeAlias = "npt.NDArray[Any] | Sequence[float]"
CategoricalSample: TypeAlias = "npt.NDArray[Any] | Sequence[str]"
_Sample: TypeAlias = "npt.NDArray[Any] | Sequence[Any]"

NUMERIC_TESTS = frozenset({"ks"})
CATEGORICAL_TESTS = frozenset({"chi2"})

# Cochran's rule for the chi-square approximation: every expected count at least 5. Columns
# of the contingency table that fall short are pooled into one "other" column (see
# `_pool_rare`), so a few one-off categories cannot produce a tiny, meaningless p-value.
MIN_EXPECTED = 5.0


# ---------------------------------------------------------------------------------------------
# Tests


def ks_2samp(ref: NumericSample, cur: NumericSample) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: (statistic D, p-value).

    D = max |F_ref(x) - F_cur(x)| over all sample points, the empirical CDFs evaluated with
    `searchsorted(side="right")` so ties are handled exactly; D is in [0, 1] and exactly 0
    when both samples hold the same values. Identical to scipy.stats.ks_2samp's statistic.

    The p-value is scipy.stats.ks_2samp's `method="asymp"`: `kstwo.sf(D, round(en))` with
    the effective size en = n_ref * n_cur / (n_ref + n_cur). NOTE: scipy's default
    `method="auto"` computes the *exact* distribution when both samples have at most 10000
    values; that costs O(n_ref * n_cur) for unequal sizes. Near the levels that matter (exact
    p between 0.001 and 0.05) the asymptotic p-value runs 10-14% below the exact one at 200
    samples a side and 3-4% below at 2000: slightly eager, and PSI must agree anyway. One
    deviation from scipy: en is at least 1 (scipy rounds 1 vs 1 samples to n=0 and returns
    NaN; we return the p-value for n=1). The asymptotic p-value means little for a handful
    of samples either way; `DriftPolicy.min_samples` keeps `judge` away from them.
    """
    a = np.sort(_numeric(ref, "ref"))
    b = np.sort(_numeric(cur, "cur"))
    n_a, n_b = a.size, b.size
    both = np.concatenate((a, b))
    cdf_a = np.searchsorted(a, both, side="right") / n_a
    cdf_b = np.searchsorted(b, both, side="right") / n_b
    d = float(np.max(np.abs(cdf_a - cdf_b)))

    from scipy.stats import kstwo  # lazy: see module docstring

    m, n = float(max(n_a, n_b)), float(min(n_a, n_b))
    n_eff = max(1.0, float(np.round(m * n / (m + n))))
    p = float(kstwo.sf(d, n_eff))
    return d, min(1.0, max(0.0, p))


def chi2_categorical(ref: CategoricalSample, cur: CategoricalSample) -> tuple[float, float, int]:
    """Pearson chi-square test of homogeneity: (statistic, p-value, degrees of freedom).

    The table is 2 x K: category counts of ref and cur over the union of their categories.
    Expected counts are row total * column total / grand total; the statistic is
    sum((observed - expected)^2 / expected); the p-value is `scipy.stats.chi2.sf(stat, K-1)`.
    No Yates continuity correction, also for K = 2 (scipy.stats.chi2_contingency applies one
    by default when dof = 1; compare with `correction=False`).

    Rare categories: a column whose smaller expected count is under 5 is pooled with the
    other such columns into one "other" column; if the pool is itself still under 5, the
    next-smallest categories join it until it is not (or nothing is left). Tables without
    small cells are tested unchanged. When fewer than two columns remain (one category only,
    or too few samples to say anything), the result is (0.0, 1.0, 0): no evidence of drift.
    """
    r, c = _category_counts(ref, cur)
    return _chi2_from_counts(r, c)


# ---------------------------------------------------------------------------------------------
# Effect size


def psi_numeric(ref: NumericSample, cur: NumericSample, bins: int = 10, eps: float = 1e-4) -> float:
    """Population Stability Index of cur against ref, binned at ref's quantiles.

    Edges are ref's 1/bins, 2/bins, ... quantiles (deciles by default; numpy's linear
    method), with duplicate edges removed (a reference with many equal values gets fewer
    bins); the outer bins are open to -inf and +inf, and a bin is [lower edge, upper edge).
    With r_i, c_i the shares of ref and cur in bin i:

        r_i, c_i <- max(share, eps), then each side renormalised to sum to 1
        PSI = sum_i (c_i - r_i) * ln(c_i / r_i)

    Every term is >= 0 (the two factors share their sign), so PSI >= 0, and it is exactly 0
    when both sides fall into the bins in the same proportions (identical samples included).
    Read it as: < 0.1 stable, 0.1-0.2 moderate, > 0.2 material shift. NOTE: with n samples a
    side, sampling noise alone adds about (bins - 1) * (1/n_ref + 1/n_cur) on average.
    NOTE: a constant reference has a single edge, so a current sample that moves entirely
    above it is not seen by PSI (KS sees it).
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    a = _numeric(ref, "ref")
    b = _numeric(cur, "cur")
    r, c = _binned_counts(a, b, bins)
    return _psi(r, c, eps)


def psi_categorical(ref: CategoricalSample, cur: CategoricalSample, eps: float = 1e-4) -> float:
    """Population Stability Index over the union of both sides' categories.

    Same formula and smoothing as `psi_numeric`, one bin per category (no pooling: eps
    already keeps a category seen on one side only finite). A category new in cur with share
    s contributes about s * ln(s / eps), so new categories weigh heavily, as they should.
    """
    r, c = _category_counts(ref, cur)
    return _psi(r, c, eps)


# ---------------------------------------------------------------------------------------------
# Verdict


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    """How a route judges drift (`monitor.drift`, docs/monitoring.md#drift); built once per config."""

    numeric_test: str = "ks"
    categorical_test: str = "chi2"
    p_value: float = 0.01   # significant when the test's p-value is under this
    psi: float = 0.2        # material when PSI is over this; 0 = judge by the p-value alone
    min_samples: int = 200  # per side, before any verdict

    def __post_init__(self) -> None:
        if self.numeric_test not in NUMERIC_TESTS:
            raise ValueError(f"numeric_test: unknown test {self.numeric_test!r} (known: ks)")
        if self.categorical_test not in CATEGORICAL_TESTS:
            raise ValueError(
                f"categorical_test: unknown test {self.categorical_test!r} (known: chi2)")
        if not 0.0 < self.p_value <= 1.0:
            raise ValueError(f"p_value must be in (0, 1], got {self.p_value}")
        if not (math.isfinite(self.psi) and self.psi >= 0.0):
            raise ValueError(f"psi must be a finite number >= 0, got {self.psi}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")


@dataclass(frozen=True, slots=True)
class DriftResult:
    """One feature's verdict: what was tested, on how much data, and whether it drifted."""

    feature: str
    test: str          # "ks" | "chi2": the `test` label of drift_statistic
    statistic: float   # KS D in [0, 1], or the chi-square statistic
    p_value: float
    psi: float
    n_ref: int
    n_cur: int
    drifted: bool

    def to_json(self) -> dict[str, Any]:
        """Admin JSON shape: plain numbers and a boolean."""
        return {
            "feature": self.feature,
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "psi": self.psi,
            "n_ref": self.n_ref,
            "n_cur": self.n_cur,
            "drifted": self.drifted,
        }


def judge(
    feature: str,
    ref: NumericSample | CategoricalSample,
    cur: NumericSample | CategoricalSample,
    categorical: bool,
    policy: DriftPolicy,
) -> DriftResult | None:
    """Test cur against ref under `policy`; None until both sides have `min_samples`.

    The rule (docs/monitoring.md#drift): drifted when the test is significant (p-value < `p_value`) AND the
    effect is material (PSI > `psi`); with `psi: 0` the p-value alone decides. (An issue
    text read "p-value under p_value OR PSI over psi"; the docs settle it as AND: with
    thousands of samples a tiny, harmless shift is significant, and with few samples PSI is
    noisy, so either alone raises false alarms.) Numeric features use KS and PSI over
    ref's deciles; categorical ones chi-square and PSI over categories.
    """
    n_ref, n_cur = len(ref), len(cur)
    if n_ref < policy.min_samples or n_cur < policy.min_samples:
        return None
    if categorical:
        r, c = _category_counts(ref, cur)
        statistic, p, _ = _chi2_from_counts(r, c)
        psi = _psi(r, c, 1e-4)
        test = policy.categorical_test
    else:
        a = _numeric(ref, "ref")
        b = _numeric(cur, "cur")
        statistic, p = ks_2samp(a, b)
        psi = _psi(*_binned_counts(a, b, 10), 1e-4)
        test = policy.numeric_test
    material = policy.psi <= 0.0 or psi > policy.psi
    return DriftResult(
        feature=feature,
        test=test,
        statistic=statistic,
        p_value=p,
        psi=psi,
        n_ref=n_ref,
        n_cur=n_cur,
        drifted=p < policy.p_value and material,
    )


# ---------------------------------------------------------------------------------------------
# Internals


def _numeric(x: _Sample, side: str) -> FloatArray:
    """x as a 1-D float64 array; ValueError when empty, not 1-D or not all finite."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{side}: expected a 1-D sample, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{side}: empty sample")
    if not np.isfinite(a).all():
        raise ValueError(f"{side}: sample holds NaN or infinite values")
    return a


def _category_counts(ref: _Sample, cur: _Sample) -> tuple[FloatArray, FloatArray]:
    """Counts of each category of the union, in sorted category order, for ref and cur.

    Counted with a dict (Counter) rather than np.unique: strings hash once and no sort of
    the samples or fixed-width unicode array is needed.
    """
    rc: Counter[Any] = Counter(ref)
    cc: Counter[Any] = Counter(cur)
    if not rc:
        raise ValueError("ref: empty sample")
    if not cc:
        raise ValueError("cur: empty sample")
    cats = sorted(rc.keys() | cc.keys())  # sorted: deterministic tie-breaks when pooling
    r = np.array([rc.get(k, 0) for k in cats], dtype=np.float64)
    c = np.array([cc.get(k, 0) for k in cats], dtype=np.float64)
    return r, c


def _pool_rare(r: FloatArray, c: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Pool the columns whose smaller expected count is under MIN_EXPECTED (chi2 docstring).

    A column's expected counts are its total times each row's share, so its smaller one is
    total * min(n_ref, n_cur) / N: "rare" is simply a column total under a limit, and the
    smallest columns are the ones pooled. Ties go by category order (argsort is stable).
    """
    col = r + c
    n_r, n_c = float(r.sum()), float(c.sum())
    limit = MIN_EXPECTED * (n_r + n_c) / min(n_r, n_c)
    order = np.argsort(col, kind="stable")
    pooled = int(np.count_nonzero(col < limit))
    if pooled == 0:
        return r, c
    cum = np.cumsum(col[order])
    while pooled < col.size and cum[pooled - 1] < limit:
        pooled += 1
    keep, pool = order[pooled:], order[:pooled]
    return (np.append(r[keep], r[pool].sum()), np.append(c[keep], c[pool].sum()))


def _chi2_from_counts(r: FloatArray, c: FloatArray) -> tuple[float, float, int]:
    r, c = _pool_rare(r, c)
    k = r.size
    if k < 2:
        return 0.0, 1.0, 0
    n_r, n_c = float(r.sum()), float(c.sum())
    n = n_r + n_c
    col = r + c
    e_r = col * (n_r / n)
    e_c = col * (n_c / n)
    statistic = float(np.sum((r - e_r) ** 2 / e_r) + np.sum((c - e_c) ** 2 / e_c))
    dof = k - 1

    from scipy.stats import chi2  # lazy: see module docstring

    return statistic, float(chi2.sf(statistic, dof)), dof


def _binned_counts(a: FloatArray, b: FloatArray, bins: int) -> tuple[FloatArray, FloatArray]:
    """Counts of a and b in bins cut at a's quantiles (psi_numeric docstring)."""
    # Linear interpolation between two values near the float maximum overflows (inf, or nan
    # from inf - inf); such an edge is dropped: the two bins it would split become one.
    with np.errstate(over="ignore", invalid="ignore"):
        edges = np.quantile(a, np.arange(1, bins) / bins)
    edges = np.unique(edges[np.isfinite(edges)])
    nbins = edges.size + 1
    r = np.bincount(np.searchsorted(edges, a, side="right"), minlength=nbins)
    c = np.bincount(np.searchsorted(edges, b, side="right"), minlength=nbins)
    return r.astype(np.float64), c.astype(np.float64)


def _psi(r: FloatArray, c: FloatArray, eps: float) -> float:
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    p = np.maximum(r / r.sum(), eps)
    q = np.maximum(c / c.sum(), eps)
    p /= p.sum()
    q /= q.sum()
    # Each term is >= 0 in floating point too: q > p gives q/p >= 1 and log >= 0, and the
    # other way round. max() only turns a sum of -0.0 terms into 0.0.
    return max(0.0, float(np.sum((q - p) * np.log(q / p))))
