"""The `fleet` block: defaults, refusals at their place, the store's password masked."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from sidecar.config.load import LoadedConfig, config_version, parse_config
from sidecar.config.plan import Plan
from sidecar.errors import ConfigError
from sidecar.shell.admin import masked_config

BASE: dict[str, Any] = {"backends": {"m": {"url": "http://127.0.0.1:9001"}},
                        "routes": [{"name": "r", "split": {"m": 1}}]}


def with_fleet(fleet: dict[str, Any], env: dict[str, str] | None = None) -> Plan:
    cfg, secrets = parse_config(yaml.safe_dump({**BASE, "fleet": fleet}), env=env or {})
    return Plan.build(LoadedConfig(cfg, config_version(cfg), None, secrets))


def errors_of(fleet: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        with_fleet(fleet)
    return [str(i) for i in info.value.issues]


def test_defaults_are_the_specs():
    f = with_fleet({"redis": "redis://127.0.0.1:6379/0", "name": "fraud-sidecars"}).config.fleet
    assert f is not None and (f.lease, f.sync_every) == (10.0, 1.0)


@pytest.mark.parametrize(("fleet", "error"), [
    ({"name": "x"}, "fleet: missing required key 'redis'"),
    ({"redis": "http://127.0.0.1:6379", "name": "x"}, "fleet: redis must be a redis://, rediss:// or unix:// URL"),
    ({"redis": "redis://h", "name": "a b"}, "fleet.name: "),
    ({"redis": "redis://h", "name": "x", "lease": "2s", "sync_every": "1s"},
     "fleet: lease (2s) must be at least 3 x sync_every (1s)"),
    ({"redis": "redis://h", "name": "x", "sync": "1s"}, "fleet: unknown key 'sync'"),
])
def test_mistakes_are_named_at_their_place(fleet, error):
    errors = errors_of(fleet)
    assert len(errors) == 1 and errors[0].startswith(error), errors


def test_the_stores_password_is_masked_in_admin_config():
    """A password in the URL, literal or from ${VAR}, never shows in /admin/config."""
    plan = with_fleet({"redis": "redis://:s3cret@redis:6379/0", "name": "x"})
    assert masked_config(plan)["fleet"]["redis"] == "redis://:***@redis:6379/0"
    plan = with_fleet({"redis": "${REDIS_URL}", "name": "x"}, env={"REDIS_URL": "redis://u:pw@r:6379/1"})
    assert "pw" not in str(masked_config(plan)["fleet"])
