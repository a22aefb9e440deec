"""The retry, hedge and fallback decisions of one request (docs/resilience.md), as a machine with no I/O.

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
    picked(index | None, now)                    Try(no, index, ...)   start try `no`; with `hedge_at`: not
                                                                       ended by then, reply woke()
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
counts it: docs/resilience.md: "never silent"), and `release`, tries whose streamed answer is no longer
kept: the shell closes them, and one that a later command names stands as a failure
("answered 503"). Respond, Static and Fail end the request; when any command but Wait,
PickHedge or Hedge follows tries that overlapped, the shell cancels those still running.

The phases, in order (`Phase`; HEDGE_PICK, FALLBACK_PICK and FALLBACK_TRYING are the
waits for a reply inside TRYING and FALLBACK):

    PICK      one split backend for the next round (none available: the chain)
    TRYING    a round: one try, and a hedge when it has not answered after `hedge_after`. The
              first good answer (not `failed`) ends the round, else the last one to end.
              Its result is final (`RetryPolicy.is_final`: an answer below 400, or a 4xx
              that `retry.on` does not list) -> Respond; else it is kept (docs/resilience.md: the latest
              answer, else the latest failure) and `RetryState.decide` says Backoff -> PICK,
              or why not -> the fallback chain
    BACKOFF   sleeping; a streamed answer cannot wait, so it is released first
    FALLBACK  each step in order: a backend gets one try if available and in time, and
              spends retry budget like a retry when tries were made before the chain; the
              first good answer responds; a static step answers; past the end, the kept
              answer passes as it was, else Fail
    DONE

Hedges (docs/resilience.md) are tries: they count in `attempts` and spend the budget. A hedge that the
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
    hedge_at: float | None = None        # a hedge may join if the try has not ended by then


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


# Phases and outcomes as module names: an Enum member read through its class costs several
# times a global's lookup, and these are read on every request.
_PICK, _TRYING, _HEDGE_PICK, _BACKOFF, _FALLBACK_PICK, _FALLBACK_TRYING, _DONE = Phase
_OK: Final = Outcome.OK
_RESPONSE: Final = Fallback.RESPONSE
_PICK_ANY: Final = Pick(None)
_WAIT: Final = Wait()
_RESPOND_FIRST: Final = Respond(1)
_FIRST_TRIES: dict[int, Try] = {}      # Try(1, index), made once per index: commands are never changed
_HEDGE_SKIPPED: Final = (NoRetry.BUDGET, Outcome.TIMEOUT)       # the first try had not answered
_FALLBACK_SKIPPED: Final = (NoRetry.BUDGET, Outcome.SERVER_ERROR)


class Attempts(RetryState):
    """The tries of one request: made once it is matched and read, dropped with it.

    A `RetryState` (tries, deadline, budget, `decide`) with the round, what is kept and the
    chain's position on top. Hot path (NOTE): one try that answers well is `start`, `picked`,
    `ended`: three calls and no allocation but this object (a Python call costs about as much
    as twenty attribute reads here, so the hot branches are written inline); the round's
    fields are set where a round starts, the chain's where it starts (`_begin_fallback`), and
    the kept result's flags only with `_kept`, not in `__init__`.
    """

    __slots__ = ("_first", "_first_index", "_hedge_index", "_inflight", "_kept", "_kept_answer", "_kept_streamed",
                 "_last_index", "_prev", "_r", "_r_outcome", "_r_status", "_r_streamed", "_step", "_tried",
                 "chain", "phase", "rng")
    # set where first needed (see __init__); declared here for the type checker
    _inflight: int
    _first: int
    _first_index: int
    _hedge_index: int
    _r: int
    _r_outcome: Outcome
    _r_status: int | None
    _r_streamed: bool
    _prev: int
    _last_index: int
    _kept_answer: bool
    _kept_streamed: bool
    _tried: bool
    _step: int

    def __init__(self, policy: RetryPolicy, budget: RetryBudget | None, deadline: float, rng: Rng,
                 chain: tuple[Fallback, ...] = ()) -> None:
        # RetryState.__init__, inline: one call less per request (hot path)
        self.policy, self.budget, self.deadline, self.tries = policy, budget, deadline, 0
        self.rng = rng                   # backoff jitter
        self.chain = chain               # the route's fallback steps, in order
        self.phase = _PICK
        # What passes when nothing better comes (docs/resilience.md): the latest answer, else the latest
        # failure; 0: nothing yet. With it, `_kept_answer` (an answer, not a failure) and
        # `_kept_streamed` (an answer that holds its connection).
        self._kept = 0
        # Set as a round starts (`picked` in PICK): the round's tries running (`_inflight`), its first try
        # (`_first`, `_first_index`), a hedge's backend (`_hedge_index`), its result so far
        # (`_r`, 0: none yet, and `_r_*`). Set by `_round_ended`: the previous round's result
        # (`_prev`, `_last_index`), whose backend and endpoint a retry avoids.
        # Set by `_begin_fallback`: `_tried` (tries came before the chain, so its backends
        # spend budget) and `_step`.

    def __repr__(self) -> str:
        return f"<Attempts {self.phase} tries={self.tries}/{self.policy.attempts} kept={self._kept}>"

    # -- events ---------------------------------------------------------------------------------

    def start(self, now: float) -> Command:
        """The request is matched and read: counted for the budget; the first pick."""
        assert self.phase is _PICK and not self.tries
        budget = self.budget
        if budget is not None:
            budget.record_request(now)
        return _PICK_ANY

    def picked(self, index: int | None, now: float) -> Command:
        """The reply to Pick and PickHedge (a split index) and to PickFallback (the step);
        None: no backend may take a try now."""
        phase = self.phase
        if phase is _PICK:               # a round starts: its first try
            if index is None:
                return self._begin_fallback(now, None, ())
            no = self.tries = self.tries + 1
            self.phase = _TRYING
            self._inflight = 1
            self._r = 0
            self._first, self._first_index = no, index
            policy = self.policy
            if policy.hedge_after_s is not None and no < policy.attempts:
                hedge_at: float | None = now + policy.hedge_after_s
            elif no == 1:                # hot path: the first try, no hedge; made once per backend
                cmd = _FIRST_TRIES.get(index)
                if cmd is None:
                    cmd = _FIRST_TRIES[index] = Try(1, index)
                return cmd
            else:
                hedge_at = None
            if no == 1:
                return Try(1, index, hedge_at=hedge_at)
            return Try(no, index, avoid_endpoint_of=self._prev if index == self._last_index else 0,
                       hedge_at=hedge_at)
        if phase is _HEDGE_PICK:
            self.phase = _TRYING
            if index is None:
                return _WAIT
            if self.try_hedge(now):
                self.record_try()
                self._inflight += 1
                self._hedge_index = index
                return Hedge(self.tries, index, avoid_endpoint_of=self._first if index == self._first_index else 0)
            # try_hedge refused with a try and the time left: for the budget
            return Wait(skipped=_HEDGE_SKIPPED) if self.would_hedge(now) else _WAIT
        assert phase is _FALLBACK_PICK, phase
        if index is None:
            self._step += 1
            return self._next_step(now, None, ())
        assert index == self._step, (index, self._step)
        budget = self.budget
        if self._tried and budget is not None and not budget.try_spend(now):
            self._step += 1
            return self._next_step(now, _FALLBACK_SKIPPED, ())
        self.phase = _FALLBACK_TRYING
        self.record_try()
        return FallbackTry(self.tries, index)

    def ended(self, no: int, outcome: Outcome, status: int | None, streamed: bool, now: float) -> Command:
        """Try `no` ended: an answer with `status` (`streamed`: its body is still to come,
        over a connection it holds), or a failure (status None)."""
        phase = self.phase
        if phase is _TRYING and outcome is _OK and self._r == 0:
            # hot path: the round's first result is good and final (is_final(OK)): it answers
            self.phase = _DONE
            self._inflight = 0           # a hedge still running is cancelled by the shell
            return _RESPOND_FIRST if no == 1 else Respond(no)
        if phase is _FALLBACK_TRYING:
            return self._fallback_ended(no, outcome, status, streamed, now)
        assert phase is _TRYING and self._inflight > 0, self
        self._inflight -= 1
        release: tuple[int, ...] = ()
        r = self._r
        # the round's result so far: the first try to end; replaced by a good one when it
        # failed, or by an answer when it had none
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
        if self.phase is _BACKOFF:
            self.phase = _PICK
            if self.policy.other_backend:
                return Pick(self._last_index)
            return _PICK_ANY
        assert self.phase is _TRYING and self._inflight == 1, self
        if not self.would_hedge(now):
            return _WAIT
        self.phase = _HEDGE_PICK
        return PickHedge(self._first_index)

    def stream_broke(self) -> NoRetry | None:
        """The answer passed on broke after bytes reached the client: it is never replayed
        (docs/reference/http.md). The retry it would otherwise have had, to count; None when none was left."""
        return NoRetry.STARTED if self.tries < self.policy.attempts else None

    # -- transitions ------------------------------------------------------------------------------

    def _round_ended(self, now: float, release: tuple[int, ...]) -> Command:
        r, outcome, status = self._r, self._r_outcome, self._r_status
        self._prev, self._last_index = r, self._first_index if r == self._first else self._hedge_index
        if status is not None and self.policy.is_final(outcome, status):
            self.phase = _DONE
            return Respond(r, release=release)
        release += self._keep(r, status, self._r_streamed)
        decision = self.decide(outcome, status, now, self.rng)
        if isinstance(decision, NoRetry):
            skipped = None if decision is NoRetry.NOT_RETRYABLE else (decision, outcome)
            return self._begin_fallback(now, skipped, release)
        if self._kept_streamed:          # a streamed answer cannot wait for a retry: it stands as a failure
            release += (r,)
            self._kept_answer = self._kept_streamed = False
        self.phase = _BACKOFF
        return Backoff(decision, release=release)

    def _keep(self, no: int, status: int | None, streamed: bool) -> tuple[int, ...]:
        """docs/resilience.md: of the failed tries, the latest answer passes, else the latest failure."""
        if status is None:
            if not (self._kept and self._kept_answer):
                self._kept, self._kept_answer, self._kept_streamed = no, False, False
            return ()
        release = (self._kept,) if self._kept and self._kept_streamed else ()
        self._kept, self._kept_answer, self._kept_streamed = no, True, streamed
        return release

    def _begin_fallback(self, now: float, skipped: Skip | None, release: tuple[int, ...]) -> Command:
        self._tried = self.tries > 0
        self._step = 0
        return self._next_step(now, skipped, release)

    def _next_step(self, now: float, skipped: Skip | None, release: tuple[int, ...]) -> Command:
        """The chain from `_step` on: the first step that can answer, else the end of the chain."""
        chain = self.chain
        while self._step < len(chain):
            if chain[self._step] is _RESPONSE:
                self.phase = _DONE
                if self._kept and self._kept_streamed:
                    release += (self._kept,)
                return Static(step=self._step, skipped=skipped, release=release)
            if now + MIN_TRY_S < self.deadline:
                self.phase = _FALLBACK_PICK
                return PickFallback(step=self._step, skipped=skipped, release=release)
            self._step += 1
        self.phase = _DONE
        if self._kept and self._kept_answer:
            return Respond(no=self._kept, skipped=skipped, release=release)  # docs/resilience.md: passes as it was
        return Fail(no=self._kept, skipped=skipped, release=release)

    def _fallback_ended(self, no: int, outcome: Outcome, status: int | None, streamed: bool,
                        now: float) -> Command:
        if not outcome.failed:
            self.phase = _DONE
            release: tuple[int, ...] = (self._kept,) if self._kept and self._kept_streamed else ()
            return Respond(no, fallback=Fallback.BACKEND, release=release)
        release = self._keep(no, status, streamed)
        self._step += 1
        return self._next_step(now, None, release)
