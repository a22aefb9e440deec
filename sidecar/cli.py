"""The `sidecar` command: run, validate, schema, demo; status, reload, weights, rollout (docs/reference/cli.md).

Exit codes: 0 success; 1 an invalid config, a drain that had to cut requests, or an admin
call the sidecar refused (4xx/5xx: rejected reload, unknown route, bad weights, no token);
2 usage; 3 the admin API could not be reached.
Imports: everything below it (core, config, shell, demo, adminclient).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import logging
import logging.handlers
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from sidecar import __version__
from sidecar.adminclient import AdminClient, AdminRefused, AdminUnreachable, default_admin, default_token
from sidecar.config.load import load_config
from sidecar.config.model import Config
from sidecar.errors import ConfigError


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def setup_logging(level: str = "info") -> None:
    """Log lines go to stderr as JSON through a queue, so the event loop never blocks on them."""
    q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    listener = logging.handlers.QueueListener(q, handler)
    listener.start()
    atexit.register(listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [_DroppingQueueHandler(q)]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A full log queue drops the record rather than blocking the event loop."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("SIDECAR_CONFIG")
    if not path:
        print("error: no config file: pass -c FILE or set SIDECAR_CONFIG", file=sys.stderr)
        raise SystemExit(2)
    return str(path)


def cmd_validate(args: argparse.Namespace) -> int:
    path = _config_path(args)
    try:
        loaded = load_config(path)
    except ConfigError as e:
        print(f"{path}: invalid config ({len(e.issues)} error{'s' if len(e.issues) != 1 else ''})",
              file=sys.stderr)
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    cfg = loaded.config
    print(f"{path}: ok (version {loaded.version})")
    print(f"  listen {cfg.listen}, admin {cfg.admin.listen}")
    print(f"  backends: {', '.join(cfg.backends)}")
    for name, b in cfg.backends.items():
        if b.model is not None:
            print(f"    {name} serves {b.model.name} " + (f"version {b.model.version}" if b.model.version is not None
                                                          else f"@{b.model.alias} (resolved in the registry)"))
    for r in cfg.routes:
        split = ", ".join(f"{b}={w:g}" for b, w in r.split.items())
        print(f"  route {r.name}: {r.match.path_prefix} -> {split}")
        if (ro := r.rollout) is not None:
            print(f"    rollout {ro.canary} vs {ro.baseline}: steps {ro.steps} every {ro.interval:g}s"
                  + (" (dry run)" if ro.dry_run else ""))
        if r.feedback is not None:
            print(f"    feedback: POST {r.feedback.path} ({r.feedback.metric}, keep {r.feedback.keep:g}s, "
                  f"max_pending {r.feedback.max_pending})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(orjson.dumps(Config.model_json_schema(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    setup_logging(args.log_level)
    log = logging.getLogger("sidecar")
    try:
        loaded = load_config(path)
    except ConfigError as e:
        for issue in e.issues:
            log.error("invalid config: %s", issue)
        return 1
    from sidecar.shell.server import ListenError, Sidecar

    freeze_heap()

    async def main() -> int:
        try:
            return await Sidecar(loaded, install_signals=True).run()
        except ListenError as e:
            log.error("%s", e)
            return 1

    return _run_loop(main())


def freeze_heap() -> None:
    """Hide what start-up made (modules, the config) from the garbage collector's full passes.

    Serving makes few long-lived objects, but a full (generation 2) collection still walks
    the whole heap: about 25 ms with this one, measured, a stall of the event loop every few
    seconds under load. Frozen objects are never walked again, so a full pass then costs
    what serving added since. Objects freed by reference counting are still freed; only
    reference cycles among start-up objects would stay, and start-up makes none that die.
    shell/monitor.py freezes again after its one late import (scipy).
    """
    gc.collect()
    gc.freeze()


def _run_loop(coro: object) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro))  # type: ignore[arg-type]


def _demo_duration(text: str) -> float:
    from sidecar.config.model import parse_duration

    try:
        seconds = float(parse_duration(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds < 10:
        raise argparse.ArgumentTypeError(f"{text!r}: the demo needs at least 10s (two rollouts and a reload)")
    return seconds


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo.run import run_demo

    try:
        return _run_loop(run_demo(duration_s=args.duration, keep=args.keep))
    except KeyboardInterrupt:  # Ctrl-C: everything was stopped before this
        return 0 if args.keep else 130


def cmd_reference(args: argparse.Namespace) -> int:
    """Build a drift reference file from sample log lines (docs/monitoring.md#build-a-reference-from-a-sample-log)."""
    from sidecar.config.plan import Plan
    from sidecar.shell.reference import ReferenceBuildError, build_reference

    path = _config_path(args)
    try:
        plan = Plan.build(load_config(path))
    except ConfigError as e:
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 1
    try:
        counts = build_reference(plan, args.route, args.log, args.output, backend=args.backend)
    except ReferenceBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: " + ", ".join(f"{name} ({n} values)" for name, n in counts.items()))
    return 0


# -- admin client commands ----------------------------------------------------------------------

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3


def _admin_call(args: argparse.Namespace, call: Callable[[AdminClient], Any]) -> tuple[int, Any]:
    client = AdminClient(args.admin, args.token, timeout_s=args.timeout)
    try:
        return 0, call(client)
    except AdminUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE, None
    except AdminRefused as e:
        hint = ""
        if e.status == 401:
            hint = " (pass --token or set SIDECAR_ADMIN_TOKEN)"
        print(f"error: the admin API refused: {e.message}{hint}", file=sys.stderr)
        for err in (e.doc or {}).get("error", {}).get("errors", []) if isinstance(e.doc, dict) else []:
            print(f"  {err}", file=sys.stderr)
        return EXIT_REFUSED, e.doc


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*map(str, r)).rstrip() for r in rows)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}ms"


AGREEMENT_FLOOR = 0.95   # as the status page: a shadow agreeing less is marked ...
ERROR_RATE_MARK = 0.05   # ... and a backend failing more of its tries over the last minute


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}/s"


def _model(m: Any) -> str:
    """A backend's `model` ({name, version, alias}, added by the registry) in one word, or "-"."""
    if not isinstance(m, dict) or not m.get("name"):
        return "-"
    text = str(m["name"]) + f" v{m['version'] if m.get('version') is not None else '?'}"   # ?: alias unresolved
    return text + (f" @{m['alias']}" if m.get("alias") is not None else "")


def _health(b: dict[str, Any]) -> str:
    """"healthy" only with a health check; else "not checked" (the errors column tells the rest)."""
    health = b.get("health") or ("healthy" if b.get("healthy") else "unhealthy")
    return health.upper() if health in ("unhealthy", "ejected") else health


def format_status(doc: dict[str, Any]) -> str:
    """The `sidecar status` summary of /admin/status: routes, backends, rollouts, mirrors,
    drift, feedback; what is wrong in capitals or marked with `<-` (docs/reference/cli.md#status)."""
    state = "DRAINING" if doc.get("draining") else "ready" if doc.get("ready") else "starting"
    lines = [f"sidecar {doc.get('sidecar_version', '?')}  config {doc['version']}  up {doc['uptime_s']:.0f}s  "
             f"{state}  {doc['inflight']} in flight"]
    last = doc.get("last_reload")
    if last:
        lines.append(f"last reload: {last['result']} ({last['reason']}) -> {last['version']}")
        lines.extend(f"  error: {e}" for e in last.get("errors", []))
        lines.extend(f"  warning: {w}" for w in last.get("warnings", []))
    lines += ["", "ROUTES"]
    rows = [[r["name"], b, f"{r['weights'][b]:g}", f"{r['current_weights'][b]:g}", _pct(r["effective"][b]),
             "override" if r["override"] and not r.get("rollout") else ""]
            for r in doc["routes"] for b in r["backends"]]
    lines += _table(["ROUTE", "BACKEND", "CONFIGURED", "IN USE", "EFFECTIVE", ""], rows)

    lines += ["", "BACKENDS  (rate, mirror copies and errors: per second and failed tries over the last minute; "
                  "p50/p99: its last 2048 answers)"]
    rows = []
    for b in doc["backends"]:
        failing = (b.get("recent_error_rate") or 0) > ERROR_RATE_MARK or b.get("circuit") == "open"
        rows.append([b["name"], _model(b.get("model")), str(b.get("answers_total", b.get("requests", 0))),
                     _rate(b.get("answers_per_s")), _rate(b.get("mirrored_per_s")), _pct(b.get("recent_error_rate")),
                     _ms(b.get("p50_s")),
                     _ms(b.get("p99_s")), (b.get("circuit") or "-").upper() if b.get("circuit") == "open"
                     else b.get("circuit") or "-", _health(b), str(b["inflight"]), "<-" if failing else ""])
    lines += _table(["BACKEND", "MODEL", "REQUESTS", "RATE", "MIRRORED", "ERRORS", "P50", "P99", "CIRCUIT", "HEALTH",
                     "INFLIGHT", ""], rows)

    rollouts = [r for r in doc["routes"] if r.get("rollout")]
    lines += ["", "ROLLOUTS" + ("" if rollouts else ": none configured")]
    for r in rollouts:
        ro = r["rollout"]
        weights = " ".join(f"{b}={w}%" for b, w in ro["weights"].items())
        lines.append(f"  {r['name']}: {ro['state'].upper() if ro['state'] == 'rolled_back' else ro['state']}, "
                     f"step {ro['step'] + 1} of {len(ro['steps'])} ({' -> '.join(map(str, ro['steps']))}%), {weights}"
                     + (" [dry run]" if ro.get("dry_run") else "") + (f"; {ro['reason']}" if ro.get("reason") else ""))
        if (d := ro.get("last_decision")) is not None:
            lines.append(f"    last decision: {d['verdict']} -> {d['action']}: {d['reason']}")

    mirrors = doc.get("mirrors") or []
    lines += ["", "MIRRORS" + ("" if mirrors else ": none configured")]
    if mirrors:
        rows = []
        for m in mirrors:
            low = m.get("agreement") is not None and m["agreement"] < AGREEMENT_FLOOR
            agreement = _pct(m.get("agreement")) if m.get("compare") else "not compared"
            rows.append([m["route"], m["backend"], f"{m['percent']:g}%", str(m["sent"]), str(m["dropped"]),
                         str(m.get("compared", "-")), agreement, f"<- below {AGREEMENT_FLOOR:.0%}" if low else ""])
        lines += _table(["ROUTE", "SHADOW", "SHARE", "SENT", "DROPPED", "COMPARED", "AGREEMENT", ""], rows)

    drift = doc.get("drift") or []
    lines += ["", "DRIFT" + ("" if drift else ": none configured")]
    if drift:
        rows = [[d["route"], d["backend"], d["feature"], d.get("test") or "-", _num(d.get("p_value")),
                 _num(d.get("psi")), f"{d.get('n_ref', 0)}/{d.get('n_cur', 0)}",
                 "DRIFTED" if d.get("drifted") else "no drift" if d.get("drifted") is False
                 else d.get("status") or "waiting"]
                for d in sorted(drift, key=lambda d: not d.get("drifted"))]
        lines += _table(["ROUTE", "BACKEND", "FEATURE", "TEST", "P-VALUE", "PSI", "SAMPLES", "VERDICT"], rows)

    feedback = doc.get("feedback") or []
    lines += ["", "FEEDBACK" + ("" if feedback else ": none joined or configured")]
    if feedback:
        rows = [[f["route"], f["backend"], f["metric"],
                 _pct(f.get("value")) if f["metric"] == "accuracy" else _num(f.get("value")), str(f["count"])]
                for f in feedback]
        lines += _table(["ROUTE", "BACKEND", "METRIC", "VALUE", "JOINED"], rows)

    known = {"sidecar_version", "version", "config_path", "state_dir", "started_at", "uptime_s", "ready",
             "draining", "inflight", "last_reload", "routes", "backends", "rollout_decisions", "mirrors", "drift",
             "feedback"}
    for key, value in doc.items():
        if key not in known:
            lines += ["", f"{key.upper()}:", orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    code, doc = _admin_call(args, AdminClient.status)
    if code == 0:
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() if args.json else format_status(doc))
    return code


def cmd_reload(args: argparse.Namespace) -> int:
    code, doc = _admin_call(args, AdminClient.reload)
    if code == 0:
        if doc["result"] == "unchanged":
            print(f"config unchanged (version {doc['version']})")
        else:
            print(f"reloaded: {doc['previous_version']} -> {doc['version']}")
        for w in doc.get("warnings", []):
            print(f"  warning: {w}")
        for r in doc.get("cleared_overrides", []):
            print(f"  weight override of route {r} cleared (the route changed)")
    return code


def _parse_weights(pairs: Sequence[str]) -> dict[str, float] | None:
    """`["stable=0", "canary=100"]` -> weights; None (after a message) when a pair is malformed."""
    weights: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            weights[name] = float(value)
        except ValueError:
            print(f"error: expected BACKEND=WEIGHT, got {pair!r}", file=sys.stderr)
            return None
    return weights


def cmd_weights(args: argparse.Namespace) -> int:
    if args.clear:
        if args.weights:
            print("error: --clear takes no BACKEND=WEIGHT", file=sys.stderr)
            return 2
        code, doc = _admin_call(args, lambda c: c.clear_weights(args.route))
    else:
        if not args.weights:
            print("error: give BACKEND=WEIGHT pairs, or --clear", file=sys.stderr)
            return 2
        weights = _parse_weights(args.weights)
        if weights is None:
            return 2
        code, doc = _admin_call(args, lambda c: c.set_weights(args.route, weights))
    if code == 0:
        shares = ", ".join(f"{b}={doc['current_weights'][b]:g} ({_pct(doc['effective'][b])})"
                           for b in doc["backends"])
        what = "override" if doc["override"] else "configured weights"
        print(f"route {doc['name']}: {shares} [{what}]")
        if not doc.get("persisted", True):
            print("  warning: could not write state_dir; the override will not survive a restart",
                  file=sys.stderr)
    return code


ROLLOUT_ACTIONS = ("status", "pause", "resume", "promote", "rollback", "restart")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_rollout(doc: dict[str, Any]) -> str:
    """A rollout, readably: state, step, weights, and the last decision with each gate."""
    steps = doc["steps"]
    weights = ", ".join(f"{b}={w}" for b, w in doc["weights"].items())
    lines = [f"route {doc['route']}: rollout {doc['state']}" + (" [dry run]" if doc["dry_run"] else ""),
             f"  step      {doc['step']} of {len(steps)} ({steps[doc['step']]}%), steps {steps}",
             f"  weights   {weights}"]
    if doc.get("would_weights"):
        lines.append("  would set " + ", ".join(f"{b}={w}" for b, w in doc["would_weights"].items()))
    if doc["reason"]:
        lines.append(f"  reason    {doc['reason']}")
    lines.append(f"  actions   {', '.join(doc['actions'])}")
    if (m := doc.get("canary_model")) is not None:
        lines.append(f"  canary    {m['name']} version {m['version'] or '(unresolved)'}"
                     + (f" (@{m['alias']})" if m["alias"] else ""))
    if (reg := doc.get("registry")) is not None:   # docs/registry.md#what-a-rollout-writes
        lines.append(f"  registry  {reg['event']}: " + (reg["error"] or "written"))
        lines += [f"    {w['outcome']:8} {w['operation']} {w['key']}{'=' + w['value'] if w['value'] else ''} "
                  f"(version {w['version']}, {w['tries']} tries)" for w in reg["writes"]]
    decisions = doc.get("decisions") or []
    if decisions:
        d = decisions[-1]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["time"]))
        lines.append(f"  last decision ({when} UTC): {d['verdict']} -> {d['action']}: {d['reason']}")
        if d["gates"]:
            rows = [[g["gate"], _num(g["value"]), _num(g["threshold"]), g["verdict"], g["reason"]] for g in d["gates"]]
            lines += ["    " + line for line in _table(["gate", "value", "threshold", "verdict", "reason"], rows)]
    return "\n".join(lines)


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "status":
        code, doc = _admin_call(args, lambda c: c.rollout(args.route))
    else:
        code, doc = _admin_call(args, lambda c: c.rollout_action(args.route, args.action))
    if code == 0:
        print(format_rollout(doc))
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="A traffic manager for ML model servers.")
    p.add_argument("--version", action="version", version=f"model-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve (config: -c FILE or SIDECAR_CONFIG)")
    run.add_argument("-c", "--config", help="config file (default: SIDECAR_CONFIG)")
    run.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"], help="default: SIDECAR_LOG_LEVEL, else info")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a config file; print every error")
    val.add_argument("-c", "--config", help="config file (default: SIDECAR_CONFIG)")
    val.set_defaults(func=cmd_validate)

    sch = sub.add_parser("schema", help="print the config file's JSON Schema")
    sch.set_defaults(func=cmd_schema)

    ref = sub.add_parser("reference", help="build a drift reference file from a sample log")
    ref.add_argument("-c", "--config", help="config file (default: SIDECAR_CONFIG)")
    ref.add_argument("--log", action="append", required=True, help="sample log file(s), JSON lines")
    ref.add_argument("--route", required=True, help="the route whose features are read")
    ref.add_argument("--backend", help="only lines of this backend (default: all)")
    ref.add_argument("-o", "--output", required=True, help="the reference file to write (JSON)")
    ref.set_defaults(func=cmd_reference)

    demo = sub.add_parser("demo", help="start example model servers and the sidecar, drive traffic, show it")
    demo.add_argument("--duration", type=_demo_duration, default=60.0, metavar="DURATION",
                      help="how long the clients send traffic, e.g. 60s or 2m (default 60s; at least 10s)")
    demo.add_argument("--keep", action="store_true",
                      help="keep everything up afterwards, for `sidecar status` and the status page, until Ctrl-C")
    demo.set_defaults(func=cmd_demo)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--admin", default=default_admin(),
                        help="admin API URL (default: SIDECAR_ADMIN or http://127.0.0.1:9901)")
    client.add_argument("--token", default=default_token(), help="admin token (default: SIDECAR_ADMIN_TOKEN)")
    client.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the admin API (default 10)")

    st = sub.add_parser("status", parents=[client],
                        help="summarise a running sidecar: routes, backends, rollouts, mirrors, drift, feedback")
    st.add_argument("--json", action="store_true", help="print /admin/status as JSON")
    st.set_defaults(func=cmd_status)

    rl = sub.add_parser("reload", parents=[client], help="reload the config file of a running sidecar now")
    rl.set_defaults(func=cmd_reload)

    wt = sub.add_parser("weights", parents=[client],
                        help="override a route's weights at runtime, e.g. `weights fraud stable=0 canary=100`")
    wt.add_argument("route", help="a route name from the config")
    wt.add_argument("weights", nargs="*", metavar="BACKEND=WEIGHT", help="new weights; backends not named keep theirs")
    wt.add_argument("--clear", action="store_true", help="drop the override: back to the configured weights")
    wt.set_defaults(func=cmd_weights)

    ro = sub.add_parser("rollout", parents=[client],
                        help="show or steer a route's rollout, e.g. `rollout fraud pause`")
    ro.add_argument("route", help="a route name from the config")
    ro.add_argument("action", nargs="?", default="status", choices=ROLLOUT_ACTIONS,
                    help="status (default), pause, resume, promote, rollback or restart")
    ro.set_defaults(func=cmd_rollout)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run" and hasattr(signal, "SIGPIPE") and threading.current_thread() is threading.main_thread():
        # `sidecar schema | head` ends quietly; `run` keeps Python's default (a closed stdout
        # must not kill the server: the access log counts what it cannot write)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return int(args.func(args))
