"""Pydantic models of the config file (docs/reference/configuration.md), with duration and size types.

Every model forbids unknown keys and is frozen. Field checks live on the fields; the rules
that span sections (a split naming an unknown backend, duplicate route names) live in one
function, `reference_issues`, which reports every problem with its place. The root validator
(`Config._check_references`) runs it on a config whose fields all passed and raises
`ReferenceErrors` (not a ValueError, so pydantic lets it through unwrapped and load.py can
keep the places). When some field failed, pydantic never reaches the root validator, so
load.py runs the same function on the raw mapping (see its docstring): one run reports both.
Sections are added here only together with the code that makes them work.

Places (`place_of`) read `routes[0].split`, `backends.stable.timeout`: an index in brackets,
a key after a dot, bare when it is a plain word and otherwise as YAML would spell it
(`backends.'my.model'`, `''`, `split.1`, `.true`, `.null`); nothing at all is `(top level)`.

Imports: stdlib, pydantic, sidecar.core.jsonpath, sidecar.errors.
"""

from __future__ import annotations

import itertools
import math
import re
import types
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

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

from sidecar.core.feedback import OTHER
from sidecar.core.jsonpath import compile_path
from sidecar.core.window import as_category
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
    """A plain integer is bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024 (docs/reference/configuration.md)."""
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
    listen: Listen = Field(default="127.0.0.1:9901", description="the admin listener: health, metrics, admin API, "
                                                                "status page; a reload cannot change it")
    token: str = Field(default="", description="when non-empty, admin calls need 'Authorization: Bearer <token>'")


class FleetConfig(_Model):
    """`fleet` (docs/fleet.md): replicas with the same name share one rollout and one set of weights."""

    redis: str = Field(description="the shared store, Redis 6 or later: redis://[user:password@]host:port/db, "
                                   "rediss:// for TLS; credentials via ${VAR}")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64,
                      description="replicas with the same name form one fleet")
    lease: Duration = Field(default=10.0, description="one replica leads (judges rollouts); another takes over "
                                                      "within this; at least 3 x sync_every")
    sync_every: Duration = Field(default=1.0, description="each replica publishes its counts and reads the fleet's "
                                                          "decisions this often; also the timeout of a store call")

    @model_validator(mode="after")
    def _check(self) -> FleetConfig:
        if not re.match(r"^(redis|rediss|unix)://", self.redis):
            raise ValueError(f"redis must be a redis://, rediss:// or unix:// URL, got {self.redis.split('://')[0]!r}")
        if self.lease < 3 * self.sync_every:
            raise ValueError(f"lease ({self.lease:g}s) must be at least 3 x sync_every ({self.sync_every:g}s): "
                             "the leader renews it every sync_every")
        return self


class LimitsConfig(_Model):
    max_body_bytes: ByteSize = Field(default=10 * 1024**2,
                                     description="larger request bodies get 413 (declared or chunked; not buffered)")
    max_inflight: int = Field(default=1024, ge=1, description="requests in progress at once; past it, 503 overloaded")
    buffer_response_bytes: ByteSize = Field(
        default=1024**2, description="answers with a Content-Length up to this are read whole before replying")
    stream_idle_timeout: Seconds = Field(default=60.0, description="longest pause between chunks of a streamed answer")
    body_timeout: Seconds = Field(default=30.0, description="a request body must arrive within this (else 408)")
    idle_timeout: Seconds = Field(default=75.0, description="idle client keep-alive connections close after this")
    max_header_bytes: ByteSize = Field(default=8190, ge=256, description="longest request line or header (else 400)")
    max_headers: int = Field(default=128, ge=8, description="most header fields in a request (else 400)")
    # connection guards (shell/listener.py)
    max_connections: int = Field(default=10000, ge=1,
                                 description="open client connections at most; past it new ones are closed at once")
    header_timeout: Seconds = Field(default=10.0, description="a request head must arrive within this, else closed")


class DrainConfig(_Model):
    delay: DelaySeconds = Field(default=5.0, description="after SIGTERM (readiness 503 at once), serve on this long")
    grace: Seconds = Field(default=25.0, description="then in-flight requests finish within this")


def _check_path(value: str) -> str:
    if not value.startswith("/") or any(c in value for c in " \r\n#"):
        raise ValueError(f"invalid path {value!r}: it must start with '/' and hold no spaces")
    return value


HttpPath = Annotated[str, AfterValidator(_check_path)]


class HealthCheckConfig(_Model):
    path: HttpPath = Field(default="/health", description="GET on every endpoint, under the backend's base path")
    interval: Seconds = Field(default=5.0, description="time between checks of one endpoint")
    timeout: Seconds = Field(default=1.0, description="each check's own timeout")
    unhealthy_after: int = Field(default=3, ge=1, description="failed checks in a row that mark an endpoint down")
    healthy_after: int = Field(default=2, ge=1, description="passed checks in a row that mark it up again")


class CircuitBreakerConfig(_Model):
    consecutive_failures: int | None = Field(default=5, ge=1, description="open after this many failures in a row")
    failure_rate: float | None = Field(
        default=0.5, gt=0, le=1, description="or when this share of the last `window` tries failed (null: off)")
    window: int = Field(default=20, ge=1, description="tries over which failure_rate is judged, once seen")
    open_for: Seconds = Field(default=30.0, description="time open before half-open")
    half_open_probes: int = Field(default=1, ge=1, description="tries let through while half-open; success closes")


class OutlierConfig(_Model):
    consecutive_failures: int = Field(default=5, ge=1, description="failed tries in a row that eject an endpoint")
    eject_for: Seconds = Field(default=30.0, description="how long an ejected endpoint gets no traffic")
    max_ejected: float = Field(default=0.5, ge=0, le=1, description="share of the endpoints ejected at once, at most")


def _version_text(value: Any) -> Any:
    """`version: 7` in YAML is an int; a registry's versions are strings ("7")."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# MLflow's rules for an alias: letters, digits, `_` and `-`; never `latest` nor `v<digits>` (a version's name)
_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def _check_alias(value: str) -> str:
    if not _ALIAS.match(value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"invalid registry alias {value!r}: letters, digits, '_' and '-', "
                         "neither 'latest' nor like 'v7'")
    return value


RegistryAlias = Annotated[str, AfterValidator(_check_alias)]


class ModelConfig(_Model):
    name: str = Field(min_length=1, max_length=256, description="the registered model's name in the registry")
    version: Annotated[str, BeforeValidator(_version_text), Field(min_length=1, max_length=64)] | None = Field(
        default=None, description="the model version the backend serves (static); or `alias`")
    alias: RegistryAlias | None = Field(
        default=None, description="an alias resolved in `registry` at load and every `registry.mlflow.refresh`")

    @model_validator(mode="after")
    def _version_or_alias(self) -> ModelConfig:
        if (self.version is None) == (self.alias is None):
            raise ValueError("give exactly one of `version` or `alias`")
        return self


class BackendConfig(_Model):
    url: BackendUrl | None = Field(default=None, description="http(s)://host:port[/base/path]; or `endpoints`")
    endpoints: list[BackendUrl] | None = Field(
        default=None, min_length=1, description="a model's replicas, instead of `url`")
    balance: Literal["least_request", "round_robin", "random"] = Field(
        default="least_request", description="how a try picks one of the endpoints")
    outlier: OutlierConfig | None = Field(default=None, description="passive ejection of failing endpoints")
    timeout: Seconds = Field(default=15.0, description="per-try timeout: until the answer is read (buffered) or starts")
    max_connections: int = Field(default=100, ge=1, description="keep-alive pool size per endpoint; more requests wait")
    max_inflight: int | None = Field(
        default=None, ge=1, description="bulkhead: at this many requests in flight the backend takes no new ones")
    health_check: HealthCheckConfig | None = Field(default=None, description="active checks of every endpoint")
    circuit_breaker: CircuitBreakerConfig | None = Field(
        default=None, description="without it the backend's circuit never opens")
    model: ModelConfig | None = Field(
        default=None, description="the model version it serves (attribution: status, logs, backend_info)")

    @property
    def urls(self) -> list[str]:
        """The endpoints' URLs: `endpoints`, or `[url]`."""
        if self.endpoints is not None:
            return list(self.endpoints)
        return [self.url] if self.url is not None else []


class MatchConfig(_Model):
    path_prefix: str = Field(default="/", description="plain string prefix, as Envoy's `prefix`")
    methods: list[Method] | None = Field(default=None, description="allowed methods (any when absent); else 405")
    headers: dict[HeaderName, str] = Field(default_factory=dict, description="headers that must equal these values")


class StickyConfig(_Model):
    header: HeaderName = Field(description="hash this header's value to pick the backend")


# --- mirror (shadow mode) and monitor (sampling, drift, sample log) ---------------------


def _check_json_path(value: str) -> str:
    compile_path(value)  # JsonPathError is a ValueError: reported at the field's place
    return value


JsonPathText = Annotated[str, AfterValidator(_check_json_path)]


_MIRROR_METHODS: list[Method] = ["POST", "GET"]


class MirrorKeyConfig(_Model):
    header: HeaderName = Field(description="choose the mirrored share by a hash of this header")


class CompareConfig(_Model):
    path: JsonPathText = Field(description="JSON path evaluated on both answers, e.g. '$.predictions[*]'")
    tolerance: float = Field(default=0.0, ge=0, description="numbers agree within this absolute difference")
    rel_tolerance: float = Field(
        default=0.0, ge=0, description="or within this share of the larger magnitude (0: off)")
    window: int = Field(default=1000, ge=1, description="compared requests behind the rolling agreement ratio")


class MirrorConfig(_Model):
    backend: str = Field(description="the shadow: a backend (need not be in the split), once per route")
    percent: float = Field(default=100.0, ge=0, le=100, description="share of requests copied")
    key: MirrorKeyConfig | None = Field(default=None, description="the share is chosen by this header's hash")
    methods: list[Method] = Field(default_factory=_MIRROR_METHODS.copy, description="only these are mirrored")
    timeout: Seconds | None = Field(default=None, description="whole mirror deadline; default the backend's timeout")
    max_inflight: int = Field(default=32, ge=1, description="past this, mirrors are dropped and counted")
    max_body_bytes: ByteSize | None = Field(default=None, description="larger request bodies are not mirrored")
    compare: CompareConfig | None = Field(default=None, description="compare the answers; else the shadow's is "
                                                                  "read and discarded")


_FEATURE_NAME = r"^[A-Za-z0-9_.-]+$"


class FeatureConfig(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)
    source: Literal["request", "response"] = Field(alias="from", description="which body the path reads")
    path: JsonPathText = Field(description="JSON path; every value it finds is one sample")
    kind: Literal["numeric", "categorical"] = Field(default="numeric", description="how values are compared")


class ReferenceConfig(_Model):
    backend: str | None = Field(default=None, description="compare with this backend of the route's split")
    file: str | None = Field(default=None, description='JSON {"feature": [values, ...]}, relative to the config')
    warmup: int | None = Field(default=None, ge=1, le=1_000_000, description="each backend's own first N samples")

    @model_validator(mode="after")
    def _exactly_one(self) -> ReferenceConfig:
        given = [k for k in ("backend", "file", "warmup") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of backend, file, warmup (got {', '.join(given) or 'none'})")
        return self


class DriftConfig(_Model):
    numeric: Literal["ks"] = Field(default="ks", description="test for numeric features: Kolmogorov-Smirnov")
    categorical: Literal["chi2"] = Field(default="chi2", description="test for categorical features: chi-square")
    p_value: float = Field(default=0.01, gt=0, le=1, description="significant when the p-value is under this")
    psi: float = Field(default=0.2, ge=0, description="material when PSI is over this; 0: p-value alone")
    min_samples: int = Field(default=200, ge=1, description="per side, before any verdict")
    every: Seconds = Field(default=10.0, description="how often drift is computed (in a worker thread)")


class SampleLogConfig(_Model):
    path: str = Field(min_length=1, description="JSONL file, relative to the config file's folder")
    sample: float | None = Field(default=None, ge=0, le=1,
                                 description="share of all requests logged; default: monitor.sample")
    redact: list[JsonPathText] = Field(default_factory=list, description="paths replaced by \"[redacted]\"")
    max_bytes: ByteSize = Field(default=100 * 1024**2, ge=1024, description="rotate past this size")
    keep: int = Field(default=5, ge=0, le=1000, description="rotated files kept: path.1 ... path.N")
    max_queue_bytes: ByteSize = Field(
        default=64 * 1024**2, ge=64 * 1024,
        description="lines waiting for a slow writer, in bytes, at most; past it new lines are dropped and "
                    "counted (sidecar_sample_log_dropped_total{reason=\"queue_bytes\"}); a line longer than "
                    "this is never logged. Hot-reloadable: the running writer takes the new bound")


class MonitorConfig(_Model):
    sample: float = Field(default=0.1, ge=0, le=1, description="share of requests whose payloads are sampled")
    window: int = Field(default=2000, ge=10, le=1_000_000, description="samples kept per (route, backend, feature)")
    features: dict[Annotated[str, Field(pattern=_FEATURE_NAME, max_length=64)], FeatureConfig] = Field(
        default_factory=dict, description="what to sample from the bodies, by name")
    reference: ReferenceConfig | None = Field(default=None, description="without one, no drift is computed")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="when a feature counts as drifted")
    log: SampleLogConfig | None = Field(default=None, description="JSON lines of sampled requests and answers")

    @model_validator(mode="after")
    def _warmup_covers_min_samples(self) -> MonitorConfig:
        ref = self.reference
        if ref is not None and ref.warmup is not None and ref.warmup < self.drift.min_samples:
            raise ValueError(f"reference.warmup ({ref.warmup}) must be at least drift.min_samples "
                             f"({self.drift.min_samples}), or no verdict is ever reached")
        return self

# --- feedback (ground truth joined to predictions; docs/feedback.md) -------------------------

# The shell serves `feedback` (shell/feedback.py: capture in the proxy, the POST endpoint,
# GET /admin/feedback, metrics). False would refuse every config holding the section, with
# an explanation, rather than accept it without effect (docs/feedback.md#status).
FEEDBACK_SERVED: bool = True
MAX_SEGMENTS: Final = 16
MAX_SEGMENT_VALUES: Final = 100
MAX_SEGMENT_VALUE_CHARS: Final = 64


def _check_one_value_path(value: str) -> str:
    if compile_path(value).is_multi:
        raise ValueError(f"{value!r} may find several values, but this is one value per request: "
                         "use an index such as [0] instead of [*]")
    return value


OneValuePathText = Annotated[str, AfterValidator(_check_json_path), AfterValidator(_check_one_value_path)]


def _check_feedback_path(value: str) -> str:
    if "?" in value:
        raise ValueError(f"invalid path {value!r}: the feedback path takes no query")
    return value


def _segment_value_type(value: Any) -> Any:
    """One clear error for a value of no usable type (instead of one per member of the union)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str | int):      # bool is an int
        raise ValueError(f"segment value {value!r}: use a string, an integer or a boolean")
    return value


SegmentValue = Annotated[str | int | bool, BeforeValidator(_segment_value_type)]


def _check_segment_values(values: list[str | int | bool]) -> list[str | int | bool]:
    """Values are compared as text (`1`, `1.0` and `"1"` are one value): distinct, short, not `other`."""
    seen: dict[str, str | int | bool] = {}
    for v in values:
        text = as_category(v)
        if not text or len(text) > MAX_SEGMENT_VALUE_CHARS:
            raise ValueError(f"segment value {v!r}: use a string of 1 to {MAX_SEGMENT_VALUE_CHARS} characters, "
                             "an integer or a boolean")
        if text == OTHER:
            raise ValueError(f"{OTHER!r} names every value not in this list; it cannot be one of them")
        if text in seen:
            raise ValueError(f"{seen[text]!r} and {v!r} are the same segment value")
        seen[text] = v
    return values


class PredictionConfig(_Model):
    path: OneValuePathText = Field(
        description="JSON path to the one value the answer predicts: a class, a score or a number, "
                    "e.g. '$.predictions[0]'")
    threshold: float | None = Field(
        default=None, allow_inf_nan=False,
        description="metric accuracy: a score at or above this is class 1, below it class 0")


class FeedbackSegmentConfig(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)
    source: Literal["request", "response"] = Field(alias="from", description="which body the path reads")
    path: OneValuePathText = Field(description="JSON path to the segment's value, e.g. '$.instances[0].country'")
    values: Annotated[list[SegmentValue], AfterValidator(_check_segment_values)] = Field(
        min_length=1, max_length=MAX_SEGMENT_VALUES,
        description="the values judged apart; every other value counts as 'other'")


class FeedbackConfig(_Model):
    path: Annotated[HttpPath, AfterValidator(_check_feedback_path)] = Field(
        description="POST feedback here, on the main listener; the sidecar's own path, never forwarded")
    prediction: PredictionConfig | None = Field(
        default=None, description="where the answer holds its prediction; needed unless metric is mean")
    metric: Literal["accuracy", "mae", "rmse", "mean"] = Field(
        default="accuracy", description="accuracy (class equals label), mae or rmse (numeric label), "
                                        "or mean (of a posted numeric value: a business metric)")
    keep: Seconds = Field(default=600.0, description="how long a prediction waits for its feedback")
    max_pending: int = Field(
        default=100_000, ge=1, le=10_000_000,
        description="predictions waiting at most (about 250 bytes each); past it the oldest are dropped "
                    "and counted")
    segments: dict[Annotated[str, Field(pattern=_FEATURE_NAME, max_length=64)], FeedbackSegmentConfig] = Field(
        default_factory=dict, max_length=MAX_SEGMENTS, description="the metric per segment value, by name")


RETRY_ON_WORDS = frozenset({"connect-error", "timeout", "reset", "5xx"})


def _check_retry_on(values: list[str | int]) -> list[str | int]:
    for v in values:
        if isinstance(v, str) and v not in RETRY_ON_WORDS:
            if v.isdigit():
                raise ValueError(f"write status codes as numbers, not strings: {v}")
            raise ValueError(f"unknown retry condition {v!r} (known: connect-error, timeout, reset, 5xx, "
                             "or a status code 400-599)")
        if isinstance(v, int) and not 400 <= v <= 599:
            raise ValueError(f"status code {v} cannot be retried on: use 400-599")
    return values


def _default_retry_on() -> list[int | str]:
    return ["connect-error", "reset", "timeout", 502, 503, 504]


class BackoffConfig(_Model):
    base: DelaySeconds = Field(default=0.025, description="first retry waits up to this (full jitter)")
    max: DelaySeconds = Field(default=0.25, description="no retry waits longer")

    @model_validator(mode="after")
    def _ordered(self) -> BackoffConfig:
        if self.base > self.max:
            raise ValueError(f"base ({self.base:g}s) must not exceed max ({self.max:g}s)")
        return self


class RetryConfig(_Model):
    attempts: int = Field(default=2, ge=1, le=10, description="total tries, the first included")
    per_try_timeout: Seconds | None = Field(default=None, description="default: the backend's `timeout`")
    on: Annotated[list[Annotated[int, Field(strict=True)] | str], AfterValidator(_check_retry_on)] = Field(
        default_factory=_default_retry_on,
        description="what is retried: connect-error, timeout, reset, 5xx, or status codes")
    backoff: BackoffConfig = Field(default_factory=BackoffConfig, description="exponential, full jitter")
    budget: float = Field(default=0.2, ge=0, description="retries at most this share of 10 s of requests (min 10/s)")
    other_backend: bool = Field(default=True, description="a retry prefers another backend of the split")
    first_byte_timeout: Seconds | None = Field(
        default=None, description="no response headers by then counts as a timeout; default per_try_timeout")
    hedge_after: Seconds | None = Field(
        default=None, description="no answer by then sends a second try elsewhere; the first answer wins")


class StaticResponseConfig(_Model):
    status: int = Field(default=200, ge=200, le=599, description="the answer's status")
    json_body: Any = Field(default=None, alias="json", description="the JSON body")
    headers: dict[HeaderName, str] = Field(default_factory=dict, description="the answer's headers")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)


class FallbackConfig(_Model):
    backend: str | None = Field(default=None, description="a backend tried once with the time left")
    response: StaticResponseConfig | None = Field(default=None, description="a static answer")


# --- rollout (progressive delivery; docs/rollout.md) -----------------------------------------

# NOTE: gates whose step data the rollout driver (shell/rollout_driver.py) does not fill yet
# are refused with this explanation rather than accepted without effect.
ROLLOUT_GATES_NOT_SERVED: Final = {
    "no_drift": "docs/rollout.md#gates-not-served-yet",
    "min_agreement": "docs/rollout.md#gates-not-served-yet",
    "min_feedback": "docs/rollout.md#gates-not-served-yet",
    "max_feedback_drop": "docs/rollout.md#gates-not-served-yet",
    "max_segment_drop": "docs/rollout.md#gates-not-served-yet",
}


class RolloutCompareConfig(_Model):
    latency: Literal["mann_whitney"] | None = Field(
        default=None, description="mann_whitney: fail when the canary's latencies are larger than the "
                                  "baseline's at `alpha` (one-sided)")
    errors: Literal["two_proportion", "sequential"] | None = Field(
        default=None, description="two_proportion: fail when the canary's error rate is higher at `alpha`; "
                                  "sequential: an always-valid test judged every second")
    alpha: Annotated[float, Field(gt=0, lt=1)] = Field(default=0.01, description="significance level, in (0, 1)")


class RolloutGatesConfig(_Model):
    max_error_rate: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="the canary's failed tries over its tries in the step, at most this")
    max_p99: Seconds | None = Field(default=None, description="the canary's p99 latency in the step, at most this")
    max_p99_ratio: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="canary p99 / baseline p99 in the step, at most this")
    no_drift: list[str] | None = Field(
        default=None, description="features whose canary-vs-baseline drift fails the step (not served yet)")
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = Field(
        default=None, description="shadow agreement over the step, at least this (not served yet)")
    min_feedback: float | None = Field(
        default=None, description="floor (accuracy, mean) or ceiling (mae, rmse) of the feedback metric "
                                  "(not served yet)")
    max_feedback_drop: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="canary's feedback metric vs the baseline's (not served yet)")
    max_segment_drop: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="the same within any one feedback segment (not served yet)")
    compare: RolloutCompareConfig | None = Field(
        default=None, description="relative gates that fail only when the canary is worse with significance")


class RolloutNotifyConfig(_Model):
    webhook: BackendUrl = Field(description="URL that receives one JSON POST per rollout event")
    headers: dict[HeaderName, str] = Field(default_factory=dict, description="extra request headers, e.g. "
                                                                            "Authorization")
    timeout: Seconds = Field(default=2.0, description="per try; up to 3 tries with backoff")


class RolloutRegistryConfig(_Model):
    promote_alias: RegistryAlias = Field(description="on promotion, move this registry alias to the canary's "
                                                     "model version; promotion and rollback also tag it")


class RolloutConfig(_Model):
    canary: str = Field(description="the backend being rolled out; in the route's split")
    baseline: str = Field(description="the backend it is compared with and takes traffic from; in the split")
    steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(
        min_length=1, description="canary weight per step, strictly increasing, each in 1-100")
    interval: Seconds = Field(default=60.0, description="time per step before judging (and between judgements)")
    min_requests: Annotated[int, Field(ge=0)] = Field(
        default=200, description="canary requests needed in a step before any gate is judged")
    gates: RolloutGatesConfig = Field(default_factory=RolloutGatesConfig, description="what fails a step")
    progress_deadline: Seconds | None = Field(
        default=None, description="a step inconclusive this long pauses the rollout with the reason")
    bake: DelaySeconds = Field(default=0.0, description="at the last step, keep judging this long before "
                                                       "promoting; 0: no bake")
    dry_run: bool = Field(default=False, description="judge and report every step, change no weight")
    on_failure: Literal["rollback", "pause"] = Field(default="rollback", description="what a failed step does")
    notify: RolloutNotifyConfig | None = Field(default=None, description="a webhook told of every transition")
    registry: RolloutRegistryConfig | None = Field(
        default=None, description="move a model registry alias on promotion (docs/registry.md)")


class RouteConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)] = Field(
        description="unique; used in metric labels and the admin API")
    match: MatchConfig = Field(default_factory=MatchConfig, description="which requests the route takes")
    split: dict[str, Annotated[float, Field(ge=0)]] = Field(
        min_length=1, description="backend -> weight; weights >= 0, not all 0, normalised")
    sticky: StickyConfig | None = Field(default=None, description="the same key goes to the same backend")
    override_header: HeaderName | None = Field(
        default=None, description="a request may name any backend of the split in this header")
    timeout: Seconds = Field(default=15.0, description="deadline until the answer starts, retries included")
    mirror: list[MirrorConfig] = Field(default_factory=list, description="shadow copies of the requests")
    monitor: MonitorConfig | None = Field(default=None, description="payload sampling, drift, sample log")
    retry: RetryConfig | None = Field(
        default=None, description="without it a route makes one try, and one more after a connect error (nothing sent)")
    fallback: list[FallbackConfig] = Field(
        default_factory=list, description="tried in order when the split cannot produce a good answer")
    feedback: FeedbackConfig | None = Field(
        default=None, description="ground truth posted later, joined to predictions by request id")
    rollout: RolloutConfig | None = Field(
        default=None, description="automated progressive delivery of a canary (docs/rollout.md)")


class MlflowConfig(_Model):
    url: BackendUrl = Field(description="the MLflow tracking server: http(s)://host:port[/base/path]")
    token: str = Field(default="", description="when non-empty, sent as 'Authorization: Bearer <token>' "
                                               "(as MLFLOW_TRACKING_TOKEN); masked in /admin/config")
    timeout: Seconds = Field(default=2.0, description="each call's timeout; also how long start-up waits "
                                                      "for the aliases")
    refresh: Seconds = Field(default=60.0, description="aliases are resolved again this often (unresolved "
                                                       "ones every 10s)")

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> MlflowConfig:
        if self.token and "@" in self.url.split("/")[2]:
            raise ValueError("give `token` or credentials in `url`, not both")
        return self


class RegistryConfig(_Model):
    mlflow: MlflowConfig = Field(description="MLflow's model registry, over its REST API")


class Config(_Model):
    listen: Listen = Field(default="0.0.0.0:8080", description="the proxy listener ([::]:8080 for IPv6); a reload "
                                                             "cannot change it")
    admin: AdminConfig = Field(default_factory=AdminConfig, description="the admin listener and its token")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="what one client or request may take")
    drain: DrainConfig = Field(default_factory=DrainConfig, description="what SIGTERM does")
    access_log: bool = Field(default=True, description="one JSON line per request on stdout")
    state_dir: str | None = Field(
        default=None, description="folder for runtime weight overrides (survive restarts); relative to the config file")
    fleet: FleetConfig | None = Field(default=None, description="replicas acting as one through Redis "
                                                                "(docs/fleet.md); read at start")
    backends: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)], BackendConfig] = Field(
        min_length=1, description="the model servers, by name")
    routes: list[RouteConfig] = Field(min_length=1, description="first match wins; no match is 404")
    registry: RegistryConfig | None = Field(
        default=None, description="the model registry that backends' `model.alias` and rollouts' `registry` use")

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        issues = reference_issues(self)
        if issues:
            raise ReferenceErrors(issues)
        return self


# --- cross-references ---------------------------------------------------------------------


class _Unparsed:
    """The type of UNPARSED."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNPARSED"


UNPARSED: Final = _Unparsed()
"""Stands, in a raw mapping, for a value that failed its own check (load.py puts it there)."""


def _get(node: Any, key: str) -> Any:
    """A field of a validated model, or a key of a raw mapping; None when absent (the default of
    every field the rules read) or when `node` is neither."""
    if isinstance(node, BaseModel):
        return getattr(node, key)
    if isinstance(node, Mapping):
        return node.get(key)
    return None


def _is_node(node: Any) -> bool:
    return isinstance(node, BaseModel | Mapping)


def _items(node: Any) -> list[Any]:
    return node if isinstance(node, list) else []


def _names(node: Any) -> list[str]:
    return [k for k in node if isinstance(k, str)] if isinstance(node, Mapping) else []


def _weight(w: Any) -> float | None:
    if isinstance(w, bool) or not isinstance(w, int | float):
        return None
    try:
        return float(w)
    except OverflowError:  # an int past float's range (raw mapping only)
        return math.inf


def reference_issues(doc: Config | Mapping[str, Any]) -> list[ConfigIssue]:
    """Every problem that spans sections, each with its place.

    `doc` is a Config whose fields all passed (the root validator), or the raw mapping with
    every value that failed its own check replaced by UNPARSED (load.py, when some field
    failed). So each rule reads a value only when it has the type the model gives it and
    skips it otherwise: a broken part is reported once, by its own error, never again as a
    derived one. A name that failed its own check (a backend `'my model'`) is still a known
    name. NOTE: on a raw mapping a weight written as a string ('5') is not summed, so the
    "all 0" and "too large" checks skip that split.
    """
    issues: list[ConfigIssue] = []
    backends = _get(doc, "backends")
    known = _names(backends)     # empty when `backends` failed: then nothing is checked against it
    known_text = ", ".join(known)

    def is_unknown(name: Any) -> bool:
        return bool(known) and isinstance(name, str) and name not in known

    seen: dict[str, int] = {}
    log_paths: dict[str, str] = {}  # sample log path -> place of its first use
    feedback_paths: dict[str, str] = {}  # feedback path -> place of the route that takes it
    has_registry = _get(doc, "registry") is not None
    for name in known:
        backend = backends[name]
        if _is_node(backend) and (_get(backend, "url") is None) == (_get(backend, "endpoints") is None):
            issues.append(ConfigIssue(place_of(("backends", name)), "needs exactly one of `url` or `endpoints`"))
        if _get(_get(backend, "model"), "alias") is not None and not has_registry:
            issues.append(ConfigIssue(place_of(("backends", name, "model", "alias")),
                                      "an alias is resolved in the registry: set `registry.mlflow`"))
    for i, route in enumerate(_items(_get(doc, "routes"))):
        if not _is_node(route):
            continue
        place = f"routes[{i}]"
        route_name = _get(route, "name")
        if isinstance(route_name, str):
            if route_name in seen:
                issues.append(ConfigIssue(f"{place}.name",
                                          f"duplicate route name {route_name!r} (also routes[{seen[route_name]}])"))
            seen.setdefault(route_name, i)
        split = _get(route, "split")
        issues.extend(ConfigIssue(f"{place}.split", f"unknown backend {b!r} (known: {known_text})")
                      for b in _names(split) if is_unknown(b))
        weights = [_weight(w) for w in split.values()] if isinstance(split, Mapping) else []
        if weights and None not in weights:
            total = sum(w for w in weights if w is not None)
            if total <= 0:
                issues.append(ConfigIssue(f"{place}.split", "weights must not all be 0"))
            elif not math.isfinite(total):
                issues.append(ConfigIssue(f"{place}.split", "weights are too large: their sum must be finite"))
        # each shadow must be a known backend, mirrored at most once per route
        shadows = [_get(m, "backend") for m in _items(_get(route, "mirror"))]
        for j, shadow in enumerate(shadows):
            if is_unknown(shadow):
                issues.append(ConfigIssue(f"{place}.mirror[{j}].backend",
                                          f"unknown backend {shadow!r} (known: {known_text})"))
            if isinstance(shadow, str) and shadow in shadows[:j]:
                issues.append(ConfigIssue(f"{place}.mirror[{j}].backend", f"backend {shadow!r} is mirrored twice"))
        issues.extend(_monitor_issues(place, route, log_paths))
        issues.extend(_feedback_issues(place, route, feedback_paths))
        issues.extend(_rollout_issues(place, route, backends, has_registry))
        fallback = _items(_get(route, "fallback"))
        for j, item in enumerate(fallback):
            if not _is_node(item):
                continue
            where = f"{place}.fallback[{j}]"
            backend, response = _get(item, "backend"), _get(item, "response")
            if (backend is None) == (response is None):
                issues.append(ConfigIssue(where, "needs exactly one of `backend` or `response`"))
            elif is_unknown(backend):
                issues.append(ConfigIssue(f"{where}.backend", f"unknown backend {backend!r} (known: {known_text})"))
            elif response is not None and j != len(fallback) - 1:
                issues.append(ConfigIssue(where, "a static `response` always answers: put it last"))
    return issues


def _rollout_issues(place: str, route: Any, backends: Any, has_registry: bool) -> list[ConfigIssue]:
    """Canary and baseline in the split and different; steps strictly increasing; gates the
    driver does not serve yet refused; sequential needs no other error comparison; `registry`
    needs the top-level registry and a canary with a `model`."""
    ro = _get(route, "rollout")
    if not _is_node(ro):
        return []
    where = f"{place}.rollout"
    issues: list[ConfigIssue] = []
    split = _get(route, "split")
    names = _names(split)
    canary, baseline = _get(ro, "canary"), _get(ro, "baseline")
    for key, b in (("canary", canary), ("baseline", baseline)):
        if isinstance(b, str) and isinstance(split, Mapping) and b not in split:
            issues.append(ConfigIssue(f"{where}.{key}", f"backend {b!r} is not in the route's split "
                                                         f"(split: {', '.join(names)})"))
    if isinstance(canary, str) and canary == baseline:
        issues.append(ConfigIssue(f"{where}.baseline", f"must differ from the canary ({canary!r})"))
    steps = _get(ro, "steps")
    if isinstance(steps, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in steps) \
            and any(a >= b for a, b in itertools.pairwise(steps)):
        issues.append(ConfigIssue(f"{where}.steps", f"must be strictly increasing, got {steps}"))
    gates = _get(ro, "gates")
    if _is_node(gates):
        for key, anchor in ROLLOUT_GATES_NOT_SERVED.items():
            if _get(gates, key) is not None:
                issues.append(ConfigIssue(f"{where}.gates.{key}", f"not served yet ({anchor}): the gate would "
                                                                  "have no data, so it is refused; remove it"))
    if _get(ro, "registry") is not None:
        if not has_registry:
            issues.append(ConfigIssue(f"{where}.registry", "needs the top-level `registry` to write to"))
        canary_cfg = _get(backends, canary) if isinstance(canary, str) and isinstance(backends, Mapping) else None
        if _is_node(canary_cfg) and _get(canary_cfg, "model") is None:
            issues.append(ConfigIssue(f"{where}.registry", f"the canary {canary!r} has no `model`: set "
                                                           f"backends.{canary}.model to the version it serves"))
    return issues


def _monitor_issues(place: str, route: Any, log_paths: dict[str, str]) -> list[ConfigIssue]:
    """A reference backend must be in the route's split; sample log paths are unique."""
    mon = _get(route, "monitor")
    issues: list[ConfigIssue] = []
    ref_backend = _get(_get(mon, "reference"), "backend")
    split = _get(route, "split")
    if isinstance(ref_backend, str) and isinstance(split, Mapping) and ref_backend not in split:
        issues.append(ConfigIssue(f"{place}.monitor.reference.backend",
                                  f"backend {ref_backend!r} is not in the route's split "
                                  f"(split: {', '.join(_names(split))})"))
    log_path = _get(_get(mon, "log"), "path")
    if isinstance(log_path, str):
        if log_path in log_paths:
            issues.append(ConfigIssue(f"{place}.monitor.log.path",
                                      f"sample log {log_path!r} is already used by {log_paths[log_path]}"))
        log_paths.setdefault(log_path, f"{place}.monitor.log.path")
    return issues


_FEEDBACK_METRICS: Final = ("accuracy", "mae", "rmse", "mean")


def _feedback_issues(place: str, route: Any, feedback_paths: dict[str, str]) -> list[ConfigIssue]:
    """Not served yet; a prediction for the metrics that need one; a threshold only for
    accuracy; one route per feedback path."""
    fb = _get(route, "feedback")
    if not _is_node(fb):
        return []
    where = f"{place}.feedback"
    issues: list[ConfigIssue] = []
    if not FEEDBACK_SERVED:
        issues.append(ConfigIssue(where, "not served by this version yet (docs/feedback.md#status): the "
                                         "section would have no effect, so it is refused; remove it"))
    metric = _get(fb, "metric")
    metric = "accuracy" if metric is None else metric     # absent from a raw mapping: the default
    prediction = _get(fb, "prediction")
    if metric in _FEEDBACK_METRICS and metric != "mean" and prediction is None:
        issues.append(ConfigIssue(where, f"metric {metric!r} needs `prediction: {{path: ...}}`: where the answer "
                                         "holds the predicted class or number"))
    threshold = _get(prediction, "threshold") if _is_node(prediction) else None
    if metric in _FEEDBACK_METRICS and metric != "accuracy" and isinstance(threshold, int | float) \
            and not isinstance(threshold, bool):
        issues.append(ConfigIssue(f"{where}.prediction.threshold",
                                  f"a threshold turns scores into classes: only for metric accuracy "
                                  f"(metric is {metric!r})"))
    path = _get(fb, "path")
    if isinstance(path, str):
        if path in feedback_paths:
            issues.append(ConfigIssue(f"{where}.path",
                                      f"{path!r} is already the feedback path of {feedback_paths[path]}"))
        feedback_paths.setdefault(path, place)
    return issues


# --- places ------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# plain words that YAML 1.2 (load.py's loader) reads as booleans or null: quoted when they are strings
_YAML_WORDS = frozenset({"true", "True", "TRUE", "false", "False", "FALSE", "null", "Null", "NULL"})


def key_text(key: object) -> str:
    """A mapping key as a message quotes it, in YAML's spelling: 'timout', '', 1, true, null."""
    if isinstance(key, str):
        return repr(key)
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return str(key)
    return repr(str(key))  # a float or a date: its text, quoted so that its dots read as part of it


def _doc_key(node: Mapping[Any, Any], part: object) -> tuple[bool, Any]:
    """(found, the mapping's own key) for a loc part: pydantic gives the key `true` as 1 and
    `null` as 'None'."""
    if part in node:
        for key in node:
            if key == part and type(key) is type(part):
                return True, key
        return True, next(key for key in node if key == part)
    for key in node:
        if not isinstance(key, str) and str(key) == part:
            return True, key
    return False, part


def resolve(doc: Any, loc: Sequence[object]) -> tuple[list[tuple[bool, Any]], bool]:
    """Walk `loc` in `doc`: ([(is_index, the doc's own key or index)], whether it got to the end).

    An int is a list index only where the node is a list (pydantic gives a mapping's key 1
    as 1 too); past the point where the walk leaves `doc`, an int is taken for an index.
    """
    steps: list[tuple[bool, Any]] = []
    node, inside = doc, True
    for part in loc:
        if inside and isinstance(node, Mapping):
            inside, key = _doc_key(node, part)
            steps.append((False, key))
            node = node[key] if inside else None
        elif inside and isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            steps.append((True, part))
            node = node[part]
        else:
            inside = False
            steps.append((isinstance(part, int) and not isinstance(part, bool), part))
    return steps, inside


def place_of(loc: Sequence[object], doc: Any = None) -> str:
    """('routes', 0, 'split') -> 'routes[0].split'; () -> '(top level)'. With `doc`, the
    mapping that `loc` points into, an int that is a mapping's key reads as a key."""
    out = ""
    for is_index, key in resolve(doc, loc)[0]:
        if is_index:
            out += f"[{key}]"
        else:
            word = key if isinstance(key, str) and _BARE_KEY.match(key) and key not in _YAML_WORDS else key_text(key)
            out += f".{word}" if out else word
    return out or "(top level)"


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X (other unions stay as they are)."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def keys_at(loc: Sequence[object]) -> list[str]:
    """The keys the model at `loc` takes (as written in YAML: aliases, else field names); []
    where `loc` leads to no model (a free mapping such as `split`, or nowhere)."""
    tp: Any = Config
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = [f for name, f in tp.model_fields.items() if part in (name, f.alias)]
            if not fields:
                return []
            tp = fields[0].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or name for name, f in tp.model_fields.items()]
    return []


class ReferenceErrors(Exception):
    """Raised by the root validator; deliberately not a ValueError (see module docstring)."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("; ".join(map(str, issues)))
        self.issues = issues
