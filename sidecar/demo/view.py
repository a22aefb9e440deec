"""What the demo shows: readings of the sidecar's admin API and /metrics, drawn live with
`rich` on a terminal, as plain periodic lines otherwise, and the summary at the end.

Owns `Reading` (one poll: `/admin/status` and the parsed `/metrics`), `Board` (the readings
of the last few seconds, so rates are differences of the sidecar's own counters, plus the
events seen so far) and the renderers. Every figure comes from the admin API or /metrics,
except the lines marked as the clients' view (`Tally`) and the model servers' own call
counts in the summary; each figure's meaning is said where it first appears (a table's
caption, the plain legend, the summary's notes).

Imports: the standard library, rich, prometheus_client's text parser, and
`sidecar.demo.{scenario,traffic}`.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sidecar.demo.scenario import MIRROR_PERCENT, USERS, Timeline
from sidecar.demo.traffic import Tally

RATE_WINDOW_S: Final = 5.0
EVENTS_SHOWN: Final = 8
BACKEND_NOTES: Final = {
    "fraud-v1": "v1 stable, 3 replicas (r3 flaky: 30 % errors)",
    "fraud-v2": "v2 good canary (same scores, faster)",
    "fraud-v3": "v3 bad canary (40 % errors, slow)",
    "fraud-shadow": f"shadow: gets {MIRROR_PERCENT} % copies, disagrees on ~10 %",
    "llm": "LLM, streams tokens",
}
CIRCUIT_STYLE: Final = {"closed": "green", "half_open": "yellow", "open": "bold red"}
STATE_STYLE: Final = {"progressing": "yellow", "baking": "yellow", "paused": "magenta",
                      "promoted": "bold green", "rolled_back": "bold red"}

Labels = tuple[tuple[str, str], ...]


def parse_metrics(text: str) -> dict[str, dict[Labels, float]]:
    """Prometheus text -> {sample name: {sorted labels: value}}."""
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = float(s.value)
    return out


@dataclass(frozen=True)
class Reading:
    at: float  # monotonic
    status: dict[str, Any]
    metrics: dict[str, dict[Labels, float]]

    def total(self, name: str, **match: str) -> float:
        """Sum of a counter's samples whose labels include `match`."""
        return sum(v for labels, v in self.metrics.get(name, {}).items()
                   if all((k, w) in labels for k, w in match.items()))


def _decision(d: dict[str, Any], canary: str) -> str:
    """A rollout decision in words; `d` is a row of /admin/status's rollout_decisions."""
    match d["action"]:
        case "advance":
            return f"{d['reason']}: {canary} now at {d['canary_weight']} % (step {d['step']})"
        case "promote":
            return f"{d['reason']}: {canary} promoted to 100 %"
        case "rollback":
            return f"{d['reason']}: {canary} rolled back to 0 %"
        case action:
            return f"{action}: {d['reason']}"


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


@dataclass
class Board:
    """The readings of the last RATE_WINDOW_S seconds, and what happened so far."""

    timeline: Timeline
    proxy_url: str
    admin_url: str
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # the admin API's decision times are wall-clock
    readings: deque[Reading] = field(default_factory=deque)
    events: list[tuple[float, str]] = field(default_factory=list)
    _seen_decisions: set[tuple[str, float]] = field(default_factory=set)

    @property
    def last(self) -> Reading | None:
        return self.readings[-1] if self.readings else None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def event(self, text: str, wall_time: float | None = None) -> None:
        at = self.elapsed() if wall_time is None else max(0.0, wall_time - self.started_wall)
        self.events.append((at, text))

    def add(self, reading: Reading) -> list[str]:
        """Keep the reading; return the events it brought (new rollout decisions)."""
        self.readings.append(reading)
        while len(self.readings) > 2 and reading.at - self.readings[0].at > RATE_WINDOW_S:
            self.readings.popleft()
        canaries = {r["name"]: r["rollout"]["canary"] for r in reading.status.get("routes", []) if r.get("rollout")}
        new: list[str] = []
        for d in sorted(reading.status.get("rollout_decisions", []), key=lambda d: d["time"]):
            key = (d["route"], d["time"])
            if key in self._seen_decisions or d["action"] == "extend":
                continue  # an extended step ("not enough canary requests yet") is shown in the table only
            self._seen_decisions.add(key)
            new.append(f"rollout {d['route']}: {_decision(d, canaries.get(d['route'], 'the canary'))}")
            self.event(new[-1], d["time"])
        return new

    def rate(self, name: str, **match: str) -> float:
        if len(self.readings) < 2:
            return 0.0
        first, last = self.readings[0], self.readings[-1]
        return max(0.0, last.total(name, **match) - first.total(name, **match)) / max(last.at - first.at, 1e-9)

    # --- the figures, by backend and route ---------------------------------------------

    def backend_rate(self, backend: str) -> float:
        """Answers per second from this backend (mirror calls for a shadow)."""
        if backend == "fraud-shadow":
            compared = ("agree", "disagree", "missing", "shadow_error", "shadow_timeout")
            return sum(self.rate("sidecar_mirror_requests_total", backend=backend, outcome=o) for o in compared)
        return self.rate("sidecar_requests_total", backend=backend)

    def failed_share(self, backend: str) -> float | None:
        tries = self.rate("sidecar_upstream_attempts_total", backend=backend)
        if tries <= 0:
            return None
        return 1 - self.rate("sidecar_upstream_attempts_total", backend=backend, outcome="ok") / tries

    def answered_share(self, route: str, backend: str) -> float | None:
        total = self.rate("sidecar_requests_total", route=route)
        return None if total <= 0 else self.rate("sidecar_requests_total", route=route, backend=backend) / total

    def routes(self) -> list[dict[str, Any]]:
        return [] if self.last is None else list(self.last.status.get("routes", []))

    def rollouts(self) -> list[dict[str, Any]]:
        return [r["rollout"] | {"effective": r["effective"]} for r in self.routes() if r.get("rollout")]


# --- the live terminal view --------------------------------------------------------------


def _backends_table(board: Board) -> Table:
    t = Table(title="Backends (rates over the last 5 s)", title_justify="left", expand=True,
              caption="req/s: answers per second from the backend (for the shadow: copies compared). "
                      "failed: share of the sidecar's tries to it that failed (5xx, reset, timeout), "
                      "before retries rescue the client. p50/p99: latency of its answers, half / 99 % are "
                      "faster. circuit: closed = in use, open = left out after repeated failures. "
                      "endpoints: replicas taken out by outlier ejection.",
              caption_justify="left")
    for col in ("backend", "what it is", "req/s", "failed", "p50", "p99", "circuit", "endpoints"):
        t.add_column(col, justify="right" if col in ("req/s", "failed", "p50", "p99") else "left")
    last = board.last
    for b in [] if last is None else last.status.get("backends", []):
        name = b["name"]
        failed = board.failed_share(name)
        endpoints = b.get("endpoints") or []
        ejected = sum(1 for e in endpoints if e.get("ejected"))
        circuit = b.get("circuit", "-")
        t.add_row(
            name, BACKEND_NOTES.get(name, ""), f"{board.backend_rate(name):.1f}",
            Text(_pct(failed, 1), style="red" if failed else ""),
            _ms(b.get("p50_s")), _ms(b.get("p99_s")),
            Text(circuit, style=CIRCUIT_STYLE.get(circuit, "")),
            "-" if len(endpoints) < 2 else Text(f"{ejected} of {len(endpoints)} ejected",
                                                style="yellow" if ejected else ""),
        )
    return t


def _weights(effective: dict[str, float]) -> str:
    return "  ".join(f"{b} {100 * w:.0f} %" for b, w in effective.items())


def _rollouts_table(board: Board) -> Table:
    t = Table(title="Rollouts", title_justify="left", expand=True,
              caption="step: the index of the rollout's step, from 0 as the admin API counts, and that "
                      "step's canary weight. weights: the route's split now. got: share of the route's "
                      "answers each backend gave in the last 5 s; "
                      f"the split is sticky by x-user-id over {USERS} users, so a user stays on one version "
                      "and the share moves in whole users: 10 % can show as 6 % or 14 %. "
                      "decision: the last judgement of the step's gates.",
              caption_justify="left")
    for col in ("route", "canary", "state", "step", "weights", "got", "decision"):
        t.add_column(col, overflow="fold")
    for ro in board.rollouts():
        route = ro["route"]
        got = "  ".join(f"{b} {_pct(board.answered_share(route, b))}" for b in ro["effective"])
        last = ro.get("last_decision") or {}
        steps = ro["steps"]
        t.add_row(route, ro["canary"], Text(ro["state"], style=STATE_STYLE.get(ro["state"], "")),
                  f"{ro['step']}: {steps[ro['step']]} % of {'/'.join(map(str, steps))}", _weights(ro["effective"]), got,
                  last.get("reason") or "waiting for the first judgement")
    if not t.row_count:
        t.add_row("-", "-", "starting", "-", "-", "-", "-")
    return t


def quality_lines(board: Board, tally: Tally) -> list[str]:
    """Retries, the shadow's agreement, drift, live accuracy, streaming: one line each."""
    last = board.last
    if last is None:
        return ["waiting for the first reading ..."]
    status = last.status
    lines = [
        f"retries: {board.rate('sidecar_retries_total'):.1f}/s now, "
        f"{last.total('sidecar_retries_total'):.0f} in all (tries sent again after a failed one, "
        f"within the retry budget); clients got {tally.after_retry} answers after a retry, "
        f"{tally.fallbacks} from the fallback, {tally.client_errors} errors"
    ]
    lines.extend(f"shadow {m['backend']}: {m['sent']} copies sent, {m['compared']} compared, agreement "
                 f"{_pct(m['agreement'])} (copies whose scores are within {m['compare']['tolerance']} of "
                 "the answer the client got; the client never sees the shadow's)"
                 for m in status.get("mirrors", []))
    drifted = [f"{d['backend']} {d['feature']}" for d in status.get("drift", []) if d.get("drifted")]
    judged = [d for d in status.get("drift", []) if d.get("status") not in ("pending", None)]
    lines.append(f"drift: {'DRIFTED: ' + ', '.join(drifted) if drifted else 'none'} "
                 f"({len(judged)} of {len(status.get('drift', []))} backend features judged; each backend's "
                 "recent payloads and scores against its own first ones: a test (KS for numbers, chi-square for "
                 "categories) and a size (PSI) must both say it moved)")
    acc = [f"{f['backend']} {f['value']:.1%} of {f['count']}" for f in status.get("feedback", [])
           if f.get("value") is not None]
    lines.append(f"live accuracy: {', '.join(acc) or 'waiting for labels'} (labels posted "
                 f"{tally.labels_posted}, joined {tally.label_outcomes.get('joined', 0)}: predictions scored "
                 "against the truth the clients post a second later)")
    ttft = sorted(tally.chat_first_token_s)
    lines.append(f"streaming: {tally.chats} chats, first token after {_ms(ttft[len(ttft) // 2] if ttft else None)} "
                 f"(median), {tally.chat_tokens} tokens relayed as they came")
    return lines


def live_view(board: Board, tally: Tally) -> RenderableType:
    last = board.last
    version = "-" if last is None else last.status.get("version", "-")
    header = Text.assemble(
        ("sidecar demo", "bold"), f"  {board.elapsed():.0f} s of {board.timeline.duration_s:.0f} s  ",
        "(past it: traffic goes on until the rollouts decide)  " if board.elapsed() > board.timeline.duration_s
        else "",
        f"proxy {board.proxy_url}  status page {board.admin_url}/  config version {version} (a hash of the "
        "config: it changes with the reload)",
    )
    events = Text("\n".join(f"{at:5.1f} s  {text}" for at, text in board.events[-EVENTS_SHOWN:]) or "-")
    return Group(header, _backends_table(board), _rollouts_table(board),
                 Text("\n".join(quality_lines(board, tally))), Text("Events", style="bold"), events)


# --- plain lines (not a terminal) --------------------------------------------------------

PLAIN_LEGEND: Final = """\
Each line below is one look at the sidecar's admin API and /metrics:
  req/s      answers per second from each backend over the last 5 s (shadow: copies compared)
  rollout    route: state, step (its index, from 0) and the canary's weight now; the split is sticky by
             x-user-id, so the canary's share of answers moves in whole users, not requests
  agreement  share of mirrored copies whose scores matched the answer the client got
  drifted    backend features whose recent values moved against their own first ones
  accuracy   predictions scored against labels the clients post a second later"""


def plain_line(board: Board, tally: Tally) -> str:
    last = board.last
    if last is None:
        return f"[{board.elapsed():5.1f} s] waiting for the sidecar"
    rates = " ".join(f"{b['name']} {board.backend_rate(b['name']):.1f}" for b in last.status.get("backends", []))
    rollouts = "; ".join(f"{ro['route']} {ro['state']} step {ro['step']}, {ro['canary']} at "
                         f"{_pct(ro['effective'].get(ro['canary']))}" for ro in board.rollouts())
    agreement = ", ".join(_pct(m["agreement"]) for m in last.status.get("mirrors", []))
    drifted = ", ".join(f"{d['backend']} {d['feature']}" for d in last.status.get("drift", [])
                        if d.get("drifted")) or "none"
    acc = ", ".join(f"{f['backend']} {f['value']:.1%}" for f in last.status.get("feedback", [])
                    if f.get("value") is not None) or "-"
    return (f"[{board.elapsed():5.1f} s] req/s: {rates} | rollout: {rollouts} | agreement {agreement} | "
            f"drifted: {drifted} | accuracy {acc} | client errors {tally.client_errors}")
