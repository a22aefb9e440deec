"""The `feedback` section: refused until the shell serves it, every mistake named at its place,
and a valid section compiled into the route's plan."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from sidecar.config import model
from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import FeedbackPlan, Plan
from sidecar.core.feedback import DEFAULT_WINDOW, Metric
from sidecar.errors import ConfigError

FEEDBACK: dict[str, Any] = {
    "path": "/v1/feedback",
    "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
    "metric": "accuracy",
    "keep": "10m",
    "max_pending": 100000,
    "segments": {"country": {"from": "request", "path": "$.instances[0].country", "values": ["US", "DE", "FR"]}},
}
BASE: dict[str, Any] = {
    "backends": {"stable": {"url": "http://127.0.0.1:9001"}, "canary": {"url": "http://127.0.0.1:9002"}},
    "routes": [{"name": "fraud", "split": {"stable": 95, "canary": 5}, "feedback": FEEDBACK}],
}


def config(**feedback: Any) -> dict[str, Any]:
    """BASE with the route's feedback keys replaced (None removes a key)."""
    cfg = copy.deepcopy(BASE)
    fb = cfg["routes"][0]["feedback"]
    for key, value in feedback.items():
        if value is None:
            fb.pop(key, None)
        else:
            fb[key] = value
    return cfg


def errors_of(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return [str(i) for i in info.value.issues]


def plan_of(cfg: dict[str, Any]) -> Plan:
    config_, secrets = parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return Plan.build(LoadedConfig(config_, config_version(config_), None, secrets))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the config is now that the shell serves feedback (shell/feedback.py)."""
    monkeypatch.setattr(model, "FEEDBACK_SERVED", True)


def test_the_shell_serves_it():
    """The shell serves feedback, so the section is accepted."""
    assert model.FEEDBACK_SERVED is True
    assert plan_of(BASE).routes[0].feedback is not None


def test_refused_by_a_version_that_does_not_serve_it(monkeypatch: pytest.MonkeyPatch):
    """Were the shell not to serve feedback, a feedback section would be refused rather than accepted
    without effect."""
    monkeypatch.setattr(model, "FEEDBACK_SERVED", False)
    assert errors_of(BASE) == [
        "routes[0].feedback: not served by this version yet (docs/feedback.md#status): the section would have "
        "no effect, so it is refused; remove it"]


@pytest.mark.usefixtures("served")
def test_the_section_of_the_spec_compiles_into_the_route_plan():
    """The documented example loads, and its plan holds compiled paths, the policy and the window."""
    plan = plan_of(BASE)
    fb = plan.routes_by_name["fraud"].feedback
    assert isinstance(fb, FeedbackPlan)
    assert plan.feedback_by_path == {"/v1/feedback": fb}
    assert (fb.route, fb.path, fb.needs_request) == ("fraud", "/v1/feedback", True)
    p = fb.policy
    assert (p.metric, p.threshold, p.keep_s, p.max_pending, p.window) == (Metric.ACCURACY, 0.5, 600.0, 100000,
                                                                          DEFAULT_WINDOW)
    assert p.prediction_path is not None and p.prediction_path.first({"predictions": [0.7]}) == 0.7
    (seg,) = p.segments
    assert (seg.name, seg.source, seg.values, seg.labels) == ("country", "request", ("US", "DE", "FR"),
                                                              ("US", "DE", "FR", "other"))
    assert seg.index_of("DE") == 1 and seg.index_of("BR") == 3


@pytest.mark.usefixtures("served")
def test_window_is_the_monitor_window_and_defaults_apply():
    """The metrics cover `monitor.window` items; `keep`, `max_pending` and `metric` have defaults."""
    cfg = config(metric=None, keep=None, max_pending=None, segments=None)
    cfg["routes"][0]["monitor"] = {"window": 500}
    fb = plan_of(cfg).routes[0].feedback
    assert fb is not None
    p = fb.policy
    assert (p.metric, p.keep_s, p.max_pending, p.window, p.segments) == (Metric.ACCURACY, 600.0, 100000, 500, ())
    assert not fb.needs_request


@pytest.mark.usefixtures("served")
def test_fingerprint_follows_the_section_and_the_window():
    """A reload that changes nothing keeps the fingerprint; a new `keep` or window changes it."""
    same = plan_of(BASE).routes[0].feedback
    again = plan_of(BASE).routes[0].feedback
    longer = plan_of(config(keep="1h")).routes[0].feedback
    windowed = copy.deepcopy(BASE)
    windowed["routes"][0]["monitor"] = {"window": 100}
    other_window = plan_of(windowed).routes[0].feedback
    assert same is not None and again is not None and longer is not None and other_window is not None
    assert same.fingerprint == again.fingerprint
    assert len({same.fingerprint, longer.fingerprint, other_window.fingerprint}) == 3


@pytest.mark.usefixtures("served")
def test_mean_needs_no_prediction_and_segment_values_are_text():
    """`metric: mean` loads without `prediction`; segment values 1.0 and true read as "1" and "true"."""
    cfg = config(metric="mean", prediction=None,
                 segments={"tier": {"from": "response", "path": "$.tier", "values": [1.0, 2, True]}})
    fb = plan_of(cfg).routes[0].feedback
    assert fb is not None
    assert fb.policy.prediction_path is None
    assert fb.policy.segments[0].values == ("1", "2", "true")
    assert fb.policy.segments[0].index_of(1.0) == 0


@pytest.mark.usefixtures("served")
@pytest.mark.parametrize(("feedback", "expected"), [
    ({"metric": "mae", "prediction": {"path": "$.predictions[0]"}, "max_pendng": 5},
     ["routes[0].feedback: unknown key 'max_pendng' (did you mean 'max_pending'?)"]),
    ({"metric": "mae", "prediction": None},
     ["routes[0].feedback: metric 'mae' needs `prediction: {path: ...}`: where the answer holds the predicted "
      "class or number"]),
    ({"metric": "rmse"},
     ["routes[0].feedback.prediction.threshold: a threshold turns scores into classes: only for metric accuracy "
      "(metric is 'rmse')"]),
    ({"metric": "precision"},
     ["routes[0].feedback.metric: Input should be 'accuracy', 'mae', 'rmse' or 'mean'"]),
    ({"prediction": {"path": "$.predictions[*]"}},
     ["routes[0].feedback.prediction.path: '$.predictions[*]' may find several values, but this is one value per "
      "request: use an index such as [0] instead of [*]"]),
    ({"prediction": {"path": "$.predictions[0", "threshold": 0.5}},
     ["routes[0].feedback.prediction.path: bad JSON path '$.predictions[0': unclosed '[' at 13"]),
    ({"prediction": {"path": "$.p", "threshold": "half"}},
     ["routes[0].feedback.prediction.threshold: Input should be a valid number, unable to parse string as a "
      "number"]),
    ({"path": "v1/feedback"},
     ["routes[0].feedback.path: invalid path 'v1/feedback': it must start with '/' and hold no spaces"]),
    ({"path": "/v1/feedback?route=fraud"},
     ["routes[0].feedback.path: invalid path '/v1/feedback?route=fraud': the feedback path takes no query"]),
    ({"keep": "a day"},
     ["routes[0].feedback.keep: invalid duration 'a day': use a number of seconds or '250ms', '2s', '1m'"]),
    ({"max_pending": 0}, ["routes[0].feedback.max_pending: Input should be greater than or equal to 1"]),
    ({"segments": {"country": {"from": "body", "path": "$.c", "values": ["US"]}}},
     ["routes[0].feedback.segments.country.from: Input should be 'request' or 'response'"]),
    ({"segments": {"country": {"from": "request", "path": "$.c", "values": []}}},
     ["routes[0].feedback.segments.country.values: List should have at least 1 item after validation, not 0"]),
    ({"segments": {"tier": {"from": "request", "path": "$.t", "values": [1, "1"]}}},
     ["routes[0].feedback.segments.tier.values: 1 and '1' are the same segment value"]),
    ({"segments": {"country": {"from": "request", "path": "$.c", "values": ["US", "other"]}}},
     ["routes[0].feedback.segments.country.values: 'other' names every value not in this list; it cannot be one "
      "of them"]),
    ({"segments": {"country": {"from": "request", "path": "$.c", "values": ["x" * 65]}}},
     [f"routes[0].feedback.segments.country.values: segment value '{'x' * 65}': use a string of 1 to 64 "
      "characters, an integer or a boolean"]),
    ({"segments": {"country": {"from": "request", "path": "$.c", "values": ["US", 1.5]}}},
     ["routes[0].feedback.segments.country.values[1]: segment value 1.5: use a string, an integer or a boolean"]),
    ({"segments": {f"s{i}": {"from": "request", "path": "$.c", "values": ["a"]} for i in range(17)}},
     ["routes[0].feedback.segments: Dictionary should have at most 16 items after validation, not more"]),
])
def test_mistakes_are_named_at_their_place(feedback: dict[str, Any], expected: list[str]):
    """Each mistake in a feedback section is reported once, at its place, saying what to write."""
    assert errors_of(config(**feedback)) == expected


@pytest.mark.usefixtures("served")
def test_field_errors_and_cross_references_in_one_run():
    """A bad duration, a missing prediction and a feedback path taken twice are all reported in one run."""
    cfg = config(keep="soon", metric="mae", prediction=None)
    second = copy.deepcopy(BASE["routes"][0])
    second["name"] = "fraud-eu"
    cfg["routes"].append(second)
    assert errors_of(cfg) == [
        "routes[0].feedback.keep: invalid duration 'soon': use a number of seconds or '250ms', '2s', '1m'",
        "routes[0].feedback: metric 'mae' needs `prediction: {path: ...}`: where the answer holds the predicted "
        "class or number",
        "routes[1].feedback.path: '/v1/feedback' is already the feedback path of routes[0]",
    ]


@pytest.mark.usefixtures("served")
def test_a_broken_metric_is_not_reported_again():
    """A metric that failed its own check is not read by the cross-references (no 'needs prediction' echo)."""
    cfg = config(metric="precision", prediction=None, keep="soon")
    assert errors_of(cfg) == [
        "routes[0].feedback.metric: Input should be 'accuracy', 'mae', 'rmse' or 'mean'",
        "routes[0].feedback.keep: invalid duration 'soon': use a number of seconds or '250ms', '2s', '1m'",
    ]
