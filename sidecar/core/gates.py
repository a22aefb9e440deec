"""Rollout gates: one step's data in, a `pass` / `fail` / `inconclusive` / `skipped` verdict per gate out.

Owns the shape of a step's data (`StepData`: what the canary and the baseline did since the
step started, filled by the shell from the monitor's windows and counters), the gates'
thresholds (`GatePolicy`, built once per config), each gate's rule, and the rule that turns
the gates' verdicts into the step's (`step_verdict`). docs/rollout.md#gates says the same for
users; the order of `judge`'s results is the order of that page's table.

Every gate returns a `GateResult`: its value, its threshold, the sample sizes it was judged
on, a one-line reason and, when inconclusive, what it still needs (`needs`). Verdicts:

    skipped       a relative gate at a step where the baseline's weight is 0 (nothing to compare)
    inconclusive  too little data: fewer than `min_requests` canary requests (every gate), or
                  fewer than `min_items` (30) baseline requests for a relative gate, joined
                  feedbacks for a feedback gate, compared mirrors for `min_agreement`
    fail          the threshold is crossed (or a comparison is significant at `alpha`)
    pass          otherwise

Thresholds are inclusive on the passing side: an error rate equal to `max_error_rate`
passes, an agreement equal to `min_agreement` passes (within float rounding: `_at_most`).

Relative comparisons (docs/rollout.md#the-statistics), each one-sided, failing only when the
canary is worse:
- latency: Mann-Whitney U, `scipy.stats.mannwhitneyu(canary, baseline, alternative="greater")`;
- errors, `two_proportion`: the pooled two-proportion z-test (`scipy.stats.norm.sf`) while
  every expected cell of the 2x2 table is at least 5 (Cochran's rule), else Fisher's exact
  test, `scipy.stats.fisher_exact(..., alternative="greater")`. Fisher, not Boschloo or
  Barnard: all three are exact, and Boschloo is uniformly more powerful, but the
  unconditional tests enumerate every (n_canary + 1) x (n_baseline + 1) table and maximise
  over a nuisance parameter numerically (scipy: shgo over Sobol points); on tables of a few
  hundred to a few thousand tries that took 0.04 s to 4.7 s here (scipy 1.17), unpredictably,
  and small *counts* of failures come with large counts of tries. Fisher costs O(failures)
  whatever the traffic. Its conservatism on sparse counts is what `errors: sequential`
  (sidecar.core.sequential) is for;
- errors, `sequential`: judged by the rollout every second; `errors_sequential` reports it.

Imports: the standard library, numpy, sidecar.core.drift and sidecar.core.sequential;
scipy.stats lazily, inside the comparisons, as sidecar.core.drift does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from sidecar.core.drift import DriftResult
from sidecar.core.feedback import Metric
from sidecar.core.sequential import SequentialPolicy, SequentialState

FloatArray: TypeAlias = npt.NDArray[np.float64]
_Rule: TypeAlias = "Callable[[], GateResult]"

# docs/rollout.md#enough-data: a relative gate needs this many baseline items of its kind.
MIN_ITEMS = 30
# Cochran's rule: the z-test's normal approximation wants every expected count >= 5.
MIN_EXPECTED = 5.0


def _at_most(value: float, limit: float) -> bool:
    """value <= limit, forgiving float rounding of a computed value.

    NOTE: ratios and differences are a rounding away from what the operator wrote: 0.45 /
    0.3 is 1.5000000000000002 and 0.9 - 0.88 is 0.020000000000000018. A threshold is
    inclusive, so a value within 1e-9 (relative) of it counts as equal.
    """
    return value <= limit or math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)


def _at_least(value: float, limit: float) -> bool:
    return value >= limit or math.isclose(value, limit, rel_tol=1e-9, abs_tol=1e-12)


class Verdict(StrEnum):
    """A gate's verdict, and a step's (never `skipped` for a step)."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"


# `feedback.metric`: which way is better decides what a floor and a drop mean (one enum, the
# feedback module's; the gates' name for it)
FeedbackMetric = Metric


class CompareLatency(StrEnum):
    MANN_WHITNEY = "mann_whitney"


class CompareErrors(StrEnum):
    TWO_PROPORTION = "two_proportion"
    SEQUENTIAL = "sequential"


# ---------------------------------------------------------------------------------------------
# The step's data


@dataclass(frozen=True, slots=True)
class MetricValue:
    """A feedback metric over the step's joined feedbacks; `value` is None when `count` is 0."""

    value: float | None
    count: int

    def __post_init__(self) -> None:
        if self.count < 0 or (self.count > 0) != (self.value is not None):
            raise ValueError(f"MetricValue needs count >= 0 and a value exactly when count > 0, got {self}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"MetricValue: value must be finite, got {self.value}")


@dataclass(frozen=True, slots=True)
class BackendData:
    """What one backend (the canary or the baseline) did since the step started.

    requests      client requests answered by it (`min_requests` counts the canary's)
    tries         tries sent to it, retries and hedges included
    failed_tries  of those, failed ones (docs/resilience.md: connect error, timeout, reset, 5xx);
                  the error rate is failed_tries / tries, whether or not a retry rescued the client
    latency_s     latencies of its tries in the step, seconds: all of them or a uniform sample
                  (the fleet pools bounded per-replica samples); order does not matter
    feedback      the feedback metric over the step's joined feedbacks of its predictions
    segments      the same per feedback segment and value: {segment: {value: MetricValue}}
    """

    requests: int = 0
    tries: int = 0
    failed_tries: int = 0
    latency_s: FloatArray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    feedback: MetricValue | None = None
    segments: Mapping[str, Mapping[str, MetricValue]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if min(self.requests, self.tries, self.failed_tries) < 0 or self.failed_tries > self.tries:
            raise ValueError(
                f"BackendData needs counts >= 0 and failed_tries <= tries, got requests={self.requests} "
                f"tries={self.tries} failed_tries={self.failed_tries}")
        lat = np.asarray(self.latency_s, dtype=np.float64)
        if lat.ndim != 1 or not np.isfinite(lat).all():
            raise ValueError("BackendData.latency_s must be a 1-D array of finite seconds")
        object.__setattr__(self, "latency_s", lat)

    @property
    def error_rate(self) -> float | None:
        return self.failed_tries / self.tries if self.tries else None


@dataclass(frozen=True, slots=True)
class Agreement:
    """Shadow agreement over the step (docs/rollout.md#gates, `min_agreement`)."""

    compared: int
    agreed: int

    def __post_init__(self) -> None:
        if not 0 <= self.agreed <= self.compared:
            raise ValueError(f"Agreement needs 0 <= agreed <= compared, got {self.agreed}/{self.compared}")


@dataclass(frozen=True, slots=True)
class StepData:
    """Everything the gates judge, for the current step only (docs/rollout.md#judging).

    drift      per feature named in `no_drift`: the canary-vs-baseline verdict of
               `sidecar.core.drift.judge` on the step's samples (baseline as the reference),
               or None while either side has fewer than `drift.min_samples`
    agreement  when the route mirrors to the canary, that mirror's agreement; otherwise the
               agreement of the route's mirrors on the requests the canary answered; None
               when nothing was compared
    """

    canary: BackendData
    baseline: BackendData
    drift: Mapping[str, DriftResult | None] = field(default_factory=dict)
    agreement: Agreement | None = None


# ---------------------------------------------------------------------------------------------
# Policy and results


@dataclass(frozen=True, slots=True)
class GatePolicy:
    """`rollout.min_requests` and `rollout.gates`, compiled. A gate set to None (or ()) is off."""

    min_requests: int
    max_error_rate: float | None = None
    max_p99_s: float | None = None
    max_p99_ratio: float | None = None
    no_drift: tuple[str, ...] = ()
    min_agreement: float | None = None
    min_feedback: float | None = None
    max_feedback_drop: float | None = None
    max_segment_drop: float | None = None
    feedback_metric: FeedbackMetric | None = None  # `feedback.metric`; needed by the feedback gates
    compare_latency: CompareLatency | None = None
    compare_errors: CompareErrors | None = None
    alpha: float = 0.01  # `compare.alpha`
    min_items: int = MIN_ITEMS
    # Derived once: the sequential test's policy when `compare.errors` is `sequential`.
    sequential: SequentialPolicy | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.min_requests < 0:
            raise ValueError(f"min_requests must be >= 0, got {self.min_requests}")
        if self.min_items < 1:
            raise ValueError(f"min_items must be >= 1, got {self.min_items}")
        for name in ("max_error_rate", "min_agreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("max_p99_s", "max_p99_ratio", "max_feedback_drop", "max_segment_drop"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.min_feedback is not None and not math.isfinite(self.min_feedback):
            raise ValueError(f"min_feedback must be finite, got {self.min_feedback}")
        uses_feedback = (self.min_feedback, self.max_feedback_drop, self.max_segment_drop)
        if any(v is not None for v in uses_feedback) and self.feedback_metric is None:
            raise ValueError("feedback gates need feedback_metric")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        seq = SequentialPolicy(alpha=self.alpha) if self.compare_errors is CompareErrors.SEQUENTIAL else None
        object.__setattr__(self, "sequential", seq)


@dataclass(frozen=True, slots=True)
class Samples:
    """Sample sizes (or, in `GateResult.needs`, the sizes a gate is waiting for); None: not used."""

    canary: int | None
    baseline: int | None = None

    def to_json(self) -> dict[str, int | None]:
        return {"canary": self.canary, "baseline": self.baseline}


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's judgement; `to_json` is the shape of a decision's `gates` entries."""

    gate: str                   # the config's name: max_error_rate, compare.latency, no_drift[score], ...
    verdict: Verdict
    value: float | None         # what was measured (a rate, seconds, a ratio, a p-value); None if nothing
    threshold: float | None
    samples: Samples
    reason: str                 # one line, human
    needs: Samples | None = None  # inconclusive: the sizes it waits for

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gate": self.gate,
            "value": self.value,
            "threshold": self.threshold,
            "samples": self.samples.to_json(),
            "verdict": str(self.verdict),
            "reason": self.reason,
        }
        if self.needs is not None:
            out["needs"] = self.needs.to_json()
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GateResult:
        """Inverse of to_json; ValueError on a broken shape."""
        try:
            needs = d.get("needs")
            return cls(
                gate=str(d["gate"]),
                verdict=Verdict(d["verdict"]),
                value=None if d["value"] is None else float(d["value"]),
                threshold=None if d["threshold"] is None else float(d["threshold"]),
                samples=_samples(d["samples"]),
                reason=str(d["reason"]),
                needs=None if needs is None else _samples(needs),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"gate result: {e!r}") from e


def _samples(d: Mapping[str, Any]) -> Samples:
    c, b = d["canary"], d["baseline"]
    return Samples(None if c is None else int(c), None if b is None else int(b))


def step_verdict(results: tuple[GateResult, ...] | list[GateResult]) -> Verdict:
    """The step's verdict: fail if any gate fails, else inconclusive if any is, else pass.

    Skipped gates do not count; a step with no gate but `min_requests` passes on traffic alone.
    """
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if Verdict.INCONCLUSIVE in verdicts:
        return Verdict.INCONCLUSIVE
    return Verdict.PASS


# ---------------------------------------------------------------------------------------------
# Judging a step


def judge(
    policy: GatePolicy,
    data: StepData,
    *,
    relative: bool,
    sequential: SequentialState | None = None,
) -> tuple[GateResult, ...]:
    """Every configured gate on the step's data, in the documented order.

    `relative` is False at a step where the baseline's weight is 0 (a last step of 100, and a
    bake there): relative gates are then `skipped`. `sequential` is the rollout's running
    sequential test, required when `compare.errors` is `sequential`.

    The first result is always `min_requests` (pass, or inconclusive with what it lacks);
    while it is inconclusive the other gates are not computed and say so.
    """
    out = [_min_requests(policy, data)]
    enough = out[0].verdict is Verdict.PASS
    for name, is_relative, rule in _gates(policy, data, sequential):
        if is_relative and not relative:
            out.append(GateResult(name, Verdict.SKIPPED, None, _threshold(policy, name), Samples(None, None),
                                  "not judged: the baseline's weight is 0 at this step"))
        elif not enough:
            out.append(GateResult(name, Verdict.INCONCLUSIVE, None, _threshold(policy, name),
                                  Samples(data.canary.requests, data.baseline.requests),
                                  f"waits for min_requests ({data.canary.requests} of {policy.min_requests} "
                                  f"canary requests)", needs=Samples(policy.min_requests, None)))
        else:
            out.append(rule())
    return tuple(out)


def _threshold(policy: GatePolicy, name: str) -> float | None:
    """The number a gate compares with, for its report (the p-value level for comparisons)."""
    if name.startswith("compare."):
        return policy.alpha
    if name.startswith("no_drift["):
        return None
    value: float | None = getattr(policy, {"max_p99": "max_p99_s"}.get(name, name))
    return value


def _gates(policy: GatePolicy, data: StepData, seq: SequentialState | None) -> list[tuple[str, bool, _Rule]]:
    """(name, relative?, thunk) per configured gate, in the documented order."""
    gates: list[tuple[str, bool, _Rule]] = []
    p = policy
    if p.max_error_rate is not None:
        gates.append(("max_error_rate", False, lambda: max_error_rate(p, data)))
    if p.max_p99_s is not None:
        gates.append(("max_p99", False, lambda: max_p99(p, data)))
    if p.max_p99_ratio is not None:
        gates.append(("max_p99_ratio", True, lambda: max_p99_ratio(p, data)))
    if p.compare_latency is not None:
        gates.append(("compare.latency", True, lambda: compare_latency(p, data)))
    if p.compare_errors is CompareErrors.TWO_PROPORTION:
        gates.append(("compare.errors", True, lambda: compare_errors(p, data)))
    elif p.compare_errors is CompareErrors.SEQUENTIAL:
        if seq is None:
            raise ValueError("compare.errors: sequential needs the rollout's sequential state")
        gates.append(("compare.errors", True, lambda: errors_sequential(p, data, seq)))
    gates.extend((f"no_drift[{feature}]", True, functools.partial(no_drift, feature, data)) for feature in p.no_drift)
    if p.min_agreement is not None:
        gates.append(("min_agreement", False, lambda: min_agreement(p, data)))
    if p.min_feedback is not None:
        gates.append(("min_feedback", False, lambda: min_feedback(p, data)))
    if p.max_feedback_drop is not None:
        gates.append(("max_feedback_drop", True, lambda: max_feedback_drop(p, data)))
    if p.max_segment_drop is not None:
        gates.append(("max_segment_drop", True, lambda: max_segment_drop(p, data)))
    return gates


# ---------------------------------------------------------------------------------------------
# Absolute gates


def _min_requests(p: GatePolicy, data: StepData) -> GateResult:
    n = data.canary.requests
    s = Samples(n, data.baseline.requests)
    if n >= p.min_requests:
        return GateResult("min_requests", Verdict.PASS, float(n), float(p.min_requests), s,
                          f"{n} canary requests >= {p.min_requests}")
    return GateResult("min_requests", Verdict.INCONCLUSIVE, float(n), float(p.min_requests), s,
                      f"{n} of {p.min_requests} canary requests", needs=Samples(p.min_requests, None))


def max_error_rate(p: GatePolicy, data: StepData) -> GateResult:
    """The canary's failed tries over its tries, at most `max_error_rate`."""
    assert p.max_error_rate is not None
    c = data.canary
    s = Samples(c.tries, None)
    if c.error_rate is None:
        return GateResult("max_error_rate", Verdict.INCONCLUSIVE, None, p.max_error_rate, s,
                          "no canary tries", needs=Samples(1, None))
    rate = c.error_rate
    ok = _at_most(rate, p.max_error_rate)
    return GateResult("max_error_rate", Verdict.PASS if ok else Verdict.FAIL, rate, p.max_error_rate, s,
                      f"{c.failed_tries} of {c.tries} canary tries failed ({rate:.4g} {'<=' if ok else '>'} "
                      f"{p.max_error_rate:g})")


def _p99(lat: FloatArray) -> float:
    """The 99th percentile as the latency windows compute it (numpy's linear interpolation)."""
    return float(np.percentile(lat, 99.0))


def max_p99(p: GatePolicy, data: StepData) -> GateResult:
    """The canary's p99 latency over the step, at most `max_p99`."""
    assert p.max_p99_s is not None
    lat = data.canary.latency_s
    s = Samples(lat.size, None)
    if lat.size == 0:
        return GateResult("max_p99", Verdict.INCONCLUSIVE, None, p.max_p99_s, s, "no canary latency samples",
                          needs=Samples(1, None))
    p99 = _p99(lat)
    ok = _at_most(p99, p.max_p99_s)
    return GateResult("max_p99", Verdict.PASS if ok else Verdict.FAIL, p99, p.max_p99_s, s,
                      f"canary p99 {p99:.4g}s {'<=' if ok else '>'} {p.max_p99_s:g}s")


def min_agreement(p: GatePolicy, data: StepData) -> GateResult:
    """Shadow agreement over the step, at least `min_agreement`, on `min_items` compared mirrors."""
    assert p.min_agreement is not None
    a = data.agreement
    n = a.compared if a is not None else 0
    s = Samples(n, None)
    if a is None or n < p.min_items:
        return GateResult("min_agreement", Verdict.INCONCLUSIVE, None if a is None or n == 0 else a.agreed / n,
                          p.min_agreement, s, f"{n} of {p.min_items} compared mirrors",
                          needs=Samples(p.min_items, None))
    share = a.agreed / n
    ok = _at_least(share, p.min_agreement)
    return GateResult("min_agreement", Verdict.PASS if ok else Verdict.FAIL, share, p.min_agreement, s,
                      f"{a.agreed} of {n} compared answers agree ({share:.4g} {'>=' if ok else '<'} "
                      f"{p.min_agreement:g})")


def min_feedback(p: GatePolicy, data: StepData) -> GateResult:
    """The canary's feedback metric: a floor for accuracy/mean, a ceiling for mae/rmse."""
    assert p.min_feedback is not None and p.feedback_metric is not None
    m = p.feedback_metric
    fb = data.canary.feedback
    n = fb.count if fb is not None else 0
    s = Samples(n, None)
    if fb is None or fb.value is None or n < p.min_items:
        return GateResult("min_feedback", Verdict.INCONCLUSIVE, None if fb is None else fb.value, p.min_feedback,
                          s, f"{n} of {p.min_items} joined feedbacks on the canary",
                          needs=Samples(p.min_items, None))
    v = fb.value
    ok = _at_least(v, p.min_feedback) if m.higher_is_better else _at_most(v, p.min_feedback)
    cmp = (">=" if ok else "<") if m.higher_is_better else ("<=" if ok else ">")
    return GateResult("min_feedback", Verdict.PASS if ok else Verdict.FAIL, v, p.min_feedback, s,
                      f"canary {m} {v:.4g} {cmp} {p.min_feedback:g} over {n} joined feedbacks")


# ---------------------------------------------------------------------------------------------
# Relative gates


def max_p99_ratio(p: GatePolicy, data: StepData) -> GateResult:
    """Canary p99 / baseline p99, at most `max_p99_ratio`; needs `min_items` baseline samples."""
    assert p.max_p99_ratio is not None
    c, b = data.canary.latency_s, data.baseline.latency_s
    s = Samples(c.size, b.size)
    if c.size == 0 or b.size < p.min_items:
        return GateResult("max_p99_ratio", Verdict.INCONCLUSIVE, None, p.max_p99_ratio, s,
                          f"{c.size} canary and {b.size} of {p.min_items} baseline latency samples",
                          needs=Samples(1, p.min_items))
    pc, pb = _p99(c), _p99(b)
    # A baseline p99 of 0 (a clock too coarse) makes any slower canary infinitely worse.
    ratio = pc / pb if pb > 0 else (1.0 if pc == 0 else math.inf)
    ok = _at_most(ratio, p.max_p99_ratio)
    return GateResult("max_p99_ratio", Verdict.PASS if ok else Verdict.FAIL, ratio, p.max_p99_ratio, s,
                      f"canary p99 {pc:.4g}s / baseline p99 {pb:.4g}s = {ratio:.4g} {'<=' if ok else '>'} "
                      f"{p.max_p99_ratio:g}")


def compare_latency(p: GatePolicy, data: StepData) -> GateResult:
    """Mann-Whitney U, one-sided: fail when the canary's latencies are stochastically larger at `alpha`."""
    c, b = data.canary.latency_s, data.baseline.latency_s
    s = Samples(c.size, b.size)
    if c.size < p.min_items or b.size < p.min_items:
        return GateResult("compare.latency", Verdict.INCONCLUSIVE, None, p.alpha, s,
                          f"{c.size} canary and {b.size} baseline latency samples, {p.min_items} each needed",
                          needs=Samples(p.min_items, p.min_items))
    from scipy.stats import mannwhitneyu  # lazy: see module docstring

    pv = float(mannwhitneyu(c, b, alternative="greater").pvalue)
    worse = pv < p.alpha
    return GateResult("compare.latency", Verdict.FAIL if worse else Verdict.PASS, pv, p.alpha, s,
                      f"Mann-Whitney p={pv:.3g} {'<' if worse else '>='} {p.alpha:g} (median canary "
                      f"{float(np.median(c)):.4g}s, baseline {float(np.median(b)):.4g}s)")


def two_proportion_p(canary_failed: int, canary_tries: int, baseline_failed: int, baseline_tries: int,
                     ) -> tuple[float, str]:
    """One-sided p-value that the canary's failure rate is higher, and the test used.

    The pooled z-test while every expected cell count of the 2x2 table is at least 5, else
    Fisher's exact test (module docstring: why Fisher). No failures at all: p = 1.
    """
    x1, n1, x2, n2 = canary_failed, canary_tries, baseline_failed, baseline_tries
    assert 0 <= x1 <= n1 and 0 <= x2 <= n2 and n1 > 0 and n2 > 0, (x1, n1, x2, n2)
    fails, n = x1 + x2, n1 + n2
    if fails == 0:
        return 1.0, "no failures"
    expected_min = min(n1, n2) * min(fails, n - fails) / n
    if expected_min < MIN_EXPECTED:
        from scipy.stats import fisher_exact  # lazy: see module docstring

        return float(fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="greater").pvalue), "fisher"
    from scipy.stats import norm  # lazy: see module docstring

    pooled = fails / n
    z = (x1 / n1 - x2 / n2) / math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    return float(norm.sf(z)), "z"


def compare_errors(p: GatePolicy, data: StepData) -> GateResult:
    """`errors: two_proportion`: fail when the canary's error rate is higher, significant at `alpha`."""
    c, b = data.canary, data.baseline
    s = Samples(c.tries, b.tries)
    if b.requests < p.min_items or c.tries == 0 or b.tries == 0:
        return GateResult("compare.errors", Verdict.INCONCLUSIVE, None, p.alpha, s,
                          f"{b.requests} of {p.min_items} baseline requests", needs=Samples(1, p.min_items))
    pv, test = two_proportion_p(c.failed_tries, c.tries, b.failed_tries, b.tries)
    worse = pv < p.alpha
    name = {"z": "two-proportion z-test", "fisher": "Fisher's exact test", "no failures": "no failures"}[test]
    return GateResult("compare.errors", Verdict.FAIL if worse else Verdict.PASS, pv, p.alpha, s,
                      f"{name} p={pv:.3g} {'<' if worse else '>='} {p.alpha:g} (canary {c.failed_tries}/{c.tries}, "
                      f"baseline {b.failed_tries}/{b.tries})")


def errors_sequential(p: GatePolicy, data: StepData, seq: SequentialState) -> GateResult:
    """`errors: sequential` at a judgement: its always-valid p-value over the rollout so far.

    A rejection has already failed the step the second it happened (sidecar.core.rollout);
    here it is reported. Not rejected: pass once the step has `min_items` baseline requests.
    """
    sp = p.sequential
    assert sp is not None
    s = Samples(seq.canary_tries, seq.baseline_tries)
    pv = seq.p_value
    where = (f"canary {seq.canary_failures}/{seq.canary_tries}, baseline {seq.baseline_failures}/"
             f"{seq.baseline_tries} over the rollout")
    if seq.rejected(sp):
        return GateResult("compare.errors", Verdict.FAIL, pv, p.alpha, s,
                          f"sequential test: canary fails more often, p={pv:.3g} < {p.alpha:g} ({where})")
    if data.baseline.requests < p.min_items:
        return GateResult("compare.errors", Verdict.INCONCLUSIVE, pv, p.alpha, s,
                          f"{data.baseline.requests} of {p.min_items} baseline requests in the step",
                          needs=Samples(None, p.min_items))
    return GateResult("compare.errors", Verdict.PASS, pv, p.alpha, s,
                      f"sequential test p={pv:.3g} >= {p.alpha:g} ({where})")


def no_drift(feature: str, data: StepData) -> GateResult:
    """The canary's distribution of `feature` has not drifted from the baseline's over the step."""
    name = f"no_drift[{feature}]"
    dr = data.drift.get(feature)
    if dr is None:
        return GateResult(name, Verdict.INCONCLUSIVE, None, None, Samples(None, None),
                          "too few samples for a drift verdict (drift.min_samples a side)")
    s = Samples(dr.n_cur, dr.n_ref)
    detail = f"{dr.test} p={dr.p_value:.3g}, PSI {dr.psi:.3g}"
    if dr.drifted:
        return GateResult(name, Verdict.FAIL, dr.p_value, None, s, f"canary drifted from baseline ({detail})")
    return GateResult(name, Verdict.PASS, dr.p_value, None, s, f"no drift ({detail})")


def _drop(metric: FeedbackMetric, canary: float, baseline: float) -> float:
    """How much worse the canary is, in the metric's units (negative: better)."""
    return baseline - canary if metric.higher_is_better else canary - baseline


def max_feedback_drop(p: GatePolicy, data: StepData) -> GateResult:
    """The canary's metric at most `max_feedback_drop` worse than the baseline's (absolute difference)."""
    assert p.max_feedback_drop is not None and p.feedback_metric is not None
    c, b = data.canary.feedback, data.baseline.feedback
    nc, nb = (c.count if c else 0), (b.count if b else 0)
    s = Samples(nc, nb)
    if c is None or b is None or c.value is None or b.value is None or nc < p.min_items or nb < p.min_items:
        return GateResult("max_feedback_drop", Verdict.INCONCLUSIVE, None, p.max_feedback_drop, s,
                          f"{nc} canary and {nb} baseline joined feedbacks, {p.min_items} each needed",
                          needs=Samples(p.min_items, p.min_items))
    drop = _drop(p.feedback_metric, c.value, b.value)
    ok = _at_most(drop, p.max_feedback_drop)
    return GateResult("max_feedback_drop", Verdict.PASS if ok else Verdict.FAIL, drop, p.max_feedback_drop, s,
                      f"{p.feedback_metric} canary {c.value:.4g} vs baseline {b.value:.4g}: drop {drop:.4g} "
                      f"{'<=' if ok else '>'} {p.max_feedback_drop:g}")


def max_segment_drop(p: GatePolicy, data: StepData) -> GateResult:
    """Within every feedback segment value with `min_items` joined feedbacks a side, the drop is at most the limit.

    Values with fewer are not judged (docs/rollout.md#gates); the result reports the worst
    judged value. Inconclusive when no value could be judged.
    """
    assert p.max_segment_drop is not None and p.feedback_metric is not None
    m = p.feedback_metric
    judged: list[tuple[float, str, MetricValue, MetricValue]] = []
    unjudged = 0
    for seg in sorted(data.canary.segments.keys() | data.baseline.segments.keys()):
        cvals, bvals = data.canary.segments.get(seg, {}), data.baseline.segments.get(seg, {})
        for val in sorted(cvals.keys() | bvals.keys()):
            c, b = cvals.get(val), bvals.get(val)
            if c is None or b is None or c.value is None or b.value is None \
                    or c.count < p.min_items or b.count < p.min_items:
                unjudged += 1
                continue
            judged.append((_drop(m, c.value, b.value), f"{seg}={val}", c, b))
    if not judged:
        return GateResult("max_segment_drop", Verdict.INCONCLUSIVE, None, p.max_segment_drop, Samples(0, 0),
                          f"no segment value with {p.min_items} joined feedbacks on both sides "
                          f"({unjudged} values seen)", needs=Samples(p.min_items, p.min_items))
    drop, where, c, b = max(judged, key=lambda t: t[0])
    ok = _at_most(drop, p.max_segment_drop)
    assert c.value is not None and b.value is not None
    rest = f"; {unjudged} values with too few feedbacks not judged" if unjudged else ""
    return GateResult("max_segment_drop", Verdict.PASS if ok else Verdict.FAIL, drop, p.max_segment_drop,
                      Samples(c.count, b.count),
                      f"worst of {len(judged)} segment values: {where}, {m} canary {c.value:.4g} vs baseline "
                      f"{b.value:.4g}: drop {drop:.4g} {'<=' if ok else '>'} {p.max_segment_drop:g}{rest}")
