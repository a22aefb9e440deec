"""Feedback shared across a fleet: the pending-predictions store of a route, in the fleet's Redis
(docs/fleet.md#feedback-across-replicas, SPEC 10). Built by shell/feedback.py only when the
config has `fleet`.

`SharedPendingStore` is a `core.feedback.PendingStore`: the route's `LocalPendingStore` plus
the fleet's store. It belongs to the feedback worker thread, like the tracker that holds it,
so its store calls are the worker's (a blocking client, each call bounded by `sync_every`
/ 2; never the event loop), and they are ordered with the captures and joins without locks:

- `publish(now)`, every `sync_every` (core/feedback_share.py `Schedule`): the predictions
  pending here (the oldest MAX_PUBLISH; more wait for the next time) go to the store in ONE
  pipeline, `HSET` of the current bucket's hash (field: request id, value: `encode`d) and
  `PEXPIREAT` (`Buckets`); once the store took them they are dropped here, so the store
  answers for them from then on and a prediction is joined at most once in the fleet. On
  failure they stay here (joined here, handed over next time).
- `join_many`: the local store first; the ids it does not know are looked up in the store in
  ONE call (`TAKE_LUA`: per id, the first bucket that has it, read and deleted in one
  atomic step, so two replicas never both join it). Found: joined here, as a local join.
  Not found, or the store failing: `unknown`, as without a fleet.

Failures are counted in `errors` (the loop adds them to `fleet_sync_errors_total`) and
logged at most every 10 s; after one, the store is left alone for `sync_every`.

NOTE: a publish that reached the store but whose answer did not come back in time counts as
failed; its predictions stay here too and go again next time, so one of them labelled in
between can join twice (once from the store on another replica, once here or again from the
store). It takes a timeout on a reply that was already on its way: rare, and counted.

Keys: `sidecar:fleet:{NAME}:fb:ROUTE:FINGERPRINT:BUCKET`: replicas whose feedback section
differs (its fingerprint) never join each other's predictions.

Imports: stdlib, redis (lazily), sidecar.core (feedback, feedback_share, throttle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from sidecar.core.feedback import JoinOutcome, LocalPendingStore, Miss, Pending, StoreCounts
from sidecar.core.feedback_share import Buckets, Schedule, decode, encode
from sidecar.core.throttle import Throttle

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger("sidecar.fleet")

LOG_EVERY_S: Final = 10.0
MAX_PUBLISH: Final = 20_000   # predictions handed over per route and sync_every (the oldest first)

# KEYS: the buckets' hashes, newest first; ARGV: request ids. Per id, the value of the first
# bucket that has it, deleted there (false: in none). Atomic: one replica takes a prediction.
TAKE_LUA: Final = """
local out = {}
for i = 1, #ARGV do
  out[i] = false
  for k = 1, #KEYS do
    local v = redis.call('HGET', KEYS[k], ARGV[i])
    if v then
      redis.call('HDEL', KEYS[k], ARGV[i])
      out[i] = v
      break
    end
  end
end
return out
"""


def connect(url: str, timeout_s: float, name: str) -> Redis:
    """A blocking client for the feedback worker: 1 connection, no retries, bounded calls."""
    from redis import BlockingConnectionPool, Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    no_retry = Retry(NoBackoff(), 0)
    pool = BlockingConnectionPool.from_url(url, max_connections=1, timeout=timeout_s, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s, retry=no_retry,
                                           client_name=f"sidecar-{name}-feedback")
    return Redis(connection_pool=pool, retry=no_retry)


class ErrorCount:
    """Failed store calls of every route's store: written by the worker thread only, read
    whole (one int) by the loop, which adds what is new to `fleet_sync_errors_total`."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class SharedPendingStore:
    """See the module docstring. Worker-thread owned, like the tracker that holds it."""

    def __init__(self, local: LocalPendingStore, client: Redis, prefix: str, sync_every_s: float,
                 errors: ErrorCount) -> None:
        self.local = local
        self.client = client
        self.prefix = prefix
        self.buckets = Buckets.of(local.keep_s, sync_every_s)
        self.schedule = Schedule(sync_every_s)
        self.errors = errors
        self._take: Any = client.register_script(TAKE_LUA)
        self._throttle = Throttle(LOG_EVERY_S)

    def _failed(self, what: str, e: Exception) -> None:
        self.errors.n += 1
        now = time.monotonic()
        self.schedule.failed(now)
        if self._throttle.try_pass(now):
            log.warning("fleet store: feedback %s failed (%r); predictions stay on this replica meanwhile", what, e)

    def _key(self, bucket: int) -> str:
        return f"{self.prefix}{bucket}"

    # -- PendingStore ---------------------------------------------------------------------------

    def add_many(self, items: Iterable[tuple[str, Pending]], now: float) -> None:
        self.local.add_many(items, now)

    def join_many(self, request_ids: Sequence[str], now: float) -> list[Pending | Miss]:
        out = self.local.join_many(request_ids, now)
        ask = [k for k, got in enumerate(out) if isinstance(got, Miss) and got.outcome is JoinOutcome.UNKNOWN]
        if not ask or not self.schedule.usable(now):
            return out
        # an id twice in one post: looked up once; the second reads duplicate, as locally
        first: dict[str, int] = {}
        for k in ask:
            first.setdefault(request_ids[k], k)
        keys = [self._key(b) for b in self.buckets.lookup(time.time())]
        try:
            values = self._take(keys=keys, args=list(first))
        except Exception as e:  # redis errors, OSError, timeouts: a fault, counted; the labels read unknown
            self._failed("lookup", e)
            return out
        got: dict[str, Pending] = {}
        for rid, raw in zip(first, values, strict=True):
            p = decode(raw, now) if raw is not None else None
            if p is not None:
                got[rid] = p
        for k in ask:
            rid = request_ids[k]
            p = got.get(rid)
            if p is None:
                continue
            if first[rid] == k:
                out[k] = p
            else:
                out[k] = Miss(JoinOutcome.DUPLICATE, p.backend)
        return out

    def expire(self, now: float) -> int:
        return self.local.expire(now)

    def counts(self) -> StoreCounts:
        return self.local.counts()

    # -- the fleet ----------------------------------------------------------------------------

    def publish(self, now: float) -> int:
        """Every `sync_every`: hand the pending predictions to the store (see the module
        docstring); returns how many went."""
        if not self.schedule.publish_due(now):
            return 0
        items = self.local.items(MAX_PUBLISH)
        if not items:
            return 0
        bucket = self.buckets.bucket(time.time())
        key = self._key(bucket)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, mapping={rid: encode(p) for rid, p in items})
            pipe.pexpireat(key, self.buckets.expires_at_ms(bucket))
            pipe.execute()
        except Exception as e:  # as in join_many: counted; the predictions stay here and go next time
            self._failed("publish", e)
            return 0
        self.local.discard(rid for rid, _ in items)
        return len(items)

