"""The route's `rollout` block: the documented example compiles into the core's policies; mistakes and the gates
not served yet are named at their place."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan, RolloutPlan
from sidecar.core.gates import CompareErrors, CompareLatency
from sidecar.core.rollout import OnFailure
from sidecar.errors import ConfigError

ROLLOUT: dict[str, Any] = {
    "canary": "canary", "baseline": "stable", "steps": [5, 10, 25, 50, 100], "interval": "60s",
    "min_requests": 200,
    "gates": {"max_error_rate": 0.01, "max_p99": "500ms", "max_p99_ratio": 1.5,
              "compare": {"latency": "mann_whitney", "errors": "two_proportion", "alpha": 0.01}},
    "progress_deadline": "10m", "bake": "5m", "dry_run": False, "on_failure": "rollback",
    "notify": {"webhook": "http://127.0.0.1:9100/hooks/rollout", "headers": {"Authorization": "Bearer x"},
               "timeout": "2s"},
}
BASE: dict[str, Any] = {
    "backends": {"stable": {"url": "http://127.0.0.1:9001"}, "canary": {"url": "http://127.0.0.1:9002"}},
    "routes": [{"name": "fraud", "split": {"stable": 95, "canary": 5}, "rollout": ROLLOUT}],
}


def config(**rollout: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    cfg["routes"][0]["rollout"].update(rollout)
    return cfg


def errors_of(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return [str(i) for i in info.value.issues]


def plan_of(cfg: dict[str, Any]) -> Plan:
    config_, secrets = parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return Plan.build(LoadedConfig(config_, config_version(config_), None, secrets))


def rollout_of(cfg: dict[str, Any]) -> RolloutPlan:
    ro = plan_of(cfg).routes_by_name["fraud"].rollout
    assert ro is not None
    return ro


def test_the_spec_example_compiles_into_the_core_policies():
    """The documented block loads into a RolloutPolicy and GatePolicy with seconds and enums."""
    ro = rollout_of(BASE)
    p = ro.policy
    assert (p.canary, p.baseline, p.steps, p.interval_s) == ("canary", "stable", (5, 10, 25, 50, 100), 60.0)
    assert (p.progress_deadline_s, p.bake_s, p.dry_run, p.on_failure) == (600.0, 300.0, False, OnFailure.ROLLBACK)
    g = p.gates
    assert (g.min_requests, g.max_error_rate, g.max_p99_s, g.max_p99_ratio) == (200, 0.01, 0.5, 1.5)
    assert (g.compare_latency, g.compare_errors, g.alpha) == (CompareLatency.MANN_WHITNEY,
                                                              CompareErrors.TWO_PROPORTION, 0.01)
    assert ro.notify is not None and ro.notify.timeout_s == 2.0
    assert ro.notify.headers == (("authorization", "Bearer x"),)


def test_the_key_ignores_notify_and_follows_the_rollout_and_its_backends():
    """A new webhook keeps the rollout's key; new steps or a changed canary backend make a new one."""
    key = rollout_of(BASE).policy.key
    assert rollout_of(config(notify={"webhook": "http://127.0.0.1:9/x"})).policy.key == key
    assert rollout_of(config(steps=[10, 100])).policy.key != key
    changed = config()
    changed["backends"]["canary"]["timeout"] = "3s"
    assert rollout_of(changed).policy.key != key


@pytest.mark.parametrize(("rollout", "error"), [
    ({"canary": "shadow"}, "routes[0].rollout.canary: backend 'shadow' is not in the route's split "
                           "(split: stable, canary)"),
    ({"baseline": "canary"}, "routes[0].rollout.baseline: must differ from the canary ('canary')"),
    ({"steps": [10, 5, 100]}, "routes[0].rollout.steps: must be strictly increasing, got [10, 5, 100]"),
    ({"gates": {"no_drift": ["score"]}}, "routes[0].rollout.gates.no_drift: not served yet "
                                         "(docs/rollout.md#gates-not-served-yet)"),
    ({"gates": {"min_feedback": 0.9}}, "routes[0].rollout.gates.min_feedback: not served yet"),
    ({"gates": {"min_agreement": 0.9}}, "routes[0].rollout.gates.min_agreement: not served yet"),
])
def test_mistakes_and_gates_not_served_are_named_at_their_place(rollout, error):
    """Each mistake, and each gate the driver cannot feed yet, is one error at its place."""
    errors = errors_of(config(**rollout))
    assert len(errors) == 1 and errors[0].startswith(error), errors


def test_unknown_keys_and_bad_values_are_refused():
    """Unknown keys, steps out of 1-100 and an unknown on_failure are refused."""
    assert errors_of(config(wait=3)) == ["routes[0].rollout: unknown key 'wait'"]
    assert any("rollout.steps" in e for e in errors_of(config(steps=[0, 100])))
    assert any("rollout.on_failure" in e for e in errors_of(config(on_failure="ignore")))
