"""Resilience config: validation with places, compiled policies, and state kept across a rebuild."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan
from sidecar.core.balance import Balance
from sidecar.core.retry import RetryPolicy
from sidecar.errors import ConfigError
from sidecar.shell.runtime import Runtime


def plan_of(cfg: dict[str, Any]) -> Plan:
    config, secrets = parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return Plan.build(LoadedConfig(config, config_version(config), None, secrets))


def errors_of(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(cfg, sort_keys=False), env={})
    return [str(i) for i in info.value.issues]


BASE: dict[str, Any] = {
    "backends": {"stable": {"url": "http://127.0.0.1:9001", "timeout": "2s"},
                 "ranker": {"endpoints": ["http://127.0.0.1:9011/a", "http://127.0.0.1:9012"]}},
    "routes": [{"name": "r", "split": {"stable": 1, "ranker": 1}, "timeout": "3s"}],
}


def with_route(**route: Any) -> dict[str, Any]:
    return {**BASE, "routes": [{**BASE["routes"][0], **route}]}


def test_url_and_endpoints_are_exclusive():
    """A backend with both `url` and `endpoints`, or neither, is refused with its place."""
    both = {**BASE, "backends": {**BASE["backends"], "x": {"url": "http://a:1", "endpoints": ["http://b:1"]}}}
    assert errors_of(both) == ["backends.x: needs exactly one of `url` or `endpoints`"]
    neither = {**BASE, "backends": {**BASE["backends"], "x": {"timeout": "1s"}}}
    assert errors_of(neither) == ["backends.x: needs exactly one of `url` or `endpoints`"]


def test_fallback_and_retry_errors_name_their_place():
    """Unknown fallback backends, static responses not last and unknown retry conditions are named."""
    errs = errors_of(with_route(fallback=[{"response": {"status": 200}}, {"backend": "nope"}, {}]))
    assert errs == [
        "routes[0].fallback[0]: a static `response` always answers: put it last",
        "routes[0].fallback[1].backend: unknown backend 'nope' (known: stable, ranker)",
        "routes[0].fallback[2]: needs exactly one of `backend` or `response`",
    ]
    assert errors_of(with_route(retry={"on": ["5xx", "gateway"]}))[0].startswith(
        "routes[0].retry.on: unknown retry condition 'gateway'")
    assert "400-599" in errors_of(with_route(retry={"on": [200]}))[0]
    assert errors_of(with_route(retry={"backoff": {"base": "1s", "max": "10ms"}}))[0].startswith(
        "routes[0].retry.backoff: base (1s) must not exceed max")


def test_plan_compiles_policies_and_per_backend_timeouts():
    """per_try_timeout defaults to each backend's timeout; first_byte_timeout to per_try_timeout."""
    plan = plan_of(with_route(retry={"attempts": 3, "on": ["connect-error", "5xx", 429], "hedge_after": "200ms"},
                              fallback=[{"backend": "stable"}, {"response": {"status": 503, "json": {"a": 1}}}]))
    route = plan.routes[0]
    assert route.retry.attempts == 3 and route.retry.on_5xx and not route.retry.on_timeout
    assert route.retry.on_statuses == frozenset({429}) and route.retry.hedge_after_s == 0.2
    assert [(t.first_byte_s, t.per_try_s) for t in route.timeouts] == [(2.0, 2.0), (15.0, 15.0)]
    assert [f.label for f in route.fallback] == ["stable", "fallback:response"]
    assert route.fallback[1].body == b'{"a":1}'
    assert ("content-type", "application/json") in route.fallback[1].headers
    ranker = plan.backends["ranker"]
    assert [e.base_path for e in ranker.endpoints] == ["/a", ""]
    assert ranker.balance is Balance.LEAST_REQUEST and ranker.breaker is None
    no_retry = plan_of(BASE).routes[0]
    assert no_retry.retry == RetryPolicy.single() and no_retry.retry_budget is None


def test_rebuild_keeps_state_of_unchanged_backends_and_routes():
    """A reload keeps the breakers, pools and retry budgets of what did not change, and renews the rest."""
    cfg = with_route(retry={"budget": 0.3})
    cfg["backends"]["stable"]["circuit_breaker"] = {"consecutive_failures": 2}
    old = Runtime.build(plan_of(cfg))
    changed = {**cfg, "backends": {**cfg["backends"], "ranker": {"endpoints": ["http://127.0.0.1:9013"]}}}
    new = Runtime.build(plan_of(changed), old)
    assert new.backends["stable"] is old.backends["stable"]
    assert new.backends["ranker"] is not old.backends["ranker"]
    assert new.route_states["r"].budget is not old.route_states["r"].budget  # the route uses `ranker`
    same = Runtime.build(plan_of(changed), new)
    assert same.route_states["r"].budget is new.route_states["r"].budget
    assert old.retired_backends(new) == [old.backends["ranker"]]
