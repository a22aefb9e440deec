"""Build a drift reference file (`monitor.reference.file`) from sample log lines.

The `sidecar reference` command: read JSON lines written by shell/samplelog.py, keep those of
one route (and optionally one backend), extract the route's features with its compiled JSON
paths (request features from `request`, response features from `response` of answers with a
status under 400, as the monitor does), convert each value as a window would
(`core.window.as_number` / `as_category`; others skipped) and write the format of docs/monitoring.md#references:
`{"feature": [values, ...], ...}`. Redacted values ("[redacted]") are skipped: a redacted
feature gives an empty reference, so redact only what is not a feature.

Blocking file I/O: for the command line, never the event loop. The output is written
atomically through a random temp name (shell/files.py). Imports: stdlib, orjson,
sidecar.config, sidecar.core, sidecar.shell.files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.config.plan import Plan
from sidecar.core.window import as_category, as_number
from sidecar.shell.files import write_atomically

REDACTED: Final = "[redacted]"  # what shell/monitor.py writes in place of a redacted value


class ReferenceBuildError(Exception):
    """The reference cannot be built (unknown route, no features, unreadable log)."""


def build_reference(plan: Plan, route: str, logs: Sequence[str | Path], output: str | Path,
                    backend: str | None = None) -> dict[str, int]:
    """Write the reference file; return the number of values per feature."""
    r = plan.routes_by_name.get(route)
    if r is None:
        raise ReferenceBuildError(f"unknown route {route!r} (known: {', '.join(plan.routes_by_name)})")
    m = r.monitor
    if m is None or not m.features:
        raise ReferenceBuildError(f"route {route!r} has no monitor features")
    if backend is not None and backend not in r.backends:
        raise ReferenceBuildError(f"backend {backend!r} is not in route {route!r}'s split")
    values: dict[str, list[Any]] = {f.name: [] for f in m.features}
    for log_path in logs:
        try:
            with open(log_path, "rb") as fh:
                for line in fh:
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue  # a torn last line of a log being written
                    if not isinstance(rec, dict) or rec.get("route") != route:
                        continue
                    if backend is not None and rec.get("backend") != backend:
                        continue
                    status = rec.get("status")
                    answered = isinstance(status, int) and status < 400
                    for f in m.features:
                        if f.source == "request":
                            doc = rec.get("request")
                        elif answered:
                            doc = rec.get("response")
                        else:
                            continue
                        if doc is None:
                            continue
                        convert = as_category if f.categorical else as_number
                        values[f.name].extend(x for x in map(convert, f.path.find(doc))
                                              if x is not None and x != REDACTED)
        except OSError as e:
            raise ReferenceBuildError(f"cannot read {log_path}: {e.strerror or e}") from None
    out = Path(output)
    try:
        write_atomically(out, orjson.dumps(values), mode=0o644)   # never through a planted symlink
    except OSError as e:
        raise ReferenceBuildError(f"cannot write {out}: {e.strerror or e}") from None
    return {name: len(v) for name, v in values.items()}
