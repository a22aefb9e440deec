"""The retry, hedge and fallback decisions of one request (SPEC 3.2, 8), as a machine with no I/O.

Two rules, as h11's `_state.py` has: all of the deciding lives here, and it never knows what
a backend, an answer or a socket is. Tries are numbers (1, 2, ... in the order they start),
backends are indexes into the route's split, a try's result is its `Outcome` and status
(None: no answer). The shell (`Proxy._forward` in shell/proxy.py) feeds events in and
carries out the one command each event returns, so the whole of a request's retrying reads
as a script, and tests write it as one (tests/core/test_attempts.py, mitmproxy's Playbook).

    events in (methods)                          commands out
    start(now)                                   Pick(avoid)           choose a split backend, preferring
                                                                       another than `avoid` (split, sticky,
                                                                       override header and availability
                                                                       are the shell's); reply picked()
    picked(index | None, now)                    Try(no, index, ...)   start try `no`; with `hedge_at`, wait
                                                                       for it until then, else reply woke()
    ended(no, outcome, status, streamed, now)    PickHedge(avoid)      as Pick, for a hedge
    woke(now)                                    Hedge(no, index, ..)  start try `no` beside the one running
                                                 Wait()                wait for the next try to end
                                                 Backoff(delay_s)      sleep, then woke()
                                                 PickFallback(step)    may the chain's backend `step` take a
                                                                       try? reply picked(step) or picked(None)
                                                 FallbackTry(no, step) start try `no` on that backend
                                                 Respond(no, fallback) try `no`'s answer goes to the client
                                                 Static(step)          the chain's static response answers
                                                 Fail(no)              no answer: try `no`'s failure (502 or
                                                                       504), or 503 when `no` is 0

Every command may also carry `skipped`, a retry not made on the way and why (the shell
counts it: SPEC "never silent"), and `release`, tries whose streamed answer is no longer
kept: the shell closes them, and one that a later command names stands as a failure
("answered 503"). Respond, Static and Fail end the request; when any command but Wait,
PickHedge or Hedge follows tries that overlapped, the shell cancels those still running.

The phases, in order (`Phase`):

    PICK      one split backend for the next round (none available: the chain)
    TRYING    a round: one try, and a hedge when it has not answered after `hedge_after`. The
              first good answer (not `failed`) ends the round, else the last one to end.
              Its result is final (`RetryPolicy.is_final`: an answer below 400, or a 4xx
              that `retry.on` does not list) -> Respond; else it is kept (SPEC 8: the latest
              answer, else the latest failure) and `RetryState.decide` says Backoff -> PICK,
              or why not -> the fallback chain
    BACKOFF   sleeping; a streamed answer cannot wait, so it is released first
    FALLBACK  each step in order: a backend gets one try if available and in time, and
              spends retry budget like a retry when tries were made before the chain; the
              first good answer responds; a static step answers; past the end, the kept
              answer passes as it was, else Fail
    DONE

Hedges (SPEC 8) are tries: they count in `attempts` and spend the budget. A hedge that the
budget refuses while a backend was there to take it is counted as a skipped retry.

Imports: standard library and sidecar.core (budget, outcome, retry).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from enum import StrEnum
from typing import Final

from sidecar.core.budget import RetryBudget
from sidecar.core.outcome import Outcome
from sidecar.core.retry import MIN_TRY_S, NoRetry, RetryPolicy, RetryState, Rng

Skip = tuple[NoRetry, Outcome]   # a retry not made, and the outcome that was not retried


class Fallback(StrEnum):
    """A step of the fallback chain; the values are the `fallbacks_total{kind}` label."""

    BACKEND = "backend"
    RESPONSE = "response"


class Phase(StrEnum):
    PICK = "pick"
    TRYING = "trying"
    HEDGE_PICK = "hedge_pick"
    BACKOFF = "backoff"
    FALLBACK_PICK = "fallback_pick"
    FALLBACK_TRYING = "fallback_trying"
    DONE = "done"


# -- commands ---------------------------------------------------------------------------------
# Plain slotted dataclasses: cheap to make on the hot path, equal by value in scripts. `skipped`
# and `release` are keyword-only, so each command's own fields come first: `Try(1, 0)`.


@dataclass(slots=True, repr=False, kw_only=True)
class Command:
    skipped: Skip | None = None
    release: tuple[int, ...] = ()

    def __repr__(self) -> str:
        """Required fields by position, the others only when set: `Try(2, 1, hedge_at=0.25)`."""
        shown = [repr(getattr(self, f.name)) for f in fields(self) if f.default is MISSING]
        shown += [f"{f.name}={value!r}" for f in fields(self)
                  if f.default is not MISSING and (value := getattr(self, f.name)) != f.default]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(slots=True, repr=False)
class Pick(Command):
    avoid: int | None                    # a split index to avoid while another is available


@dataclass(slots=True, repr=False)
class Try(Command):
    no: int
    index: int                           # the split backend
    avoid_endpoint_of: int = 0           # an earlier try on this backend: prefer another endpoint
    hedge_at: float | None = None        # wait for the try until then, then woke()


@dataclass(slots=True, repr=False)
class PickHedge(Command):
    avoid: int


@dataclass(slots=True, repr=False)
class Hedge(Command):
    no: int
    index: int
    avoid_endpoint_of: int = 0


@dataclass(slots=True, repr=False)
class Wait(Command):
    pass


@dataclass(slots=True, repr=False)
class Backoff(Command):
    delay_s: float


@dataclass(slots=True, repr=False)
class PickFallback(Command):
    step: int


@dataclass(slots=True, repr=False)
class FallbackTry(Command):
    no: int
    step: int


@dataclass(slots=True, repr=False)
class Respond(Command):
    no: int
    fallback: Fallback | None = None     # Fallback.BACKEND: the chain rescued the request


@dataclass(slots=True, repr=False)
class Static(Command):
    step: int


@dataclass(slots=True, repr=False)
class Fail(Command):
    no: int                              # 0: nothing was tried


_PICK_ANY: Final = Pick(None)
_WAIT: Final = Wait()
_HEDGE_SKIPPED: Final = (NoRetry.BUDGET, Outcome.TIMEOUT)       # the first try had not answered
_FALLBACK_SKIPPED: Final = (NoRetry.BUDGET, Outcome.SERVER_ERROR)


class Attempts:
    """The tries of one request: made once it is matched and read, dropped with it."""

    __slots__ = ("_first", "_first_index", "_index", "_inflight", "_kept", "_kept_answer", "_kept_streamed",
                 "_last_index", "_prev", "_r", "_r_outcome", "_r_status", "_r_streamed", "_step", "_tried",
                 "chain", "phase", "retry", "rng")

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None, deadline: float, rng: Rng,
                 chain: tuple[Fallback, ...] = ()) -> None:
        self.retry = RetryState(policy, budget, deadline)
        self.rng = rng                   # backoff jitter
        self.chain = chain               # the route's fallback steps, in order
        self.phase = Phase.PICK
        self._index: list[int] = []      # split index of each try (-1: a fallback try)
        # the round: tries running, its first try, and its result so far (try 0: none yet)
        self._inflight = 0
        self._first = self._first_index = 0
        self._r = 0
        self._r_outcome = Outcome.OK
        self._r_status: int | None = None
        self._r_streamed = False
        # the previous round's result: a retry avoids its backend (other_backend) and endpoint
        self._prev = 0
        self._last_index: int | None = None
        # what passes when nothing better comes (SPEC 8): the latest answer, else the latest failure
        self._kept = 0
        self._kept_answer = False
        self._kept_streamed = False
        self._tried = False              # tries were made before the chain (its backends spend budget)
        self._step = 0

    def __repr__(self) -> str:
        return f"<Attempts {self.phase} tries={self.retry.tries} kept={self._kept} step={self._step}>"

    @property
    def tries(self) -> int:
        """Tries started, hedges and fallbacks included (`x-sidecar-attempts`)."""
        return self.retry.tries

    # -- events ---------------------------------------------------------------------------------

    def start(self, now: float) -> Command:
        """The request is matched and read: counted for the budget; the first pick."""
        assert self.phase is Phase.PICK and not self.retry.tries
        budget = self.retry.budget
        if budget is not None:
            budget.record_request(now)
        return _PICK_ANY

    def picked(self, index: int | None, now: float) -> Command:
        """The reply to Pick and PickHedge (a split index) and to PickFallback (the step);
        None: no backend may take a try now."""
        phase = self.phase
        if phase is Phase.PICK:
            if index is None:
                return self._begin_fallback(now, None, ())
            return self._start_round(index, now)
        if phase is Phase.HEDGE_PICK:
            self.phase = Phase.TRYING
            if index is None:
                return _WAIT
            retry = self.retry
            if retry.try_hedge(now):
                no = self._record(index)
                self._inflight += 1
                return Hedge(no=no, index=index, avoid_endpoint_of=self._first if index == self._first_index else 0)
            # try_hedge refused with a try and the time left: for the budget
            return Wait(skipped=_HEDGE_SKIPPED) if retry.would_hedge(now) else _WAIT
        assert phase is Phase.FALLBACK_PICK, phase
        if index is None:
            self._step += 1
            return self._next_step(now, None, ())
        assert index == self._step, (index, self._step)
        budget = self.retry.budget
        if self._tried and budget is not None and not budget.try_spend(now):
            self._step += 1
            return self._next_step(now, _FALLBACK_SKIPPED, ())
        self.phase = Phase.FALLBACK_TRYING
        return FallbackTry(no=self._record(-1), step=index)

    def ended(self, no: int, outcome: Outcome, status: int | None, streamed: bool, now: float) -> Command:
        """Try `no` ended: an answer with `status` (`streamed`: its body is still to come,
        over a connection it holds), or a failure (status None)."""
        if self.phase is Phase.FALLBACK_TRYING:
            return self._fallback_ended(no, outcome, status, streamed, now)
        assert self.phase is Phase.TRYING and self._inflight > 0, self
        self._inflight -= 1
        release: tuple[int, ...] = ()
        r = self._r
        # the round's result so far (as `_hedged` chose it): the first to end; replaced by a
        # good one when it failed, or by an answer when it was no answer
        if r == 0 or (self._r_outcome.failed and not outcome.failed) or \
                (status is not None and self._r_status is None):
            if r and self._r_status is not None and self._r_streamed:
                release = (r,)
            self._r, self._r_outcome, self._r_status, self._r_streamed = no, outcome, status, streamed
        elif status is not None and streamed:
            release = (no,)              # a loser that answered too
        if self._inflight and self._r_outcome.failed:
            return Wait(release=release) if release else _WAIT
        self._inflight = 0               # a good answer: the shell cancels the tries still running
        return self._round_ended(now, release)

    def woke(self, now: float) -> Command:
        """The backoff is slept, or a round's hedge timer fired before its try ended."""
        if self.phase is Phase.BACKOFF:
            self.phase = Phase.PICK
            if self.retry.policy.other_backend and self._last_index is not None:
                return Pick(avoid=self._last_index)
            return _PICK_ANY
        assert self.phase is Phase.TRYING and self._inflight == 1, self
        if not self.retry.would_hedge(now):
            return _WAIT
        self.phase = Phase.HEDGE_PICK
        return PickHedge(avoid=self._first_index)

    def stream_broke(self) -> NoRetry | None:
        """The answer passed on broke after bytes reached the client: it is never replayed
        (SPEC 3.1). The retry it would otherwise have had, to count; None when none was left."""
        return NoRetry.STARTED if self.retry.tries < self.retry.policy.attempts else None

    # -- transitions ------------------------------------------------------------------------------

    def _record(self, index: int) -> int:
        self.retry.record_try()
        self._index.append(index)
        return self.retry.tries

    def _start_round(self, index: int, now: float) -> Try:
        no = self._record(index)
        self.phase = Phase.TRYING
        self._inflight = 1
        self._first, self._first_index = no, index
        policy = self.retry.policy
        hedge_after = policy.hedge_after_s
        hedge_at = now + hedge_after if hedge_after is not None and no < policy.attempts else None
        return Try(no=no, index=index, avoid_endpoint_of=self._prev if index == self._last_index else 0,
                   hedge_at=hedge_at)

    def _round_ended(self, now: float, release: tuple[int, ...]) -> Command:
        r, outcome, status = self._r, self._r_outcome, self._r_status
        self._r = 0
        self._prev, self._last_index = r, self._index[r - 1]
        retry = self.retry
        if status is not None and retry.policy.is_final(outcome, status):
            self.phase = Phase.DONE
            return Respond(no=r, release=release)
        release += self._keep(r, status, self._r_streamed)
        decision = retry.decide(outcome, status, now, self.rng)
        if isinstance(decision, NoRetry):
            skipped = None if decision is NoRetry.NOT_RETRYABLE else (decision, outcome)
            return self._begin_fallback(now, skipped, release)
        if self._kept_streamed:          # a streamed answer cannot wait for a retry: it stands as a failure
            release += (r,)
            self._kept_answer = self._kept_streamed = False
        self.phase = Phase.BACKOFF
        return Backoff(delay_s=decision, release=release)

    def _keep(self, no: int, status: int | None, streamed: bool) -> tuple[int, ...]:
        """SPEC 8: of the failed tries, the latest answer passes, else the latest failure."""
        if status is None:
            if not self._kept_answer:
                self._kept = no
            return ()
        release = (self._kept,) if self._kept_streamed else ()
        self._kept, self._kept_answer, self._kept_streamed = no, True, streamed
        return release

    def _begin_fallback(self, now: float, skipped: Skip | None, release: tuple[int, ...]) -> Command:
        self._tried = self.retry.tries > 0
        self._step = 0
        return self._next_step(now, skipped, release)

    def _next_step(self, now: float, skipped: Skip | None, release: tuple[int, ...]) -> Command:
        """The chain from `_step` on: the first step that can answer, else the end of the chain."""
        chain = self.chain
        while self._step < len(chain):
            if chain[self._step] is Fallback.RESPONSE:
                self.phase = Phase.DONE
                if self._kept_streamed:
                    release += (self._kept,)
                return Static(step=self._step, skipped=skipped, release=release)
            if now + MIN_TRY_S < self.retry.deadline:
                self.phase = Phase.FALLBACK_PICK
                return PickFallback(step=self._step, skipped=skipped, release=release)
            self._step += 1
        self.phase = Phase.DONE
        if self._kept_answer:
            return Respond(no=self._kept, skipped=skipped, release=release)  # SPEC 8: passes as it was
        return Fail(no=self._kept, skipped=skipped, release=release)

    def _fallback_ended(self, no: int, outcome: Outcome, status: int | None, streamed: bool,
                        now: float) -> Command:
        if not outcome.failed:
            self.phase = Phase.DONE
            return Respond(no=no, fallback=Fallback.BACKEND, release=(self._kept,) if self._kept_streamed else ())
        release = self._keep(no, status, streamed)
        self._step += 1
        return self._next_step(now, None, release)
