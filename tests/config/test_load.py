"""Loading config files: types, substitution, and errors that name their place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config.load import load_config, parse_config
from sidecar.config.model import parse_duration, parse_size
from sidecar.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = """
backends:
  stable: {url: http://127.0.0.1:9001}
  canary: {url: http://127.0.0.1:9002}
routes:
  - name: fraud
    split: {stable: 95, canary: 5}
"""


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, env=env or {})
    return [str(i) for i in e.value.issues]


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), (3, 3.0), ("1.5", 1.5)])
def test_durations(text, seconds):
    """Durations accept units or plain seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [(10, 10), ("10MiB", 10 * 1024**2), ("1MB", 10**6), ("512KiB", 524288)])
def test_sizes(text, size):
    """Sizes: KB/MB are powers of 1000, KiB/MiB of 1024, plain integers are bytes."""
    assert parse_size(text) == size


def test_unknown_backend_in_split_names_its_place():
    """A split naming an unknown backend is reported at routes[0].split with the known names."""
    assert errors(BASE.replace("canary: 5", "canary2: 5")) == [
        "routes[0].split: unknown backend 'canary2' (known: stable, canary)"]


def test_every_error_is_reported_at_once():
    """Several mistakes give several errors, each with its place."""
    text = BASE.replace("url: http://127.0.0.1:9001}", "url: http://127.0.0.1:9001, timeout: soon}") + "bogus: 1\n"
    text = text.replace("name: fraud", "name: fraud\n    sticky: {}")
    got = errors(text)
    assert "backends.stable.timeout: invalid duration 'soon': use a number of seconds or '250ms', '2s', '1m'" in got
    assert "(top level): unknown key 'bogus'" in got
    assert "routes[0].sticky: missing required key 'header'" in got


def test_env_substitution_with_defaults_and_types():
    """${NAME} and ${NAME:-default} fill strings; a whole-value variable converts to the field's type."""
    text = BASE.replace("http://127.0.0.1:9001", "'http://${HOST}:${PORT:-9001}'") + \
        "limits: {max_inflight: '${INFLIGHT}'}\nadmin: {token: '${MY_TOKEN:-}'}\n"
    cfg, secrets = parse_config(text, env={"HOST": "10.0.0.5", "INFLIGHT": "7"})
    assert cfg.backends["stable"].url == "http://10.0.0.5:9001"
    assert cfg.limits.max_inflight == 7
    assert "admin.token" in secrets


def test_unset_variable_without_default_is_an_error_naming_it():
    """An unset variable without default names the place and the variable."""
    assert errors(BASE.replace("http://127.0.0.1:9001", "'http://${NOPE_HOST}:1'")) == [
        "backends.stable.url: environment variable NOPE_HOST is not set (no default)"]


@pytest.mark.parametrize(("text", "expected"), [
    ("backends: [1]\n", "backends: Input should be a valid dictionary"),
    ("routes: {\n", "invalid YAML"),
    ("- a\n", "(top level): the config must be a mapping"),
    (BASE.replace("split: {stable: 95, canary: 5}", "split: {stable: 0, canary: 0}"), "weights must not all be 0"),
    (BASE.replace("split: {stable: 95, canary: 5}", "split: {stable: -1}"), "routes[0].split.stable"),
    (BASE.replace("http://127.0.0.1:9001", "ftp://x"), "backends.stable.url: invalid backend URL"),
    (BASE + "listen: nowhere\n", "listen: invalid listen address"),
])
def test_bad_configs_name_their_place(text, expected):
    """Wrong types, bad YAML and bad values are errors that say where."""
    assert any(expected in e for e in errors(text)), errors(text)


def test_version_is_stable_and_changes_with_content(tmp_path):
    """The same config has the same version; a change gives a new one."""
    p = tmp_path / "c.yaml"
    p.write_text(BASE)
    v1 = load_config(p).version
    p.write_text(BASE + "\n# a comment changes nothing\n")
    assert load_config(p).version == v1
    p.write_text(BASE.replace("95", "90"))
    assert load_config(p).version != v1


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_validate_cli_ok_and_every_error(tmp_path):
    """`sidecar validate` exits 0 with a summary, or 1 listing every error."""
    ok = run_cli("validate", "-c", str(ROOT / "config" / "example.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "route fraud" in ok.stdout
    assert "rollout canary vs stable: steps [5, 10, 25, 50, 100] every 60s" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("canary: 5", "canary2: 5") + "extra: true\n")
    res = run_cli("validate", "-c", str(bad))
    assert res.returncode == 1
    assert "(top level): unknown key 'extra'" in res.stderr
    missing = run_cli("validate", "-c", str(tmp_path / "none.yaml"))
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr


def test_schema_cli_prints_json_schema():
    """`sidecar schema` prints a JSON Schema that forbids unknown keys."""
    res = run_cli("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert schema["additionalProperties"] is False
    assert "routes" in schema["properties"] and "backends" in schema["required"]


def test_yaml_on_off_yes_no_are_strings_not_booleans():
    """`retry: {on: [...]}` is the key "on", not YAML 1.1's boolean True (docs/reference/configuration.md#formats)."""
    text = BASE.replace("split: {stable: 95, canary: 5}",
                        "split: {stable: 95, canary: 5}\n    retry:\n      on: [connect-error, 503]")
    cfg, _ = parse_config(text + "access_log: false\n", env={})
    assert cfg.routes[0].retry is not None and cfg.routes[0].retry.on == ["connect-error", 503]
    assert cfg.access_log is False


def test_weights_whose_sum_overflows_are_refused():
    """Split weights so large that their sum is infinite are an error at their place."""
    assert any("routes[0].split: weights are too large" in e
               for e in errors(BASE.replace("{stable: 95, canary: 5}", "{stable: 1.7e308, canary: 1.7e308}")))
