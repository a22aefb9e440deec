"""Fuzzing the config loader: any document gives a valid config or errors that each name a
place and say what is wrong, never a traceback.

The mutation base is config/example.yaml, which shows the capabilities' sections (health
checks, breakers, retry, fallback, mirror, monitor), so mutations reach them too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.config.load import load_yaml, parse_config
from sidecar.config.model import Config
from sidecar.errors import ConfigError

EXAMPLE = load_yaml((Path(__file__).resolve().parents[2] / "config" / "example.yaml").read_text())
ENV = {"SET": "8080", "STABLE_HOST": "10.0.0.1", "EMPTY": "", "SIDECAR_ADMIN_TOKEN": "t0k"}


def check(text: str) -> None:
    issues = []
    try:
        cfg, _ = parse_config(text, env=ENV)
    except ConfigError as e:  # any other exception fails the test with its traceback
        issues = e.issues
        assert issues
    else:
        assert isinstance(cfg, Config)
    for issue in issues:
        assert isinstance(issue.place, str) and issue.place.strip(), issues
        assert isinstance(issue.message, str) and issue.message.strip(), issues


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["250ms", "2s", "1m", "-1s", "0", "soon", "1e309", "10MiB", "-5KB", "1.5GiB", "9" * 30,
                     "http://127.0.0.1:9001", "ftp://x", "http://", "http://h:99999999", "127.0.0.1:0", ":80",
                     "[::1]:9901", "${SET}", "${UNSET}", "${UNSET:-3s}", "${EMPTY}", "${", "${}", "$${SET}",
                     "stable", "canary", "POST", "get", "x-user-id", "bad header", "", " "]),
)
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4)),
    max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text(text: str):
    """Arbitrary text: a config or located errors."""
    check(text)


@settings(max_examples=150, deadline=None)
@given(documents)
@example({"": "${A}"})  # an unset variable under the empty key: its error had an empty place
def test_any_document(doc: Any):
    """Arbitrary nested YAML documents: a config or located errors."""
    check(yaml.safe_dump(doc))


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


ALL_PATHS = [p for p in paths(EXAMPLE) if p]


def mutate(doc: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    def has(node: Any, part: Any) -> bool:
        return (isinstance(node, dict) and part in node) or \
            (isinstance(node, list) and isinstance(part, int) and part < len(node))

    parent = doc
    for part in path[:-1]:  # an earlier mutation may have replaced or removed part of the path
        if not has(parent, part):
            return doc
        parent = parent[part]
    key = path[-1]
    if not has(parent, key):
        return doc
    if op == "replace":
        parent[key] = value
    elif op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "unknown_key":
        target = parent[key]
        if isinstance(target, dict):
            target["not_a_key"] = value
        else:
            parent[key] = {"not_a_key": value}
    return doc


@settings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["replace", "delete", "unknown_key"]),
                          documents), min_size=1, max_size=3))
def test_mutated_example(mutations: list[tuple[tuple[Any, ...], str, Any]]):
    """The example config with wrong types, missing or unknown keys, bad values: a config or located errors."""
    doc: Any = EXAMPLE
    for path, op, value in mutations:
        try:
            doc = mutate(doc, path, op, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    check(yaml.safe_dump(doc))


def test_example_itself_is_valid():
    """The mutation base is a valid config (else every mutation would only test one error)."""
    check(yaml.safe_dump(EXAMPLE))
    parse_config(yaml.safe_dump(EXAMPLE), env=ENV)


# The weights body and the admin API's OpenAPI document are fuzzed against a running
# sidecar in test_fuzz_admin.py. There is no feedback capability (no feedback body to fuzz).
# The JSON path subset has its properties in tests/core/test_jsonpath.py.
