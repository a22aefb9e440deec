"""Read a config file: expand ${VAR}, parse YAML, validate, and name the place of every error.

Order (docs/reference/configuration.md): YAML is parsed first, then `${NAME}` / `${NAME:-default}` are replaced inside
string values (never keys); a string that was only `${NAME}` is then converted by pydantic to
the field's type. Places read like `routes[0].split` and `backends.stable.timeout`.
`load_config` reads no state and writes nothing, so `sidecar validate` is side-effect free.

Every error in one run: pydantic reports every field error but stops before the root
validator, so the cross-references would wait for the next run. When anything failed,
`parse_config` takes a second, lenient pass: the raw mapping with each value that failed
(and each unset variable) replaced by `UNPARSED` goes through the same rules,
`model.reference_issues`, which skip what did not parse. The list reads: unset variables,
field errors (unknown keys with a "did you mean" when a key of that place is close), then
cross-references. A YAML error caused by a `${...}` inside a flow mapping `{...}` or sequence
`[...]` (where `{` ends a plain value) says to quote that value.

Imports: stdlib, yaml, pydantic, sidecar.config.model, sidecar.errors.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from sidecar.config.model import (
    UNPARSED,
    Config,
    ReferenceErrors,
    key_text,
    keys_at,
    place_of,
    reference_issues,
    resolve,
)
from sidecar.errors import ConfigError, ConfigIssue

__all__ = ["LoadedConfig", "config_version", "load_config", "load_yaml", "parse_config", "place_of"]


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false. In YAML 1.1 (PyYAML's default) `on`, `off`,
    `yes`, `no` are booleans too, which would turn `retry: {on: [...]}` into True (docs/reference/configuration.md)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

def load_yaml(text: str) -> Any:
    """YAML as the config loader reads it (1.2 booleans; safe: no arbitrary objects)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: Config
    version: str                      # hash of the canonical dump: same config, same version
    path: Path | None
    secret_places: frozenset[str] = field(default_factory=frozenset)  # values from *TOKEN* etc.


Loc = tuple[Any, ...]  # keys and list indices, as the document holds them


def _expand(node: Any, loc: Loc, env: Mapping[str, str], unset: dict[Loc, ConfigIssue],
            secrets: set[str]) -> Any:
    if isinstance(node, str):
        if "${" not in node:
            return node

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if _SECRET_NAME.search(name):
                secrets.add(place_of(loc))
            if name in env:
                return env[name]
            if default is not None:
                return default
            unset.setdefault(loc, ConfigIssue(place_of(loc), f"environment variable {name} is not set (no default)"))
            return m.group(0)

        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand(v, (*loc, k), env, unset, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*loc, i), env, unset, secrets) for i, v in enumerate(node)]
    return node


_KEY = "[key]"  # pydantic's last loc part when a mapping's key (not its value) failed


def _issue_from_pydantic(err: Mapping[str, Any], doc: Any) -> ConfigIssue:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    kind = err["type"]
    if kind == "extra_forbidden":
        key = resolve(doc, loc)[0][-1][1]
        msg = f"unknown key {key_text(key)}"
        close = difflib.get_close_matches(key, keys_at(loc[:-1]), n=1) if isinstance(key, str) else []
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        return ConfigIssue(place_of(loc[:-1], doc), msg)
    if kind == "missing":
        return ConfigIssue(place_of(loc[:-1], doc), f"missing required key {key_text(loc[-1])}")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if loc and loc[-1] == _KEY:  # named in the message, placed at its mapping, as an unknown key is
        key = resolve(doc, loc[:-1])[0][-1][1]
        return ConfigIssue(place_of(loc[:-2], doc), f"key {key_text(key)}: {msg}")
    return ConfigIssue(place_of(loc, doc), msg)


def _without(doc: Any, locs: Sequence[Sequence[Any]]) -> Any:
    """A copy of `doc` with the value at each loc replaced by UNPARSED, for the lenient pass.

    A loc that goes on past the document (pydantic names a union's members) replaces the
    deepest value it reaches. A missing key or a failed mapping key replaces nothing: the
    mapping around it is still worth checking, and a name that failed is still a name.
    """
    doc = copy.deepcopy(doc)  # _expand made every container anew: no YAML alias shares one
    for loc in locs:
        if loc and loc[-1] == _KEY:
            continue
        node: Any = doc
        path: list[tuple[Any, Any]] = []  # (container, key or index) down to the deepest value reached
        for is_index, key in resolve(doc, loc)[0]:
            if not is_index and isinstance(node, dict):
                if key not in node:   # a missing key
                    path = []
                    break
            elif not (is_index and isinstance(node, list)):
                break
            path.append((node, key))
            node = node[key]
        if path:
            container, key = path[-1]
            container[key] = UNPARSED
    return doc


_VARIABLE_IN_FLOW = {"while parsing a flow mapping": "{...}", "while parsing a flow sequence": "[...]"}


def _yaml_issue(e: yaml.YAMLError, text: str, source: str) -> ConfigIssue:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return ConfigIssue(source, f"invalid YAML: {problem}")
    inside = _VARIABLE_IN_FLOW.get(getattr(e, "context", None) or "")
    i = mark.index
    if inside and text[i - 1:i + 1] == "${":
        # `url: http://${HOST}:8501` inside {...}: in a flow collection `{` is syntax, so the
        # plain value ends at `$` and the parser stops at the variable's `{`. The value needs quotes.
        return ConfigIssue(f"{source}:{mark.line + 1}:{mark.column}",
                           f"invalid YAML: inside {inside} a value holding ${{...}} must be quoted; write "
                           f"{_quoted(text, i - 1)}")
    return ConfigIssue(f"{source}:{mark.line + 1}:{mark.column + 1}", f"invalid YAML: {problem}")


def _quoted(text: str, start: int) -> str:
    """The flow item around text[start] (a `${`), with its value quoted: url: "http://${HOST}:8501"."""
    begin = start
    while begin > 0 and text[begin - 1] not in "{[,\n":
        begin -= 1
    end = start
    while end < len(text) and text[end] not in ",]}\n":
        if text.startswith("${", end):
            close = text.find("}", end)
            end = len(text) if close < 0 else close + 1
        elif text[end] == "#" and text[end - 1] in " \t":
            break
        else:
            end += 1
    item = text[begin:end].strip()
    key, sep, value = item.partition(": ")
    if sep and "${" not in key:
        return f"{key}: {json.dumps(value.strip(), ensure_ascii=False)}"
    return json.dumps(item, ensure_ascii=False)


def parse_config(text: str, *, env: Mapping[str, str] | None = None,
                 source: str = "<config>") -> tuple[Config, frozenset[str]]:
    """Validate config text; raise ConfigError listing every problem found."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_issue(e, text, source)]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("(top level)", "the config must be a mapping of keys to values")])
    unset: dict[Loc, ConfigIssue] = {}
    secrets: set[str] = set()
    expanded = _expand(raw, (), os.environ if env is None else env, unset, secrets)
    errors: list[Any] = []
    try:
        config = Config.model_validate(expanded)
    except ValidationError as e:
        errors = e.errors()
    except ReferenceErrors as e:
        if not unset:
            raise ConfigError(e.issues) from None
    else:
        if not unset:
            return config, frozenset(secrets)
    # the lenient pass (module docstring); a field error at an unset variable's place is its echo
    # (`http://${HOST}:1` is no URL), while an unknown key holding one is an error of its own
    errors = [err for err in errors if err["type"] == "extra_forbidden"
              or tuple(key for _, key in resolve(expanded, err["loc"])[0]) not in unset]
    issues = [*unset.values(), *(_issue_from_pydantic(err, expanded) for err in errors)]
    issues += reference_issues(_without(expanded, [*(err["loc"] for err in errors), *unset]))
    raise ConfigError(list(dict.fromkeys(issues)))


def config_version(config: Config) -> str:
    canonical = orjson.dumps(config.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:12]


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigIssue(str(p), f"cannot read config file: {e.strerror or e}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(p), "config file is not UTF-8 text")]) from None
    config, secrets = parse_config(text, env=env, source=str(p))
    # absolute, not resolved: a Kubernetes ConfigMap swaps the `..data` symlink under the same path,
    # and a reload must read the path again, not the folder it pointed to then
    return LoadedConfig(config, config_version(config), p.absolute(), secrets)
