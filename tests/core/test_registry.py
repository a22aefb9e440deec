"""The registry's pure decisions: what a promotion and a rollback write, how calls are classified, and the canary's
version stamped on a rollout's decisions and events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.gates import GatePolicy
from sidecar.core.registry import (
    BACKOFF_S,
    TAG_REASON,
    TAG_ROLLOUT,
    CallOutcome,
    ModelRef,
    Operation,
    RolloutEnd,
    Write,
    backoff_s,
    classify_status,
    rollout_writes,
)
from sidecar.core.rollout import (
    Admin,
    AdminAction,
    Decision,
    Notify,
    Record,
    RolloutPolicy,
    attribute,
    handle,
    start,
)

CANARY = ModelRef("fraud", "8", "challenger")


def test_a_promotion_moves_the_alias_first_then_tags_the_version():
    """Promoted: the alias moves to the canary's version, then the version gets both tags."""
    writes = rollout_writes(RolloutEnd.PROMOTED, CANARY, "champion", "promoted by admin")
    assert writes == (
        Write(Operation.SET_ALIAS, "fraud", "8", "champion"),
        Write(Operation.SET_TAG, "fraud", "8", TAG_ROLLOUT, "promoted"),
        Write(Operation.SET_TAG, "fraud", "8", TAG_REASON, "promoted by admin"),
    )
    assert writes[0].describe() == "alias champion of fraud -> version 8"


def test_a_rollback_only_tags_the_version_with_a_one_line_reason():
    """Rolled back: no alias moves; the reason tag is one line, however it was written."""
    writes = rollout_writes(RolloutEnd.ROLLED_BACK, CANARY, "champion", "failed: max_error_rate:\n 5 of 100")
    assert [w.operation for w in writes] == [Operation.SET_TAG, Operation.SET_TAG]
    assert writes[0].value == "rolled_back"
    assert writes[1].value == "failed: max_error_rate: 5 of 100"


def test_an_unresolved_canary_writes_nothing():
    """A canary whose alias is unresolved has no version to write to."""
    assert rollout_writes(RolloutEnd.PROMOTED, ModelRef("fraud", None, "challenger"), "champion", "x") == ()


@pytest.mark.parametrize(("status", "outcome", "retryable"), [
    (200, CallOutcome.OK, False), (404, CallOutcome.NOT_FOUND, False), (400, CallOutcome.REFUSED, False),
    (401, CallOutcome.REFUSED, False), (403, CallOutcome.REFUSED, False), (429, CallOutcome.ERROR, True),
    (500, CallOutcome.ERROR, True), (503, CallOutcome.ERROR, True),
])
def test_statuses_are_classified_and_only_transient_ones_retried(status, outcome, retryable):
    """A 4xx is the registry's answer (never retried); 5xx and 429 may pass."""
    got = classify_status(status)
    assert got is outcome and got.retryable is retryable


@given(st.integers(min_value=1, max_value=50))
def test_backoff_grows_and_is_bounded(tries):
    """The wait between tries never shrinks and never passes the last step."""
    assert BACKOFF_S[0] <= backoff_s(tries) <= BACKOFF_S[-1]
    assert backoff_s(tries + 1) >= backoff_s(tries)


def policy() -> RolloutPolicy:
    return RolloutPolicy(key="k", canary="canary", baseline="stable", steps=(10, 100), interval_s=60.0,
                         gates=GatePolicy(min_requests=10))


def test_attribute_stamps_the_canary_model_on_the_decision_its_record_and_its_event():
    """The decision kept in the state, its record and its webhook event all name the same version."""
    p = policy()
    res = attribute(handle(p, start(p, 0.0).state, Admin(AdminAction.PROMOTE), 5.0), CANARY)
    kept = res.state.decisions[-1]
    assert kept.canary_model == CANARY
    record = next(a for a in res.actions if isinstance(a, Record))
    notify = next(a for a in res.actions if isinstance(a, Notify))
    assert record.decision == kept and notify.decision == kept
    body = notify.to_json("fraud")
    assert body["canary_model"] == {"name": "fraud", "version": "8", "alias": "challenger"}
    assert body["decision"]["canary_model"] == body["canary_model"]
    assert Decision.from_json(kept.to_json()) == kept


def test_attribute_leaves_older_decisions_and_unattributed_results_alone():
    """Only the decisions this result made are stamped; no model stamps nothing."""
    p = policy()
    first = handle(p, start(p, 0.0).state, Admin(AdminAction.PAUSE), 1.0)
    second = attribute(handle(p, first.state, Admin(AdminAction.RESUME), 2.0), CANARY)
    assert [d.canary_model for d in second.state.decisions] == [None, CANARY]
    plain = handle(p, first.state, Admin(AdminAction.RESUME), 2.0)
    assert attribute(plain, None) is plain
