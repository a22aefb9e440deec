"""The model registry's decisions, with no I/O: what a backend serves, what a call came to, what a rollout writes.

    ModelRef          a backend's model: name, version (None while its alias is unresolved), alias
    CallOutcome       what one registry call came to; `retryable` says whether another try may help
    Write             one write a rollout asks of the registry (move an alias, set a version tag)
    rollout_writes()  the writes of a promotion or a rollback (docs/registry.md#what-a-rollout-writes)
    backoff_s()       the wait before try n+1 of a call

The shell (shell/registry.py) makes the calls, counts them and shows what could not be
written; nothing here knows which registry it talks to, sleeps or reads a clock.

Imports: the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

# the tags a rollout sets on the canary's model version (SPEC section 11)
TAG_ROLLOUT: Final = "sidecar.rollout"
TAG_REASON: Final = "sidecar.rollout.reason"
# a tag value is one line; MLflow takes values up to 5000 characters
MAX_TAG_VALUE: Final = 5000


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a backend serves. `version` is None while `alias` is not resolved (registry
    unreachable, alias unknown); a static `{name, version}` has no alias."""

    name: str
    version: str | None
    alias: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The shape of `model` in /admin/status, logs, decisions and webhook events."""
        return {"name": self.name, "version": self.version, "alias": self.alias}


class Operation(StrEnum):
    """A registry call; the `operation` label of `sidecar_registry_calls_total`."""

    RESOLVE_ALIAS = "resolve_alias"
    SET_ALIAS = "set_alias"
    SET_TAG = "set_tag"


class CallOutcome(StrEnum):
    """What one call (one try) came to; the `outcome` label of `sidecar_registry_calls_total`."""

    OK = "ok"
    NOT_FOUND = "not_found"       # 404: no such model, version or alias
    REFUSED = "refused"           # another 4xx: bad request, unauthorised, forbidden
    ERROR = "error"               # 5xx or 429, or an answer that is not the registry's JSON
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"   # connect error, reset, DNS

    @property
    def retryable(self) -> bool:
        """Whether another try of the same call may come to something else."""
        return self in (CallOutcome.ERROR, CallOutcome.TIMEOUT, CallOutcome.UNREACHABLE)


def classify_status(status: int) -> CallOutcome:
    """An HTTP status of the registry's answer -> the call's outcome."""
    if status < 300:
        return CallOutcome.OK
    if status == 404:
        return CallOutcome.NOT_FOUND
    if status == 429 or status >= 500:
        return CallOutcome.ERROR
    return CallOutcome.REFUSED


# Writes are tried this often in all, waiting BACKOFF_S[i] after try i+1 fails (retryable outcomes only).
WRITE_TRIES: Final = 3
BACKOFF_S: Final = (0.5, 2.0)


def backoff_s(tries_made: int) -> float:
    """The wait after `tries_made` failed tries (1-based), before the next."""
    return BACKOFF_S[min(tries_made, len(BACKOFF_S)) - 1]


@dataclass(frozen=True, slots=True)
class Write:
    """One write: `SET_ALIAS` points alias `key` of model `name` at `version`; `SET_TAG` sets
    tag `key` = `value` on version `version` of model `name`."""

    operation: Operation
    name: str
    version: str
    key: str
    value: str = ""

    def describe(self) -> str:
        if self.operation is Operation.SET_ALIAS:
            return f"alias {self.key} of {self.name} -> version {self.version}"
        return f"tag {self.key}={self.value!r} on {self.name} version {self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"operation": str(self.operation), "name": self.name, "version": self.version, "key": self.key,
                "value": self.value}


class RolloutEnd(StrEnum):
    """The rollout events that write to the registry; the value is the `sidecar.rollout` tag's."""

    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


def rollout_writes(end: RolloutEnd, canary: ModelRef, promote_alias: str, reason: str) -> tuple[Write, ...]:
    """The writes of a promotion or a rollback of a canary serving `canary`, in the order to make them.

    Promotion: the alias first (what serving reads), then the tags. Rollback: the tags only.
    Empty when the canary's version is not known (its alias unresolved): nothing can be
    written, and the shell says so. `reason` is the decision's one-line reason.
    """
    version = canary.version
    if version is None:
        return ()
    writes: list[Write] = []
    if end is RolloutEnd.PROMOTED:
        writes.append(Write(Operation.SET_ALIAS, canary.name, version, promote_alias))
    one_line = " ".join(reason.split())[:MAX_TAG_VALUE]
    writes.append(Write(Operation.SET_TAG, canary.name, version, TAG_ROLLOUT, str(end)))
    writes.append(Write(Operation.SET_TAG, canary.name, version, TAG_REASON, one_line))
    return tuple(writes)
