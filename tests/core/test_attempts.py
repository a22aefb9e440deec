"""Retry, hedge and fallback decisions of one request, scripted as events in and commands out
on a fake clock (tests/core/playbook.py). What the shell does with each command is tested
over sockets in tests/shell/test_resilience.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.attempts import (
    Attempts,
    Backoff,
    Command,
    Fail,
    Fallback,
    FallbackTry,
    Hedge,
    Pick,
    PickFallback,
    PickHedge,
    Respond,
    Static,
    Try,
    Wait,
)
from sidecar.core.budget import RetryBudget
from sidecar.core.outcome import Outcome, classify_status
from sidecar.core.retry import MIN_TRY_S, NoRetry, RetryPolicy
from tests.core.playbook import Ended, Picked, Playbook, Start, Woke

OK, E4XX, E5XX = Outcome.OK, Outcome.CLIENT_ERROR, Outcome.SERVER_ERROR
BACKEND, RESPONSE = Fallback.BACKEND, Fallback.RESPONSE


def policy(**changes: object) -> RetryPolicy:
    """The documented example: attempts 3, on [connect-error, timeout, 502, 503, 504], 25-250 ms."""
    base: dict[str, object] = {
        "attempts": 3, "on_connect_error": True, "on_timeout": True, "on_reset": False, "on_5xx": False,
        "on_statuses": frozenset({502, 503, 504}), "backoff_base_s": 0.025, "backoff_max_s": 0.25,
        "other_backend": True, "hedge_after_s": None,
    }
    base.update(changes)
    return RetryPolicy(**base)  # type: ignore[arg-type]


def half() -> float:
    return 0.5


def attempts(budget: RetryBudget | None = None, deadline: float = 3.0, chain: tuple[Fallback, ...] = (),
             **changes: object) -> Attempts:
    return Attempts(policy(**changes), budget, deadline, half, chain)


def spent_budget() -> RetryBudget:
    """A budget whose one retry per 10 s is already spent."""
    b = RetryBudget(0.0, min_per_s=0.1)
    assert b.try_spend(0.0)
    return b


# -- retries ------------------------------------------------------------------------------------


def test_retry_on_503_then_ok():
    """A 503 is retried after a jittered backoff on the other backend, whose 200 is the answer."""
    budget = RetryBudget(0.2)
    m = attempts(budget)
    assert (Playbook(m)
            >> Start(0.0)
            << Pick(None)
            >> Picked(0, 0.0)
            << Try(1, 0)
            >> Ended(1, E5XX, 503, 0.1)
            << Backoff(0.0125)              # first retry: half of 25 ms
            >> Woke(0.1125)
            << Pick(0)                      # other_backend: anything but backend 0
            >> Picked(1, 0.1125)
            << Try(2, 1)
            >> Ended(2, OK, 200, 0.2)
            << Respond(2))
    assert m.tries == 2 and budget.requests == 1 and budget.retries == 1


def test_retry_on_the_same_backend_prefers_another_endpoint():
    """When only the failed backend is left, the retry goes there again, to another endpoint."""
    assert (Playbook(attempts(other_backend=False))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, Outcome.CONNECT_ERROR, None, 0.01) << Backoff(0.0125)
            >> Woke(0.03) << Pick(None)
            >> Picked(0, 0.03) << Try(2, 0, avoid_endpoint_of=1)
            >> Ended(2, OK, 200, 0.05) << Respond(2))


def test_budget_exhausted_no_retry_counted_with_its_reason():
    """With the retry budget spent, a retryable 503 is not retried: it passes, and the skip says why."""
    budget = spent_budget()
    assert (Playbook(attempts(budget))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 503, 0.1) << Respond(1, skipped=(NoRetry.BUDGET, E5XX)))
    assert budget.retries == 1


def test_deadline_too_close_no_backoff():
    """A retry whose backoff would end past the deadline is not waited for: the failure answers at once."""
    deadline = 0.1 + 0.0125 + MIN_TRY_S / 2
    assert (Playbook(attempts(deadline=deadline))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, Outcome.TIMEOUT, None, 0.1) << Fail(1, skipped=(NoRetry.DEADLINE, Outcome.TIMEOUT)))


def test_attempts_spent_the_last_answer_passes():
    """When every try failed, the latest answer passes as it was, even after a later failure."""
    assert (Playbook(attempts(attempts=2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 503, 0.1) << Backoff(0.0125)
            >> Woke(0.12) << Pick(0)
            >> Picked(1, 0.12) << Try(2, 1)
            >> Ended(2, Outcome.TIMEOUT, None, 0.6) << Respond(1, skipped=(NoRetry.ATTEMPTS, Outcome.TIMEOUT)))


def test_no_answer_at_all_fails_with_the_last_failure():
    """Tries that all failed without an answer end in the latest failure (the shell's 502 or 504)."""
    assert (Playbook(attempts(attempts=2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, Outcome.CONNECT_ERROR, None, 0.0) << Backoff(0.0125)
            >> Woke(0.02) << Pick(0)
            >> Picked(1, 0.02) << Try(2, 1)
            >> Ended(2, Outcome.TIMEOUT, None, 0.5) << Fail(2, skipped=(NoRetry.ATTEMPTS, Outcome.TIMEOUT)))


def test_4xx_not_in_retry_on_passes():
    """A model's 4xx is its answer: it passes after one try, and no retry is counted as skipped."""
    assert (Playbook(attempts())
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E4XX, 422, 0.1) << Respond(1))


def test_4xx_listed_in_retry_on_is_retried():
    """A status the operator listed (429) is retried like a 503."""
    assert (Playbook(attempts(on_statuses=frozenset({429})))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E4XX, 429, 0.1) << Backoff(0.0125))


def test_5xx_not_in_retry_on_is_not_retried_and_not_counted():
    """A 500 that `retry.on` does not list passes as it was; it is no skipped retry."""
    assert (Playbook(attempts())
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 500, 0.1) << Respond(1))


def test_nothing_available_is_503():
    """When no backend of the split can take a try and there is no chain, nothing is tried."""
    m = attempts()
    assert (Playbook(m)
            >> Start(0.0) << Pick(None)
            >> Picked(None, 0.0) << Fail(0))
    assert m.tries == 0


def test_no_backend_left_after_backoff_ends_with_what_was_kept():
    """A retry that finds no available backend after its backoff ends with the answer kept so far."""
    assert (Playbook(attempts())
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 502, 0.1) << Backoff(0.0125)
            >> Woke(0.12) << Pick(0)
            >> Picked(None, 0.12) << Respond(1))


# -- streams ------------------------------------------------------------------------------------


def test_streamed_answer_never_retried():
    """A streamed answer passes as soon as its head is good; once it has started it is never replayed."""
    m = attempts()
    assert (Playbook(m)
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, OK, 200, 0.1, streamed=True) << Respond(1))
    assert m.stream_broke() is NoRetry.STARTED   # counted as a retry not made
    single = Attempts(RetryPolicy.single(), None, 3.0, half)
    assert (Playbook(single)
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, OK, 200, 0.1, streamed=True) << Respond(1))
    assert single.stream_broke() is None         # no retry was possible anyway


def test_streamed_503_is_released_before_the_backoff():
    """A failed streamed answer cannot wait for a retry: it is closed and stands as a failure."""
    assert (Playbook(attempts(attempts=2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 503, 0.1, streamed=True) << Backoff(0.0125, release=(1,))
            >> Woke(0.12) << Pick(0)
            >> Picked(None, 0.12) << Fail(1))


# -- hedging ------------------------------------------------------------------------------------


def test_hedge_fires_after_hedge_after_and_the_first_good_answer_wins():
    """A try with no answer after hedge_after gets a hedge elsewhere; the first good answer responds."""
    budget = RetryBudget(0.2)
    m = attempts(budget, hedge_after_s=0.2)
    assert (Playbook(m)
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << PickHedge(0)
            >> Picked(1, 0.2) << Hedge(2, 1)
            >> Ended(2, OK, 200, 0.25) << Respond(2))   # the shell cancels try 1
    assert m.tries == 2 and budget.retries == 1


def test_hedge_a_failed_answer_waits_for_the_other_try():
    """When the first try to end failed, the round waits for the other one; its good answer wins."""
    assert (Playbook(attempts(hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << PickHedge(0)
            >> Picked(0, 0.2) << Hedge(2, 0, avoid_endpoint_of=1)
            >> Ended(1, E5XX, 503, 0.3, streamed=True) << Wait()
            >> Ended(2, OK, 200, 0.35) << Respond(2, release=(1,)))


def test_hedge_round_of_two_failures_is_decided_like_one_try():
    """When both tries fail, the round's answer (or else its latest failure) is retried or passes."""
    assert (Playbook(attempts(attempts=2, hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << PickHedge(0)
            >> Picked(1, 0.2) << Hedge(2, 1)
            >> Ended(2, Outcome.RESET, None, 0.3) << Wait()
            >> Ended(1, E5XX, 503, 0.4) << Respond(1, skipped=(NoRetry.ATTEMPTS, E5XX)))


def test_hedge_refused_by_the_budget_is_counted():
    """With the budget spent, no hedge goes out; the skip is counted and the first try runs on."""
    assert (Playbook(attempts(spent_budget(), hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << PickHedge(0)
            >> Picked(1, 0.2) << Wait(skipped=(NoRetry.BUDGET, Outcome.TIMEOUT))
            >> Ended(1, OK, 200, 0.9) << Respond(1))


def test_no_hedge_without_a_backend_time_or_tries():
    """No hedge when no backend is available, the deadline is near, or no try is left."""
    assert (Playbook(attempts(hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << PickHedge(0)
            >> Picked(None, 0.2) << Wait())
    assert (Playbook(attempts(deadline=0.2, hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0, hedge_at=0.2)
            >> Woke(0.2) << Wait())
    assert (Playbook(attempts(attempts=1, hedge_after_s=0.2))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0))               # no timer at all


# -- fallback -----------------------------------------------------------------------------------


def test_fallback_chain_to_a_backend_then_to_a_static_response():
    """A route without retries falls back to its chain's backend, and when that fails, to the static answer."""
    m = Attempts(RetryPolicy.single(), None, 3.0, half, (BACKEND, RESPONSE))
    assert (Playbook(m)
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 500, 0.1) << PickFallback(0)
            >> Picked(0, 0.1) << FallbackTry(2, 0)
            >> Ended(2, Outcome.CONNECT_ERROR, None, 0.1) << Static(1))
    assert m.tries == 2


def test_fallback_backend_rescues_the_request():
    """The chain's backend answering well is the answer, counted as a fallback."""
    assert (Playbook(Attempts(RetryPolicy.single(), None, 3.0, half, (BACKEND, RESPONSE)))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 500, 0.1, streamed=True) << PickFallback(0)
            >> Picked(0, 0.1) << FallbackTry(2, 0)
            >> Ended(2, OK, 200, 0.2) << Respond(2, fallback=BACKEND, release=(1,)))


def test_fallback_after_retries_spends_budget():
    """A fallback try after retries spends budget like a retry; refused, the chain moves on."""
    budget = RetryBudget(0.0, min_per_s=0.1)   # one retry per 10 s
    assert (Playbook(attempts(budget, attempts=2, chain=(BACKEND, RESPONSE)))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, E5XX, 503, 0.1) << Backoff(0.0125)
            >> Woke(0.12) << Pick(0)
            >> Picked(1, 0.12) << Try(2, 1)
            >> Ended(2, E5XX, 503, 0.2) << PickFallback(0, skipped=(NoRetry.ATTEMPTS, E5XX))
            >> Picked(0, 0.2) << Static(1, skipped=(NoRetry.BUDGET, E5XX)))


def test_fallback_with_nothing_tried_spends_no_budget():
    """When the split had no backend to try, the chain's backend gets its try even with no budget."""
    assert (Playbook(attempts(spent_budget(), chain=(BACKEND,)))
            >> Start(0.0) << Pick(None)
            >> Picked(None, 0.0) << PickFallback(0)
            >> Picked(0, 0.0) << FallbackTry(1, 0)
            >> Ended(1, E5XX, 503, 0.1) << Respond(1))      # the chain's failed answer passes as it was


def test_fallback_skips_unavailable_and_late_steps():
    """An unavailable chain backend is skipped; one that has no time left is not even asked about."""
    assert (Playbook(attempts(chain=(BACKEND, BACKEND)))
            >> Start(0.0) << Pick(None)
            >> Picked(None, 0.0) << PickFallback(0)
            >> Picked(None, 0.0) << PickFallback(1)
            >> Picked(None, 0.0) << Fail(0))
    assert (Playbook(attempts(deadline=1.0, chain=(BACKEND, RESPONSE)))
            >> Start(0.0) << Pick(None)
            >> Picked(0, 0.0) << Try(1, 0)
            >> Ended(1, Outcome.TIMEOUT, None, 1.0) << Static(1, skipped=(NoRetry.DEADLINE, Outcome.TIMEOUT)))


def test_fallback_4xx_is_an_answer():
    """A chain backend's 4xx is its answer, like the split's."""
    assert (Playbook(attempts(chain=(BACKEND,)))
            >> Start(0.0) << Pick(None)
            >> Picked(None, 0.0) << PickFallback(0)
            >> Picked(0, 0.0) << FallbackTry(1, 0)
            >> Ended(1, E4XX, 429, 0.1) << Respond(1, fallback=BACKEND))


def test_command_reprs_read_like_the_script():
    """A command shows its own fields by position and the others only when set."""
    assert repr(Try(2, 1, hedge_at=0.25)) == "Try(2, 1, hedge_at=0.25)"
    assert repr(Respond(1, skipped=(NoRetry.BUDGET, E5XX))) == \
        "Respond(1, skipped=(<NoRetry.BUDGET: 'budget_exhausted'>, <Outcome.SERVER_ERROR: '5xx'>))"
    assert repr(Wait()) == "Wait()"


def test_a_broken_script_shows_the_difference():
    """A script that does not match fails with both scripts side by side."""
    with pytest.raises(AssertionError, match=r"(?s)- << Pick\(1\).*\+ << Pick\(None\)"):
        assert Playbook(attempts()) >> Start(0.0) << Pick(1)


# -- properties ---------------------------------------------------------------------------------


@dataclass
class Run:
    """What a random shell saw: the try results it reported, and the command that ended it."""

    results: dict[int, tuple[Outcome, int | None]] = field(default_factory=dict)
    released: set[int] = field(default_factory=set)
    last: Command | None = None


RESULTS = st.sampled_from([(OK, 200), (E4XX, 422), (E4XX, 429), (E5XX, 503), (E5XX, 500),
                           (Outcome.TIMEOUT, None), (Outcome.CONNECT_ERROR, None), (Outcome.RESET, None)])


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n_attempts=st.integers(1, 4), hedge=st.booleans(), other=st.booleans(),
       chain=st.lists(st.sampled_from([BACKEND, RESPONSE]), max_size=3), ratio=st.sampled_from([0.0, 0.5]))
def test_any_script_ends_within_its_tries(data, n_attempts, hedge, other, chain, ratio):
    """Whatever backends answer, a request ends with one answer or failure, within attempts + chain tries."""
    budget = RetryBudget(ratio, min_per_s=0.2)
    m = Attempts(policy(attempts=n_attempts, hedge_after_s=0.2 if hedge else None, other_backend=other,
                        on_5xx=True, on_statuses=frozenset({429})), budget, 5.0, half, tuple(chain))
    run = Run()
    now = 0.0
    running: list[int] = []
    cmd = m.start(now)
    for _ in range(100):
        run.released.update(cmd.release)
        now += data.draw(st.sampled_from([0.0, 0.01, 0.3]))
        if isinstance(cmd, (Respond, Static, Fail)):
            break
        if isinstance(cmd, (Pick, PickHedge)):
            cmd = m.picked(data.draw(st.sampled_from([None, 0, 1])), now)
        elif isinstance(cmd, PickFallback):
            cmd = m.picked(data.draw(st.sampled_from([None, cmd.step])), now)
        elif isinstance(cmd, Backoff):
            cmd = m.woke(now)
        else:
            if isinstance(cmd, (Try, Hedge, FallbackTry)):
                running.append(cmd.no)
            if isinstance(cmd, Try) and cmd.hedge_at is not None and data.draw(st.booleans()):
                cmd = m.woke(now)
                continue
            assert running, cmd
            no = running.pop(data.draw(st.integers(0, len(running) - 1)))
            outcome, status = data.draw(RESULTS)
            streamed = status is not None and data.draw(st.booleans())
            run.results[no] = (outcome, status)
            cmd = m.ended(no, outcome, status, streamed, now)
            if not isinstance(cmd, (Wait, PickHedge, Hedge)):
                running.clear()              # the round is over: the shell cancels the rest
    else:
        pytest.fail(f"no end after 100 steps: {m!r}")
    assert m.tries <= n_attempts + chain.count(BACKEND)
    assert budget.retries <= max(budget.ratio * budget.requests, 0.2 * 10)
    if isinstance(cmd, Respond):
        outcome, status = run.results[cmd.no]
        assert status is not None and cmd.no not in run.released
        assert classify_status(status) is outcome
    elif isinstance(cmd, Fail) and cmd.no:
        assert run.results[cmd.no][1] is None or cmd.no in run.released
