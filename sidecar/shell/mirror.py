"""Shadow mirroring: copies of a route's requests to shadow backends, and their comparison.

What this module owns (docs/shadow.md; config, admin API and metrics in docs/reference/):

- The per-request decision, `Mirrors.select`: the sampled share first (one `rng()` compare,
  or the key header's hash when `key` is set, so the same users are mirrored every time),
  then the rules (`methods`, the body cap). A sampled request that a rule excludes is
  counted by reason; requests outside `percent` are not counted (requests_total has them).
- The mirror tasks, started by `MirrorTicket.send` once the primary answer is known (the
  primary request was forwarded first, docs/shadow.md), one per shadow, each with its own
  deadline (`mirror.timeout`). At a shadow's `max_inflight` a mirror is dropped and counted,
  never queued; while the shadow backend is not available it is skipped and counted. Tasks
  live in one set that is bounded by the sum of the caps, are discarded when done, and are
  cancelled and awaited by `drain`.
- Comparison, in the mirror task once both answers are whole: `compare.path`
  (core/jsonpath) on both, `compare_values` (core/compare), then the rolling
  `AgreementWindow` and the bounded `DisagreementLog` of that (route, shadow). Values kept
  for a disagreement are found again in redacted documents (`MirrorPlan.redact`) and cut
  to `MAX_SHOWN_BYTES` of JSON each, so 50 kept disagreements stay small.
- Per (route, shadow) state that survives reloads (`MirrorStats`, keyed by names): outcome
  counters (the metric cells themselves), the agreement window and the disagreements.
  `retain(plan)` forgets mirrors a new plan dropped and resets a window whose comparison
  settings changed.

Why the client pays nothing: its path runs `select` (a hash or rng() compare, a set lookup,
a length compare) and `send` (a counter check and a task creation). The shadow's I/O, the
reading of its answer, JSON parsing and comparison run in the mirror's own task, which
never touches the client's response; the shadow's status, headers and body are never relayed.
NOTE: parsing and comparing run on the event loop thread. For model-sized answers that is
microseconds; a route comparing multi-megabyte answers at 100% will show it in the bench.

Outcome values of `mirror_requests_total{route,backend,outcome}`, one per sampled request
and shadow (`MirrorOutcome` below): agree, disagree, missing (the path found nothing in either
answer; not in the ratio), sent (the shadow answered, no `compare` configured),
primary_unreadable (`compare` set but the primary answer was not read whole: streamed, too
big, or the primary failed), shadow_error (connect error, reset, protocol error, 5xx, or an
answer too big to compare), shadow_timeout, dropped (at `max_inflight`, or draining),
cancelled (cut by the drain), skipped_method, skipped_body, skipped_unavailable (the shadow
backend is not available: its circuit is open, every endpoint is unhealthy or ejected, or its
own `max_inflight` is reached), internal_error (a bug; logged).

A shadow copy is a try on its backend (`Backend.try_`): it counts for that backend's circuit
breaker and outlier detection, as every try does (docs/resilience.md#circuit-breaker). So a shadow that hangs or fails,
given a `circuit_breaker` or `health_check`, is soon skipped (`skipped_unavailable`) and costs
no connections at all, instead of holding `max_inflight` of them until each times out.

Imports: stdlib, orjson, aiohttp (types only), sidecar.config, sidecar.core, sidecar.shell.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson

from sidecar.config.plan import MirrorPlan, Plan, RoutePlan
from sidecar.core.compare import AgreementWindow, Disagreement, DisagreementLog, Verdict, compare_values
from sidecar.core.jsonpath import JsonPath, redact_all
from sidecar.core.outcome import Outcome
from sidecar.core.split import key_hash
from sidecar.core.throttle import Throttle
from sidecar.shell.backend import Backend, CircuitRefused
from sidecar.shell.formats import load_json
from sidecar.shell.metrics import Cell, Metrics
from sidecar.shell.upstream import Answer, UpstreamFailure

if TYPE_CHECKING:
    from aiohttp import web

    from sidecar.shell.runtime import Runtime

log = logging.getLogger("sidecar.mirror")

SHADOW_LINE: Final = b"x-sidecar-shadow: 1\r\n"  # put before the primary's header lines
DISAGREEMENTS_KEPT: Final = 50
MAX_SHOWN_BYTES: Final = 2048  # JSON of one side's values kept per disagreement, at most
_KEY_SALT: Final = b"mirror\x00"  # keyed sampling is independent of the sticky split's hash
DROP_LOG_EVERY_S: Final = 10.0  # drops are counted each time, logged at most this often per shadow
_TWO_64: Final = float(2**64)  # key_hash is 64-bit: hash < threshold * 2**64 (exact compare)


class MirrorOutcome(StrEnum):
    """What one shadow copy came to; the values are the `outcome` metric label (docstring above)."""

    AGREE = "agree"
    DISAGREE = "disagree"
    MISSING = "missing"
    SENT = "sent"
    PRIMARY_UNREADABLE = "primary_unreadable"
    SHADOW_ERROR = "shadow_error"
    SHADOW_TIMEOUT = "shadow_timeout"
    DROPPED = "dropped"
    CANCELLED = "cancelled"
    SKIPPED_METHOD = "skipped_method"
    SKIPPED_BODY = "skipped_body"
    SKIPPED_UNAVAILABLE = "skipped_unavailable"
    INTERNAL_ERROR = "internal_error"


_VERDICT_OUTCOME: Final = {Verdict.AGREE: MirrorOutcome.AGREE, Verdict.DISAGREE: MirrorOutcome.DISAGREE,
                           Verdict.MISSING: MirrorOutcome.MISSING}


def key_share_below(key: str, threshold: float) -> bool:
    """Whether a keyed request falls in the mirrored share; deterministic across processes."""
    return key_hash(_KEY_SALT + key.encode("utf-8", "surrogateescape")) < threshold * _TWO_64


class MirrorStats:
    """What one (route, shadow) has seen; kept by name across reloads."""

    __slots__ = ("cells", "compare_fingerprint", "disagreements", "inflight", "sent", "window")

    def __init__(self, plan: MirrorPlan, metrics: Metrics) -> None:
        self.cells: dict[MirrorOutcome, Cell] = {o: metrics.mirror_requests.labels(plan.route, plan.backend, o)
                                                 for o in MirrorOutcome}
        self.inflight = 0   # mirror tasks of this pair running now (the max_inflight cap)
        self.sent = 0       # mirror requests started (everything but dropped and skipped)
        self.compare_fingerprint = plan.compare_fingerprint
        self.window = AgreementWindow(plan.window)
        self.disagreements = DisagreementLog(DISAGREEMENTS_KEPT)

    def count(self, outcome: MirrorOutcome) -> None:
        self.cells[outcome].value += 1

    def json(self, plan: MirrorPlan) -> dict[str, Any]:
        outcomes = {str(o): int(c.value) for o, c in self.cells.items()}
        return {
            "route": plan.route,
            "backend": plan.backend,
            "percent": plan.threshold * 100.0,
            "keyed_by": plan.key_header,
            "compare": None if plan.compare_path is None else {
                "path": plan.compare_path.text, "tolerance": plan.tolerance, "rel_tolerance": plan.rel_tolerance},
            "sent": self.sent,
            "dropped": outcomes[MirrorOutcome.DROPPED],
            "inflight": self.inflight,
            "agreement": self.window.ratio,
            "compared": self.window.count,
            "outcomes": outcomes,
            "disagreements": [
                {"request_id": d.request_id, "path": d.path, "primary": d.primary, "shadow": d.shadow, "at": d.at}
                for d in self.disagreements.items()
            ],
        }


class MirrorTicket:
    """The mirrors one request was selected for, waiting for its primary answer."""

    __slots__ = ("backends", "body", "buffer_limit", "headers", "method", "mirrors", "raw_path", "read_limit",
                 "request_id", "targets")

    def __init__(self, mirrors: Mirrors, backends: Mapping[str, Backend],
                 targets: list[tuple[MirrorPlan, MirrorStats]], method: str, raw_path: str,
                 headers: bytes, body: bytes, request_id: str, read_limit: int, compares: bool) -> None:
        self.mirrors = mirrors
        self.backends = backends     # of the request's Runtime: a reload does not move its mirrors
        self.targets = targets
        self.method = method
        self.raw_path = raw_path     # the primary's checked origin-form target, percent-encoded as received
        self.headers = headers       # the header lines the primary got (x-request-id included), framed
        self.body = body             # the very bytes object the primary got
        self.request_id = request_id
        self.read_limit = read_limit
        # what the primary try should read whole: the compare limit when some target compares
        self.buffer_limit: int | None = read_limit if compares else None

    def send(self, primary_body: bytes | None) -> None:
        """Start the mirrors now that the primary answer is known.

        `primary_body` is the answer read whole, or None when it was streamed or the primary
        failed (the shadows still get the request; nothing is compared).
        """
        self.mirrors._send(self, primary_body)


class Mirrors:
    """Owns every mirror task and the per (route, shadow) statistics. One per process (shell/services.py)."""

    def __init__(self, metrics: Metrics, rng: Callable[[], float], plan: Plan | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._rng = rng
        self._clock = clock  # wall clock: disagreements are shown to people
        self._stats: dict[tuple[str, str], MirrorStats] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._drop_log = Throttle(DROP_LOG_EVERY_S)   # by (route, shadow)
        if plan is not None:
            self.retain(plan)

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    # -- state across reloads ------------------------------------------------------------------

    def _stats_for(self, m: MirrorPlan) -> MirrorStats:
        stats = self._stats.get(m.key)
        if stats is None:
            stats = self._stats[m.key] = MirrorStats(m, self._metrics)
        return stats

    def retain(self, plan: Plan) -> None:
        """Adopt a (new) plan: keep the stats of its mirrors, forget the others.

        A mirror whose comparison settings (path, tolerances, window, redaction) changed
        starts a new agreement window and disagreement list; its counters carry on.
        """
        keep: dict[tuple[str, str], MirrorStats] = {}
        for route in plan.routes:
            for m in route.mirrors:
                stats = self._stats_for(m)
                if stats.compare_fingerprint != m.compare_fingerprint:
                    stats.compare_fingerprint = m.compare_fingerprint
                    stats.window = AgreementWindow(m.window)
                    stats.disagreements = DisagreementLog(DISAGREEMENTS_KEPT)
                keep[m.key] = stats
        self._stats = keep

    # -- the request path ----------------------------------------------------------------------

    def select(self, route: RoutePlan, rt: Runtime, request: web.BaseRequest, request_id: str,
               headers: bytes, body: bytes, *, path: str) -> MirrorTicket | None:
        """Which of the route's shadows get a copy of this request; None when none does.

        `path`: the checked origin-form target the primary is sent (core/target.py `forward`),
        never `request.raw_path`: a shadow gets exactly the path its primary got.
        """
        targets: list[tuple[MirrorPlan, MirrorStats]] | None = None
        compares = False
        for m in route.mirrors:
            key = request.headers.get(m.key_header) if m.key_header is not None else None
            if not (key_share_below(key, m.threshold) if key else self._rng() < m.threshold):
                continue
            stats = self._stats_for(m)
            if request.method not in m.methods:
                stats.count(MirrorOutcome.SKIPPED_METHOD)
            elif m.max_body_bytes is not None and len(body) > m.max_body_bytes:
                stats.count(MirrorOutcome.SKIPPED_BODY)
            elif not rt.backends[m.backend].available(asyncio.get_running_loop().time()):
                stats.count(MirrorOutcome.SKIPPED_UNAVAILABLE)  # decided now: no ticket, no whole primary answer
            else:
                if targets is None:
                    targets = [(m, stats)]
                else:
                    targets.append((m, stats))
                compares = compares or m.compare_path is not None
        if targets is None:
            return None
        limits = rt.plan.limits
        return MirrorTicket(self, rt.backends, targets, request.method, path, headers, body, request_id,
                            max(limits.max_body_bytes, limits.buffer_response_bytes), compares)

    def _send(self, ticket: MirrorTicket, primary_body: bytes | None) -> None:
        shadow_headers: bytes | None = None
        now = asyncio.get_running_loop().time()
        for m, stats in ticket.targets:
            if self._closed or stats.inflight >= m.max_inflight:
                stats.count(MirrorOutcome.DROPPED)
                self._log_drop(m)
                continue
            backend = ticket.backends[m.backend]
            endpoint = backend.pick(now, self._rng) if backend.available(now) else None
            if endpoint is None:  # became unavailable while the primary was answering
                stats.count(MirrorOutcome.SKIPPED_UNAVAILABLE)
                continue
            if shadow_headers is None:
                shadow_headers = SHADOW_LINE + ticket.headers  # the primary's lines, not made again
            stats.inflight += 1
            stats.sent += 1
            # only a comparing mirror holds on to the primary's answer (until its shadow answers)
            kept = primary_body if m.compare_path is not None else None
            self._spawn(self._run(m, stats, backend, endpoint, ticket, shadow_headers, kept))

    def _log_drop(self, m: MirrorPlan) -> None:
        if self._drop_log.try_pass(time.monotonic(), m.key):
            log.warning("mirror %s -> %s: %s; dropping mirrors (counted in outcome=dropped)", m.route, m.backend,
                        "shutting down" if self._closed else f"{m.max_inflight} in flight (max_inflight)")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The one place mirror tasks are made. Not in the server's TaskGroup: a mirror
        # outlives its request but not the process, and must never fail its siblings. The
        # set owns the task (a strong reference until done); drain() cancels and awaits it.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, m: MirrorPlan, stats: MirrorStats, backend: Backend, endpoint: int, ticket: MirrorTicket,
                   headers: bytes, primary_body: bytes | None) -> None:
        outcome = MirrorOutcome.INTERNAL_ERROR
        try:
            outcome = await self._mirror_once(m, stats, backend, endpoint, ticket, headers, primary_body)
        except asyncio.CancelledError:
            outcome = MirrorOutcome.CANCELLED
            raise
        except Exception:
            log.exception("mirror of request %s to %s failed inside the sidecar", ticket.request_id, m.backend)
        finally:
            stats.inflight -= 1
            stats.count(outcome)

    async def _mirror_once(self, m: MirrorPlan, stats: MirrorStats, backend: Backend, endpoint: int,
                           ticket: MirrorTicket, headers: bytes,
                           primary_body: bytes | None) -> MirrorOutcome:
        compare = m.compare_path is not None
        deadline = asyncio.get_running_loop().time() + m.timeout_s
        answer: Answer | None = None
        try:
            # one deadline for the whole mirror: the try enforces it up to a whole buffered
            # answer; a streamed answer's chunks are read under the same deadline
            answer = await backend.try_(endpoint, ticket.method, ticket.raw_path, headers, ticket.body, deadline,
                                        deadline, buffer_limit=ticket.read_limit if compare else None)
            if answer.outcome is Outcome.SERVER_ERROR:
                return MirrorOutcome.SHADOW_ERROR
            shadow_body = answer.body
            if shadow_body is None:
                async with asyncio.timeout_at(deadline):
                    shadow_body = await _read_stream(answer, ticket.read_limit if compare else None, m.timeout_s)
        except CircuitRefused:
            return MirrorOutcome.SKIPPED_UNAVAILABLE  # the half-open probe slots were taken since _send
        except UpstreamFailure as f:
            return MirrorOutcome.SHADOW_TIMEOUT if f.timed_out else MirrorOutcome.SHADOW_ERROR
        except TimeoutError:
            return MirrorOutcome.SHADOW_TIMEOUT
        finally:
            if answer is not None:
                answer.close()  # no-op unless a stream was left unread
        if m.compare_path is None:
            return MirrorOutcome.SENT
        if primary_body is None:
            return MirrorOutcome.PRIMARY_UNREADABLE
        if shadow_body is None:
            return MirrorOutcome.SHADOW_ERROR  # larger than the compare limit
        return self._compare(m, m.compare_path, stats, ticket.request_id, primary_body, shadow_body)

    def _compare(self, m: MirrorPlan, path: JsonPath, stats: MirrorStats, request_id: str,
                 primary_body: bytes, shadow_body: bytes) -> MirrorOutcome:
        primary_doc = load_json(primary_body)
        shadow_doc = load_json(shadow_body)
        primary = path.find(primary_doc)
        shadow = path.find(shadow_doc)
        verdict = compare_values(primary, shadow, m.tolerance, m.rel_tolerance)
        stats.window.record_verdict(verdict)
        if verdict is Verdict.DISAGREE:
            if m.redact:  # found again in redacted documents, so a redacted field never shows
                primary = path.find(redact_all(primary_doc, m.redact))
                shadow = path.find(redact_all(shadow_doc, m.redact))
            stats.disagreements.add(Disagreement(request_id, path.text, _shown(path, primary), _shown(path, shadow),
                                                 self._clock()))
        return _VERDICT_OUTCOME[verdict]

    # -- shutdown --------------------------------------------------------------------------------

    async def wait_idle(self) -> None:
        """Return once no mirror is in flight (for tests and callers that must not cut them)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def drain(self, timeout_s: float) -> int:
        """Stop mirroring; let mirrors in flight finish within `timeout_s`, then cancel and await
        the rest. Returns how many were cut (counted as outcome `cancelled`)."""
        self._closed = True
        tasks = set(self._tasks)
        if not tasks:
            return 0
        pending = tasks
        if timeout_s > 0:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            # a cancelled mirror closes its connection and ends at once
            await asyncio.wait(pending)
            log.warning("drain: %d mirrors still in flight; cancelled", len(pending))
        return len(pending)

    # -- reporting -------------------------------------------------------------------------------

    def status_json(self, plan: Plan) -> list[dict[str, Any]]:
        """Per route and shadow of `plan`, in config order: what `GET /admin/mirrors` lists
        under "mirrors" (and `/admin/status` may embed)."""
        return [self._stats_for(m).json(m) for route in plan.routes for m in route.mirrors]

    def agreement_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [(key, ratio) for key, stats in self._stats.items() if (ratio := stats.window.ratio) is not None]


async def _read_stream(answer: Answer, cap: int | None, idle_s: float) -> bytes | None:
    """A streamed answer's body, or None when it passed `cap`; cap None: read and discard."""
    parts: list[bytes] = []
    size = 0
    while chunk := await answer.next_chunk(idle_s):
        if cap is None:
            continue
        size += len(chunk)
        if size > cap:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _shown(path: JsonPath, values: list[Any]) -> Any:
    """What a disagreement keeps of one side: the value (a list for `[*]` paths), bounded."""
    value = values if path.is_multi else (values[0] if values else None)
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    if len(text) <= MAX_SHOWN_BYTES:
        return value
    return text[:MAX_SHOWN_BYTES].decode("utf-8", "ignore") + f"... ({len(text)} bytes)"
