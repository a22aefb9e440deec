"""The demo's view: rates from the sidecar's counters, rollout decisions in words, every column explained."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from sidecar.demo.scenario import Timeline
from sidecar.demo.traffic import Tally
from sidecar.demo.view import Board, Reading, live_view, parse_metrics, plain_line


def metrics(v1: int, v2: int, v2_failed: int = 0) -> str:
    return "\n".join([
        "# TYPE sidecar_requests_total counter",
        f'sidecar_requests_total{{backend="fraud-v1",code="200",route="fraud"}} {v1}',
        f'sidecar_requests_total{{backend="fraud-v2",code="200",route="fraud"}} {v2}',
        "# TYPE sidecar_upstream_attempts_total counter",
        f'sidecar_upstream_attempts_total{{backend="fraud-v2",outcome="ok",route="fraud"}} {v2}',
        f'sidecar_upstream_attempts_total{{backend="fraud-v2",outcome="5xx",route="fraud"}} {v2_failed}',
        "",
    ])


def status(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    rollout = {"route": "fraud", "state": "progressing", "step": 1, "steps": [10, 25, 50, 100],
               "canary": "fraud-v2", "reason": "step 0 passed", "last_decision": {"reason": "step 0 passed"}}
    return {
        "version": "abc123",
        "routes": [{"name": "fraud", "effective": {"fraud-v1": 0.75, "fraud-v2": 0.25}, "rollout": rollout}],
        "backends": [
            {"name": "fraud-v1", "circuit": "closed", "p50_s": 0.004, "p99_s": 0.02,
             "endpoints": [{"ejected": False}, {"ejected": True}, {"ejected": False}]},
            {"name": "fraud-v2", "circuit": "open", "p50_s": 0.003, "p99_s": 0.01, "endpoints": [{"ejected": False}]},
        ],
        "mirrors": [{"backend": "fraud-shadow", "sent": 10, "compared": 10, "agreement": 0.9,
                     "compare": {"tolerance": 0.02}}],
        "drift": [{"backend": "fraud-v1", "feature": "amount", "status": "ok", "drifted": True}],
        "feedback": [{"backend": "fraud-v1", "value": 0.85, "count": 40}],
        "rollout_decisions": decisions,
    }


ADVANCE = {"route": "fraud", "time": 2.0, "step": 1, "canary_weight": 25, "action": "advance",
           "reason": "step 0 passed"}
EXTEND = {"route": "fraud", "time": 1.0, "step": 0, "canary_weight": 10, "action": "extend",
          "reason": "inconclusive: min_requests: 3 of 15 canary requests; judged again"}


def board_of_two_readings() -> Board:
    board = Board(Timeline(20), "http://127.0.0.1:1", "http://127.0.0.1:2")
    assert board.add(Reading(100.0, status([EXTEND]), parse_metrics(metrics(0, 0)))) == []
    new = board.add(Reading(102.0, status([EXTEND, ADVANCE]), parse_metrics(metrics(100, 40, v2_failed=10))))
    assert new == ["rollout fraud: step 0 passed: fraud-v2 now at 25 % (step 1)"]
    return board


def test_rates_are_differences_of_the_sidecars_counters():
    """Per-second rates, failed shares and answered shares come from two readings' counters."""
    board = board_of_two_readings()
    assert board.backend_rate("fraud-v1") == 50.0
    assert board.backend_rate("fraud-v2") == 20.0
    assert board.failed_share("fraud-v2") == pytest.approx(0.2)
    assert board.failed_share("fraud-v1") is None  # no tries: unknown, not 0
    assert board.answered_share("fraud", "fraud-v2") == 40 / 140


def test_an_extended_step_is_no_event_and_a_decision_is_told_once():
    """Only decisions that change something become events, each once."""
    board = board_of_two_readings()
    assert board.add(Reading(103.0, status([EXTEND, ADVANCE]), parse_metrics(metrics(100, 40)))) == []
    assert [text for _, text in board.events] == ["rollout fraud: step 0 passed: fraud-v2 now at 25 % (step 1)"]


def test_the_live_view_shows_every_figure_with_its_explanation():
    """The terminal view draws backends, rollouts and quality lines, and explains each column in a caption."""
    board = board_of_two_readings()
    console = Console(record=True, width=200, force_terminal=True)
    console.print(live_view(board, Tally()))
    text = console.export_text()
    for shown in ("fraud-v1", "50.0", "20.0 %", "1 of 3 ejected", "open", "1: 25 % of 10/25/50/100",
                  "fraud-v1 75 %  fraud-v2 25 %", "agreement 90 %", "DRIFTED: fraud-v1 amount",
                  "fraud-v1 85.0% of 40", "config version abc123"):
        assert shown in text, shown
    for explained in ("req/s: answers per second", "failed: share of the sidecar's tries", "p50/p99:",
                      "circuit: closed", "endpoints: replicas", "step: the index", "got: share",
                      "sticky by x-user-id over 400 users"):
        assert explained in text, explained


def test_the_plain_line_reads_the_same_figures():
    """Without a terminal, one line carries the rates, the rollout, agreement, drift and accuracy."""
    line = plain_line(board_of_two_readings(), Tally())
    assert "fraud-v1 50.0 fraud-v2 20.0" in line
    assert "fraud progressing step 1, fraud-v2 at 25 %" in line
    assert "agreement 90 %" in line and "drifted: fraud-v1 amount" in line and "accuracy fraud-v1 85.0%" in line
