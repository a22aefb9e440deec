"""Formats the shell's writers and readers share, each defined once.

- `utc_iso(t)`: the timestamp of the access log and the sample log's `time` field:
  `2024-05-01T12:00:00.123Z` (UTC, milliseconds, truncated).
- `load_json(body)`: a body as JSON, leniently: None when it is empty or not JSON, so every
  path finds nothing in it (a missing sample, a missing comparison value) and a log shows
  null. Used by mirror comparison and by the monitor's features and sample log.

Imports: stdlib, orjson.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def utc_iso(t: float) -> str:
    """Wall-clock seconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def load_json(body: bytes | None) -> Any:
    """The JSON document of a body, or None when there is none (empty, or not JSON)."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
