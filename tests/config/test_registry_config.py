"""`registry`, `backends.<name>.model` and `rollout.registry`: the documented shapes compile; a model without a
registry to resolve it in, or a rollout with nothing to write to, is refused at its place."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan
from sidecar.core.registry import ModelRef
from sidecar.errors import ConfigError

BASE: dict[str, Any] = {
    "registry": {"mlflow": {"url": "http://127.0.0.1:5000", "token": "t0ken"}},
    "backends": {
        "stable": {"url": "http://127.0.0.1:9001", "model": {"name": "fraud", "alias": "champion"}},
        "canary": {"url": "http://127.0.0.1:9002", "model": {"name": "fraud", "version": 7}},
    },
    "routes": [{"name": "fraud", "split": {"stable": 95, "canary": 5},
                "rollout": {"canary": "canary", "baseline": "stable", "steps": [50, 100],
                            "registry": {"promote_alias": "champion"}}}],
}


def plan_of(cfg: dict[str, Any]) -> Plan:
    config, secrets = parse_config(yaml.safe_dump(cfg), env={})
    return Plan.build(LoadedConfig(config, config_version(config), None, secrets))


def errors_of(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg), env={})
    return [str(i) for i in info.value.issues]


def changed(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


def test_the_documented_shapes_compile():
    """A static version (YAML int or string), an alias, the registry's defaults and the rollout's alias."""
    plan = plan_of(BASE)
    assert plan.backends["stable"].model == ModelRef("fraud", None, "champion")
    assert plan.backends["canary"].model == ModelRef("fraud", "7", None)
    assert plan.registry is not None
    assert (plan.registry.kind, plan.registry.url, plan.registry.token) == ("mlflow", "http://127.0.0.1:5000", "t0ken")
    assert (plan.registry.timeout_s, plan.registry.refresh_s) == (2.0, 60.0)
    assert plan.routes[0].rollout is not None and plan.routes[0].rollout.promote_alias == "champion"


def test_a_model_changes_the_rollout_key_but_a_registry_address_does_not():
    """The canary's model is part of its backend (a new version is a new rollout); the registry's URL is not."""
    key = plan_of(BASE).routes[0].rollout.policy.key  # type: ignore[union-attr]
    assert plan_of(changed(("backends", "canary", "model", "version"), "8")).routes[0] \
        .rollout.policy.key != key  # type: ignore[union-attr]
    assert plan_of(changed(("registry", "mlflow", "url"), "http://10.0.0.1:5000")).routes[0] \
        .rollout.policy.key == key  # type: ignore[union-attr]


@pytest.mark.parametrize(("path", "value", "error"), [
    (("registry",), None, "backends.stable.model.alias: an alias is resolved in the registry: set `registry.mlflow`"),
    (("backends", "canary", "model"), None,
     "routes[0].rollout.registry: the canary 'canary' has no `model`: set backends.canary.model"),
    (("backends", "canary", "model"), {"name": "fraud"}, "backends.canary.model: give exactly one of `version` or "
                                                         "`alias`"),
    (("backends", "canary", "model"), {"name": "fraud", "version": "1", "alias": "x"},
     "backends.canary.model: give exactly one of"),
    (("backends", "stable", "model", "alias"), "latest", "backends.stable.model.alias: invalid registry alias"),
    (("routes", 0, "rollout", "registry", "promote_alias"), "v3",
     "routes[0].rollout.registry.promote_alias: invalid registry alias 'v3'"),
    (("registry", "mlflow", "url"), "ftp://x", "registry.mlflow.url: invalid backend URL"),
    (("registry", "mlflow", "refresh"), "0s", "registry.mlflow.refresh: must be greater than 0"),
    (("registry", "mlflow", "tokn"), "x", "registry.mlflow: unknown key 'tokn'"),
    (("registry", "mlflow", "url"), "http://u:p@127.0.0.1:5000", "registry.mlflow: give `token` or credentials"),
])
def test_mistakes_are_named_at_their_place(path, value, error):
    """Each mistake is one error, at its place."""
    errors = errors_of(changed(path, value))
    assert any(e.startswith(error) for e in errors), errors


def test_a_rollout_registry_without_the_top_level_registry_is_refused():
    """Nothing to write to: refused, where the rollout asks for it."""
    cfg = changed(("registry",), None)
    del cfg["backends"]["stable"]["model"]
    assert errors_of(cfg) == ["routes[0].rollout.registry: needs the top-level `registry` to write to"]
