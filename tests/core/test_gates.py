"""Rollout gates: each gate's verdict at its edges, the relative tests against scipy, and the step's verdict."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats  # eager here, so no test times the gates' lazy import

from sidecar.core.drift import DriftResult
from sidecar.core.gates import (
    MIN_ITEMS,
    Agreement,
    BackendData,
    CompareErrors,
    CompareLatency,
    FeedbackMetric,
    GatePolicy,
    GateResult,
    MetricValue,
    Samples,
    StepData,
    Verdict,
    errors_sequential,
    judge,
    step_verdict,
    two_proportion_p,
)
from sidecar.core.sequential import SequentialState


def backend(requests=1000, failed=0, latency=None, feedback=None, segments=None, tries=None) -> BackendData:
    return BackendData(
        requests=requests,
        tries=requests if tries is None else tries,
        failed_tries=failed,
        latency_s=np.full(requests, 0.1) if latency is None else np.asarray(latency, dtype=np.float64),
        feedback=feedback,
        segments=segments or {},
    )


def data(canary=None, baseline=None, **kw) -> StepData:
    return StepData(canary=canary or backend(), baseline=baseline or backend(), **kw)


def gate(policy: GatePolicy, d: StepData, name: str, relative: bool = True, seq=None) -> GateResult:
    [result] = [r for r in judge(policy, d, relative=relative, sequential=seq) if r.gate == name]
    return result


# ---------------------------------------------------------------------------------------------
# min_requests and the absolute gates


def test_min_requests_holds_every_gate():
    """Below min_requests every gate waits and says how many canary requests it still needs."""
    p = GatePolicy(min_requests=200, max_error_rate=0.01, max_p99_s=0.5)
    results = judge(p, data(canary=backend(199, failed=199)), relative=True)
    assert [(r.gate, r.verdict) for r in results] == [
        ("min_requests", Verdict.INCONCLUSIVE), ("max_error_rate", Verdict.INCONCLUSIVE),
        ("max_p99", Verdict.INCONCLUSIVE)]
    assert results[0].reason == "199 of 200 canary requests"
    assert results[0].needs == Samples(200, None)
    assert results[1].reason == "waits for min_requests (199 of 200 canary requests)"
    assert step_verdict(results) is Verdict.INCONCLUSIVE
    assert judge(p, data(canary=backend(200)), relative=True)[0].verdict is Verdict.PASS


def test_no_gate_but_traffic_passes_on_traffic():
    """A rollout without gates moves on once the canary served min_requests."""
    results = judge(GatePolicy(min_requests=10), data(canary=backend(10)), relative=True)
    assert [r.gate for r in results] == ["min_requests"]
    assert step_verdict(results) is Verdict.PASS


@pytest.mark.parametrize(("failed", "verdict"), [(0, Verdict.PASS), (2, Verdict.PASS), (3, Verdict.FAIL)])
def test_max_error_rate_edge(failed, verdict):
    """An error rate equal to max_error_rate passes; one more failure fails."""
    r = gate(GatePolicy(min_requests=200, max_error_rate=0.01), data(canary=backend(200, failed)), "max_error_rate")
    assert r.verdict is verdict
    assert r.value == failed / 200 and r.threshold == 0.01 and r.samples == Samples(200, None)


def test_max_error_rate_counts_tries_not_requests():
    """Retried failures count: 3 failed tries among 300 tries for 200 requests is a 1% error rate."""
    c = BackendData(requests=200, tries=300, failed_tries=3)
    r = gate(GatePolicy(min_requests=200, max_error_rate=0.01), data(canary=c), "max_error_rate")
    assert (r.verdict, r.value) == (Verdict.PASS, 0.01)
    assert "3 of 300 canary tries failed" in r.reason


def test_max_error_rate_without_tries_is_inconclusive():
    """With min_requests 0 and no traffic, the error gate waits instead of passing on nothing."""
    r = gate(GatePolicy(min_requests=0, max_error_rate=0.01), data(canary=backend(0)), "max_error_rate")
    assert r.verdict is Verdict.INCONCLUSIVE


def test_max_p99_edge():
    """The canary's p99 (numpy's linear percentile) at the limit passes, above it fails, none is inconclusive."""
    lat = np.linspace(0.0, 1.0, 101)  # p99 is exactly 0.99
    p = GatePolicy(min_requests=0, max_p99_s=0.99)
    r = gate(p, data(canary=backend(101, latency=lat)), "max_p99")
    assert r.verdict is Verdict.PASS and r.value == pytest.approx(0.99) and r.samples.canary == 101
    assert gate(GatePolicy(min_requests=0, max_p99_s=0.98), data(canary=backend(101, latency=lat)),
                "max_p99").verdict is Verdict.FAIL
    assert gate(p, data(canary=backend(5, latency=[])), "max_p99").verdict is Verdict.INCONCLUSIVE


def test_min_agreement_edge():
    """Agreement equal to min_agreement passes, below fails, and fewer than 30 compared mirrors wait."""
    p = GatePolicy(min_requests=0, min_agreement=0.9)
    assert gate(p, data(agreement=Agreement(30, 27)), "min_agreement").verdict is Verdict.PASS
    assert gate(p, data(agreement=Agreement(30, 26)), "min_agreement").verdict is Verdict.FAIL
    r = gate(p, data(agreement=Agreement(29, 29)), "min_agreement")
    assert (r.verdict, r.needs, r.reason) == (Verdict.INCONCLUSIVE, Samples(30, None), "29 of 30 compared mirrors")
    assert gate(p, data(agreement=None), "min_agreement").verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(("metric", "value", "verdict"), [
    (FeedbackMetric.ACCURACY, 0.9, Verdict.PASS), (FeedbackMetric.ACCURACY, 0.89, Verdict.FAIL),
    (FeedbackMetric.MEAN, 0.95, Verdict.PASS),
    (FeedbackMetric.MAE, 0.9, Verdict.PASS), (FeedbackMetric.MAE, 0.91, Verdict.FAIL),
    (FeedbackMetric.RMSE, 0.5, Verdict.PASS),
])
def test_min_feedback_is_a_floor_or_a_ceiling(metric, value, verdict):
    """min_feedback is a floor for accuracy and mean, a ceiling for mae and rmse, inclusive."""
    p = GatePolicy(min_requests=0, min_feedback=0.9, feedback_metric=metric)
    r = gate(p, data(canary=backend(feedback=MetricValue(value, 30))), "min_feedback")
    assert (r.verdict, r.value, r.samples) == (verdict, value, Samples(30, None))


def test_min_feedback_waits_for_30_joined_feedbacks():
    """With 29 joined feedbacks on the canary the feedback floor is not judged yet."""
    p = GatePolicy(min_requests=0, min_feedback=0.9, feedback_metric=FeedbackMetric.ACCURACY)
    r = gate(p, data(canary=backend(feedback=MetricValue(0.1, 29))), "min_feedback")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(MIN_ITEMS, None))
    assert gate(p, data(), "min_feedback").verdict is Verdict.INCONCLUSIVE


# ---------------------------------------------------------------------------------------------
# Relative gates


def test_relative_gates_are_skipped_when_the_baseline_has_no_weight():
    """At a step of 100 (and its bake) relative gates report `skipped` and the absolute ones decide."""
    p = GatePolicy(min_requests=0, max_error_rate=0.01, max_p99_ratio=1.5, compare_latency=CompareLatency.MANN_WHITNEY,
                   compare_errors=CompareErrors.TWO_PROPORTION, no_drift=("score",), max_feedback_drop=0.02,
                   max_segment_drop=0.05, feedback_metric=FeedbackMetric.ACCURACY)
    results = judge(p, data(baseline=backend(0)), relative=False)
    assert {r.gate: r.verdict for r in results} == {
        "min_requests": Verdict.PASS, "max_error_rate": Verdict.PASS, "max_p99_ratio": Verdict.SKIPPED,
        "compare.latency": Verdict.SKIPPED, "compare.errors": Verdict.SKIPPED, "no_drift[score]": Verdict.SKIPPED,
        "max_feedback_drop": Verdict.SKIPPED, "max_segment_drop": Verdict.SKIPPED}
    assert step_verdict(results) is Verdict.PASS


def test_max_p99_ratio_edge():
    """A canary p99 exactly 1.5x the baseline's passes despite float rounding; 30 baseline samples are needed."""
    p = GatePolicy(min_requests=0, max_p99_ratio=1.5)
    c, b = backend(100, latency=np.full(100, 0.45)), backend(30, latency=np.full(30, 0.3))
    r = gate(p, data(canary=c, baseline=b), "max_p99_ratio")
    assert r.verdict is Verdict.PASS and r.value == pytest.approx(1.5) and r.samples == Samples(100, 30)
    slower = backend(100, latency=np.full(100, 0.46))
    assert gate(p, data(canary=slower, baseline=b), "max_p99_ratio").verdict is Verdict.FAIL
    r = gate(p, data(canary=c, baseline=backend(29, latency=np.full(29, 0.3))), "max_p99_ratio")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(1, 30))
    zero = backend(30, latency=np.zeros(30))
    assert gate(p, data(canary=c, baseline=zero), "max_p99_ratio").value == float("inf")


def test_mann_whitney_matches_scipy():
    """The latency comparison's p-value is scipy's one-sided Mann-Whitney U, and a slower canary fails."""
    rng = np.random.default_rng(7)
    base = rng.lognormal(-2.0, 0.5, 400)
    slower = rng.lognormal(-1.8, 0.5, 300)
    p = GatePolicy(min_requests=0, compare_latency=CompareLatency.MANN_WHITNEY, alpha=0.01)
    r = gate(p, data(canary=backend(300, latency=slower), baseline=backend(400, latency=base)), "compare.latency")
    assert r.value == pytest.approx(scipy.stats.mannwhitneyu(slower, base, alternative="greater").pvalue, rel=1e-12)
    assert r.verdict is Verdict.FAIL and r.threshold == 0.01 and r.samples == Samples(300, 400)
    same = rng.lognormal(-2.0, 0.5, 300)
    assert gate(p, data(canary=backend(300, latency=same), baseline=backend(400, latency=base)),
                "compare.latency").verdict is Verdict.PASS


def test_mann_whitney_is_one_sided():
    """A canary that is faster than its baseline never fails the latency comparison."""
    rng = np.random.default_rng(8)
    p = GatePolicy(min_requests=0, compare_latency=CompareLatency.MANN_WHITNEY)
    fast, slow = rng.lognormal(-3.0, 0.5, 300), rng.lognormal(-2.0, 0.5, 300)
    r = gate(p, data(canary=backend(300, latency=fast), baseline=backend(300, latency=slow)), "compare.latency")
    assert r.verdict is Verdict.PASS and r.value is not None and r.value > 0.99


def test_mann_whitney_waits_for_30_a_side():
    """With 29 baseline latencies the comparison waits for 30 a side."""
    p = GatePolicy(min_requests=0, compare_latency=CompareLatency.MANN_WHITNEY)
    r = gate(p, data(baseline=backend(29)), "compare.latency")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(30, 30))


def test_two_proportion_z_matches_scipy_chi_square():
    """With enough failures the errors comparison is the pooled z-test: half scipy's uncorrected chi-square p-value."""
    pv, test = two_proportion_p(30, 1000, 100, 10000)
    _, p2, _, _ = scipy.stats.chi2_contingency([[30, 970], [100, 9900]], correction=False)
    assert test == "z"
    assert pv == pytest.approx(p2 / 2, rel=1e-9)
    better, _ = two_proportion_p(5, 1000, 100, 10000)  # 0.5% vs 1%: the other side
    assert better > 0.5


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), [(3, 200, 1, 3800), (2, 30, 0, 30), (4, 10000, 1, 190000),
                                                     (1, 50, 0, 950)])
def test_two_proportion_goes_exact_on_small_counts(x1, n1, x2, n2):
    """With under 5 expected failures in a cell, the errors comparison is Fisher's exact test, as scipy computes it."""
    pv, test = two_proportion_p(x1, n1, x2, n2)
    assert test == "fisher"
    want = scipy.stats.fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="greater").pvalue
    assert pv == pytest.approx(want, rel=1e-12)


def test_two_proportion_without_failures_passes():
    """No failure on either side is p = 1: nothing suggests the canary is worse."""
    assert two_proportion_p(0, 500, 0, 9500) == (1.0, "no failures")


def test_compare_errors_gate():
    """A canary failing 3% against a 1% baseline fails the comparison; 29 baseline requests wait."""
    p = GatePolicy(min_requests=0, compare_errors=CompareErrors.TWO_PROPORTION, alpha=0.01)
    r = gate(p, data(canary=backend(1000, 30), baseline=backend(10000, 100)), "compare.errors")
    assert r.verdict is Verdict.FAIL and r.value is not None and r.value < 1e-4 and r.samples == Samples(1000, 10000)
    assert "z-test" in r.reason
    assert gate(p, data(canary=backend(1000, 10), baseline=backend(10000, 100)), "compare.errors").verdict \
        is Verdict.PASS
    r = gate(p, data(canary=backend(1000, 30), baseline=backend(29, 0)), "compare.errors")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(1, 30))


def test_sequential_gate_reports_the_rollouts_test():
    """The sequential errors gate reports the always-valid p-value of the rollout so far; a rejection is a fail."""
    p = GatePolicy(min_requests=0, compare_errors=CompareErrors.SEQUENTIAL, alpha=0.01)
    assert p.sequential is not None
    fresh = SequentialState.new(p.sequential)
    r = gate(p, data(), "compare.errors", seq=fresh)
    assert (r.verdict, r.value, r.threshold) == (Verdict.PASS, 1.0, 0.01)
    assert gate(p, data(baseline=backend(29)), "compare.errors", seq=fresh).verdict is Verdict.INCONCLUSIVE
    worse = fresh.update(p.sequential, 50, 20, 950, 1).update(p.sequential, 50, 20, 950, 1)
    r = errors_sequential(p, data(baseline=backend(29)), worse)
    assert r.verdict is Verdict.FAIL and r.value is not None and r.value < 0.01
    assert r.samples == Samples(100, 1900)
    with pytest.raises(ValueError, match="sequential state"):
        judge(p, data(), relative=True)


def test_no_drift_takes_the_monitors_verdict():
    """no_drift fails a feature whose canary-vs-baseline drift verdict is drifted, and waits while there is none."""
    p = GatePolicy(min_requests=0, no_drift=("score", "amount"))
    drifted = DriftResult("score", "ks", 0.3, 1e-6, 0.4, n_ref=500, n_cur=400, drifted=True)
    fine = DriftResult("amount", "ks", 0.02, 0.7, 0.01, n_ref=500, n_cur=400, drifted=False)
    d = data(drift={"score": drifted, "amount": fine})
    assert (gate(p, d, "no_drift[score]").verdict, gate(p, d, "no_drift[amount]").verdict) == (Verdict.FAIL,
                                                                                              Verdict.PASS)
    assert gate(p, d, "no_drift[score]").samples == Samples(400, 500)
    assert gate(p, data(drift={"score": None}), "no_drift[score]").verdict is Verdict.INCONCLUSIVE
    assert gate(p, data(), "no_drift[amount]").verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(("metric", "canary", "baseline", "verdict"), [
    (FeedbackMetric.ACCURACY, 0.88, 0.90, Verdict.PASS),   # a drop of exactly 0.02, despite 0.9 - 0.88 > 0.02
    (FeedbackMetric.ACCURACY, 0.87, 0.90, Verdict.FAIL),
    (FeedbackMetric.ACCURACY, 0.99, 0.90, Verdict.PASS),   # better
    (FeedbackMetric.MAE, 0.32, 0.30, Verdict.PASS),        # mae up by 0.02
    (FeedbackMetric.MAE, 0.33, 0.30, Verdict.FAIL),
    (FeedbackMetric.RMSE, 0.10, 0.30, Verdict.PASS),
])
def test_max_feedback_drop_edge(metric, canary, baseline, verdict):
    """The feedback drop is how much worse the canary is in the metric's units, inclusive of the limit."""
    p = GatePolicy(min_requests=0, max_feedback_drop=0.02, feedback_metric=metric)
    r = gate(p, data(canary=backend(feedback=MetricValue(canary, 40)), baseline=backend(feedback=MetricValue(
        baseline, 30))), "max_feedback_drop")
    assert r.verdict is verdict and r.samples == Samples(40, 30)


def test_max_feedback_drop_waits_for_30_a_side():
    """With 29 joined feedbacks on the baseline, the drop is not judged."""
    p = GatePolicy(min_requests=0, max_feedback_drop=0.02, feedback_metric=FeedbackMetric.ACCURACY)
    r = gate(p, data(canary=backend(feedback=MetricValue(0.1, 400)), baseline=backend(feedback=MetricValue(0.9, 29))),
             "max_feedback_drop")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(30, 30))


def test_max_segment_drop_judges_each_value_with_enough_feedback():
    """The worst segment value with 30 feedbacks a side decides; thinner values are not judged, and said so."""
    p = GatePolicy(min_requests=0, max_segment_drop=0.05, feedback_metric=FeedbackMetric.ACCURACY)
    canary = backend(segments={"country": {"US": MetricValue(0.90, 100), "DE": MetricValue(0.80, 40),
                                           "other": MetricValue(0.0, 29)}})
    baseline = backend(segments={"country": {"US": MetricValue(0.91, 100), "DE": MetricValue(0.90, 30),
                                             "other": MetricValue(1.0, 500)}})
    r = gate(p, data(canary=canary, baseline=baseline), "max_segment_drop")
    assert r.verdict is Verdict.FAIL and r.value == pytest.approx(0.1) and r.samples == Samples(40, 30)
    assert "country=DE" in r.reason and "1 values with too few feedbacks not judged" in r.reason
    ok = backend(segments={"country": {"US": MetricValue(0.90, 100), "DE": MetricValue(0.86, 40)}})
    assert gate(p, data(canary=ok, baseline=baseline), "max_segment_drop").verdict is Verdict.PASS
    thin = backend(segments={"country": {"US": MetricValue(0.1, 29)}})
    r = gate(p, data(canary=thin, baseline=baseline), "max_segment_drop")
    assert (r.verdict, r.needs) == (Verdict.INCONCLUSIVE, Samples(30, 30))


# ---------------------------------------------------------------------------------------------
# The step's verdict, shapes and validation


def _result(v: Verdict) -> GateResult:
    return GateResult("g", v, None, None, Samples(None), "")


@pytest.mark.parametrize(("verdicts", "step"), [
    ([Verdict.PASS, Verdict.PASS], Verdict.PASS),
    ([Verdict.PASS, Verdict.SKIPPED], Verdict.PASS),
    ([Verdict.PASS, Verdict.INCONCLUSIVE], Verdict.INCONCLUSIVE),
    ([Verdict.INCONCLUSIVE, Verdict.FAIL], Verdict.FAIL),
    ([Verdict.SKIPPED], Verdict.PASS),
])
def test_step_verdict(verdicts, step):
    """A step fails when any gate fails, is inconclusive when any gate is and none fails, else passes."""
    assert step_verdict([_result(v) for v in verdicts]) is step


def test_gate_result_json_round_trips():
    """A gate's report reads back from its JSON (as saved with the rollout's decisions)."""
    p = GatePolicy(min_requests=200, max_error_rate=0.01)
    for r in judge(p, data(canary=backend(100, 50)), relative=True):
        j = r.to_json()
        assert set(j) >= {"gate", "value", "threshold", "samples", "verdict", "reason"}
        assert GateResult.from_json(j) == r
    with pytest.raises(ValueError, match="gate result"):
        GateResult.from_json({"gate": "x"})


@pytest.mark.parametrize("kwargs", [
    {"min_requests": -1}, {"min_requests": 0, "max_error_rate": 1.5}, {"min_requests": 0, "max_p99_s": -1.0},
    {"min_requests": 0, "min_feedback": 0.9}, {"min_requests": 0, "alpha": 0.0},
    {"min_requests": 0, "min_items": 0}, {"min_requests": 0, "min_feedback": float("nan"),
                                          "feedback_metric": FeedbackMetric.MAE},
])
def test_policy_rejects_nonsense(kwargs):
    """Gate thresholds that cannot mean anything are refused when the policy is built."""
    with pytest.raises(ValueError, match=r"must be|need"):
        GatePolicy(**kwargs)


def test_step_data_rejects_impossible_counts():
    """More failed tries than tries, negative counts, NaN latencies or an impossible agreement are refused."""
    with pytest.raises(ValueError, match="failed_tries"):
        BackendData(requests=1, tries=1, failed_tries=2)
    with pytest.raises(ValueError, match="latency"):
        BackendData(latency_s=np.array([np.nan]))
    with pytest.raises(ValueError, match="agreed"):
        Agreement(compared=1, agreed=2)
    with pytest.raises(ValueError, match="MetricValue"):
        MetricValue(None, 3)
