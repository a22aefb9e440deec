"""Feedback: pending predictions bounded in time and count, every outcome of a posted item, the
metrics per backend and segment, the step view, and a state machine against a brute-force model."""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sidecar.core.feedback import (
    MAX_ITEMS,
    MISSING_SEGMENT,
    FeedbackBodyError,
    FeedbackPolicy,
    FeedbackTracker,
    JoinOutcome,
    LocalPendingStore,
    Metric,
    Miss,
    Pending,
    RecentIds,
    SegmentPolicy,
    Tally,
    TermWindow,
    class_key,
    feedback_items,
    results_json,
)
from sidecar.core.jsonpath import compile_path

KEEP_S = 600.0  # keep: 10m


def policy(metric: str = "accuracy", threshold: float | None = None, keep_s: float = KEEP_S,
           max_pending: int = 1000, window: int = 2000, segments: tuple[SegmentPolicy, ...] = (),
           prediction: str | None = "$.predictions[0]") -> FeedbackPolicy:
    return FeedbackPolicy(metric=Metric(metric), keep_s=keep_s, max_pending=max_pending, window=window,
                          prediction_path=compile_path(prediction) if prediction else None,
                          threshold=threshold, segments=segments)


COUNTRY = SegmentPolicy("country", "request", compile_path("$.instances[0].country"), ("US", "DE", "FR"))
TIER = SegmentPolicy("tier", "response", compile_path("$.tier"), ("1", "2"))


def answer(prediction: Any, **extra: Any) -> dict[str, Any]:
    return {"predictions": [prediction], **extra}


def request(country: Any = "US") -> dict[str, Any]:
    return {"instances": [{"country": country, "amount": 10}]}


def add(tracker: FeedbackTracker, request_id: str, backend: str, prediction: Any, now: float,
        country: Any = "US", **extra: Any) -> None:
    tracker.add_many([(request_id, tracker.capture(backend, now, request(country), answer(prediction, **extra)))], now)


def post(tracker: FeedbackTracker, now: float, *items: dict[str, Any]) -> list[str]:
    return [str(r.outcome) for r in tracker.join_many(list(items), now)]


def reading(tracker: FeedbackTracker, backend: str) -> Any:
    return next(b for b in tracker.summary().backends if b.backend == backend)


# ------------------------------------------------------------------------------------------------
# keep and max_pending


def test_a_prediction_waits_keep_seconds_for_its_feedback():
    """Feedback that comes within `keep` joins; a second later than `keep`, it is `expired`."""
    t = FeedbackTracker(policy(keep_s=60.0))
    add(t, "a", "stable", 1, now=0.0)
    add(t, "b", "stable", 1, now=0.0)
    assert post(t, 59.9, {"request_id": "a", "label": 1}) == ["joined"]
    assert post(t, 60.0, {"request_id": "b", "label": 1}) == ["expired"]
    counts = t.store.counts()
    assert (counts.pending, counts.expired_total, counts.dropped_total) == (0, 1, 0)


def test_expiry_runs_on_schedule_without_traffic():
    """`expire(now)` drops what passed `keep` even when nothing is added or posted."""
    t = FeedbackTracker(policy(keep_s=10.0))
    for i in range(5):
        add(t, f"r{i}", "stable", 1, now=float(i))
    assert t.expire(12.0) == 3          # captured at 0, 1, 2
    assert t.store.counts().pending == 2
    assert t.expire(12.5) == 0


def test_max_pending_pushes_out_the_oldest_and_counts_them():
    """Past `max_pending` the oldest predictions are dropped, counted, and their feedback reads `expired`."""
    t = FeedbackTracker(policy(max_pending=3))
    for i in range(5):
        add(t, f"r{i}", "stable", 1, now=float(i))
    counts = t.store.counts()
    assert (counts.pending, counts.dropped_total, counts.added_total) == (3, 2, 5)
    assert post(t, 5.0, *({"request_id": f"r{i}", "label": 1} for i in range(5))) == [
        "expired", "expired", "joined", "joined", "joined"]


def test_an_id_added_again_replaces_its_prediction():
    """A request id answered twice keeps the newer prediction, counted as replaced, and joins once."""
    t = FeedbackTracker(policy())
    add(t, "a", "stable", 0, now=0.0)
    add(t, "a", "canary", 1, now=1.0)
    assert t.store.counts().replaced_total == 1
    assert post(t, 2.0, {"request_id": "a", "label": 1}) == ["joined"]
    assert reading(t, "canary").metric == 1.0
    assert reading(t, "stable").count == 0


def test_a_late_capture_waits_at_least_keep():
    """A capture handed in after a newer one is kept as if captured then: never shorter than `keep`."""
    store = LocalPendingStore(keep_s=10.0, max_pending=10)
    store.add_many([("new", Pending("s", 5.0, 1, None, ())), ("late", Pending("s", 3.0, 1, None, ()))], 5.0)
    assert store.expire(14.9) == 0
    assert store.expire(15.0) == 2


# ------------------------------------------------------------------------------------------------
# outcomes


def test_every_outcome_of_a_posted_item():
    """One post holds each outcome, answered in the order posted, with messages for the invalid ones."""
    t = FeedbackTracker(policy(keep_s=60.0))
    add(t, "old", "stable", 1, now=0.0)
    add(t, "done", "stable", 1, now=100.0)
    add(t, "fresh", "canary", 0, now=100.0)
    assert post(t, 101.0, {"request_id": "done", "label": 1}) == ["joined"]
    results = t.join_many([
        {"request_id": "fresh", "label": 0},
        {"request_id": "fresh", "label": 0},         # the same id again in the same post
        {"request_id": "done", "label": 1},          # joined by an earlier post
        {"request_id": "old", "label": 1},           # its prediction passed keep
        {"request_id": "never", "label": 1},
        {"request_id": "fresh2", "label": 0.5},
        {"label": 1},
        "not an object",
    ], now=102.0)
    assert results_json(results) == {
        "results": [
            {"request_id": "fresh", "outcome": "joined"},
            {"request_id": "fresh", "outcome": "duplicate"},
            {"request_id": "done", "outcome": "duplicate"},
            {"request_id": "old", "outcome": "expired"},
            {"request_id": "never", "outcome": "unknown"},
            {"request_id": "fresh2", "outcome": "invalid",
             "message": '"label" must be a class for metric accuracy: true/false, an integer or a string '
                        "(got the number 0.5)"},
            {"request_id": None, "outcome": "invalid", "message": '"request_id" must be a non-empty string'},
            {"request_id": None, "outcome": "invalid",
             "message": 'an item is an object {"request_id": "...", "label": ...}'},
        ],
        "counts": {"joined": 1, "unknown": 1, "expired": 1, "duplicate": 2, "invalid": 3},
    }
    # backends are known for joined, duplicate and expired items (feedback_total's label)
    assert [r.backend for r in results[:5]] == ["canary", "canary", "stable", "stable", None]
    assert t.outcome_counts() == {
        ("stable", JoinOutcome.JOINED): 1, ("stable", JoinOutcome.DUPLICATE): 1, ("stable", JoinOutcome.EXPIRED): 1,
        ("canary", JoinOutcome.JOINED): 1, ("canary", JoinOutcome.DUPLICATE): 1,
        (None, JoinOutcome.UNKNOWN): 1, (None, JoinOutcome.INVALID): 3,
    }
    assert t.summary().outcomes == {"joined": 2, "unknown": 1, "expired": 1, "duplicate": 2, "invalid": 3}


def test_an_invalid_item_changes_nothing():
    """A wrongly typed label leaves the prediction pending: the corrected post joins it."""
    t = FeedbackTracker(policy())
    add(t, "a", "stable", 1, now=0.0)
    assert post(t, 1.0, {"request_id": "a", "label": [1]}) == ["invalid"]
    assert post(t, 2.0, {"request_id": "a", "label": True}) == ["joined"]


@pytest.mark.parametrize(("metric", "item", "message"), [
    ("accuracy", {"request_id": "a"}, 'missing "label"'),
    ("accuracy", {"request_id": "a", "label": None}, '"label" must be a class for metric accuracy: true/false, '
                                                     "an integer or a string (got null)"),
    ("mae", {"request_id": "a", "label": "3"}, '"label" must be a number for metric mae (got a string)'),
    ("rmse", {"request_id": "a", "label": True}, '"label" must be a number for metric rmse (got a boolean)'),
    ("mae", {"request_id": "a", "label": 1e300}, '"label" must be a number for metric mae (got the number 1e+300)'),
    ("mean", {"request_id": "a", "label": 3}, 'metric mean needs a numeric "value"'),
    ("mean", {"request_id": "a", "value": {"eur": 3}}, '"value" must be a number (got an object)'),
    ("accuracy", {"request_id": 17, "label": 1}, '"request_id" must be a non-empty string'),
    ("accuracy", {"request_id": "", "label": 1}, '"request_id" must be a non-empty string'),
    ("accuracy", {"request_id": "x" * 257, "label": 1}, '"request_id" is longer than 256 characters'),
])
def test_invalid_items_say_why(metric: str, item: dict[str, Any], message: str):
    """A label of the wrong type for the metric, or a bad id, is `invalid` with a message saying what is wrong."""
    t = FeedbackTracker(policy(metric=metric))
    add(t, "a", "stable", 1, now=0.0)
    (result,) = t.join_many([item], now=1.0)
    assert (result.outcome, result.message) == (JoinOutcome.INVALID, message)


def test_expired_and_duplicate_are_remembered_for_about_keep():
    """For at least `keep` an expired or joined id is recognised; a little later it reads `unknown`."""
    t = FeedbackTracker(policy(keep_s=8.0))            # generations of 1 s
    add(t, "late", "stable", 1, now=0.0)
    add(t, "twice", "stable", 1, now=0.0)
    assert post(t, 1.0, {"request_id": "twice", "label": 1}) == ["joined"]
    t.expire(8.0)                                      # "late" expires; "twice"'s generation closes
    assert post(t, 15.9, {"request_id": "late", "label": 1}, {"request_id": "twice", "label": 1}) == [
        "expired", "duplicate"]
    assert post(t, 16.0, {"request_id": "late", "label": 1}, {"request_id": "twice", "label": 1}) == [
        "expired", "unknown"]                          # "twice": joined 15 s ago, closed 8 s ago
    assert post(t, 24.0, {"request_id": "late", "label": 1}) == ["unknown"]   # closed at 15.9


def test_recent_ids_are_bounded_by_capacity():
    """The memory of recent ids holds about `capacity` ids: past it the oldest are forgotten early."""
    r = RecentIds(keep_s=100.0, capacity=4, generations=2)    # chunks of 2 ids
    for i in range(8):
        r.remember(hash(f"id{i}"), i % 3, float(i))
        r.rotate(float(i))
    assert len(r) == 4
    assert list(r.previous([hash("id0"), hash("id3"), hash("id7"), hash("nope")])) == [-1, -1, 1, -1]
    assert r.current(hash("id7")) is None and repr(r) == "RecentIds(keep_s=100.0, current=0, chunks=2, in_chunks=4)"


def test_missing_prediction_is_counted_and_not_kept():
    """An answer with no usable prediction, or with an overlong id, is counted; feedback for it reads `unknown`."""
    t = FeedbackTracker(policy())
    t.add_many([("a", t.capture("stable", 0.0, request(), {"error": "overloaded"})),
                ("b", t.capture("stable", 0.0, request(), answer(0.7)))], 0.0)   # a score, no threshold
    t.add_many([("x" * 257, t.capture("stable", 0.0, request(), answer(1)))], 0.0)
    b = reading(t, "stable")
    assert (b.missing_prediction_total, b.id_too_long_total) == (2, 1)
    assert post(t, 1.0, {"request_id": "a", "label": 1}) == ["unknown"]


def test_feedback_body_holds_one_item_or_up_to_1000():
    """A body is one object or a list of at most 1000; anything else is refused as a whole."""
    assert feedback_items({"request_id": "a", "label": 1}) == [{"request_id": "a", "label": 1}]
    assert len(feedback_items([{}] * MAX_ITEMS)) == MAX_ITEMS
    with pytest.raises(FeedbackBodyError, match="at most 1000 items per request, got 1001"):
        feedback_items([{}] * (MAX_ITEMS + 1))
    with pytest.raises(FeedbackBodyError, match="expected an object"):
        feedback_items("request_id=a")


def test_a_thousand_items_join_in_one_call():
    """1000 items posted at once are all joined, in order, and all counted."""
    t = FeedbackTracker(policy(threshold=0.5, max_pending=5000))
    t.add_many([(f"r{i}", t.capture("stable" if i % 2 else "canary", 0.0, request(), answer(i % 10 / 10)))
                for i in range(1000)], 0.0)
    results = t.join_many(feedback_items([{"request_id": f"r{i}", "label": 1} for i in range(1000)]), 1.0)
    assert [r.request_id for r in results] == [f"r{i}" for i in range(1000)]
    assert {r.outcome for r in results} == {JoinOutcome.JOINED}
    assert t.store.counts().pending == 0
    # stable's scores 0.1, 0.3, 0.5, 0.7, 0.9: three in five reach the threshold; canary's 0.0 .. 0.8: two
    assert (reading(t, "stable").count, reading(t, "stable").metric) == (500, 0.6)
    assert (reading(t, "canary").count, reading(t, "canary").metric) == (500, 0.4)


# ------------------------------------------------------------------------------------------------
# metrics


def test_accuracy_per_backend_for_a_known_pattern():
    """Stable right 9 times in 10 and canary 7 in 10 read exactly 0.9 and 0.7."""
    t = FeedbackTracker(policy(), backends=("stable", "canary"))
    for i in range(100):
        add(t, f"s{i}", "stable", 1, now=0.0)
        add(t, f"c{i}", "canary", 1, now=0.0)
    post(t, 1.0, *({"request_id": f"s{i}", "label": 1 if i % 10 else 0} for i in range(100)))
    post(t, 1.0, *({"request_id": f"c{i}", "label": 1 if i % 10 >= 3 else 0} for i in range(100)))
    assert (reading(t, "stable").metric, reading(t, "stable").count) == (0.9, 100)
    assert (reading(t, "canary").metric, reading(t, "canary").count) == (0.7, 100)


def test_backends_of_the_route_show_before_any_data():
    """A backend of the split is listed with no metric until feedback for it joins."""
    b = reading(FeedbackTracker(policy(), backends=("stable", "canary")), "canary")
    assert (b.count, b.metric, b.score_mean, b.joined_total) == (0, None, None, 0)


@pytest.mark.parametrize(("prediction", "label", "correct"), [
    (0.5, 1, True),          # at the threshold: class 1
    (0.49, 0, True),
    (0.49, False, True),     # booleans are the classes 0 and 1
    (0.9, True, True),
    (0.9, 1.0, True),        # an integral float is its integer
    (0.9, "1", False),       # a string is never a number
    (True, 1, True),         # a boolean prediction is a class already
])
def test_threshold_turns_scores_into_classes(prediction: Any, label: Any, correct: bool):
    """With `threshold: 0.5` a score of 0.5 or more is class 1, and true/1/1.0 are the same class."""
    t = FeedbackTracker(policy(threshold=0.5))
    add(t, "a", "stable", prediction, now=0.0)
    assert post(t, 1.0, {"request_id": "a", "label": label}) == ["joined"]
    assert reading(t, "stable").metric == (1.0 if correct else 0.0)


def test_string_classes_without_threshold():
    """A model answering class names is judged against string labels."""
    t = FeedbackTracker(policy())
    for i, (pred, label) in enumerate([("fraud", "fraud"), ("legit", "fraud"), ("legit", "legit"), ("fraud", 1)]):
        add(t, f"r{i}", "stable", pred, now=0.0)
        post(t, 1.0, {"request_id": f"r{i}", "label": label})
    assert reading(t, "stable").metric == 0.5


def test_class_keys():
    """Booleans, integers and integral floats compare by value; strings by text; other values are no class."""
    assert [class_key(v) for v in (True, False, 3, 3.0, "3", "x" * 300)] == [1, 0, 3, 3, "3", "x" * 256]
    assert [class_key(v) for v in (0.5, None, [1], {"a": 1}, math.inf, 2**63, 1e300)] == [None] * 7


def test_mae_and_rmse_against_numeric_labels():
    """Errors 1, -3 and 0 give MAE 4/3 and RMSE sqrt(10/3)."""
    for metric, expected in (("mae", 4 / 3), ("rmse", math.sqrt(10 / 3))):
        t = FeedbackTracker(policy(metric=metric))
        for i, (pred, label) in enumerate([(10.0, 11), (5, 2.0), (7, 7)]):
            add(t, f"r{i}", "stable", pred, now=0.0)
            assert post(t, 1.0, {"request_id": f"r{i}", "label": label}) == ["joined"]
        assert reading(t, "stable").metric == pytest.approx(expected)


def test_mean_of_a_business_value():
    """`metric: mean` averages the posted values (revenue per answer), no prediction needed."""
    t = FeedbackTracker(policy(metric="mean", prediction=None))
    for i in range(4):
        add(t, f"r{i}", "canary", None, now=0.0)
    post(t, 1.0, *({"request_id": f"r{i}", "value": v} for i, v in enumerate([0, 12.5, 0, 7.5])))
    assert (reading(t, "canary").metric, reading(t, "canary").count) == (5.0, 4)


def test_rolling_window_covers_the_last_n_joined_items():
    """With `monitor.window: 10` the metric covers the last 10 joined items; lifetime counts go on."""
    t = FeedbackTracker(policy(window=10))
    for i in range(30):
        add(t, f"r{i}", "stable", 1, now=0.0)
    post(t, 1.0, *({"request_id": f"r{i}", "label": 0 if i < 20 else 1} for i in range(30)))
    b = reading(t, "stable")
    assert (b.count, b.metric, b.joined_total) == (10, 1.0, 30)


def test_mean_predicted_score_is_known_before_any_label():
    """Each backend's mean score over its last `window` answers shows before any feedback comes."""
    t = FeedbackTracker(policy(threshold=0.5, window=4))
    for i, score in enumerate([0.1, 0.2, 0.9, 0.9, 0.9, 0.9]):
        add(t, f"r{i}", "canary", score, now=0.0)
    b = reading(t, "canary")
    assert (b.score_mean, b.score_count, b.count) == (pytest.approx(0.9), 4, 0)


def test_term_window_resums_exactly():
    """The running sum is recomputed from the ring every `size` adds, so a huge term's rounding does not last."""
    w = TermWindow(3)
    for x in [1e16, 1.0, -1e16] + [0.3] * 6:
        w.add(x)
    assert w.terms() == [0.3, 0.3, 0.3]
    assert w.mean == pytest.approx(0.3, rel=1e-15)
    assert w.count == 3


pairs = st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=60)


@settings(max_examples=80, deadline=None)
@given(pairs=pairs, window=st.integers(1, 25), metric=st.sampled_from(["mae", "rmse"]))
def test_error_metrics_equal_brute_force(pairs: list[tuple[float, float]], window: int, metric: str):
    """MAE and RMSE over the window equal a recomputation from the last `window` joined items."""
    t = FeedbackTracker(policy(metric=metric, window=window, max_pending=100))
    for i, (pred, _) in enumerate(pairs):
        add(t, f"r{i}", "stable", pred, now=0.0)
    assert set(post(t, 1.0, *({"request_id": f"r{i}", "label": y} for i, (_, y) in enumerate(pairs)))) == {"joined"}
    errors = [y - p for p, y in pairs][-window:]
    expected = (sum(abs(e) for e in errors) / len(errors) if metric == "mae"
                else math.sqrt(sum(e * e for e in errors) / len(errors)))
    assert reading(t, "stable").metric == pytest.approx(expected, rel=1e-9, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# segments


def test_segment_values_outside_the_list_count_as_other():
    """Countries not in `values` are `other`; a missing country counts for the backend, not the segment."""
    t = FeedbackTracker(policy(segments=(COUNTRY,)))
    for i, country in enumerate(["US", "DE", "BR", "JP", None, {"code": "US"}]):
        add(t, f"r{i}", "stable", 1, now=0.0, country=country)
    post(t, 1.0, *({"request_id": f"r{i}", "label": 1} for i in range(6)))
    b = reading(t, "stable")
    assert b.count == 6
    assert {(s.value, s.count) for s in b.segments} == {("US", 1), ("DE", 1), ("FR", 0), ("other", 2)}
    assert b.missing_segment_total == {"country": 2}


def test_segment_values_match_whatever_the_yaml_spelling():
    """A segment value 1 in the config matches 1, 1.0 and "1" in a body."""
    t = FeedbackTracker(policy(segments=(TIER,)))
    for i, tier in enumerate([1, 1.0, "1", 2, 3, True]):
        add(t, f"r{i}", "stable", 1, now=0.0, tier=tier)
    post(t, 1.0, *({"request_id": f"r{i}", "label": 1} for i in range(6)))
    assert [(s.value, s.count) for s in reading(t, "stable").segments] == [("1", 3), ("2", 1), ("other", 2)]


def test_small_segments_are_flagged():
    """A segment value with fewer than 30 joined items is shown but flagged too small to judge."""
    t = FeedbackTracker(policy(segments=(COUNTRY,), max_pending=100))
    for i in range(59):
        add(t, f"r{i}", "stable", 1, now=0.0, country="US" if i < 30 else "DE")
    post(t, 1.0, *({"request_id": f"r{i}", "label": 1} for i in range(59)))
    rows = {s.value: (s.count, s.too_small) for s in reading(t, "stable").segments}
    assert rows == {"US": (30, False), "DE": (29, True), "FR": (0, True), "other": (0, True)}


def test_a_canary_worse_in_one_segment_only_shows_there():
    """A canary as accurate as stable overall but worse for DE shows it in DE, rolling and in the step view."""
    t = FeedbackTracker(policy(segments=(COUNTRY,), max_pending=10_000), backends=("stable", "canary"))
    mark = t.mark(0.0)
    items = []
    for backend in ("stable", "canary"):
        for i in range(400):
            country = ("US", "DE", "FR", "BR")[i % 4]
            # stable: wrong on 1 in 10 of every country; canary: right everywhere but on 4 in 10 of DE
            wrong = (i // 4) % 10 == 0 if backend == "stable" else country == "DE" and (i // 4) % 10 < 4
            rid = f"{backend}{i}"
            add(t, rid, backend, 1, now=0.0, country=country)
            items.append({"request_id": rid, "label": 0 if wrong else 1})
    post(t, 1.0, *items)
    stable, canary = reading(t, "stable"), reading(t, "canary")
    assert stable.metric == pytest.approx(0.9) and canary.metric == pytest.approx(0.9)
    by_value = {(s.value): (s.metric, s.too_small) for s in canary.segments}
    assert by_value["DE"] == (pytest.approx(0.6), False)
    assert by_value["US"] == (1.0, False)

    step = t.since(mark)
    assert step.backend("canary") == Tally(400, 360.0)
    drops = {c.value: c for c in step.compare_segments("canary", "stable")}
    assert drops["DE"].judged and drops["DE"].worse_by == pytest.approx(0.3)
    assert drops["US"].worse_by == pytest.approx(-0.1)
    assert drops["FR"].judged and drops["FR"].worse_by == pytest.approx(-0.1)
    assert drops["other"].judged and drops["other"].canary.count == 100   # BR is "other"


def test_step_view_counts_only_feedback_joined_since_the_mark():
    """Feedback joined before the step's start is not in the step; joined after, it is, whenever predicted."""
    t = FeedbackTracker(policy(metric="mae", segments=(COUNTRY,)))
    for i in range(4):
        add(t, f"r{i}", "canary", 10.0, now=0.0)
    post(t, 5.0, {"request_id": "r0", "label": 20.0})
    mark = t.mark(10.0)
    post(t, 15.0, {"request_id": "r1", "label": 12.0}, {"request_id": "r2", "label": 6.0})
    step = t.since(mark)
    assert step.since == 10.0
    assert step.backend("canary") == Tally(2, 6.0)
    assert step.backend("canary").value(Metric.MAE) == 3.0
    assert step.segment("canary", "country", "US") == Tally(2, 6.0)
    assert step.backend("stable") == Tally()
    assert step.segment("canary", "country", "nowhere") == Tally()
    assert step.compare_segments("canary", "stable")[0].judged is False   # 2 items: too few


def test_worse_by_reads_the_metric_s_direction():
    """A drop in accuracy and a rise in MAE are both 'worse'."""
    assert Metric.ACCURACY.worse_by(0.8, 0.9) == pytest.approx(0.1)
    assert Metric.MAE.worse_by(3.0, 2.0) == 1.0
    assert Metric.RMSE.of(4, 16.0) == 2.0 and Metric.MEAN.of(0, 0.0) is None


def test_policy_refuses_inconsistent_sections():
    """A policy needs a prediction unless its metric is mean, and a threshold only with accuracy."""
    with pytest.raises(ValueError, match="needs a prediction path"):
        policy(metric="mae", prediction=None)
    with pytest.raises(ValueError, match="only for metric accuracy"):
        policy(metric="mae", threshold=0.5)
    with pytest.raises(ValueError, match="'other' is the name of every other value"):
        SegmentPolicy("c", "request", compile_path("$.c"), ("US", "other"))


def test_summary_json_shape():
    """The admin JSON of a route's feedback carries its settings, store counts, outcomes and backends."""
    t = FeedbackTracker(policy(threshold=0.5, segments=(COUNTRY,)), backends=("stable",))
    add(t, "a", "stable", 0.8, now=0.0)
    post(t, 1.0, {"request_id": "a", "label": 1})
    doc = t.summary().to_json()
    assert doc["metric"] == "accuracy" and doc["pending"] == 0 and doc["outcomes"]["joined"] == 1
    (b,) = doc["backends"]
    assert b["metric"] == 1.0 and b["score_mean"] == 0.8 and b["outcomes"] == {"joined": 1, "expired": 0,
                                                                                "duplicate": 0}
    assert b["segments"][0] == {"segment": "country", "value": "US", "count": 1, "metric": 1.0, "too_small": True}


def test_pending_predictions_are_invisible_to_the_garbage_collector():
    """However many predictions wait, a full garbage collection has none of them to walk (no event-loop stall)."""
    t = FeedbackTracker(policy(threshold=0.5, segments=(COUNTRY,), max_pending=20_000))
    gc.collect()
    before = len(gc.get_objects())
    for start in range(0, 20_000, 1000):
        t.add_many([(f"r{i}", t.capture("stable", 0.0, request(), answer(0.7))) for i in range(start, start + 1000)],
                   0.0)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert t.store.counts().pending == 20_000


def test_a_join_checks_the_request_id_not_only_its_hash():
    """A record found under an id's hash but made for another id is not joined (a hash collision reads unknown)."""
    store = LocalPendingStore(keep_s=10.0, max_pending=10)
    store.add_many([("a", Pending("stable", 0.0, "fraud", None, (0, -1)))], 0.0)
    store._records[hash("b")] = store._records.pop(hash("a"))      # as if "a" and "b" had the same hash
    assert store.join_many(["b"], 1.0) == [Miss(JoinOutcome.UNKNOWN, None)]
    store._records[hash("a")] = store._records.pop(hash("b"))
    assert store.join_many(["a"], 1.0) == [Pending("stable", 0.0, "fraud", None, (0, -1))]


@pytest.mark.parametrize("predicted", [None, 7, -(2**63), 2.5, "fraud", "\udcff surrogate", ""])
def test_records_keep_every_kind_of_prediction(predicted: Any):
    """What a store gives back on a join is what was captured: classes, numbers, none, segments."""
    store = LocalPendingStore(keep_s=10.0, max_pending=10)
    p = Pending("canary", 3.25, predicted, 0.75 if predicted is not None else None, (2, -1, 0))
    store.add_many([("id-\u00e9", p)], 3.25)
    assert store.join_many(["id-\u00e9"], 4.0) == [p]


def test_order_arrays_stay_bounded_under_quick_joins():
    """Predictions joined as fast as they come leave no growing backlog behind them."""

    class Tight(LocalPendingStore):
        compact_slack = 8

    store = Tight(keep_s=1e9, max_pending=1000)
    for i in range(5000):
        store.add_many([(f"r{i}", Pending("s", float(i), 1, None, ()))], float(i))
        assert store.join_many([f"r{i}"], float(i))[0] == Pending("s", float(i), 1, None, ())
        assert len(store._order_hash) - store._start <= 2 * len(store) + 8 + 1
        assert store._start <= max(8, len(store._order_hash) - store._start) + 1


def test_reprs():
    """reprs say the state at a glance."""
    store = LocalPendingStore(keep_s=1.0, max_pending=2)
    assert repr(store) == ("LocalPendingStore(keep_s=1.0, max_pending=2, pending=0, expired_total=0, "
                           "dropped_total=0)")
    assert repr(RecentIds(1.0, 2)) == "RecentIds(keep_s=1.0, current=0, chunks=0, in_chunks=0)"


# ------------------------------------------------------------------------------------------------
# properties: the tracker against a brute-force model


class Model:
    """What should happen, the slow way: every prediction with its capture time, in a list."""

    def __init__(self, p: FeedbackPolicy) -> None:
        self.p = p
        self.pending: dict[str, tuple[str, float, int, int]] = {}   # id -> (backend, at, class, country index)
        self.joined: list[tuple[str, float, int]] = []               # (backend, term, country index)

    def expire(self, now: float) -> None:
        self.pending = {k: v for k, v in self.pending.items() if now - v[1] < self.p.keep_s}

    def add(self, rid: str, backend: str, at: float, cls: int, country: int) -> None:
        self.pending.pop(rid, None)
        self.pending[rid] = (backend, at, cls, country)
        while len(self.pending) > self.p.max_pending:
            del self.pending[next(iter(self.pending))]

    def metric(self, terms: list[float]) -> float | None:
        last = terms[-self.p.window:]
        return sum(last) / len(last) if last else None


COUNTRIES = ["US", "DE", "FR", "BR", None]


class TightStore(LocalPendingStore):
    """Compacts its order arrays as soon as it may, so that short runs exercise compaction."""

    compact_slack = 1


class FeedbackMachine(RuleBasedStateMachine):
    """Random answers, posts and waits; the tracker must agree with the model after each step."""

    @initialize(max_pending=st.integers(1, 12), window=st.integers(1, 6), keep_s=st.sampled_from([5.0, 30.0]))
    def setup(self, max_pending: int, window: int, keep_s: float) -> None:
        self.p = policy(max_pending=max_pending, window=window, keep_s=keep_s, segments=(COUNTRY,))
        self.t = FeedbackTracker(self.p, store=TightStore(keep_s, max_pending))
        self.model = Model(self.p)
        self.ms = 0
        self.next_id = 0
        self.ever_joined: set[str] = set()

    @property
    def now(self) -> float:
        return self.ms / 1000

    @rule(dt_ms=st.sampled_from([0, 1, 1000, 4999, 5000, 20_000]))
    def wait(self, dt_ms: int) -> None:
        self.ms += dt_ms
        if dt_ms == 20_000:
            self.t.expire(self.now)

    @rule(backend=st.sampled_from(["stable", "canary"]), cls=st.integers(0, 1),
          country=st.integers(0, len(COUNTRIES) - 1), reuse=st.booleans())
    def answer(self, backend: str, cls: int, country: int, reuse: bool) -> None:
        if reuse and self.model.pending:
            rid = next(iter(self.model.pending))          # a client that reuses its x-request-id
        else:
            rid, self.next_id = f"r{self.next_id}", self.next_id + 1
        self.model.expire(self.now)
        self.model.add(rid, backend, self.now, cls, COUNTRY.index_of(COUNTRIES[country]))
        self.t.add_many([(rid, self.t.capture(backend, self.now, request(COUNTRIES[country]), answer(cls)))],
                        self.now)
        self.ever_joined.discard(rid)                     # a new prediction may join again

    @rule(picks=st.lists(st.integers(0, 40), min_size=1, max_size=6), label=st.integers(0, 1))
    def feedback(self, picks: list[int], label: int) -> None:
        ids = [f"r{i}" for i in picks]
        self.model.expire(self.now)
        results = self.t.join_many([{"request_id": rid, "label": label} for rid in ids], self.now)
        for rid, r in zip(ids, results, strict=True):
            event(f"outcome {r.outcome}")
            entry = self.model.pending.pop(rid, None)
            assert (r.outcome is JoinOutcome.JOINED) == (entry is not None), (rid, r, entry)
            if entry is not None:
                assert rid not in self.ever_joined       # never joined twice
                self.ever_joined.add(rid)
                backend, _, cls, country = entry
                self.model.joined.append((backend, 1.0 if cls == label else 0.0, country))
            else:
                assert r.outcome is not JoinOutcome.INVALID

    @invariant()
    def bounded(self) -> None:
        if hasattr(self, "t"):
            assert self.t.store.counts().pending <= self.p.max_pending

    @invariant()
    def metrics_equal_brute_force(self) -> None:
        if not hasattr(self, "t"):
            return
        for b in self.t.summary().backends:
            terms = [term for backend, term, _ in self.model.joined if backend == b.backend]
            assert b.metric == self.model.metric(terms)
            assert b.count == min(len(terms), self.p.window)
            for s in b.segments:
                v = COUNTRY.labels.index(s.value)
                seg_terms = [term for backend, term, c in self.model.joined if backend == b.backend and c == v]
                assert s.metric == self.model.metric(seg_terms), (s, seg_terms)
            assert b.missing_segment_total["country"] == sum(
                1 for backend, _, c in self.model.joined if backend == b.backend and c == MISSING_SEGMENT)


FeedbackMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_feedback_matches_model = FeedbackMachine.TestCase


def test_store_join_many_is_ordered():
    """The store answers each id in order: the pending one, then a DUPLICATE for its repeat, then UNKNOWN."""
    store = LocalPendingStore(keep_s=10.0, max_pending=10)
    p = Pending("stable", 0.0, 1, 0.9, ())
    store.add_many([("a", p)], 0.0)
    assert store.join_many(["a", "a", "b"], 1.0) == [p, Miss(JoinOutcome.DUPLICATE, "stable"),
                                                       Miss(JoinOutcome.UNKNOWN, None)]
