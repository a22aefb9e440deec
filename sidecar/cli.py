"""The `sidecar` command: run, validate, schema, demo (SPEC 7).

Exit codes: 0 success; 1 an invalid config or a drain that had to cut requests; 2 usage.
Imports: everything below it (core, config, shell, demo).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Sequence

import orjson

from sidecar import __version__
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
    for r in cfg.routes:
        split = ", ".join(f"{b}={w:g}" for b, w in r.split.items())
        print(f"  route {r.name}: {r.match.path_prefix} -> {split}")
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
    from sidecar.shell.server import Sidecar

    async def main() -> int:
        return await Sidecar(loaded, install_signals=True).run()

    return _run_loop(main())


def _run_loop(coro: object) -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return int(runner.run(coro))  # type: ignore[arg-type]


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo.run import run_demo

    return _run_loop(run_demo(seconds=args.seconds))


def cmd_reference(args: argparse.Namespace) -> int:
    """Issue 6: build a drift reference file from sample log lines (docs/monitoring.md)."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidecar", description="A traffic manager for ML model servers.")
    p.add_argument("--version", action="version", version=f"model-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve (config: -c FILE or SIDECAR_CONFIG)")
    run.add_argument("-c", "--config")
    run.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", help="check a config file; print every error")
    val.add_argument("-c", "--config")
    val.set_defaults(func=cmd_validate)

    sch = sub.add_parser("schema", help="print the config file's JSON Schema")
    sch.set_defaults(func=cmd_schema)

    ref = sub.add_parser("reference", help="build a drift reference file from a sample log (issue 6)")
    ref.add_argument("-c", "--config")
    ref.add_argument("--log", action="append", required=True, help="sample log file(s), JSON lines")
    ref.add_argument("--route", required=True)
    ref.add_argument("--backend", help="only lines of this backend (default: all)")
    ref.add_argument("-o", "--output", required=True)
    ref.set_defaults(func=cmd_reference)

    demo = sub.add_parser("demo", help="start example model servers and the sidecar, drive traffic, show it")
    demo.add_argument("--seconds", type=float, default=8.0)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
