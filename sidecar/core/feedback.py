"""Feedback: ground truth joined to predictions by request id, and rolling metrics per backend and segment.

Owns (docs/feedback.md):

- `FeedbackPolicy`: a route's `feedback` section compiled (metric, threshold, keep, bounds,
  JSON paths, segments), and `capture`, which turns one answered request into a `Pending`
  (the class or number predicted, the score, the segment values as small ints);
- `PendingStore`, the interface of the pending-predictions store (few batched calls, so
  that a Redis-backed store can replace the local one for a fleet), and `LocalPendingStore`,
  a bounded, time-limited map request id -> `Pending` in this process;
- `RecentIds`: the cheap, bounded memory of ids that expired or were joined recently, which
  tells `expired` and `duplicate` from `unknown`;
- `FeedbackTracker`: one route's feedback: validates posted items, joins them, keeps the
  rolling metric per backend and per (backend, segment, value), the answer-time confidence
  signal, the per-outcome counts, and the cumulative tallies behind the rollout's
  step-scoped view (`mark` / `since`);
- the shapes the shell reads: `JoinResult`, `FeedbackSummary`, `StepFeedback`, `Tally`.

Flow (what the shell does with it):

    answer  -> pending = tracker.capture(backend, now, request_doc, response_doc)
               tracker.add_many([(request_id, pending), ...], now)      # batched, off the loop
    POST    -> items = feedback_items(json_doc)                         # FeedbackBodyError -> 400
               results = tracker.join_many(items, now); results_json(results)
    schedule-> tracker.expire(now); tracker.summary()                   # admin, metrics
    rollout -> mark = tracker.mark(now) at the step's start; tracker.since(mark) when judging

Costs (STYLE "Hot path"): `add_many` and `join_many` are O(1) per item (a dict operation,
a struct pack or unpack, a few ring writes; no scan). Expiry is amortised: the adds are
queued in capture order, so `expire` consumes the queue's old end and stops at the first
prediction still young; each add is consumed once. Summaries read running sums:
O(backends x segment values), never O(items). Measured on the shared 2-core VM, loaded:
capture 3-8 us, add 3-5 us, join 7-16 us per item, so a POST of 1000 items is about 10 ms
of Python: not for the event loop.

Memory: one pending prediction costs about 210 bytes by tracemalloc and 250 bytes of RSS
(100,000 pending: ~25 MB), and nothing of it is seen by the garbage collector, so a full
collection costs the same with a million pending as with none (LocalPendingStore says how);
measured in fresh processes by `python3 bench/feedback_memory.py` (docs/feedback.md#memory).
The memory of recent ids adds about 20 bytes per id expired or joined in the last `keep`.

Threading: nothing here locks. A tracker and its store belong to ONE thread (the shell's
feedback worker, say), which also orders the work: a batch of captures is added before any
later join runs, or its feedback reads `unknown`. Readers on other threads take
`summary()` / `since()` results, which are immutable snapshots.

Imports: the standard library, numpy, sidecar.core.jsonpath and sidecar.core.window.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final, Literal, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from sidecar.core.jsonpath import JsonPath
from sidecar.core.window import MAX_CATEGORY_CHARS, as_category, as_number

MAX_ITEMS: Final = 1000               # items in one POST (docs/feedback.md#posting-feedback)
DEFAULT_WINDOW: Final = 2000          # joined items per rolling window without `monitor.window`
MIN_SEGMENT_ITEMS: Final = 30         # fewer joined items than this: a segment value is too small to judge
MAX_REQUEST_ID_CHARS: Final = 256     # longer ids are never kept (memory) and are invalid when posted
# Numbers beyond this magnitude are refused as labels, values and numeric predictions: no model
# predicts them, and their squares (rmse) would overflow the running sums to inf, then nan.
MAX_MAGNITUDE: Final = 1e100
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
OTHER: Final = "other"                # the segment value of every value not in the config's list
MISSING_SEGMENT: Final = -1           # Pending.segments entry when the segment's path found nothing usable


class Metric(StrEnum):
    """`feedback.metric`. Each is the mean of one number per joined item (its *term*), so one
    running sum serves them all: accuracy (1 when the class matched, else 0), mae (|error|),
    rmse (error squared; the metric is the root of the mean) and mean (the posted value)."""

    ACCURACY = "accuracy"
    MAE = "mae"
    RMSE = "rmse"
    MEAN = "mean"

    @property
    def higher_is_better(self) -> bool:
        """accuracy and mean: a floor (`min_feedback`); mae and rmse are errors: a ceiling."""
        return self in (Metric.ACCURACY, Metric.MEAN)

    @property
    def needs_prediction(self) -> bool:
        """Whether a join needs the captured prediction (mean judges the posted value alone)."""
        return self is not Metric.MEAN

    def of(self, count: int, total: float) -> float | None:
        """The metric of `count` items whose terms sum to `total`; None for no items."""
        if count <= 0:
            return None
        mean = total / count
        return math.sqrt(max(mean, 0.0)) if self is Metric.RMSE else mean

    def worse_by(self, value: float, baseline: float) -> float:
        """How much worse `value` is than `baseline` (> 0: worse): the drop of an accuracy or a
        mean, the rise of an error. What `max_feedback_drop` and `max_segment_drop` bound."""
        return baseline - value if self.higher_is_better else value - baseline


class JoinOutcome(StrEnum):
    """What became of one posted feedback item (`feedback_total{outcome}`)."""

    JOINED = "joined"          # matched a pending prediction; counted in the metrics
    UNKNOWN = "unknown"        # no prediction under this id is pending or remembered
    EXPIRED = "expired"        # its prediction was given up recently (passed `keep`, or pushed out)
    DUPLICATE = "duplicate"    # its prediction was joined already (an earlier post, or earlier in this one)
    INVALID = "invalid"        # the item itself is wrong; `message` says how. Nothing changed.


# --- capture -----------------------------------------------------------------------------------

ClassKey = int | str


def class_key(value: object) -> ClassKey | None:
    """The class a JSON value names, for `accuracy`: classes are equal when their keys are.

    bool -> 0/1 (so `true`, `1` and `1.0` are one class), int -> itself, integral float ->
    its int, str -> itself (cut to MAX_CATEGORY_CHARS). Anything else (a fractional number,
    an integer outside int64, null, a list, an object) is no class: None. A string is never
    equal to a number: "1" and 1 are different classes.
    """
    if type(value) is str:
        return value if len(value) <= MAX_CATEGORY_CHARS else value[:MAX_CATEGORY_CHARS]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and \
            _INT64_MIN <= value < -float(_INT64_MIN) else None
    if isinstance(value, str):  # str subclasses
        return class_key(str(value))
    return None


def bounded_number(value: object) -> float | None:
    """`as_number` (finite int or float, never bool), refused beyond MAX_MAGNITUDE."""
    x = as_number(value)
    return x if x is not None and -MAX_MAGNITUDE <= x <= MAX_MAGNITUDE else None


class Pending(NamedTuple):
    """One answered request's prediction, waiting for its feedback: what a store keeps.

    Plain data: the local store packs it into bytes, a Redis-backed one would serialise it.
    Short-lived as an object (made by `capture`, packed by `add_many`, unpacked by a join).
    `predicted` is a class key (accuracy), a float (mae, rmse) or None (no usable
    prediction; always for `mean`).
    `segments` holds, per `policy.segments`, the index of the value in its `values` list,
    `len(values)` for `other`, or MISSING_SEGMENT.
    """

    backend: str
    at: float                        # monotonic seconds when it was captured
    predicted: ClassKey | float | None
    score: float | None              # the numeric prediction (the confidence signal), else None
    segments: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SegmentPolicy:
    """One `feedback.segments.<name>`: where its value is read and the values judged apart.

    `values` are the config's values as text (`as_category`: `1` and `1.0` are "1", `true` is
    "true"); a request's value is converted the same way, so it matches whatever the YAML
    spelling. Every other value is `other`; a path that finds nothing, or finds a list or an
    object, is missing (the item counts for its backend, but for no value of this segment).
    A path with `[*]` would take its first match; the config refuses `[*]` (one value per request).
    """

    name: str
    source: Literal["request", "response"]
    path: JsonPath
    values: tuple[str, ...]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if OTHER in self.values:
            raise ValueError(f"segment {self.name!r}: {OTHER!r} is the name of every other value, not a value")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"segment {self.name!r}: values must be distinct")
        object.__setattr__(self, "_index", {v: i for i, v in enumerate(self.values)})

    @property
    def labels(self) -> tuple[str, ...]:
        """Every value label this segment reports: the config's values, then `other`."""
        return (*self.values, OTHER)

    def index_of(self, value: object) -> int:
        """The segment value's index in `labels` for a JSON value, or MISSING_SEGMENT."""
        text = as_category(value)
        if text is None:
            return MISSING_SEGMENT
        return self._index.get(text, len(self.values))


@dataclass(frozen=True, slots=True)
class FeedbackPolicy:
    """A route's `feedback` section, compiled (config/plan.py builds it). Immutable, thread-safe.

    `window` is the route's `monitor.window` (DEFAULT_WINDOW without `monitor`): the rolling
    metrics cover the last `window` joined items of each backend and of each (backend,
    segment, value).
    """

    metric: Metric
    keep_s: float
    max_pending: int
    window: int = DEFAULT_WINDOW
    prediction_path: JsonPath | None = None
    threshold: float | None = None
    segments: tuple[SegmentPolicy, ...] = ()
    min_segment_items: int = MIN_SEGMENT_ITEMS

    def __post_init__(self) -> None:
        if not self.keep_s > 0:
            raise ValueError(f"keep must be above 0 seconds, got {self.keep_s}")
        if self.max_pending < 1 or self.window < 1:
            raise ValueError(f"max_pending and window must be at least 1, got {self.max_pending}, {self.window}")
        if self.metric.needs_prediction and self.prediction_path is None:
            raise ValueError(f"metric {self.metric} needs a prediction path")
        if self.threshold is not None and self.metric is not Metric.ACCURACY:
            raise ValueError("a threshold turns scores into classes: only for metric accuracy")

    def capture(self, backend: str, at: float, request: Any, response: Any) -> Pending:
        """The Pending for one answered request; `request`/`response` are the parsed bodies
        (None, or anything that is not JSON, when a body was not JSON: every path then
        finds nothing). Never raises: a value of the wrong type is a missing prediction or
        segment, counted by the tracker."""
        predicted: ClassKey | float | None = None
        score: float | None = None
        if self.prediction_path is not None:
            raw = self.prediction_path.first(response, None)
            score = bounded_number(raw)
            if self.metric is Metric.ACCURACY:
                if self.threshold is not None and score is not None:
                    predicted = 1 if score >= self.threshold else 0
                else:
                    predicted = class_key(raw)
            elif self.metric is not Metric.MEAN:
                predicted = score
        segments = tuple(s.index_of(s.path.first(request if s.source == "request" else response, None))
                         for s in self.segments)
        return Pending(backend, at, predicted, score, segments)


# --- remembering recent ids ------------------------------------------------------------------


class RecentIds:
    """Ids seen recently (by 64-bit hash), each with a small int (the backend's index).

    `remember` writes into the current generation, a dict {hash: backend index} (about 80
    bytes an id, the int included). `rotate(now)` closes it once it is `keep_s /
    generations` old or holds `capacity / generations` ids: it becomes a chunk, two sorted
    numpy arrays (10 bytes an id), looked up a batch at a time with `searchsorted`. A chunk
    is dropped `keep_s` after it was closed. So at most 1/`generations` of the remembered
    ids cost a dict slot: about 20 bytes an id on average.

    NOTE, the approximations (what `expired` and `duplicate` can get wrong):
    - Time: an id is remembered for at least `keep_s` and at most about
      `keep_s` x (1 + 1/generations), plus the time between two `rotate` calls; after that
      a post for it reads `unknown`.
    - Count: past `capacity` ids remembered, the oldest chunks are dropped early, so in an
      expiry storm (more than `capacity` ids given up within `keep_s`) the oldest are
      forgotten before `keep_s`. Memory is bounded by about `capacity` ids plus one batch.
    - Hashes: Python's `hash(str)`, 64 bits, stable within the process (which is all this
      memory lives in; a fleet's store keeps its own). An unknown id reads `expired` or
      `duplicate` only when its hash collides with a remembered one's: about n / 2**64.
    The dict, the ints and the arrays are all invisible to the garbage collector.
    """

    __slots__ = ("_chunk_ids", "_chunk_max", "_chunks", "_current", "_current_since", "_span_s", "capacity",
                 "keep_s")

    def __init__(self, keep_s: float, capacity: int, generations: int = 8) -> None:
        if not keep_s > 0 or capacity < 1 or generations < 1:
            raise ValueError(f"need keep_s > 0, capacity >= 1, generations >= 1; got {keep_s}, {capacity}, "
                             f"{generations}")
        self.keep_s = keep_s
        self.capacity = capacity
        self._span_s = keep_s / generations
        self._chunk_max = max(1, capacity // generations)
        self._current: dict[int, int] = {}
        self._current_since = 0.0
        # (closed at, sorted hashes, their backend indexes), oldest first
        self._chunks: deque[tuple[float, npt.NDArray[np.int64], npt.NDArray[np.int16]]] = deque()
        self._chunk_ids = 0

    def __len__(self) -> int:
        return len(self._current) + self._chunk_ids

    def __repr__(self) -> str:
        return (f"RecentIds(keep_s={self.keep_s}, current={len(self._current)}, chunks={len(self._chunks)}, "
                f"in_chunks={self._chunk_ids})")

    def remember(self, h: int, backend: int, now: float) -> None:
        """Remember one id's hash. Never rotates: lookups within a batch see the same chunks."""
        if not self._current:
            self._current_since = now
        self._current[h] = backend

    def current(self, h: int) -> int | None:
        """The backend index of an id remembered in the current generation, or None."""
        return self._current.get(h)

    def previous(self, hashes: Sequence[int]) -> npt.NDArray[np.int16]:
        """For each hash, its backend index in the closed chunks, or -1 (one numpy call a chunk)."""
        out = np.full(len(hashes), -1, dtype=np.int16)
        if not self._chunks or not hashes:
            return out
        q = np.fromiter(hashes, dtype=np.int64, count=len(hashes))
        for _, chunk, backends in self._chunks:
            pos = np.minimum(np.searchsorted(chunk, q), len(chunk) - 1)
            found = chunk[pos] == q
            out[found] = backends[pos[found]]
        return out

    def rotate(self, now: float) -> None:
        """Age the generations (see the class docstring); O(1) unless a generation turns over."""
        chunks = self._chunks
        while chunks and now - chunks[0][0] >= self.keep_s:
            self._chunk_ids -= len(chunks.popleft()[1])
        cur = self._current
        if cur and (now - self._current_since >= self._span_s or len(cur) >= self._chunk_max):
            hashes = np.fromiter(cur.keys(), dtype=np.int64, count=len(cur))
            backends = np.fromiter(cur.values(), dtype=np.int16, count=len(cur))
            order = np.argsort(hashes, kind="stable")
            chunks.append((now, hashes[order], backends[order]))
            self._chunk_ids += len(cur)
            self._current = {}
        while self._chunk_ids > self.capacity and len(chunks) > 1:
            self._chunk_ids -= len(chunks.popleft()[1])    # an expiry storm: forget the oldest early


# --- the pending-predictions store -----------------------------------------------------------


class Miss(NamedTuple):
    """`join_many`'s answer for an id with no pending prediction: why, and whose it was if known."""

    outcome: JoinOutcome          # UNKNOWN, EXPIRED or DUPLICATE
    backend: str | None           # None for UNKNOWN


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """A store's size and lifetime totals (never reset)."""

    pending: int
    added_total: int
    replaced_total: int           # an id added again while pending: the newer prediction replaced it
    expired_total: int            # passed `keep` without feedback
    dropped_total: int            # pushed out by `max_pending` (feedback_pending_dropped_total)
    remembered: int               # ids in the expired and joined memories


class PendingStore(Protocol):
    """Where predictions wait for their feedback. Every call is batched, so that a store
    across the network (Redis, for a fleet) costs one round trip per call, not per item.

    Contract, for any implementation:
    - `add_many` keeps each (request id, Pending); an id already pending is replaced by the
      newer prediction. Past `max_pending` the oldest are dropped, and remembered as expired.
    - `join_many` takes, in order, each id's pending prediction out of the store (a second
      occurrence of an id, in the same call or a later one, is a DUPLICATE Miss), or says
      why there is none. Entries older than `keep` are never joined.
    - `expire(now)` drops the entries older than `keep` and returns how many; `add_many`
      and `join_many` expire first themselves, so calling it is only needed when quiet.
    - `now` never goes backwards between calls (monotonic seconds).
    """

    def add_many(self, items: Iterable[tuple[str, Pending]], now: float) -> None: ...

    def join_many(self, request_ids: Sequence[str], now: float) -> list[Pending | Miss]: ...

    def expire(self, now: float) -> int: ...

    def counts(self) -> StoreCounts: ...


# A pending prediction's record, packed into one bytes object (see LocalPendingStore):
#   head: the add's sequence number (i64), at (f64), score (f64, NaN for none), backend index
#         (u16), kind of prediction (u8), number of segments (u8), bytes of a string class (u16)
#   the prediction: 8 bytes, an int64 class or a float64 number (0 when none or a string class)
#   the segments: one int16 each
#   a string class, utf-8; then the request id, utf-8 (checked on every join)
_HEAD: Final = struct.Struct("<qddHBBH")
_AT: Final = struct.Struct("<d")
_INT: Final = struct.Struct("<q")
_AT_OFFSET: Final = 8
_KIND_NONE, _KIND_INT, _KIND_STR, _KIND_FLOAT = 0, 1, 2, 3
_SEGMENTS: dict[int, struct.Struct] = {}


def _segments_struct(n: int) -> struct.Struct:
    st = _SEGMENTS.get(n)
    if st is None:
        st = _SEGMENTS[n] = struct.Struct(f"<{n}h")
    return st


class LocalPendingStore:
    """The in-process PendingStore, built so that the garbage collector never sees it.

    Why: a full (generation 2) collection walks every tracked object and every reference held
    by a tracked container; one pending prediction as a tuple in an ordered dict made a full
    pass over 1,000,000 pending take about 1.5 s (measured), a stall of the event loop
    whatever thread owns the store. So nothing here is a tracked object per prediction:

    - `_records`: a plain dict hash(request id) -> bytes. Ints and bytes are not tracked, so
      CPython keeps the dict itself untracked: a full pass skips it whole (1,000,000
      pending: under 1 ms). The record (see `_HEAD`) holds the request id, so a join checks
      it: an id never joins another id's prediction.
    - `_order_hash`, `_order_seq`: two `array`s (raw int64) of the adds in capture order,
      each add's id hash and sequence number: the expiry queue. `_start` is its front.
      Entries whose prediction was joined or replaced stay until they reach the front
      (stale: their record is gone, or holds another sequence number) or until a compaction
      drops them.

    Invariants:
    - Records' `at`, in the order of their entries, is non-decreasing: an add's `at` is
      clamped to the newest seen so far (a capture handed in late is kept as if captured
      then: it may wait slightly longer than `keep`, never shorter). So the oldest live
      record is the first live entry from `_start`, and expiry stops at the first young one.
    - Every record has exactly one live entry: the one with its hash and sequence number.
    - len(_records) <= max_pending after every call.
    - Compaction keeps the arrays within 2 x len(_records) + `compact_slack` entries past
      `_start`, and `_start` within half of them: each compaction is O(entries) and comes after as many
      cheap calls, so adds and expiry stay O(1) amortised.

    NOTE: two different request ids with the same 64-bit hash (Python's `hash(str)`, stable
    within the process) cannot both be pending: the newer replaces the older, counted as
    replaced, and a feedback for the older reads `unknown` (the record's id is checked).
    The chance is about pending / 2**64 per add.
    """

    __slots__ = ("_backend_index", "_backends", "_expired", "_joined", "_last_at", "_order_hash", "_order_seq",
                 "_records", "_start", "added_total", "dropped_total", "expired_total", "keep_s", "max_pending",
                 "replaced_total")

    compact_slack: ClassVar[int] = 4096     # see the invariants; tests lower it to compact often

    def __init__(self, keep_s: float, max_pending: int) -> None:
        if not keep_s > 0 or max_pending < 1:
            raise ValueError(f"keep_s must be > 0 and max_pending >= 1, got {keep_s}, {max_pending}")
        self.keep_s = keep_s
        self.max_pending = max_pending
        self._records: dict[int, bytes] = {}
        self._order_hash = array("q")
        self._order_seq = array("q")
        self._start = 0
        self._expired = RecentIds(keep_s, max_pending)
        self._joined = RecentIds(keep_s, max_pending)
        self._backends: list[str] = []
        self._backend_index: dict[str, int] = {}
        self._last_at = -math.inf
        self.added_total = 0
        self.replaced_total = 0
        self.expired_total = 0
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"LocalPendingStore(keep_s={self.keep_s}, max_pending={self.max_pending}, pending={len(self)}, "
                f"expired_total={self.expired_total}, dropped_total={self.dropped_total})")

    def _index(self, backend: str) -> int:
        i = self._backend_index.get(backend)
        if i is None:
            if len(self._backends) >= 0xFFFF:
                raise ValueError("more than 65535 backends")
            i = self._backend_index[backend] = len(self._backends)
            self._backends.append(backend)
        return i

    # -- records ------------------------------------------------------------------------------

    def _pack(self, request_id: str, p: Pending, seq: int, at: float) -> bytes:
        predicted, cls = p.predicted, b""
        if predicted is None:
            kind, value = _KIND_NONE, _INT.pack(0)
        elif isinstance(predicted, str):
            kind, value, cls = _KIND_STR, _INT.pack(0), predicted.encode("utf-8", "surrogatepass")
        elif isinstance(predicted, int):
            kind, value = _KIND_INT, _INT.pack(predicted)       # class_key keeps ints within int64
        else:
            kind, value = _KIND_FLOAT, _AT.pack(predicted)
        segments = p.segments
        head = _HEAD.pack(seq, at, math.nan if p.score is None else p.score, self._index(p.backend), kind,
                          len(segments), len(cls))
        return b"".join((head, value, _segments_struct(len(segments)).pack(*segments), cls,
                         request_id.encode("utf-8", "surrogatepass")))

    def _unpack(self, record: bytes, request_id: str) -> Pending | None:
        """The record's Pending, or None when it belongs to another request id (a hash collision)."""
        rid, p = self._read(record)
        return p if rid == request_id else None

    def _read(self, record: bytes) -> tuple[str, Pending]:
        """The record's request id and Pending."""
        _, at, score, backend, kind, n_segments, n_cls = _HEAD.unpack_from(record)
        offset = _HEAD.size
        predicted: ClassKey | float | None = None
        if kind == _KIND_INT:
            predicted = _INT.unpack_from(record, offset)[0]
        elif kind == _KIND_FLOAT:
            predicted = _AT.unpack_from(record, offset)[0]
        offset += 8
        segments: tuple[int, ...] = _segments_struct(n_segments).unpack_from(record, offset)
        offset += 2 * n_segments
        if kind == _KIND_STR:
            predicted = record[offset:offset + n_cls].decode("utf-8", "surrogatepass")
        offset += n_cls
        return (record[offset:].decode("utf-8", "surrogatepass"),
                Pending(self._backends[backend], at, predicted, None if score != score else score, segments))

    def _backend_of(self, record: bytes) -> int:
        return int(_HEAD.unpack_from(record)[3])

    def _live(self, i: int) -> bytes | None:
        """Order entry i's record, or None when the entry is stale (its add was joined,
        expired, dropped or replaced)."""
        record = self._records.get(self._order_hash[i])
        return record if record is not None and _INT.unpack_from(record)[0] == self._order_seq[i] else None

    # -- the PendingStore calls -----------------------------------------------------------------

    def add_many(self, items: Iterable[tuple[str, Pending]], now: float) -> None:
        self.expire(now)
        records = self._records
        for request_id, p in items:
            h = hash(request_id)
            if h in records:
                del records[h]                      # its order entry goes stale
                self.replaced_total += 1
            elif len(records) >= self.max_pending:
                self._drop_oldest(now)
            at = p.at if p.at >= self._last_at else self._last_at
            self._last_at = at
            seq = self.added_total
            records[h] = self._pack(request_id, p, seq, at)
            self._order_hash.append(h)
            self._order_seq.append(seq)
            self.added_total += 1
        self._compact()

    def _drop_oldest(self, now: float) -> None:
        """max_pending: push out the oldest live prediction, remembered as expired."""
        order_hash, n = self._order_hash, len(self._order_hash)
        i = self._start
        while i < n:
            record = self._live(i)
            i += 1
            if record is not None:
                h = order_hash[i - 1]
                del self._records[h]
                self._expired.remember(h, self._backend_of(record), now)
                self.dropped_total += 1
                break
        self._start = i

    def join_many(self, request_ids: Sequence[str], now: float) -> list[Pending | Miss]:
        self.expire(now)
        hashes = [hash(r) for r in request_ids]
        # the previous generations cannot change during this call (remember never rotates):
        # look them all up at once; the current ones are read live, so that an id joined
        # earlier in this same call reads DUPLICATE
        prev_joined = self._joined.previous(hashes)
        prev_expired = self._expired.previous(hashes)
        out: list[Pending | Miss] = []
        records, backends = self._records, self._backends
        for k, request_id in enumerate(request_ids):
            h = hashes[k]
            record = records.get(h)
            p = self._unpack(record, request_id) if record is not None else None
            if p is not None:
                del records[h]                      # its order entry goes stale
                self._joined.remember(h, self._backend_index[p.backend], now)
                out.append(p)
                continue
            b = self._joined.current(h)
            if b is None and prev_joined[k] >= 0:
                b = int(prev_joined[k])
            if b is not None:
                out.append(Miss(JoinOutcome.DUPLICATE, backends[b]))
                continue
            b = self._expired.current(h)
            if b is None and prev_expired[k] >= 0:
                b = int(prev_expired[k])
            out.append(Miss(JoinOutcome.EXPIRED, backends[b]) if b is not None else Miss(JoinOutcome.UNKNOWN, None))
        self._compact()
        return out

    def expire(self, now: float) -> int:
        order_hash, keep_s, records = self._order_hash, self.keep_s, self._records
        i, end, n = self._start, len(order_hash), 0
        while i < end:
            record = self._live(i)
            if record is not None:
                if now - _AT.unpack_from(record, _AT_OFFSET)[0] < keep_s:
                    break                               # the oldest is young: so is every later one
                h = order_hash[i]
                del records[h]
                self._expired.remember(h, self._backend_of(record), now)
                n += 1
            i += 1                                      # expired, or a stale entry: consumed
        self._start = i
        self.expired_total += n
        self._expired.rotate(now)
        self._joined.rotate(now)
        self._compact()
        return n

    def _compact(self) -> None:
        """Drop the order arrays' consumed front and their stale entries (see the invariants)."""
        waiting = len(self._order_hash) - self._start
        if waiting > 2 * len(self._records) + self.compact_slack:
            keep = [i for i in range(self._start, len(self._order_hash)) if self._live(i) is not None]
            self._order_hash = array("q", (self._order_hash[i] for i in keep))
            self._order_seq = array("q", (self._order_seq[i] for i in keep))
            self._start = 0
        elif self._start > self.compact_slack and self._start > waiting:
            del self._order_hash[: self._start]
            del self._order_seq[: self._start]
            self._start = 0

    def items(self, limit: int | None = None) -> list[tuple[str, Pending]]:
        """The pending predictions (request id, Pending), oldest first, at most `limit`: what a
        fleet's replica hands to the shared store (shell/feedback_share.py). O(what it reads)."""
        out: list[tuple[str, Pending]] = []
        for i in range(self._start, len(self._order_hash)):
            if limit is not None and len(out) >= limit:
                break
            record = self._live(i)
            if record is not None:
                out.append(self._read(record))
        return out

    def discard(self, request_ids: Iterable[str]) -> None:
        """Take these predictions out, neither joined nor expired: handed to the shared store,
        which answers for them from then on. Ids not pending here are ignored."""
        records = self._records
        for request_id in request_ids:
            h = hash(request_id)
            record = records.get(h)
            if record is not None and self._unpack(record, request_id) is not None:
                del records[h]                      # its order entry goes stale
        self._compact()

    def counts(self) -> StoreCounts:
        return StoreCounts(pending=len(self._records), added_total=self.added_total,
                           replaced_total=self.replaced_total, expired_total=self.expired_total,
                           dropped_total=self.dropped_total, remembered=len(self._expired) + len(self._joined))


# --- rolling windows and tallies ----------------------------------------------------------------


class TermWindow:
    """The last `size` terms (one number per item) and their running sum, as a ring.

    `add` is O(1). The running sum is recomputed exactly (`math.fsum`) once every `size`
    adds, amortised O(1), so float rounding cannot pile up over a long run. NOTE: between
    two recomputations it is off by a few ulps of the largest partial sum since the last
    one (a term of 1e16 hides terms of 0.3 until the next recomputation, at most `size`
    adds later). 0/1 terms (accuracy) and integers sum exactly anyway.
    """

    __slots__ = ("_count", "_next", "_ring", "_since_exact", "_sum", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        self.size = size
        self._ring = array("d", bytes(8 * size))   # raw doubles: 8 bytes a slot, nothing for the GC to walk
        self._next = 0
        self._count = 0
        self._sum = 0.0
        self._since_exact = 0

    def __repr__(self) -> str:
        return f"TermWindow(size={self.size}, count={self._count}, mean={self.mean})"

    @property
    def count(self) -> int:
        return self._count

    @property
    def total(self) -> float:
        return self._sum

    @property
    def mean(self) -> float | None:
        return self._sum / self._count if self._count else None

    def add(self, term: float) -> None:
        i = self._next
        if self._count == self.size:
            self._sum -= self._ring[i]
        else:
            self._count += 1
        self._ring[i] = term
        self._sum += term
        i += 1
        self._next = 0 if i == self.size else i
        self._since_exact += 1
        if self._since_exact >= self.size:
            self._since_exact = 0
            self._sum = math.fsum(self._ring[: self._count])

    def terms(self) -> list[float]:
        """The window's terms, oldest first (for tests and debugging; O(size))."""
        if self._count < self.size:
            return self._ring[: self._count].tolist()
        return (self._ring[self._next:] + self._ring[: self._next]).tolist()


@dataclass(frozen=True, slots=True)
class Tally:
    """Joined items and the sum of their terms: mergeable (a fleet sums replicas' tallies)
    and subtractable (since a mark). `value(metric)` is the metric they give."""

    count: int = 0
    total: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.count + other.count, self.total + other.total)

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.count - other.count, self.total - other.total)

    def value(self, metric: Metric) -> float | None:
        return metric.of(self.count, self.total)


class _Acc:
    """A mutable tally (cumulative, since the tracker was made)."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0


# Keys of the per-segment state: (backend, segment index, value index in SegmentPolicy.labels)
SegmentKey = tuple[str, int, int]


# --- results and summaries -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinResult:
    """One posted item's outcome, in the order posted. `request_id` is the posted id when it
    was a string of at most MAX_REQUEST_ID_CHARS, else None; `backend` is known for joined,
    expired and duplicate items (for the `feedback_total` label), not shown to the client."""

    request_id: str | None
    outcome: JoinOutcome
    message: str | None = None
    backend: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"request_id": self.request_id, "outcome": str(self.outcome)}
        if self.message is not None:
            doc["message"] = self.message
        return doc


def results_json(results: Sequence[JoinResult]) -> dict[str, Any]:
    """The 200 answer to a feedback POST: `{"results": [...], "counts": {outcome: n}}`,
    every outcome present in `counts` (0 when none)."""
    counts = dict.fromkeys((str(o) for o in JoinOutcome), 0)
    for r in results:
        counts[str(r.outcome)] += 1
    return {"results": [r.to_json() for r in results], "counts": counts}


class FeedbackBodyError(ValueError):
    """A feedback body that is JSON but not one item or a list of at most MAX_ITEMS: a 400."""


def feedback_items(doc: Any) -> list[Any]:
    """The items of a parsed feedback body: one object, or a list of up to MAX_ITEMS of them.

    The items themselves are judged one by one by `join_many` (a bad item is `invalid`, the
    others still join); only the body's shape is refused here, with FeedbackBodyError.
    """
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list):
        if len(doc) > MAX_ITEMS:
            raise FeedbackBodyError(f"at most {MAX_ITEMS} items per request, got {len(doc)}")
        return doc
    raise FeedbackBodyError('expected an object {"request_id": ..., "label": ...} or a list of them')


@dataclass(frozen=True, slots=True)
class SegmentReading:
    """One (backend, segment, value) over its rolling window."""

    segment: str
    value: str                        # one of the config's values, or "other"
    count: int                        # joined items in the window
    metric: float | None
    too_small: bool                   # count < min_segment_items: shown, but not to be judged

    def to_json(self) -> dict[str, Any]:
        return {"segment": self.segment, "value": self.value, "count": self.count, "metric": self.metric,
                "too_small": self.too_small}


@dataclass(frozen=True, slots=True)
class BackendReading:
    """One backend: its rolling metric, its confidence signal, its counts."""

    backend: str
    count: int                        # joined items in the window (at most `window`)
    metric: float | None
    score_mean: float | None          # mean predicted score over its last `window` captured predictions
    score_count: int
    joined_total: int
    outcomes: Mapping[str, int]       # joined, expired, duplicate (lifetime) for this backend
    missing_prediction_total: int     # answers whose prediction path found nothing usable: not kept
    id_too_long_total: int            # answers whose request id was empty or too long: not kept
    missing_segment_total: Mapping[str, int]   # per segment: joined items whose segment value was missing
    segments: tuple[SegmentReading, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "count": self.count, "metric": self.metric,
            "score_mean": self.score_mean, "score_count": self.score_count,
            "outcomes": dict(self.outcomes), "missing_prediction": self.missing_prediction_total,
            "id_too_long": self.id_too_long_total,
            "missing_segment": dict(self.missing_segment_total),
            "segments": [s.to_json() for s in self.segments],
        }


@dataclass(frozen=True, slots=True)
class FeedbackSummary:
    """A route's feedback as `GET /admin/feedback` and the feedback metrics show it (the shell
    adds the route's name and path)."""

    metric: Metric
    window: int
    keep_s: float
    max_pending: int
    store: StoreCounts
    outcomes: Mapping[str, int]       # lifetime count per outcome over all backends (unknown, invalid too)
    backends: tuple[BackendReading, ...]

    def to_json(self) -> dict[str, Any]:
        s = self.store
        return {
            "metric": str(self.metric), "window": self.window, "keep_s": self.keep_s,
            "max_pending": self.max_pending,
            "pending": s.pending, "pending_dropped": s.dropped_total, "pending_expired": s.expired_total,
            "pending_replaced": s.replaced_total,
            "outcomes": dict(self.outcomes),
            "backends": [b.to_json() for b in self.backends],
        }


@dataclass(frozen=True, slots=True)
class FeedbackMark:
    """The cumulative tallies at a moment (a rollout step's start): `since` subtracts them."""

    at: float
    backends: Mapping[str, Tally]
    segments: Mapping[SegmentKey, Tally]


@dataclass(frozen=True, slots=True)
class SegmentComparison:
    """One segment value, canary against baseline, over a step (`max_segment_drop`)."""

    segment: str
    value: str
    canary: Tally
    baseline: Tally
    judged: bool                      # both sides have at least min_segment_items
    worse_by: float | None            # Metric.worse_by(canary, baseline); None unless judged


@dataclass(frozen=True, slots=True)
class StepFeedback:
    """Feedback JOINED since a mark, per backend and per (backend, segment, value).

    Joined since, not predicted since: labels often come hours after the prediction (a
    chargeback), long after a step of minutes has been judged, while the model behind a
    backend stays the same for the whole rollout (a reload that changes it starts the
    rollout anew). So a step is judged on the feedback that arrived during it, about
    predictions made at any time by the same backend.
    """

    metric: Metric
    since: float
    min_segment_items: int
    segment_labels: tuple[tuple[str, tuple[str, ...]], ...]   # (segment name, value labels) per segment
    backends: Mapping[str, Tally]
    segments: Mapping[SegmentKey, Tally]

    def backend(self, name: str) -> Tally:
        """The step's tally of one backend (empty when it had no joined feedback)."""
        return self.backends.get(name, Tally())

    def segment(self, backend: str, segment: str, value: str) -> Tally:
        """The step's tally of one (backend, segment, value label); empty when unknown."""
        for s, (name, labels) in enumerate(self.segment_labels):
            if name == segment and value in labels:
                return self.segments.get((backend, s, labels.index(value)), Tally())
        return Tally()

    def compare_segments(self, canary: str, baseline: str) -> list[SegmentComparison]:
        """Every segment value, canary against baseline: judged only when both sides have at
        least `min_segment_items` joined items in the step (docs/feedback.md#segments)."""
        out = []
        for s, (name, labels) in enumerate(self.segment_labels):
            for v, label in enumerate(labels):
                c = self.segments.get((canary, s, v), Tally())
                b = self.segments.get((baseline, s, v), Tally())
                judged = c.count >= self.min_segment_items and b.count >= self.min_segment_items
                cv, bv = c.value(self.metric), b.value(self.metric)
                worse = self.metric.worse_by(cv, bv) if judged and cv is not None and bv is not None else None
                out.append(SegmentComparison(name, label, c, b, judged, worse))
        return out


# --- the tracker ------------------------------------------------------------------------------


class _BackendState:
    """Per backend: rolling windows and counters (tracker-owned)."""

    __slots__ = ("acc", "id_too_long", "missing_prediction", "missing_segment", "outcomes", "scores", "window")

    def __init__(self, size: int, n_segments: int) -> None:
        self.window = TermWindow(size)
        self.scores = TermWindow(size)
        self.acc = _Acc()
        self.outcomes: dict[JoinOutcome, int] = {}
        self.missing_prediction = 0
        self.id_too_long = 0
        self.missing_segment = [0] * n_segments


class FeedbackTracker:
    """One route's feedback: capture, join, rolling metrics, counts, step tallies.

    Built from a FeedbackPolicy and a store (a LocalPendingStore by default). `backends`
    (the route's split) are reported even before they have data.
    """

    __slots__ = ("_backends", "_outcomes", "_seg_acc", "_seg_windows", "policy", "store")

    def __init__(self, policy: FeedbackPolicy, store: PendingStore | None = None,
                 backends: Iterable[str] = ()) -> None:
        self.policy = policy
        self.store: PendingStore = store if store is not None else LocalPendingStore(policy.keep_s,
                                                                                    policy.max_pending)
        self._backends: dict[str, _BackendState] = {}
        self._seg_windows: dict[SegmentKey, TermWindow] = {}
        self._seg_acc: dict[SegmentKey, _Acc] = {}
        self._outcomes = dict.fromkeys(JoinOutcome, 0)
        for b in backends:
            self._backend(b)

    def __repr__(self) -> str:
        return (f"FeedbackTracker(metric={self.policy.metric}, backends={list(self._backends)}, "
                f"joined={self._outcomes[JoinOutcome.JOINED]})")

    def _backend(self, name: str) -> _BackendState:
        st = self._backends.get(name)
        if st is None:
            st = self._backends[name] = _BackendState(self.policy.window, len(self.policy.segments))
        return st

    # -- answers -----------------------------------------------------------------------------

    def capture(self, backend: str, at: float, request: Any, response: Any) -> Pending:
        """`policy.capture`: the Pending of one answered request (see FeedbackPolicy.capture)."""
        return self.policy.capture(backend, at, request, response)

    def add_many(self, items: Iterable[tuple[str, Pending]], now: float) -> int:
        """Keep captured predictions until their feedback comes; returns how many were kept.

        Not kept, and counted per backend: a prediction the metric needs but whose path
        found nothing usable (`missing_prediction`), and a request id that is empty or longer
        than MAX_REQUEST_ID_CHARS (`id_too_long`); a feedback for either reads `unknown`.
        Each kept score feeds the backend's confidence window.
        """
        needs = self.policy.metric.needs_prediction
        kept: list[tuple[str, Pending]] = []
        for request_id, p in items:
            st = self._backend(p.backend)
            if needs and p.predicted is None:
                st.missing_prediction += 1
                continue
            if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
                st.id_too_long += 1
                continue
            if p.score is not None:
                st.scores.add(p.score)
            kept.append((request_id, p))
        self.store.add_many(kept, now)
        return len(kept)

    # -- feedback ----------------------------------------------------------------------------

    def _read_item(self, item: Any) -> tuple[str | None, float | ClassKey | None, str | None]:
        """(request id or None, label or value, error message or None) of one posted item."""
        if not isinstance(item, dict):
            return None, None, 'an item is an object {"request_id": "...", "label": ...}'
        rid = item.get("request_id")
        if not isinstance(rid, str) or not rid:
            return None, None, '"request_id" must be a non-empty string'
        if len(rid) > MAX_REQUEST_ID_CHARS:
            return None, None, f'"request_id" is longer than {MAX_REQUEST_ID_CHARS} characters'
        metric = self.policy.metric
        if metric is Metric.MEAN:
            if "value" not in item:
                return rid, None, 'metric mean needs a numeric "value"'
            value = bounded_number(item["value"])
            if value is None:
                return rid, None, f'"value" must be a number (got {_json_type(item["value"])})'
            return rid, value, None
        if "label" not in item:
            return rid, None, 'missing "label"'
        label = item["label"]
        if metric is Metric.ACCURACY:
            key = class_key(label)
            if key is None:
                return rid, None, (f'"label" must be a class for metric accuracy: true/false, an integer or '
                                   f'a string (got {_json_type(label)})')
            return rid, key, None
        number = bounded_number(label)
        if number is None:
            return rid, None, f'"label" must be a number for metric {metric} (got {_json_type(label)})'
        return rid, number, None

    def _term(self, predicted: ClassKey | float | None, label: ClassKey | float) -> float:
        metric = self.policy.metric
        if metric is Metric.ACCURACY:
            return 1.0 if predicted == label else 0.0
        if metric is Metric.MEAN:
            assert isinstance(label, float)
            return label
        assert isinstance(predicted, float) and isinstance(label, float), (predicted, label)
        error = label - predicted
        return abs(error) if metric is Metric.MAE else error * error

    def join_many(self, items: Sequence[Any], now: float) -> list[JoinResult]:
        """Join posted items (already decoded, see `feedback_items`), in order; one result each.

        An invalid item changes nothing (its prediction stays pending). Each joined item adds
        its term to its backend's window and tally and to each of its segment values'.
        """
        results: list[JoinResult | None] = [None] * len(items)
        where: list[int] = []
        ids: list[str] = []
        labels: list[ClassKey | float] = []
        for i, item in enumerate(items):
            rid, label, message = self._read_item(item)
            if message is not None or rid is None or label is None:
                results[i] = JoinResult(rid, JoinOutcome.INVALID, message)
                continue
            where.append(i)
            ids.append(rid)
            labels.append(label)
        found = self.store.join_many(ids, now) if ids else []
        segments = self.policy.segments
        for i, rid, label, got in zip(where, ids, labels, found, strict=True):
            if isinstance(got, Miss):
                results[i] = JoinResult(rid, got.outcome, None, got.backend)
                if got.backend is not None:
                    outcomes = self._backend(got.backend).outcomes
                    outcomes[got.outcome] = outcomes.get(got.outcome, 0) + 1
                continue
            st = self._backend(got.backend)
            term = self._term(got.predicted, label)
            st.window.add(term)
            st.acc.count += 1
            st.acc.total += term
            st.outcomes[JoinOutcome.JOINED] = st.outcomes.get(JoinOutcome.JOINED, 0) + 1
            # zip: a Pending captured under another segment list (a fleet peer's, mid-reload)
            # contributes to the segments both lists have
            for s, (v, seg) in enumerate(zip(got.segments, segments, strict=False)):
                if not 0 <= v <= len(seg.values):
                    st.missing_segment[s] += 1
                    continue
                key = (got.backend, s, v)
                w = self._seg_windows.get(key)
                if w is None:
                    w = self._seg_windows[key] = TermWindow(self.policy.window)
                    self._seg_acc[key] = _Acc()
                w.add(term)
                acc = self._seg_acc[key]
                acc.count += 1
                acc.total += term
            results[i] = JoinResult(rid, JoinOutcome.JOINED, None, got.backend)
        out: list[JoinResult] = []
        for r in results:
            assert r is not None
            self._outcomes[r.outcome] += 1
            out.append(r)
        return out

    def expire(self, now: float) -> int:
        """Drop predictions older than `keep` (the shell calls it on a schedule; joins and adds
        do it themselves). Returns how many expired."""
        return self.store.expire(now)

    # -- reading -----------------------------------------------------------------------------

    def summary(self) -> FeedbackSummary:
        """Everything `GET /admin/feedback` and the feedback metrics show. O(backends x segment
        values): running sums, no scan of the windows."""
        policy, metric = self.policy, self.policy.metric
        backends = []
        for name, st in self._backends.items():
            rows = []
            for s, seg in enumerate(policy.segments):
                for v, label in enumerate(seg.labels):
                    w = self._seg_windows.get((name, s, v))
                    count = w.count if w is not None else 0
                    rows.append(SegmentReading(seg.name, label, count,
                                               metric.of(count, w.total) if w is not None else None,
                                               count < policy.min_segment_items))
            backends.append(BackendReading(
                backend=name,
                count=st.window.count,
                metric=metric.of(st.window.count, st.window.total),
                score_mean=st.scores.mean,
                score_count=st.scores.count,
                joined_total=st.acc.count,
                outcomes={str(o): st.outcomes.get(o, 0)
                          for o in (JoinOutcome.JOINED, JoinOutcome.EXPIRED, JoinOutcome.DUPLICATE)},
                missing_prediction_total=st.missing_prediction,
                id_too_long_total=st.id_too_long,
                missing_segment_total={seg.name: st.missing_segment[s] for s, seg in enumerate(policy.segments)},
                segments=tuple(rows),
            ))
        return FeedbackSummary(metric=metric, window=policy.window, keep_s=policy.keep_s,
                               max_pending=policy.max_pending, store=self.store.counts(),
                               outcomes={str(o): n for o, n in self._outcomes.items()},
                               backends=tuple(backends))

    def outcome_counts(self) -> dict[tuple[str | None, JoinOutcome], int]:
        """Lifetime counts per (backend, outcome) for `feedback_total`: backend None holds the
        outcomes with no backend (unknown, invalid)."""
        out: dict[tuple[str | None, JoinOutcome], int] = {}
        with_backend = dict.fromkeys(JoinOutcome, 0)
        for name, st in self._backends.items():
            for o, n in st.outcomes.items():
                out[(name, o)] = n
                with_backend[o] += n
        for o, n in self._outcomes.items():
            if n - with_backend[o]:
                out[(None, o)] = n - with_backend[o]
        return out

    def mark(self, now: float) -> FeedbackMark:
        """The cumulative tallies now: take one at a rollout step's start, pass it to `since`."""
        return FeedbackMark(
            at=now,
            backends={b: Tally(st.acc.count, st.acc.total) for b, st in self._backends.items()},
            segments={k: Tally(a.count, a.total) for k, a in self._seg_acc.items()},
        )

    def since(self, mark: FeedbackMark) -> StepFeedback:
        """Feedback joined since `mark`, per backend and segment value (see StepFeedback)."""
        now = self.mark(mark.at)
        return StepFeedback(
            metric=self.policy.metric,
            since=mark.at,
            min_segment_items=self.policy.min_segment_items,
            segment_labels=tuple((s.name, s.labels) for s in self.policy.segments),
            backends={b: t - mark.backends.get(b, Tally()) for b, t in now.backends.items()},
            segments={k: t - mark.segments.get(k, Tally()) for k, t in now.segments.items()},
        )


def _json_type(value: object) -> str:
    """How a JSON value's type reads in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}" if isinstance(value, int) or math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
