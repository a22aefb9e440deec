"""`sidecar demo`: the example models, a real `sidecar run` in front of them, clients, and a
live view of what the sidecar does, read from its admin API and /metrics.

Owns the run's lifetime and everything it starts: the model servers (in this process, on
127.0.0.1 ephemeral ports), the sidecar (a child process `python -m sidecar run -c FILE`
in its own session, so a Ctrl-C reaches the demo, which stops it), the clients
(`traffic.Traffic`) and the view's polling. All of it is stopped on every way out: the end,
Ctrl-C, an error. The config file and the sidecar's log live in a temporary folder, removed
at the end.

The timeline (`scenario.Timeline`): traffic for `duration`; half-way the config file is
edited (route `fraud-eu` with the bad canary's rollout) and reloaded through
`POST /admin/reload` (what `sidecar reload` does), and a campaign changes where payments
come from (drift).
Past `duration`, traffic goes on while a rollout is still undecided, up to `grace_s`. Then
the summary; with `keep`, everything stays up until Ctrl-C.

Imports: the standard library, aiohttp, yaml, rich, `sidecar.demo.*`. Never the sidecar's
shell: the demo is a client of the product.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml
from rich.console import Console
from rich.live import Live

from sidecar.demo.models import RunningModel, start_model_server
from sidecar.demo.scenario import (
    BAD_STEPS,
    EU_SHARE,
    FEEDBACK,
    GOOD_STEPS,
    MAX_ERROR_RATE,
    MAX_P99_RATIO,
    MIN_REQUESTS,
    MODELS,
    PREDICT,
    Timeline,
    initial_config,
    reloaded_config,
)
from sidecar.demo.traffic import Traffic
from sidecar.demo.view import PLAIN_LEGEND, Board, Reading, live_view, parse_metrics, plain_line, quality_lines

RATE: Final = 60.0  # fraud requests per second (the machine may be small and busy)
POLL_S: Final = 1.0
PLAIN_EVERY_S: Final = 2.0
START_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0
ADMIN_TIMEOUT: Final = aiohttp.ClientTimeout(total=5)
_SERVING: Final = re.compile(r"serving on [^ ]+:(\d+), admin on [^ ]+:(\d+)")
DONE_STATES: Final = frozenset({"promoted", "rolled_back", "paused"})


class DemoError(Exception):
    """The demo could not run (the sidecar did not start, or stopped)."""


async def _write(path: Path, cfg: dict[str, Any]) -> None:
    """Write the config file whole, then swap it in (a watcher never reads half a file)."""
    text = "# written by `sidecar demo`\n" + yaml.safe_dump(cfg, sort_keys=False)

    def write() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    await asyncio.to_thread(write)


@contextlib.asynccontextmanager
async def _models() -> AsyncIterator[dict[str, list[RunningModel]]]:
    servers: dict[str, list[RunningModel]] = {}
    try:
        for name, specs in MODELS.items():
            servers[name] = []
            for spec in specs:
                servers[name].append(await start_model_server(spec))
        yield servers
    finally:
        for running in servers.values():
            for model in running:
                await model.stop()


@contextlib.asynccontextmanager
async def _sidecar(config: Path, log: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """`sidecar run -c config`, its stderr into `log`; yields (process, proxy URL, admin URL)."""
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "run", "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            start_new_session=True,  # Ctrl-C goes to the demo only; the demo stops the sidecar
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (found := _SERVING.search(await asyncio.to_thread(log.read_text))) is None:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise DemoError(f"the sidecar did not start (exit code {proc.returncode}):\n{await _tail(log)}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)  # a bounded look at the log, 20 times a second
        yield proc, f"http://127.0.0.1:{found[1]}", f"http://127.0.0.1:{found[2]}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # drains (drain.delay 0, grace 2s) and exits
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _tail(log: Path, lines: int = 10) -> str:
    """The last lines of the sidecar's log, for a failure report."""
    text = await asyncio.to_thread(log.read_text, errors="replace")
    return "\n".join(text.splitlines()[-lines:])


async def _read(session: aiohttp.ClientSession, admin: str) -> Reading:
    async with session.get(admin + "/admin/status") as r:
        r.raise_for_status()
        status = await r.json()
    async with session.get(admin + "/metrics") as r:
        r.raise_for_status()
        metrics = parse_metrics(await r.text())
    return Reading(time.monotonic(), status, metrics)


def _intro(timeline: Timeline) -> str:
    return (
        f"sidecar demo: {timeline.duration_s:.0f} s of traffic ({RATE:.0f} fraud requests/s from 8 clients, "
        "a streamed chat every 2 s).\n"
        "  route fraud:  fraud-v1 (stable, 3 replicas, one flaky) -> rollout of fraud-v2, "
        f"steps {'/'.join(map(str, GOOD_STEPS))} %, each judged every {timeline.interval_s} s on "
        f"its own traffic: at least {MIN_REQUESTS} canary requests, failed tries <= {MAX_ERROR_RATE:.0%}, "
        f"p99 <= {MAX_P99_RATIO:g} x fraud-v1's;\n"
        f"                half the requests copied to fraud-shadow and compared; drift checked; "
        f"labels posted to {FEEDBACK} a second later.\n"
        f"  at {timeline.reload_at_s:.0f} s: the config file gets route fraud-eu ({EU_SHARE:.0%} of requests carry "
        f"x-region: eu) with a rollout of fraud-v3 (steps {'/'.join(map(str, BAD_STEPS))} %, same gates), "
        "and a marketing campaign starts (payments from other countries).\n"
        "  route chat:   an LLM streaming tokens."
    )


async def run_demo(duration_s: float = 60.0, keep: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    timeline = Timeline(duration_s)
    console.print(_intro(timeline), markup=False, highlight=False, soft_wrap=True)
    console.print("starting the model servers and the sidecar ...", markup=False)
    folder = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    try:
        async with _models() as servers:
            urls = {name: [m.url for m in running] for name, running in servers.items()}
            config = folder / "sidecar.yaml"
            await _write(config, initial_config(urls, timeline))
            async with _sidecar(config, folder / "sidecar.log") as (proc, proxy, admin):
                return await _show(console, timeline, servers, urls, config, folder, proc, proxy, admin, keep)
    except DemoError as e:
        console.print(f"demo failed: {e}", markup=False)
        return 1
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def _show(console: Console, timeline: Timeline, servers: dict[str, list[RunningModel]],
                urls: dict[str, list[str]], config: Path, folder: Path, proc: asyncio.subprocess.Process,
                proxy: str, admin: str, keep: bool) -> int:
    console.print("model servers: " + "; ".join(f"{name} {' '.join(u)}" for name, u in urls.items()),
                  markup=False, highlight=False, soft_wrap=True)
    console.print(f"sidecar: proxy {proxy}, admin {admin} (pid {proc.pid}); config {config}", markup=False,
                  highlight=False, soft_wrap=True)
    board = Board(timeline, proxy, admin)
    traffic = Traffic(proxy, RATE)
    live = console.is_terminal and not console.is_dumb_terminal
    if not live:
        console.print(PLAIN_LEGEND, markup=False, highlight=False, soft_wrap=True)
    async with aiohttp.ClientSession(timeout=ADMIN_TIMEOUT) as session, asyncio.TaskGroup() as tg:
        tg.create_task(traffic.run())
        try:
            view = Live(live_view(board, traffic.tally), console=console, auto_refresh=False,
                        vertical_overflow="ellipsis") if live else contextlib.nullcontext()
            with view:
                failure = await _drive(session, board, traffic, timeline, urls, config, admin, proc, view, console)
            if failure:
                console.print(f"demo failed: {failure}; the sidecar's log ends:\n{await _tail(folder / 'sidecar.log')}",
                              markup=False, highlight=False, soft_wrap=True)
                return 1
            console.print(_summary(board, traffic, servers, admin, proxy, folder, keep), markup=False,
                          highlight=False, soft_wrap=True)
            if keep:
                console.print("Still serving, clients included: the models, the sidecar and its status page "
                              "stay up until Ctrl-C.", markup=False)
                await proc.wait()  # ends by Ctrl-C (cancelling this) or if the sidecar stops on its own
                console.print(f"the sidecar stopped (exit code {proc.returncode})", markup=False)
                return 1
        finally:
            traffic.stop()
    return 0


async def _drive(session: aiohttp.ClientSession, board: Board, traffic: Traffic, timeline: Timeline,
                 urls: dict[str, list[str]], config: Path, admin: str, proc: asyncio.subprocess.Process,
                 view: Live | contextlib.nullcontext[None], console: Console) -> str | None:
    """Poll, draw, and carry out the timeline until the end; -> why the demo failed, or None."""
    reloaded = campaign = False
    last_plain = -PLAIN_EVERY_S
    events_printed = 0
    while True:
        if proc.returncode is not None:
            return f"the sidecar stopped (exit code {proc.returncode})"
        elapsed = board.elapsed()
        if not campaign and elapsed >= timeline.campaign_at_s:
            campaign = True
            traffic.campaign()
            board.event("a campaign starts: most payments now come from DE, FR, NL, ES, IT (watch drift)")
        if not reloaded and elapsed >= timeline.reload_at_s:
            reloaded = True
            traffic.eu_routed()
            await _write(config, reloaded_config(urls, timeline))
            try:
                async with session.post(admin + "/admin/reload") as r:
                    answer = await r.json()
            except (aiohttp.ClientError, TimeoutError) as e:
                return f"POST /admin/reload failed: {e!r}"
            if answer.get("result") != "ok":
                return f"the edited config was refused: {answer}"
            board.event(f"config file edited: route fraud-eu added with a rollout of fraud-v3; "
                        f"POST /admin/reload -> {answer['result']}, version "
                        f"{answer.get('previous_version')} -> {answer.get('version')}")
        try:
            board.add(await _read(session, admin))
        except (aiohttp.ClientError, TimeoutError) as e:
            board.event(f"admin API did not answer: {e!r}")
        if isinstance(view, Live):
            view.update(live_view(board, traffic.tally), refresh=True)
        else:
            for at, text in board.events[events_printed:]:
                console.print(f"[{at:5.1f} s] event: {text}", markup=False, highlight=False, soft_wrap=True)
            events_printed = len(board.events)
            if board.elapsed() - last_plain >= PLAIN_EVERY_S:
                last_plain = board.elapsed()
                console.print(plain_line(board, traffic.tally), markup=False, highlight=False, soft_wrap=True)
        if _finished(board, elapsed, timeline, reloaded):
            return None
        await asyncio.sleep(POLL_S)  # pacing of the view, not synchronisation


def _finished(board: Board, elapsed: float, timeline: Timeline, reloaded: bool) -> bool:
    if elapsed < timeline.duration_s:
        return False
    undecided = [ro for ro in board.rollouts() if ro["state"] not in DONE_STATES]
    return reloaded and (not undecided or elapsed >= timeline.duration_s + timeline.grace_s)


def _summary(board: Board, traffic: Traffic, servers: dict[str, list[RunningModel]], admin: str, proxy: str,
             folder: Path, keep: bool) -> str:
    last = board.last
    tally = traffic.tally
    lines = ["", "=== Summary " + "=" * 60]
    lines.append(f"clients sent {tally.sent} fraud requests: answers by status {dict(sorted(tally.statuses.items()))} "
                 "(0: no answer at all)")
    lines.append("per backend (from /metrics): answered = answers the sidecar passed to clients; tries = calls "
                 "the sidecar made, failed ones and retries included; model saw = the model servers' own count "
                 "(mirror copies included):")
    for name, running in servers.items():
        answered = 0.0 if last is None else last.total("sidecar_requests_total", backend=name)
        tries = 0.0 if last is None else last.total("sidecar_upstream_attempts_total", backend=name)
        failed = tries - (0.0 if last is None else last.total("sidecar_upstream_attempts_total", backend=name,
                                                              outcome="ok"))
        saw = sum(m.requests for m in running)
        if name == "fraud-shadow" and last is not None:
            copies = last.total("sidecar_mirror_requests_total", backend=name)
            lines.append(f"  {name:<13} mirror copies {copies:>6.0f} (a shadow answers the sidecar only)   "
                         f"model saw {saw:>6}")
            continue
        lines.append(f"  {name:<13} answered {answered:>6.0f}   tries {tries:>6.0f} ({failed:.0f} failed)   "
                     f"model saw {saw:>6}")
    lines.append("rollouts:")
    for ro in board.rollouts():
        d = ro.get("last_decision") or {}
        outcome = {"promoted": "PROMOTED", "rolled_back": "ROLLED BACK"}.get(ro["state"], ro["state"])
        gate = next((g for g in d.get("gates", []) if g.get("verdict") == "fail"), None)
        why = f", caught by gate {gate['gate']}: {gate['reason']}" if gate else f": {ro.get('reason') or '-'}"
        lines.append(f"  {ro['route']}: {ro['canary']} {outcome}{why}")
    lines += ["  " + line for line in quality_lines(board, tally)]
    lines.append("events:")
    lines += [f"  {at:5.1f} s  {text}" for at, text in board.events]
    lines.append("where it was:")
    lines.append(f"  status page {admin}/   metrics {admin}/metrics   proxy {proxy}")
    if keep:
        lines.append(f"  config file {folder / 'sidecar.yaml'}   sidecar log {folder / 'sidecar.log'}")
    lines.append("what to try next" + (" (now, while it stays up):" if keep else " (run `sidecar demo --keep` first):"))
    lines += [
        f"  sidecar status --admin {admin}",
        f"  sidecar rollout fraud-eu restart --admin {admin}        # judge v3 again; watch it fail again",
        f"  curl -s {admin}/admin/routes/fraud/rollout             # every decision with its gates",
        f"  curl -s {admin}/metrics | grep sidecar_requests_total",
        f"  curl -si {proxy}{PREDICT} -H 'x-user-id: alice' -d '{{\"instances\": [{{\"amount\": 120}}]}}'",
        f"  curl -s {admin}/admin/mirrors                           # the shadow's disagreements",
    ]
    return "\n".join(lines)
