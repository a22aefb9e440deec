"""Read a config file: expand ${VAR}, parse YAML, validate, and name the place of every error.

Order (docs/reference/configuration.md): YAML is parsed first, then `${NAME}` / `${NAME:-default}` are replaced inside
string values (never keys); a string that was only `${NAME}` is then converted by pydantic to
the field's type. Places read like `routes[0].split` and `backends.stable.timeout`.
`load_config` reads no state and writes nothing, so `sidecar validate` is side-effect free.

Imports: stdlib, yaml, pydantic, sidecar.config.model, sidecar.errors.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from sidecar.config.model import Config, ReferenceErrors
from sidecar.errors import ConfigError, ConfigIssue


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


def place_of(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """('routes', 0, 'split') -> 'routes[0].split'."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _expand(node: Any, loc: list[int | str], env: Mapping[str, str],
            issues: list[ConfigIssue], secrets: set[str]) -> Any:
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
            issues.append(ConfigIssue(place_of(loc), f"environment variable {name} is not set (no default)"))
            return m.group(0)

        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand(v, [*loc, k], env, issues, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, [*loc, i], env, issues, secrets) for i, v in enumerate(node)]
    return node


def _issue_from_pydantic(err: Mapping[str, Any]) -> ConfigIssue:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    kind = err["type"]
    if kind == "extra_forbidden":
        return ConfigIssue(place_of(loc[:-1]) or "(top level)", f"unknown key {loc[-1]!r}")
    if kind == "missing":
        return ConfigIssue(place_of(loc[:-1]) or "(top level)", f"missing required key {loc[-1]!r}")
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    return ConfigIssue(place_of(loc) or "(top level)", msg)


def parse_config(text: str, *, env: Mapping[str, str] | None = None,
                 source: str = "<config>") -> tuple[Config, frozenset[str]]:
    """Validate config text; raise ConfigError listing every problem found."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([ConfigIssue(where, f"invalid YAML: {problem}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("(top level)", "the config must be a mapping of keys to values")])
    issues: list[ConfigIssue] = []
    secrets: set[str] = set()
    expanded = _expand(raw, [], os.environ if env is None else env, issues, secrets)
    if issues:
        raise ConfigError(issues)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as e:
        raise ConfigError([_issue_from_pydantic(err) for err in e.errors()]) from None
    except ReferenceErrors as e:
        raise ConfigError(e.issues) from None
    return config, frozenset(secrets)


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
