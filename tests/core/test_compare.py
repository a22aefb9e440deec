"""Shadow agreement: verdicts within tolerance, the rolling ratio and the disagreement log."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.compare import (
    AgreementWindow,
    Disagreement,
    DisagreementLog,
    Verdict,
    compare_values,
)

AGREE, DISAGREE, MISSING = Verdict.AGREE, Verdict.DISAGREE, Verdict.MISSING
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("primary", "shadow", "tolerance", "verdict"),
    [
        ([1.0], [1.5], 0.5, AGREE),
        ([1.0], [1.5000001], 0.5, DISAGREE),
        ([10], [12], 2, AGREE),
        ([10], [12], 1.999, DISAGREE),
        ([0.5], [0.51], 0.01, AGREE),  # 0.51 - 0.5 is 0.010000000000000009 in floats
        ([0.5], [0.5101], 0.01, DISAGREE),
        ([0.3], [0.1 + 0.2], 0.0, AGREE),
        ([10**17], [10**17 + 1], 0.0, DISAGREE),  # ints are exact: no float slack
        ([1, 2, 3], [1, 2, 3], 0.0, AGREE),
        ([1, 2, 3], [1, 2, 4], 0.5, DISAGREE),
        ([-1.0], [1.0], 1.0, DISAGREE),
        ([-1.0], [1.0], 2.0, AGREE),
    ],
)
def test_absolute_tolerance_boundaries(
    primary: list[Any], shadow: list[Any], tolerance: float, verdict: Verdict
) -> None:
    """Values agree up to and including `tolerance` apart, and disagree just beyond it."""
    assert compare_values(primary, shadow, tolerance) is verdict


def test_nothing_found_on_either_side_is_missing() -> None:
    """When the path finds nothing in both answers the request is missing, not a disagreement."""
    assert compare_values([], [], 0.01) is MISSING


def test_one_side_empty_or_lengths_differ_disagrees() -> None:
    """A shadow that returns fewer or more predictions than the primary disagrees."""
    assert compare_values([0.1], [], 1.0) is DISAGREE
    assert compare_values([], [0.1], 1.0) is DISAGREE
    assert compare_values([0.1, 0.2], [0.1], 1.0) is DISAGREE
    assert compare_values([[0.1, 0.2]], [[0.1]], 1.0) is DISAGREE


@pytest.mark.parametrize(
    ("primary", "shadow", "verdict"),
    [
        ([True], [1], DISAGREE),
        ([1], [True], DISAGREE),
        ([False], [0.0], DISAGREE),
        ([True], [True], AGREE),
        ([True], [False], DISAGREE),
        ([None], [None], AGREE),
        ([None], [0], DISAGREE),
        ([None], [False], DISAGREE),
        (["cat"], ["cat"], AGREE),
        (["cat"], ["dog"], DISAGREE),
        (["1"], [1], DISAGREE),
        ([[1]], [1], DISAGREE),
        ([{"a": 1}], [[1]], DISAGREE),
    ],
)
def test_kinds_never_mix(primary: list[Any], shadow: list[Any], verdict: Verdict) -> None:
    """A bool never equals a number, a string never equals a number, and shapes must match."""
    assert compare_values(primary, shadow, tolerance=1.0) is verdict


@pytest.mark.parametrize(
    ("primary", "shadow"),
    [([NAN], [NAN]), ([NAN], [1.0]), ([1.0], [NAN]), ([[NAN]], [[NAN]]), ([{"p": NAN}], [{"p": NAN}])],
)
def test_nan_never_agrees(primary: list[Any], shadow: list[Any]) -> None:
    """A NaN prediction disagrees with anything, even with a NaN, whatever the tolerance."""
    assert compare_values(primary, shadow, tolerance=INF, rel_tolerance=1.0) is DISAGREE


def test_infinities() -> None:
    """An infinite prediction agrees only with the same infinity, even with a relative tolerance."""
    assert compare_values([INF], [INF], 0.0) is AGREE
    assert compare_values([INF], [-INF], 0.0, rel_tolerance=0.5) is DISAGREE
    assert compare_values([INF], [1e308], 1.0, rel_tolerance=0.5) is DISAGREE
    assert compare_values([1e308], [-1e308], 1.0, rel_tolerance=2.0) is DISAGREE


def test_huge_ints_do_not_crash() -> None:
    """Integers beyond float range are compared without an error."""
    assert compare_values([10**400], [10**400], 0.0) is AGREE
    assert compare_values([10**400], [1.0], 0.1, rel_tolerance=0.5) is DISAGREE


def test_relative_tolerance() -> None:
    """With rel_tolerance, values agree when they differ by at most that share of the larger one."""
    assert compare_values([100], [105], 0.0, rel_tolerance=0.05) is AGREE
    assert compare_values([100], [106], 0.0, rel_tolerance=0.05) is DISAGREE
    assert compare_values([-100], [-105], 0.0, rel_tolerance=0.05) is AGREE
    assert compare_values([100], [106], 1.0) is DISAGREE
    assert compare_values([0.001], [0.0011], 0.0, rel_tolerance=0.1) is AGREE
    assert compare_values([0.001], [0.0011], 0.0) is DISAGREE
    assert compare_values([100], [106], 1.0, rel_tolerance=0.05) is DISAGREE  # 6 > 1 and 6 > 5.3
    assert compare_values([100], [106], 6.0, rel_tolerance=0.05) is AGREE  # either test suffices
    assert compare_values([0.0], [0.5], 0.5, rel_tolerance=0.01) is AGREE


def test_nested_values_compare_by_the_same_rules() -> None:
    """Structured predictions (lists of scores, dicts of labels) agree element by element within tolerance."""
    p = [{"label": "fraud", "scores": [0.1, 0.9], "extra": None}]
    assert compare_values(p, [{"label": "fraud", "scores": [0.105, 0.895], "extra": None}], 0.01) is AGREE
    assert compare_values(p, [{"label": "fraud", "scores": [0.2, 0.9], "extra": None}], 0.01) is DISAGREE
    assert compare_values(p, [{"label": "ok", "scores": [0.1, 0.9], "extra": None}], 0.01) is DISAGREE
    assert compare_values(p, [{"label": "fraud", "scores": [0.1, 0.9]}], 0.01) is DISAGREE
    more_keys = [{"label": "fraud", "scores": [0.1, 0.9], "extra": None, "x": 1}]
    assert compare_values(p, more_keys, 0.01) is DISAGREE


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from("abc"), c, max_size=3),
    max_leaves=12,
)


def _has_nan(x: Any) -> bool:
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, list):
        return any(_has_nan(v) for v in x)
    if isinstance(x, dict):
        return any(_has_nan(v) for v in x.values())
    return False


@given(
    a=st.lists(_json, max_size=4), b=st.lists(_json, max_size=4), tol=st.floats(0, 10), rel=st.floats(0, 1)
)
def test_verdict_is_symmetric(a: list[Any], b: list[Any], tol: float, rel: float) -> None:
    """Which side is primary and which is shadow does not change the verdict."""
    assert compare_values(a, b, tol, rel) is compare_values(b, a, tol, rel)


@given(a=st.lists(_json, max_size=4), tol=st.floats(0, 10), rel=st.floats(0, 1))
def test_identical_answers_agree_unless_nan(a: list[Any], tol: float, rel: float) -> None:
    """A shadow that answers exactly like the primary agrees, unless the answer holds a NaN."""
    verdict = compare_values(a, a, tol, rel)
    if not a:
        assert verdict is MISSING
    else:
        assert verdict is (DISAGREE if _has_nan(a) else AGREE)


@given(x=st.floats(-1e6, 1e6), d=st.floats(0, 1e3), tol=st.floats(0, 1e3))
def test_numbers_within_tolerance_agree(x: float, d: float, tol: float) -> None:
    """Two numbers at most `tolerance` apart agree; clearly further apart they disagree."""
    verdict = compare_values([x], [x + d], tol)
    if abs((x + d) - x) <= tol:
        assert verdict is AGREE
    elif d > tol * 1.001 + 1e-6:
        assert verdict is DISAGREE


@given(size=st.integers(1, 20), records=st.lists(st.booleans(), max_size=100))
def test_agreement_ratio_is_the_share_over_the_last_size_records(size: int, records: list[bool]) -> None:
    """The agreement ratio shown is the agreeing share of the last `size` compared requests."""
    assert AgreementWindow(size).ratio is None
    window = AgreementWindow(size)
    for n, agreed in enumerate(records, start=1):
        window.record(agreed)
        recent = records[:n][-size:]
        assert window.count == len(recent)
        assert window.ratio == sum(recent) / len(recent)
        assert window.agreed_total == sum(records[:n])
        assert window.disagreed_total == n - sum(records[:n])


def test_missing_verdicts_do_not_move_the_ratio() -> None:
    """Requests whose path found nothing are counted apart and leave the agreement ratio alone."""
    window = AgreementWindow(3)
    for v in [AGREE, MISSING, DISAGREE, MISSING, AGREE, AGREE]:
        window.record_verdict(v)
    assert window.count == 3
    assert window.ratio == 2 / 3
    assert (window.agreed_total, window.disagreed_total, window.missing_total) == (3, 1, 2)
    assert repr(window) == f"AgreementWindow(size=3, count=3, ratio={2 / 3})"


def test_window_size_must_be_positive() -> None:
    """A window of size 0 is a programming error and is refused."""
    with pytest.raises(ValueError, match="size >= 1"):
        AgreementWindow(0)


def test_disagreement_log_keeps_the_newest_first_and_is_bounded() -> None:
    """The admin view lists the latest disagreements newest first and never grows past its limit."""
    log = DisagreementLog(maxlen=5)
    assert log.items() == []
    for i in range(12):
        log.add(Disagreement(f"r{i}", "$.predictions[*]", primary=[i], shadow=[i + 1], at=1000.0 + i))
    assert len(log) == 5
    assert log.maxlen == 5
    assert [d.request_id for d in log.items()] == ["r11", "r10", "r9", "r8", "r7"]
    assert log.items()[0] == Disagreement("r11", "$.predictions[*]", [11], [12], 1011.0)


def test_disagreement_is_frozen() -> None:
    """A recorded disagreement cannot be altered afterwards."""
    d = Disagreement("r1", "$.p", 1, 2, 0.0)
    with pytest.raises(AttributeError):
        d.request_id = "r2"  # type: ignore[misc]
