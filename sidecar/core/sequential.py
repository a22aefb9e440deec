"""`compare.errors: sequential`: an always-valid test that the canary fails more often than its baseline.

Owns the test's policy (`SequentialPolicy`), its running state (`SequentialState`, a plain
value that is serialised with the rollout) and the one formula both use
(`log_lr_increments`, written on numpy arrays so that tests/core/test_sequential.py
simulates thousands of rollouts with the very code the rollout runs).

The model (docs/rollout.md#the-sequential-error-test). Every second the shell reports,
for the second just gone, the canary's tries n_c and failed tries f_c and the baseline's
n_b and f_b. Conditional on the second's F = f_c + f_b failures, each failure is the
canary's with probability

    theta(r) = n_c * r / (n_c * r + n_b)        r = p_canary / p_baseline

(the Poisson-process formulation of Lindon, Sanden and Shirikian, "Rapid Regression
Detection in Software Deployments through Sequential Testing", KDD 2022, section 4: merge
the two failure streams and ask whose each failure is). The null is r <= 1, where
theta0 = theta(1) = n_c / (n_c + n_b) is just the canary's share of the second's tries.
For an alternative r_k > 1 the second's likelihood ratio is, in logs,

    f_c * log(theta(r_k)/theta0) + f_b * log((1-theta(r_k))/(1-theta0))
        = f_c * log(r_k) - F * log(1 + theta0 * (r_k - 1))

The test statistic is a mixture over a fixed grid of ratios with prior weights w_k:

    M_t = sum_k w_k * exp(S_k(t)),   S_k(t) = the sum of those terms over the seconds so far

and the canary fails the first time M_t >= 1/alpha. The always-valid p-value is
min(1, 1 / max_{s<=t} M_s).

Why it holds alpha however often it is looked at: under the null each second's ratio has
conditional mean <= 1, so every exp(S_k) and their mixture M_t are non-negative
supermartingales with M_0 = 1, and Ville's inequality gives P(sup_t M_t >= 1/alpha) <= alpha
(Robbins 1970; Howard, Ramdas, McAuliffe and Sekhon, Annals of Statistics 2021). The mean is
<= 1, not only approximately 1, for three reasons: (a) given F, the canary's share of
failures in a second is hypergeometric when p_c = p_b (tries are draws without replacement
from the second's n_c + n_b tries), and a hypergeometric is smaller in convex order than the
binomial with the same mean (Hoeffding 1963, theorem 4), while the ratio is convex in f_c;
(b) p_c < p_b shifts f_c down (Fisher's non-central hypergeometric, odds ratio < 1) and the
ratio increases in f_c, since every r_k > 1; (c) the allocation (the step's weights) may
change from second to second: theta0 is recomputed per second, so steps 5 -> 10 -> 25 -> 50
need no correction. A second in which one side had no tries contributes exactly 0.

Lindon et al. put a conjugate Beta mixture on theta for a fixed allocation; a rollout changes
its allocation at every step, so here the mixture is over the ratio r, which keeps one meaning
across steps, on a log-spaced grid (a discretised log-uniform prior: exact, no numerical
integration). A canary at ratio r is detected once log(w_k) + S_k passes log(1/alpha) for an
r_k near r; a finer grid costs log(K) in that margin.

NOTE, approximations the proof does not cover: tries are assumed independent given their
second, so a retry of a failed canary try that goes to the baseline (`other_backend`), which
ties a baseline try to a canary failure, is outside the model (it adds baseline tries with the
baseline's own failure chance: the effect on the test is small, not nil); and the shell's
per-second counts are taken as they come, so a try that straddles two seconds is counted in
the second it ended.

Imports: the standard library and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]
ArrayLike: TypeAlias = "npt.NDArray[Any] | float | int"

# The mixture's grid of failure-rate ratios r = p_canary / p_baseline, equal prior weights.
# 1.25 is about the smallest regression a rollout's traffic can show; 50 covers a canary that
# fails most of its tries against a healthy baseline. See the module docstring for the cost.
DEFAULT_RATIOS: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)

# How often the rollout feeds the test: judged every second (docs/rollout.md#the-sequential-error-test).
EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class SequentialPolicy:
    """The test's constants: level `alpha` and the mixture grid (ratios > 1, weights sum 1)."""

    alpha: float
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    weights: tuple[float, ...] = ()  # () = equal weights
    # Derived once: log(r_k), log(w_k), log(1/alpha).
    _log_ratios: FloatArray = field(init=False, repr=False, compare=False)
    _log_weights: FloatArray = field(init=False, repr=False, compare=False)
    threshold: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not self.ratios or not all(math.isfinite(r) and r > 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be finite numbers > 1, got {self.ratios}")
        weights = self.weights or tuple(1.0 / len(self.ratios) for _ in self.ratios)
        if len(weights) != len(self.ratios) or not all(w > 0.0 for w in weights) \
                or not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be one positive number per ratio, summing to 1, got {self.weights}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "_log_ratios", np.log(np.asarray(self.ratios, dtype=np.float64)))
        object.__setattr__(self, "_log_weights", np.log(np.asarray(weights, dtype=np.float64)))
        object.__setattr__(self, "threshold", math.log(1.0 / self.alpha))

    @property
    def log_ratios(self) -> FloatArray:
        return self._log_ratios

    @property
    def log_weights(self) -> FloatArray:
        return self._log_weights


def log_lr_increments(
    policy: SequentialPolicy,
    canary_tries: ArrayLike,
    canary_failures: ArrayLike,
    baseline_tries: ArrayLike,
    baseline_failures: ArrayLike,
) -> FloatArray:
    """The log likelihood ratio each batch of counts adds to each mixture component.

    Arguments broadcast together (scalars, or arrays of any shape S); the result has shape
    S + (K,), K the number of ratios: f_c * log(r_k) - F * log(1 + theta0 * (r_k - 1)).
    A batch where either side had no tries adds exactly 0 (theta0 is 0 or 1 and the two
    terms cancel), and so does a batch without failures.
    """
    n_c = np.asarray(canary_tries, dtype=np.float64)
    n_b = np.asarray(baseline_tries, dtype=np.float64)
    # Batches where one side had no tries carry no information: their failures are zeroed
    # here rather than masking the (..., K) result, which is the costly array.
    both = (n_c > 0) & (n_b > 0)
    f_c = np.where(both, np.asarray(canary_failures, dtype=np.float64), 0.0)
    fails = f_c + np.where(both, np.asarray(baseline_failures, dtype=np.float64), 0.0)
    total = n_c + n_b
    theta0 = np.divide(n_c, total, out=np.zeros_like(total), where=both)
    r_minus_1 = np.expm1(policy.log_ratios)
    out: FloatArray = f_c[..., None] * policy.log_ratios - fails[..., None] * np.log1p(theta0[..., None] * r_minus_1)
    return out


def log_mixture(policy: SequentialPolicy, log_lr: FloatArray) -> FloatArray:
    """log M = log sum_k w_k exp(S_k) over the last axis, computed without overflow."""
    a = log_lr + policy.log_weights
    top = np.max(a, axis=-1)
    return np.asarray(top + np.log(np.sum(np.exp(a - top[..., None]), axis=-1)), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class SequentialState:
    """The test over the rollout so far: a value, replaced by `update`, serialised with the rollout.

    `log_lr` holds S_k per ratio; `max_log_m` the largest log M_t seen (once it reaches
    log(1/alpha) the canary has failed, and stays failed until the rollout restarts).
    The four totals are what the test has seen, for reports.
    """

    log_lr: tuple[float, ...]
    max_log_m: float = 0.0
    canary_tries: int = 0
    canary_failures: int = 0
    baseline_tries: int = 0
    baseline_failures: int = 0

    @classmethod
    def new(cls, policy: SequentialPolicy) -> SequentialState:
        return cls(log_lr=tuple(0.0 for _ in policy.ratios))

    def update(
        self,
        policy: SequentialPolicy,
        canary_tries: int,
        canary_failures: int,
        baseline_tries: int,
        baseline_failures: int,
    ) -> SequentialState:
        """The state after one more batch of counts (a second's, or any span's)."""
        if min(canary_tries, canary_failures, baseline_tries, baseline_failures) < 0 \
                or canary_failures > canary_tries or baseline_failures > baseline_tries:
            raise ValueError(
                f"counts must be >= 0 with failures <= tries, got canary {canary_failures}/{canary_tries}, "
                f"baseline {baseline_failures}/{baseline_tries}")
        if len(self.log_lr) != len(policy.ratios):
            raise ValueError(f"state has {len(self.log_lr)} components, policy {len(policy.ratios)}")
        inc = log_lr_increments(policy, canary_tries, canary_failures, baseline_tries, baseline_failures)
        log_lr = np.asarray(self.log_lr, dtype=np.float64) + inc
        log_m = float(log_mixture(policy, log_lr))
        return SequentialState(
            log_lr=tuple(float(x) for x in log_lr),
            max_log_m=max(self.max_log_m, log_m),
            canary_tries=self.canary_tries + canary_tries,
            canary_failures=self.canary_failures + canary_failures,
            baseline_tries=self.baseline_tries + baseline_tries,
            baseline_failures=self.baseline_failures + baseline_failures,
        )

    def rejected(self, policy: SequentialPolicy) -> bool:
        """Whether the canary has been shown to fail more often than its baseline, at level alpha."""
        return self.max_log_m >= policy.threshold

    @property
    def p_value(self) -> float:
        """The always-valid p-value: min(1, 1 / max_t M_t)."""
        return min(1.0, math.exp(-self.max_log_m))

    def e_value(self, policy: SequentialPolicy) -> float:
        """M_t now: the evidence against "no worse" (1 at the start; 1/alpha rejects)."""
        log_m = float(log_mixture(policy, np.asarray(self.log_lr, dtype=np.float64)))
        return math.inf if log_m > 700.0 else math.exp(log_m)

    def to_dict(self) -> dict[str, Any]:
        return {
            "log_lr": list(self.log_lr),
            "max_log_m": self.max_log_m,
            "canary_tries": self.canary_tries,
            "canary_failures": self.canary_failures,
            "baseline_tries": self.baseline_tries,
            "baseline_failures": self.baseline_failures,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequentialState:
        """Inverse of to_dict; ValueError on a broken shape."""
        try:
            log_lr = tuple(float(x) for x in d["log_lr"])
            out = cls(
                log_lr=log_lr,
                max_log_m=float(d["max_log_m"]),
                canary_tries=int(d["canary_tries"]),
                canary_failures=int(d["canary_failures"]),
                baseline_tries=int(d["baseline_tries"]),
                baseline_failures=int(d["baseline_failures"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"sequential: {e!r}") from e
        if not all(math.isfinite(x) for x in (*log_lr, out.max_log_m)):
            raise ValueError("sequential: non-finite statistic")
        return out
