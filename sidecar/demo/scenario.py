"""What `sidecar demo` sets up: the example models, the sidecar's config and the timeline.

Owns the story, as data: which model servers run (`MODELS`), the config file the sidecar is
started with (`initial_config`) and the one it is edited into half-way (`reloaded_config`),
and when things happen for a given duration (`Timeline`). Nothing here does I/O; `run.py`
carries it out.

The story:
- `fraud-v1` is the stable fraud scorer, served by three replicas; one of them (`r3`)
  fails 30 % of its calls. Retries and outlier ejection keep that from the clients.
- `fraud-v2` is a good canary: the same scores, faster. Its rollout on route `fraud` steps
  it 10 -> 25 -> 50 -> 100 % and promotes it.
- `fraud-shadow` gets a copy of half of route `fraud`'s requests and disagrees on about 10 %
  of answers: the mirror's agreement shows it, the clients never see it.
- Half-way the config file is edited: a route `fraud-eu` (requests with `x-region: eu`)
  starts a rollout of `fraud-v3`, a bad canary (40 % errors, slow). Its gates catch it and
  roll it back.
- `llm` streams tokens on route `chat`.
- From the half-way mark a marketing campaign changes where payments come from, so route
  `fraud`'s drift check (each backend against its own first samples) sees `country` move.

Imports: the standard library and `sidecar.demo.models` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sidecar.demo.models import ModelSpec

PREDICT: Final = "/v1/models/fraud:predict"
CHAT: Final = "/v1/chat/completions"
FEEDBACK: Final = "/v1/feedback"
REGION_HEADER: Final = "x-region"
USER_HEADER: Final = "x-user-id"
USERS: Final = 400  # distinct x-user-id values the clients send
EU_SHARE: Final = 0.4  # share of fraud requests with x-region: eu
MIRROR_PERCENT: Final = 50
DISAGREE_SHARE: Final = 0.1
MIN_REQUESTS: Final = 15  # canary requests a rollout step needs before it is judged (demo scale)
# The gates. Relative latency, not an absolute p99: a busy machine stalls canary and baseline
# alike, and a dozen canary latencies make a p99 that one stall decides. Absolute limits
# would roll the good canary back on a loaded laptop or CI runner.
MAX_ERROR_RATE: Final = 0.1
MAX_P99_RATIO: Final = 3.0
GOOD_STEPS: Final = (10, 25, 50, 100)
BAD_STEPS: Final = (20, 50, 100)
DRIFT_WARMUP: Final = 150  # each backend's first samples: its drift reference

# name -> the model servers behind it (one spec per replica)
MODELS: Final[dict[str, tuple[ModelSpec, ...]]] = {
    "fraud-v1": (
        ModelSpec("fraud", "1", latency_s=0.006, seed=11),
        ModelSpec("fraud", "1", latency_s=0.006, seed=12),
        ModelSpec("fraud", "1", latency_s=0.006, error_rate=0.3, seed=13),  # the flaky replica
    ),
    "fraud-v2": (ModelSpec("fraud", "2", latency_s=0.003, seed=21),),
    "fraud-v3": (ModelSpec("fraud", "3", latency_s=0.04, error_rate=0.4, seed=31),),
    "fraud-shadow": (ModelSpec("fraud", "2-exp", disagree_share=DISAGREE_SHARE, latency_s=0.004, seed=41),),
    "llm": (ModelSpec("chat", "llm-1", latency_s=0.05, token_delay_s=0.04, seed=51),),
}


@dataclass(frozen=True, slots=True)
class Timeline:
    """When things happen in a run of `duration_s` seconds of traffic."""

    duration_s: float

    @property
    def interval_s(self) -> float:
        """A rollout step's judging interval: about a twelfth of the run, at least 1.5 s."""
        return round(max(1.5, self.duration_s / 12), 1)

    @property
    def reload_at_s(self) -> float:
        return self.duration_s / 2

    @property
    def campaign_at_s(self) -> float:
        """From here most payments come from other countries (drift)."""
        return self.duration_s / 2

    @property
    def grace_s(self) -> float:
        """How long traffic goes on past `duration_s` while a rollout is still undecided."""
        return max(20.0, self.duration_s / 2)


def _backend(urls: list[str], **extra: Any) -> dict[str, Any]:
    where: dict[str, Any] = {"url": urls[0]} if len(urls) == 1 else {"endpoints": urls}
    return {**where, "timeout": "2s", **extra}


def _rollout(canary: str, steps: tuple[int, ...], timeline: Timeline) -> dict[str, Any]:
    return {
        "canary": canary,
        "baseline": "fraud-v1",
        "steps": list(steps),
        "interval": f"{timeline.interval_s}s",
        "min_requests": MIN_REQUESTS,
        "gates": {"max_error_rate": MAX_ERROR_RATE, "max_p99_ratio": MAX_P99_RATIO},
        "progress_deadline": f"{max(30.0, timeline.duration_s)}s",
    }


_RETRY: Final = {
    "attempts": 2,
    "per_try_timeout": "2s",  # a try past it counts as failed: generous, for busy machines
    "on": ["connect-error", "reset", "timeout", "5xx"],
    "backoff": {"base": "5ms", "max": "50ms"},
    "budget": 0.2,
    "other_backend": True,
}
_FALLBACK: Final = [{"response": {"status": 200, "json": {"predictions": [], "fallback": True}}}]
_BREAKER: Final = {"consecutive_failures": 5, "failure_rate": 0.6, "window": 20, "open_for": "3s"}


def initial_config(urls: dict[str, list[str]], timeline: Timeline) -> dict[str, Any]:
    """The config the sidecar starts with; `urls`: backend name -> its servers' URLs."""
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "access_log": False,
        "drain": {"delay": 0, "grace": "2s"},
        "backends": {
            "fraud-v1": _backend(
                urls["fraud-v1"],
                outlier={"consecutive_failures": 3, "eject_for": "2s", "max_ejected": 0.34},
                circuit_breaker=_BREAKER,
            ),
            "fraud-v2": _backend(urls["fraud-v2"], circuit_breaker=_BREAKER),
            "fraud-v3": _backend(urls["fraud-v3"], circuit_breaker=_BREAKER),
            "fraud-shadow": _backend(urls["fraud-shadow"]),
            "llm": {**_backend(urls["llm"]), "timeout": "10s"},
        },
        "routes": [
            {
                "name": "fraud",
                "match": {"path_prefix": "/v1/models/fraud", "methods": ["POST"]},
                "split": {"fraud-v1": 100, "fraud-v2": 0},
                "sticky": {"header": USER_HEADER},
                "timeout": "5s",
                "retry": _RETRY,
                "fallback": _FALLBACK,
                "mirror": [
                    {
                        "backend": "fraud-shadow",
                        "percent": MIRROR_PERCENT,
                        "max_inflight": 32,
                        "compare": {"path": "$.predictions[*]", "tolerance": 0.02},
                    }
                ],
                "monitor": {
                    "sample": 1.0,
                    "window": 300,
                    "features": {
                        "amount": {"from": "request", "path": "$.instances[*].amount"},
                        "country": {"from": "request", "path": "$.instances[*].country", "kind": "categorical"},
                        "score": {"from": "response", "path": "$.predictions[*]"},
                    },
                    "reference": {"warmup": DRIFT_WARMUP},
                    "drift": {"min_samples": 100, "every": "1s"},
                },
                "feedback": {
                    "path": FEEDBACK,
                    "prediction": {"path": "$.predictions[0]", "threshold": 0.5},
                    "metric": "accuracy",
                    "keep": "2m",
                    "max_pending": 50_000,
                },
                "rollout": _rollout("fraud-v2", GOOD_STEPS, timeline),
            },
            {"name": "chat", "match": {"path_prefix": "/v1/chat"}, "split": {"llm": 1}, "timeout": "10s"},
        ],
    }


def reloaded_config(urls: dict[str, list[str]], timeline: Timeline) -> dict[str, Any]:
    """The config file as edited half-way: route `fraud-eu` first, with v3's rollout."""
    cfg = initial_config(urls, timeline)
    eu = {
        "name": "fraud-eu",
        "match": {"path_prefix": "/v1/models/fraud", "methods": ["POST"], "headers": {REGION_HEADER: "eu"}},
        "split": {"fraud-v1": 100, "fraud-v3": 0},
        "sticky": {"header": USER_HEADER},
        "timeout": "5s",
        "retry": _RETRY,
        "fallback": _FALLBACK,
        "rollout": _rollout("fraud-v3", BAD_STEPS, timeline),
    }
    cfg["routes"] = [eu, *cfg["routes"]]
    return cfg
