"""Pydantic models of the config file (SPEC 2), with duration and size types.

Every model forbids unknown keys and is frozen. Field checks live on the fields; the one
root validator (`Config._check_references`) checks what spans sections (a split naming an
unknown backend, duplicate route names) and reports every problem with its place, raising
`ReferenceErrors` (not a ValueError, so pydantic lets it through unwrapped and load.py can
keep the places). Sections are added here only together with the code that makes them work.

Imports: stdlib, pydantic, sidecar.errors.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from sidecar.errors import ConfigIssue

# --- scalar types -------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """`250ms`, `2s`, `1m`, `1h` or a plain number of seconds -> float seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '250ms', '2s', '1m'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"invalid duration {value!r}: use a number of seconds or '250ms', '2s', '1m'")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(value: Any) -> Any:
    """A plain integer is bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024 (SPEC 8)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '10MiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"invalid size {value!r}: use bytes or a string like '512KiB', '10MiB', '1GB'")


def _positive(v: float) -> float:
    if v <= 0:
        raise ValueError("must be greater than 0")
    return v


def _non_negative_f(v: float) -> float:
    if v < 0:
        raise ValueError("must be 0 or more")
    return v


def _non_negative(v: int) -> int:
    if v < 0:
        raise ValueError("must be 0 or more")
    return v


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(_positive),
    WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                              {"type": "string", "pattern": _DURATION.pattern}]}),
]
ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    AfterValidator(_non_negative),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                              {"type": "string", "pattern": _SIZE.pattern}]}),
]

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9_.-]*)):(?P<port>\d{1,5})$")


def _check_listen(value: str) -> str:
    m = _HOST_PORT.match(value)
    if not m or int(m.group("port")) > 65535:
        raise ValueError(f"invalid listen address {value!r}: use HOST:PORT, e.g. 0.0.0.0:8080")
    return value


Listen = Annotated[str, AfterValidator(_check_listen)]


def split_listen(value: str) -> tuple[str, int]:
    m = _HOST_PORT.match(value)
    assert m, value
    return (m.group("v6") or m.group("host") or "0.0.0.0"), int(m.group("port"))


_URL = re.compile(r"^(?P<scheme>https?)://(?P<netloc>[^/?#]+)(?P<path>/[^?#]*)?$")


def _check_url(value: str) -> str:
    m = _URL.match(value)
    if not m:
        raise ValueError(f"invalid backend URL {value!r}: use http(s)://host:port[/base/path]")
    return value


BackendUrl = Annotated[str, AfterValidator(_check_url)]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _check_header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"invalid header name {value!r}")
    return value.lower()


HeaderName = Annotated[str, AfterValidator(_check_header_name)]

Method = Annotated[
    Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]

# serialises durations back as seconds (canonical dump, version hash, /admin/config)
Seconds = Annotated[Duration, PlainSerializer(float)]
# a delay may be 0 (timeouts may not)
DelaySeconds = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(lambda v: _non_negative_f(v)),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION.pattern}]}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections -------------------------------------------------------------------------------


class AdminConfig(_Model):
    listen: Listen = "127.0.0.1:9901"
    token: str = Field(default="", description="when non-empty, admin calls need 'Authorization: Bearer <token>'")


class LimitsConfig(_Model):
    max_body_bytes: ByteSize = Field(default=10 * 1024**2, description="larger request bodies get 413")
    max_inflight: int = Field(default=1024, ge=1, description="past this, new requests get 503 overloaded")
    buffer_response_bytes: ByteSize = Field(
        default=1024**2, description="answers with a Content-Length up to this are read whole before replying")
    stream_idle_timeout: Seconds = Field(default=60.0, description="longest pause between chunks of a streamed answer")
    body_timeout: Seconds = Field(default=30.0, description="a request body must arrive within this (else 408)")
    idle_timeout: Seconds = Field(default=75.0, description="idle client keep-alive connections close after this")
    max_header_bytes: ByteSize = Field(default=8190, ge=256, description="longest request line or header field")
    max_headers: int = Field(default=128, ge=8, description="most header fields in a request")
    # issue 8: connection guards (shell/listener.py)
    max_connections: int = Field(default=10000, ge=1,
                                 description="open client connections at most; past it new ones are closed at once")
    header_timeout: Seconds = Field(default=10.0, description="a request head must arrive within this (else closed)")


class DrainConfig(_Model):
    delay: DelaySeconds = Field(default=5.0, description="serve on after SIGTERM while endpoint removal propagates")
    grace: Seconds = Field(default=25.0, description="then in-flight requests finish within this")


class BackendConfig(_Model):
    url: BackendUrl = Field(description="scheme, host, port, optional base path")
    timeout: Seconds = Field(default=15.0, description="default per-try timeout")
    max_connections: int = Field(default=100, ge=1, description="connection pool size")
    max_inflight: int | None = Field(
        default=None, ge=1, description="bulkhead: at this many requests in flight the backend takes no new ones")


class MatchConfig(_Model):
    path_prefix: str = Field(default="/", description="plain string prefix, as Envoy's `prefix`")
    methods: list[Method] | None = Field(default=None, description="allowed methods; any when absent")
    headers: dict[HeaderName, str] = Field(default_factory=dict, description="headers that must equal these values")


class StickyConfig(_Model):
    header: HeaderName


class RouteConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)]
    match: MatchConfig = Field(default_factory=MatchConfig)
    split: dict[str, Annotated[float, Field(ge=0)]] = Field(min_length=1)
    sticky: StickyConfig | None = None
    override_header: HeaderName | None = None
    timeout: Seconds = Field(default=15.0, description="whole-request deadline until the answer starts")


class Config(_Model):
    listen: Listen = "0.0.0.0:8080"
    admin: AdminConfig = Field(default_factory=AdminConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    drain: DrainConfig = Field(default_factory=DrainConfig)
    access_log: bool = True
    backends: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)], BackendConfig] = Field(
        min_length=1)
    routes: list[RouteConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        issues: list[ConfigIssue] = []
        known = list(self.backends)
        known_text = ", ".join(known)
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            place = f"routes[{i}]"
            if route.name in seen:
                issues.append(ConfigIssue(f"{place}.name",
                                          f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])"))
            seen.setdefault(route.name, i)
            issues.extend(ConfigIssue(f"{place}.split", f"unknown backend {b!r} (known: {known_text})")
                          for b in route.split if b not in self.backends)
            if route.split and sum(route.split.values()) <= 0:
                issues.append(ConfigIssue(f"{place}.split", "weights must not all be 0"))
        if issues:
            raise ReferenceErrors(issues)
        return self


class ReferenceErrors(Exception):
    """Raised by the root validator; deliberately not a ValueError (see module docstring)."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("; ".join(map(str, issues)))
        self.issues = issues
