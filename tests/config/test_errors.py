"""Config errors as a new user meets them: every mistake of a file in one run, cross-references
included; a hint for a misspelt key; `${VAR}` inside a flow mapping; places for any key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.load import parse_config, place_of
from sidecar.errors import ConfigError

# a misspelt key in one backend, a backend that does not exist in a split
TWO_MISTAKES = """\
backends:
  stable: {url: http://127.0.0.1:9001, timout: 2s}
  canary: {url: http://127.0.0.1:9002}
routes:
  - name: fraud
    split: {stable: 95, canary2: 5}
"""

SEVERAL_MISTAKES = """\
listen: 0.0.0.0:8080
limits: {max_body_bytes: 10MB, body_timout: 30s}
backends:
  stable: {url: http://127.0.0.1:9001, timeout: soon}
  canary: {url: http://127.0.0.1:9002, max_inflght: 10}
routes:
  - name: fraud
    split: {stable: 95, canary2: 5}
    mirror:
      - {backend: shadow, percent: 10}
    retry: {atempts: 3}
  - name: fraud
    split: {stable: 1}
    sticky: {}
"""

SEVERAL_ERRORS = [
    "limits: unknown key 'body_timout' (did you mean 'body_timeout'?)",
    "backends.stable.timeout: invalid duration 'soon': use a number of seconds or '250ms', '2s', '1m'",
    "backends.canary: unknown key 'max_inflght' (did you mean 'max_inflight'?)",
    "routes[0].retry: unknown key 'atempts' (did you mean 'attempts'?)",
    "routes[1].sticky: missing required key 'header'",
    "routes[0].split: unknown backend 'canary2' (known: stable, canary)",
    "routes[0].mirror[0].backend: unknown backend 'shadow' (known: stable, canary)",
    "routes[1].name: duplicate route name 'fraud' (also routes[0])",
]


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(text, env={})
    return [str(i) for i in e.value.issues]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """`sidecar validate -c FILE` as a user runs it: a new process, no variable named A set."""
    env = {k: v for k, v in os.environ.items() if k not in ("A", "HOST")}
    return subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_field_errors_and_cross_references_in_one_run():
    """A misspelt key and an unknown backend in a split are both reported, in one run."""
    assert errors(TWO_MISTAKES) == [
        "backends.stable: unknown key 'timout' (did you mean 'timeout'?)",
        "routes[0].split: unknown backend 'canary2' (known: stable, canary)",
    ]


def test_several_mistakes_each_once():
    """Field errors come first, then cross-references; a part that failed is not reported twice."""
    assert errors(SEVERAL_MISTAKES) == SEVERAL_ERRORS


STABLE = "backends: {stable: {url: 'http://127.0.0.1:9001'}}\n"


@pytest.mark.parametrize(("text", "expected"), [
    # a weight that failed its own check is not summed: no "weights must not all be 0" echo
    (STABLE + "routes: [{name: r, split: {stable: -1}}]\n",
     ["routes[0].split.stable: Input should be greater than or equal to 0"]),
    # an invalid URL is still a URL: no "needs exactly one of `url` or `endpoints`" echo
    ("backends: {stable: {url: 'ftp://x'}}\nroutes: [{name: r, split: {stable: 1}}]\n",
     ["backends.stable.url: invalid backend URL 'ftp://x': use http(s)://host:port[/base/path]"]),
    # a backend written as a bare URL is still a backend's name
    ("backends: {stable: 'http://127.0.0.1:9001'}\nroutes: [{name: r, split: {stable: 1}}]\n",
     ["backends.stable: Input should be a valid dictionary or instance of BackendConfig"]),
    # an unset variable is reported once, not again as the invalid URL it leaves behind
    ("backends: {stable: {url: 'http://${NOPE_HOST}:1'}}\nroutes: [{name: r, split: {stable: 1, canary2: 1}}]\n",
     ["backends.stable.url: environment variable NOPE_HOST is not set (no default)",
      "routes[0].split: unknown backend 'canary2' (known: stable)"]),
    # a route with errors of its own still has its references checked
    (STABLE + "routes: [{split: {canary2: 1}, timout: 1s}]\n",
     ["routes[0]: missing required key 'name'",
      "routes[0]: unknown key 'timout' (did you mean 'timeout'?)",
      "routes[0].split: unknown backend 'canary2' (known: stable)"]),
    # without a usable `backends` there is nothing to check names against
    ("backends: [stable]\nroutes: [{name: r, split: {stable: 1}}]\n",
     ["backends: Input should be a valid dictionary"]),
])
def test_a_broken_part_is_reported_once(text: str, expected: list[str]):
    """What failed its own check is not reported again by a cross-reference that reads it."""
    assert errors(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("rotues: []\n", "(top level): unknown key 'rotues' (did you mean 'routes'?)"),
    ("bogus: 1\n", "(top level): unknown key 'bogus'"),
    ("routes: [{name: r, split: {s: 1}, match: {path_prefx: /}}]\n",
     "routes[0].match: unknown key 'path_prefx' (did you mean 'path_prefix'?)"),
    ("routes: [{name: r, split: {s: 1}, monitor: {features: {f: {frm: request, path: $.x}}}}]\n",
     "routes[0].monitor.features.f: unknown key 'frm' (did you mean 'from'?)"),
    ("routes: [{name: r, split: {s: 1}, retry: {backoff: {bas: 1s}}}]\n",
     "routes[0].retry.backoff: unknown key 'bas' (did you mean 'base'?)"),
])
def test_unknown_key_suggests_a_close_one(text: str, expected: str):
    """An unknown key names the key of that place it is close to, if any."""
    assert expected in errors("backends: {s: {url: 'http://127.0.0.1:1'}}\n" + text)


QUICK_START = """\
backends:
  stable: {url: http://${STABLE_HOST}:8501, timeout: 2s}
  canary: {url: http://10.0.0.6:8501, timeout: 2s}
routes:
  - name: fraud
    split: {stable: 95, canary: 5}
"""


@pytest.mark.parametrize(("text", "expected"), [
    (QUICK_START,
     "<config>:2:24: invalid YAML: inside {...} a value holding ${...} must be quoted; "
     'write url: "http://${STABLE_HOST}:8501"'),
    # a flow mapping over several lines: the line of the variable
    ("backends:\n  stable: {\n    timeout: 2s,\n    url: http://${HOST:-127.0.0.1}:${PORT}/v1\n  }\n",
     "<config>:4:17: invalid YAML: inside {...} a value holding ${...} must be quoted; "
     'write url: "http://${HOST:-127.0.0.1}:${PORT}/v1"'),
    ("backends:\n  ranker: {endpoints: [http://10.0.0.1:1, http://${HOST}:2]}\n",
     '<config>:2:50: invalid YAML: inside [...] a value holding ${...} must be quoted; write "http://${HOST}:2"'),
    ("admin: {token: ${SIDECAR_ADMIN_TOKEN:-}}\n",
     "<config>:1:16: invalid YAML: inside {...} a value holding ${...} must be quoted; "
     'write token: "${SIDECAR_ADMIN_TOKEN:-}"'),
    # a quoted variable on the line before a real YAML error is not blamed
    ("backends:\n  stable: {url: 'http://${HOST}:1', timeout: 2s\nroutes: []\n",
     "<config>:3:7: invalid YAML: expected ',' or '}', but got ':'"),
])
def test_variable_in_flow_collection_says_to_quote_it(text: str, expected: str):
    """An unquoted `${VAR}` inside {...} or [...] says where it is and how to quote the value."""
    assert errors(text) == [expected]


def test_quoted_as_told_the_quick_start_loads():
    """The value written as the error says loads, and the variable is expanded."""
    fixed = QUICK_START.replace("url: http://${STABLE_HOST}:8501", 'url: "http://${STABLE_HOST}:8501"')
    config, _ = parse_config(fixed, env={"STABLE_HOST": "10.0.0.5"})
    assert config.backends["stable"].url == "http://10.0.0.5:8501"


@pytest.mark.parametrize(("loc", "doc", "place"), [
    ((), None, "(top level)"),
    (("",), None, "''"),
    (("backends", "", "timeout"), None, "backends.''.timeout"),
    (("backends", "my.model", "timeout"), None, "backends.'my.model'.timeout"),
    (("backends", "a b"), None, "backends.'a b'"),
    (("backends", "it's"), None, "backends.\"it's\""),
    (("backends", "fraud-v2", "url"), None, "backends.fraud-v2.url"),
    (("backends", "2024"), None, "backends.'2024'"),
    (("backends", "true"), None, "backends.'true'"),
    (("routes", 0, "split", "stable"), None, "routes[0].split.stable"),
    # pydantic names the key `1` 1, `true` 1 and `null` 'None': the document tells keys from indices
    (("routes", 0, "split", 1), {"routes": [{"split": {1: 5}}]}, "routes[0].split.1"),
    (("routes", 0, "split", 1), {"routes": [{"split": {True: 5}}]}, "routes[0].split.true"),
    (("routes", 0, "split", "None"), {"routes": [{"split": {None: 5}}]}, "routes[0].split.null"),
    ((1.5,), {1.5: 1}, "'1.5'"),
])
def test_places_of_keys_that_are_not_words(loc: tuple[Any, ...], doc: Any, place: str):
    """A key that is not a plain word is quoted, so a place never reads empty or ambiguous."""
    assert place_of(loc, doc) == place


@pytest.mark.parametrize(("doc", "expected"), [
    # found by hypothesis (tests/reliability/test_fuzz_config.py): the error had an empty place
    ({"": "${A}"}, ["'': environment variable A is not set (no default)",
                    "(top level): missing required key 'backends'",
                    "(top level): missing required key 'routes'",
                    "(top level): unknown key ''"]),
    ({"backends": {"my.model": {"url": "http://127.0.0.1:1", "timeout": "soon"}},
      "routes": [{"name": "r", "split": {"my.model": 1, 7: 1, True: 1}}]},
     ["backends.'my.model'.timeout: invalid duration 'soon': use a number of seconds or '250ms', '2s', '1m'",
      "routes[0].split: key 7: Input should be a valid string",
      "routes[0].split: key true: Input should be a valid string"]),
])
def test_loader_places_of_odd_keys(doc: dict[Any, Any], expected: list[str]):
    """Errors under an empty, dotted, numeric or boolean key name it so that it can be found."""
    assert errors(yaml.safe_dump(doc)) == expected


@pytest.mark.parametrize(("text", "stderr"), [
    (TWO_MISTAKES, [
        "invalid config (2 errors)",
        "  backends.stable: unknown key 'timout' (did you mean 'timeout'?)",
        "  routes[0].split: unknown backend 'canary2' (known: stable, canary)"]),
    (SEVERAL_MISTAKES, ["invalid config (8 errors)", *(f"  {e}" for e in SEVERAL_ERRORS)]),
    (QUICK_START, [
        "invalid config (1 error)",
        "  PATH:2:24: invalid YAML: inside {...} a value holding ${...} must be quoted; "
        'write url: "http://${STABLE_HOST}:8501"']),
    ("'': ${A}\n", [
        "invalid config (4 errors)",
        "  '': environment variable A is not set (no default)",
        "  (top level): missing required key 'backends'",
        "  (top level): missing required key 'routes'",
        "  (top level): unknown key ''"]),
])
def test_validate_prints_every_error(tmp_path: Path, text: str, stderr: list[str]):
    """`sidecar validate -c FILE` prints every error of the file, each at its place, and exits 1."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    res = validate(path)
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.splitlines() == [f"{path}: {stderr[0]}", *(s.replace("PATH", str(path)) for s in stderr[1:])]
