"""Feedback shared across a fleet: the pure parts (docs/fleet.md#feedback-across-replicas).

With `fleet` and a route with `feedback`, each replica hands the predictions it keeps pending
to the fleet's store once per `sync_every`, and looks a label whose prediction is not pending
here up in the store; the shell (shell/feedback_share.py) does the I/O. This module decides
where and when:

- `encode` / `decode`: one prediction as the store keeps it (a short JSON array: backend,
  prediction, score, segments; the request id is the hash field). `decode` refuses what it
  cannot read (None), so a damaged or foreign value is an `unknown`, never an error.
- `Buckets`: the store keeps the predictions of one route in hashes, one per `span` seconds
  of wall-clock time, each expiring `keep` after its span ends. So a prediction is joinable
  for at least `keep` after it was handed over and at most `keep + span`, the store holds at
  most `keep / span + 2` hashes per route, and one publish is one HSET (and one PEXPIREAT)
  whatever the traffic. `lookup` names the hashes a label is searched in, newest first,
  with one span of slack for replicas' clocks.
- `Schedule`: hand over every `sync_every`; after a failed store call, no call for
  `sync_every` (the predictions wait here, labels for foreign ones read `unknown`).

Imports: the standard library and sidecar.core.feedback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Final

from sidecar.core.feedback import Pending

MAX_BUCKETS: Final = 16      # keep / span: the hashes per route, and so the HGETs per label looked up


def encode(p: Pending) -> bytes:
    """A pending prediction as the store keeps it (its `at` stays here: clocks differ)."""
    return json.dumps([p.backend, p.predicted, p.score, list(p.segments)], separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def decode(raw: bytes, at: float) -> Pending | None:
    """The Pending an `encode`d value holds, captured (for this replica) at `at`; None when
    the value is not one."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, list) or len(doc) != 4:
        return None
    backend, predicted, score, segments = doc
    if not isinstance(backend, str) or not isinstance(segments, list) or \
            not all(type(s) is int for s in segments):
        return None
    if predicted is not None and type(predicted) not in (int, float, str):
        return None
    if score is not None and (type(score) not in (int, float) or not math.isfinite(score)):
        return None
    return Pending(backend, at, predicted, None if score is None else float(score), tuple(segments))


@dataclass(frozen=True, slots=True)
class Buckets:
    """Which store hash a prediction goes to, when it expires, and where a label looks."""

    keep_s: float
    span_s: float

    @classmethod
    def of(cls, keep_s: float, sync_every_s: float) -> Buckets:
        """Spans of `keep / MAX_BUCKETS`, never shorter than `sync_every`."""
        if not keep_s > 0 or not sync_every_s > 0:
            raise ValueError(f"keep and sync_every must be above 0, got {keep_s}, {sync_every_s}")
        return cls(keep_s, max(sync_every_s, keep_s / MAX_BUCKETS))

    def bucket(self, wall: float) -> int:
        """The bucket of predictions handed over at wall-clock time `wall` (Unix seconds)."""
        return math.floor(wall / self.span_s)

    def expires_at_ms(self, bucket: int) -> int:
        """When a bucket's hash expires (Unix ms, for PEXPIREAT): `keep` after its span ends."""
        return math.ceil(((bucket + 1) * self.span_s + self.keep_s) * 1000)

    def lookup(self, wall: float) -> list[int]:
        """The buckets a label posted at `wall` is searched in, newest first: every bucket that
        can still hold a prediction, and one span ahead and behind for clock differences."""
        newest = self.bucket(wall + self.span_s)
        oldest = self.bucket(wall - self.keep_s - 2 * self.span_s)
        return list(range(newest, oldest - 1, -1))


class Schedule:
    """When the shell calls the store: `publish_due` every `every_s`; none while backing off
    (`every_s` after a failure). Monotonic seconds. Owned by one thread."""

    __slots__ = ("_last_publish", "_resume_at", "every_s")

    def __init__(self, every_s: float) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s must be above 0, got {every_s}")
        self.every_s = every_s
        self._last_publish = -math.inf
        self._resume_at = -math.inf

    def usable(self, now: float) -> bool:
        """Whether to call the store now (False while backing off after a failure)."""
        return now >= self._resume_at

    def publish_due(self, now: float) -> bool:
        """Whether to hand the pending predictions over now; True starts the next interval."""
        if not self.usable(now) or now - self._last_publish < self.every_s:
            return False
        self._last_publish = now
        return True

    def failed(self, now: float) -> None:
        """A store call failed: no call before `every_s` from now."""
        self._resume_at = now + self.every_s
