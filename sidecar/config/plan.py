"""Config -> Plan: frozen, precomputed runtime objects; the hot path reads only these.

A Plan is built once per (re)load. Each backend and route carries a `fingerprint` (hash of
its own config section) so that a reload can keep the state of the ones that did not change
(docs/operations.md#hot-reload). Imports: stdlib, sidecar.core, sidecar.config.model/load, sidecar.errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from sidecar.config.load import LoadedConfig
from sidecar.config.model import (
    BackendConfig,
    Config,
    DrainConfig,
    FeedbackConfig,
    LimitsConfig,
    MonitorConfig,
    RegistryConfig,
    RetryConfig,
    RolloutConfig,
    RouteConfig,
    split_listen,
)
from sidecar.core.attempts import Fallback
from sidecar.core.balance import Balance, OutlierPolicy
from sidecar.core.breaker import BreakerPolicy
from sidecar.core.drift import DriftPolicy
from sidecar.core.feedback import DEFAULT_WINDOW, FeedbackPolicy, Metric, SegmentPolicy
from sidecar.core.gates import CompareErrors, CompareLatency, GatePolicy
from sidecar.core.jsonpath import JsonPath, compile_path
from sidecar.core.registry import ModelRef
from sidecar.core.retry import RetryPolicy
from sidecar.core.rollout import OnFailure, RolloutPolicy, config_key
from sidecar.core.split import Split
from sidecar.core.window import as_category
from sidecar.errors import MethodNotAllowed, NoRoute

if TYPE_CHECKING:
    from sidecar.config.model import MirrorConfig


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """One replica of a backend: where its pool connects and what it sends."""

    url: str
    scheme: str          # "http" | "https"
    host: str            # what the pool connects to (parsed here once: shell/upstream.py)
    port: int
    base_path: str       # "" or "/base" (no trailing slash): prefixed to every request path
    host_header: str     # the Host header upstream: the endpoint's, not the client's

    @classmethod
    def build(cls, url: str) -> EndpointPlan:
        u = urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        default_port = port == (443 if u.scheme == "https" else 80)
        host = u.hostname or "127.0.0.1"
        host_text = f"[{host}]" if ":" in host else host
        return cls(
            url=url,
            scheme=u.scheme,
            host=host,
            port=port,
            base_path=u.path.rstrip("/"),
            host_header=host_text if default_port else f"{host_text}:{port}",
        )


@dataclass(frozen=True, slots=True)
class HealthCheckPlan:
    path: str
    interval_s: float
    timeout_s: float
    unhealthy_after: int
    healthy_after: int


@dataclass(frozen=True, slots=True)
class BackendPlan:
    name: str
    endpoints: tuple[EndpointPlan, ...]   # one for `url`, several for `endpoints`
    balance: Balance
    outlier: OutlierPolicy | None
    breaker: BreakerPolicy | None          # None: the circuit never opens
    health_check: HealthCheckPlan | None
    timeout_s: float
    max_connections: int                   # per endpoint
    max_inflight: int | None
    fingerprint: str                       # covers every endpoint and policy
    model: ModelRef | None = None          # what it serves; version None: an alias, resolved by shell/registry.py

    @classmethod
    def build(cls, name: str, cfg: BackendConfig) -> BackendPlan:
        cb, out, hc = cfg.circuit_breaker, cfg.outlier, cfg.health_check
        return cls(
            name=name,
            endpoints=tuple(EndpointPlan.build(url) for url in cfg.urls),
            balance=Balance(cfg.balance),
            outlier=OutlierPolicy(out.consecutive_failures, out.eject_for, out.max_ejected) if out else None,
            breaker=BreakerPolicy(cb.consecutive_failures, cb.failure_rate, cb.window, cb.open_for,
                                  cb.half_open_probes) if cb else None,
            health_check=HealthCheckPlan(hc.path, hc.interval, hc.timeout, hc.unhealthy_after,
                                         hc.healthy_after) if hc else None,
            timeout_s=cfg.timeout,
            max_connections=cfg.max_connections,
            max_inflight=cfg.max_inflight,
            fingerprint=_fingerprint(name, cfg.model_dump(mode="json")),
            model=ModelRef(cfg.model.name, cfg.model.version, cfg.model.alias) if cfg.model is not None else None,
        )


# --- mirror (shadow mode) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    """One `routes[].mirror[]` entry, compiled: what shell/mirror.py reads per request."""

    route: str
    backend: str
    key: tuple[str, str]              # (route, backend): the Mirrors stats key, survives reloads
    threshold: float                  # percent / 100: mirrored when rng() or the key's hash is below
    key_header: str | None            # lower-case
    methods: frozenset[str]
    timeout_s: float
    max_inflight: int
    max_body_bytes: int | None        # None: any body the route accepts (limits.max_body_bytes)
    compare_path: JsonPath | None     # None: no comparison, the shadow's answer is discarded
    tolerance: float
    rel_tolerance: float
    window: int
    # paths redacted from both answers before a disagreement is kept (the route's
    # `monitor.log.redact`; docs/reference/admin-api.md#mirrors: "redacted as the sample log is")
    redact: tuple[JsonPath, ...]
    compare_fingerprint: str          # a change resets the agreement window on reload

    @classmethod
    def build(cls, route: str, cfg: MirrorConfig, backends: Mapping[str, BackendPlan],
              redact: tuple[JsonPath, ...] = ()) -> MirrorPlan:
        c = cfg.compare
        return cls(
            route=route,
            backend=cfg.backend,
            key=(route, cfg.backend),
            threshold=cfg.percent / 100.0,
            key_header=cfg.key.header if cfg.key else None,
            methods=frozenset(cfg.methods),
            timeout_s=cfg.timeout if cfg.timeout is not None else backends[cfg.backend].timeout_s,
            max_inflight=cfg.max_inflight,
            max_body_bytes=cfg.max_body_bytes,
            compare_path=compile_path(c.path) if c else None,
            tolerance=c.tolerance if c else 0.0,
            rel_tolerance=c.rel_tolerance if c else 0.0,
            window=c.window if c else 1,
            redact=redact,
            compare_fingerprint=_fingerprint(c.model_dump(mode="json") if c else None, [p.text for p in redact]),
        )


# --- monitor (sampling, drift, sample log) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class FeaturePlan:
    name: str
    source: str              # "request" | "response"
    path: JsonPath
    categorical: bool
    signature: str           # what a window of this feature depends on; changed -> window dropped


@dataclass(frozen=True, slots=True)
class SampleLogPlan:
    path: Path               # absolute: relative paths resolved against the config file's folder
    sample: float            # share of ALL requests logged
    redact: tuple[JsonPath, ...]
    max_bytes: int
    keep: int
    fingerprint: str         # all but max_queue_bytes: a reload that changes only that keeps the writer
    max_queue_bytes: int = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class MonitorPlan:
    """A route's `monitor` section, compiled. One rng draw u per request: u < draw_below reads
    the payloads whole; of those, u < sample feeds the statistics and u < log.sample the log."""

    route: str
    sample: float
    draw_below: float
    window: int
    features: tuple[FeaturePlan, ...]
    request_features: tuple[FeaturePlan, ...]
    response_features: tuple[FeaturePlan, ...]
    reference_kind: str | None             # "backend" | "file" | "warmup" | None (no drift)
    reference_backend: str | None
    reference_file: Path | None
    reference_warmup: int | None
    policy: DriftPolicy
    every_s: float
    log: SampleLogPlan | None
    fingerprint: str

    @property
    def needs_response(self) -> bool:
        """Whether a sampled answer must be read whole: response features, or the sample log."""
        return bool(self.response_features) or self.log is not None

    @classmethod
    def build(cls, route: str, cfg: MonitorConfig, base_dir: Path) -> MonitorPlan:
        ref = cfg.reference
        ref_kind = None if ref is None else ("backend" if ref.backend is not None
                                             else "file" if ref.file is not None else "warmup")
        ref_dump = None if ref is None else ref.model_dump(mode="json")
        features = tuple(
            FeaturePlan(name=name, source=f.source, path=compile_path(f.path), categorical=f.kind == "categorical",
                        signature=_fingerprint(f.model_dump(mode="json"), cfg.window, ref_dump))
            for name, f in cfg.features.items())
        log = None
        if cfg.log is not None:
            lc = cfg.log
            log_sample = cfg.sample if lc.sample is None else lc.sample
            log = SampleLogPlan(path=base_dir / lc.path, sample=log_sample,
                                redact=tuple(compile_path(p) for p in lc.redact), max_bytes=lc.max_bytes,
                                keep=lc.keep, max_queue_bytes=lc.max_queue_bytes,
                                fingerprint=_fingerprint(lc.model_dump(mode="json", exclude={"max_queue_bytes"}),
                                                         str(base_dir)))
        d = cfg.drift
        return cls(
            route=route,
            sample=cfg.sample,
            draw_below=max(cfg.sample, log.sample if log is not None else 0.0),
            window=cfg.window,
            features=features,
            request_features=tuple(f for f in features if f.source == "request"),
            response_features=tuple(f for f in features if f.source == "response"),
            reference_kind=ref_kind,
            reference_backend=ref.backend if ref is not None else None,
            reference_file=base_dir / ref.file if ref is not None and ref.file is not None else None,
            reference_warmup=ref.warmup if ref is not None else None,
            policy=DriftPolicy(numeric_test=d.numeric, categorical_test=d.categorical, p_value=d.p_value,
                               psi=d.psi, min_samples=d.min_samples),
            every_s=d.every,
            log=log,
            fingerprint=_fingerprint(cfg.model_dump(mode="json"), str(base_dir)),
        )

# --- feedback (ground truth joined to predictions) -----------------------------------------


@dataclass(frozen=True, slots=True)
class FeedbackPlan:
    """A route's `feedback` section, compiled (docs/feedback.md); served by shell/feedback.py.
    What each part is for:

    - the proxy: for every answered request of the route, read the answer whole (up to
      `limits.max_body_bytes`), and hand (backend, request id, monotonic time, request body
      when `needs_request`, answer body) to whoever owns the tracker, which parses them and
      calls `FeedbackTracker.capture` and `add_many` in batches;
    - the main listener: `POST {path}` goes to `FeedbackTracker.join_many`, before route
      matching (the feedback path wins over any route prefix);
    - the tracker: `FeedbackTracker(policy, backends=route.backends)`, kept across a reload
      while `fingerprint` is the same.
    """

    route: str
    path: str                    # the URL path feedback is POSTed to, on the main listener
    policy: FeedbackPolicy       # metric, threshold, keep, max_pending, window, compiled paths, segments
    needs_request: bool          # some segment reads the request body
    fingerprint: str             # what the tracker's state depends on: the section and the window

    @classmethod
    def build(cls, route: str, cfg: FeedbackConfig, window: int) -> FeedbackPlan:
        pred = cfg.prediction
        segments = tuple(
            SegmentPolicy(name=name, source=seg.source, path=compile_path(seg.path),
                          values=tuple(str(as_category(v)) for v in seg.values))
            for name, seg in cfg.segments.items())
        policy = FeedbackPolicy(
            metric=Metric(cfg.metric),
            keep_s=cfg.keep,
            max_pending=cfg.max_pending,
            window=window,
            prediction_path=compile_path(pred.path) if pred is not None else None,
            threshold=pred.threshold if pred is not None else None,
            segments=segments,
        )
        return cls(route=route, path=cfg.path, policy=policy,
                   needs_request=any(s.source == "request" for s in segments),
                   fingerprint=_fingerprint(cfg.model_dump(mode="json"), window))


@dataclass(frozen=True, slots=True)
class TryTimeouts:
    """The timeouts of one try to one backend on one route (retry config or backend default)."""

    first_byte_s: float
    per_try_s: float


@dataclass(frozen=True, slots=True)
class FallbackPlan:
    """One step of a route's fallback chain: a backend, or a static response."""

    backend: str | None
    timeouts: TryTimeouts | None           # for a backend step
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """What `x-sidecar-backend` says when this step answered."""
        return self.backend if self.backend is not None else "fallback:response"


def _timeouts(retry: RetryConfig | None, backend: BackendPlan) -> TryTimeouts:
    per_try = retry.per_try_timeout if retry and retry.per_try_timeout else backend.timeout_s
    first_byte = retry.first_byte_timeout if retry and retry.first_byte_timeout else per_try
    return TryTimeouts(first_byte, per_try)


def _retry_policy(cfg: RouteConfig) -> RetryPolicy:
    r = cfg.retry
    if r is None:
        return RetryPolicy.single()
    return RetryPolicy(
        attempts=r.attempts,
        on_connect_error="connect-error" in r.on,
        on_timeout="timeout" in r.on,
        on_reset="reset" in r.on,
        on_5xx="5xx" in r.on,
        on_statuses=frozenset(v for v in r.on if isinstance(v, int)),
        backoff_base_s=r.backoff.base,
        backoff_max_s=r.backoff.max,
        other_backend=r.other_backend,
        hedge_after_s=r.hedge_after,
    )


@dataclass(frozen=True, slots=True)
class NotifyPlan:
    webhook: str
    headers: tuple[tuple[str, str], ...]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    """`routes[].rollout`, compiled into the core's policies (docs/rollout.md#configuration-keys).

    `policy.key` is the rollout's identity: a hash of the rollout section (notify aside: a
    new webhook address is not a new rollout) and of the canary's and baseline's backend
    fingerprints. A reload with the same key keeps the rollout; another key starts it anew.
    """

    policy: RolloutPolicy
    notify: NotifyPlan | None
    promote_alias: str | None = None   # `registry.promote_alias` (shell/registry.py writes it)

    @classmethod
    def build(cls, cfg: RolloutConfig, backends: Mapping[str, BackendPlan]) -> RolloutPlan:
        g = cfg.gates
        cmp = g.compare
        gates = GatePolicy(
            min_requests=cfg.min_requests,
            max_error_rate=g.max_error_rate,
            max_p99_s=g.max_p99,
            max_p99_ratio=g.max_p99_ratio,
            compare_latency=CompareLatency(cmp.latency) if cmp is not None and cmp.latency else None,
            compare_errors=CompareErrors(cmp.errors) if cmp is not None and cmp.errors else None,
            alpha=cmp.alpha if cmp is not None else 0.01,
        )
        key = config_key(cfg.model_dump(mode="json", exclude={"notify"}),
                         backends[cfg.canary].fingerprint, backends[cfg.baseline].fingerprint)
        policy = RolloutPolicy(
            key=key, canary=cfg.canary, baseline=cfg.baseline, steps=tuple(cfg.steps), interval_s=cfg.interval,
            gates=gates, progress_deadline_s=cfg.progress_deadline, bake_s=cfg.bake, dry_run=cfg.dry_run,
            on_failure=OnFailure(cfg.on_failure))
        n = cfg.notify
        notify = NotifyPlan(n.webhook, tuple(n.headers.items()), n.timeout) if n is not None else None
        return cls(policy, notify, cfg.registry.promote_alias if cfg.registry is not None else None)


@dataclass(frozen=True, slots=True)
class RoutePlan:
    name: str
    path_prefix: str
    methods: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]   # lower-case names, exact values
    split: Split
    backends: tuple[str, ...]              # the split's backend names, in config order
    sticky_header: str | None
    override_header: str | None
    timeout_s: float
    retry: RetryPolicy                     # RetryPolicy.single when the route has no `retry`
    retry_budget: float | None             # share of requests; None: no retries, no budget
    timeouts: tuple[TryTimeouts, ...]      # per backend of the split, in split order
    fallback: tuple[FallbackPlan, ...]
    fallback_kinds: tuple[Fallback, ...]   # of each step, in chain order: what core/attempts.py walks
    fingerprint: str
    mirrors: tuple[MirrorPlan, ...] = ()   # shadows, in config order
    monitor: MonitorPlan | None = None
    feedback: FeedbackPlan | None = None
    rollout: RolloutPlan | None = None

    @classmethod
    def build(cls, cfg: RouteConfig, backends: Mapping[str, BackendPlan],
              base_dir: Path | None = None) -> RoutePlan:
        fallback = []
        for item in cfg.fallback:
            if item.backend is not None:
                fallback.append(FallbackPlan(item.backend, _timeouts(cfg.retry, backends[item.backend])))
            elif item.response is not None:
                resp = item.response
                headers = dict(resp.headers)
                body = b""
                if resp.json_body is not None:
                    body = orjson.dumps(resp.json_body)
                    headers.setdefault("content-type", "application/json")
                fallback.append(FallbackPlan(None, None, resp.status, body, tuple(headers.items())))
        used = [*cfg.split, *(f.backend for f in fallback if f.backend is not None)]
        retry = _retry_policy(cfg)
        monitor = (MonitorPlan.build(cfg.name, cfg.monitor, base_dir or Path.cwd())
                   if cfg.monitor is not None else None)
        # disagreements kept by mirrors are redacted as the sample log is (docs/reference/admin-api.md#mirrors)
        redact = monitor.log.redact if monitor is not None and monitor.log is not None else ()
        return cls(
            name=cfg.name,
            path_prefix=cfg.match.path_prefix,
            methods=frozenset(cfg.match.methods) if cfg.match.methods else None,
            headers=tuple(cfg.match.headers.items()),
            split=Split(list(cfg.split.items())),
            backends=tuple(cfg.split),
            sticky_header=cfg.sticky.header if cfg.sticky else None,
            override_header=cfg.override_header,
            timeout_s=cfg.timeout,
            retry=retry,
            retry_budget=cfg.retry.budget if cfg.retry is not None else None,
            timeouts=tuple(_timeouts(cfg.retry, backends[b]) for b in cfg.split),
            fallback=tuple(fallback),
            fallback_kinds=tuple(Fallback.BACKEND if f.backend is not None else Fallback.RESPONSE for f in fallback),
            # a route changes when its own section or a backend it uses changes (docs/operations.md#hot-reload)
            fingerprint=_fingerprint(cfg.model_dump(mode="json"), [backends[b].fingerprint for b in used]),
            mirrors=tuple(MirrorPlan.build(cfg.name, m, backends, redact) for m in cfg.mirror),
            monitor=monitor,
            # the rolling metrics cover `monitor.window` joined items (docs/feedback.md#metrics)
            feedback=FeedbackPlan.build(cfg.name, cfg.feedback, cfg.monitor.window if cfg.monitor is not None
                                        else DEFAULT_WINDOW) if cfg.feedback is not None else None,
            rollout=RolloutPlan.build(cfg.rollout, backends) if cfg.rollout is not None else None,
        )

    def backend_index(self, name: str) -> int | None:
        try:
            return self.backends.index(name)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class RegistryPlan:
    """`registry`: which registry, where, and how often aliases are resolved again (shell/registry.py)."""

    kind: str                 # "mlflow", the only one so far
    url: str                  # without a trailing slash
    token: str
    timeout_s: float
    refresh_s: float

    @classmethod
    def build(cls, cfg: RegistryConfig) -> RegistryPlan:
        mf = cfg.mlflow
        return cls("mlflow", mf.url.rstrip("/"), mf.token, mf.timeout, mf.refresh)


@dataclass(frozen=True, slots=True)
class Plan:
    config: Config
    version: str
    secret_places: frozenset[str]
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    admin_token: str
    limits: LimitsConfig
    drain: DrainConfig
    access_log: bool
    backends: Mapping[str, BackendPlan]
    routes: tuple[RoutePlan, ...]
    routes_by_name: Mapping[str, RoutePlan]
    # POST paths of the routes' feedback sections (unique: config/model.py checks it)
    feedback_by_path: Mapping[str, FeedbackPlan] = field(default_factory=dict)
    registry: RegistryPlan | None = None

    @classmethod
    def build(cls, loaded: LoadedConfig) -> Plan:
        cfg = loaded.config
        backends = {name: BackendPlan.build(name, b) for name, b in cfg.backends.items()}
        base_dir = loaded.path.parent if loaded.path is not None else Path.cwd()  # docs/reference/configuration.md
        routes = tuple(RoutePlan.build(r, backends, base_dir) for r in cfg.routes)
        return cls(
            config=cfg,
            version=loaded.version,
            secret_places=loaded.secret_places,
            listen=split_listen(cfg.listen),
            admin_listen=split_listen(cfg.admin.listen),
            admin_token=cfg.admin.token,
            limits=cfg.limits,
            drain=cfg.drain,
            access_log=cfg.access_log,
            backends=backends,
            routes=routes,
            routes_by_name={r.name: r for r in routes},
            feedback_by_path={r.feedback.path: r.feedback for r in routes if r.feedback is not None},
            registry=RegistryPlan.build(cfg.registry) if cfg.registry is not None else None,
        )

    def match(self, method: str, path: str, headers: Mapping[str, str]) -> RoutePlan:
        """First route whose prefix, method and headers match (docs/reference/http.md#routing).

        No prefix match: NoRoute (404). Some prefix matched but no route there allows the
        method: MethodNotAllowed (405) with the methods those routes allow.
        """
        allow: set[str] | None = None
        for route in self.routes:
            if not path.startswith(route.path_prefix):
                continue
            if route.headers and any(headers.get(k) != v for k, v in route.headers):
                continue
            if route.methods is None or method in route.methods:
                return route
            allow = (allow or set()) | route.methods
        if allow is not None:
            raise MethodNotAllowed(f"method {method} not allowed here", sorted(allow))
        raise NoRoute(f"no route matches {path}")
