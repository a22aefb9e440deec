"""The access log: one JSON line per request on stdout, written off the event loop.

The hot path only appends a tuple to a list (no formatting, no I/O). A flusher task wakes
every `FLUSH_S` and hands the batch to one writer thread, which formats it with orjson and
writes it to stdout with a single `os.write` loop. The pending list is bounded: past
`MAX_PENDING` lines (the writer cannot keep up, stdout is blocked) lines are dropped and
counted in `sidecar_access_log_dropped_total`, never queued without bound.

Each line names the backend's `model` and `version` (docs/registry.md): the writer reads them
from `models` (backend -> ModelRef, swapped whole by shell/registry.py), so the hot path
carries nothing more.

Imports: stdlib, orjson, sidecar.core.registry, sidecar.shell.formats/metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import orjson

from sidecar.core.registry import ModelRef
from sidecar.shell.formats import utc_iso
from sidecar.shell.metrics import Cell

FLUSH_S: Final = 0.2
MAX_PENDING: Final = 50_000

# field order of a record tuple; the writer thread zips them into a JSON object
FIELDS: Final = ("time", "request_id", "method", "path", "route", "backend", "status", "attempts",
                 "duration_s", "upstream_s", "ttfb_s", "bytes_in", "bytes_out", "error", "trace_id")

Record = tuple[float, str, str, str, str, str, int, int, float, float | None, float | None, int, int,
               str | None, str | None]


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`), else None."""
    if traceparent and len(traceparent) >= 55 and traceparent[2] == "-" and traceparent[35] == "-":
        tid = traceparent[3:35]
        if tid != "0" * 32 and all(c in "0123456789abcdef" for c in tid):
            return tid
    return None


def _format(batch: list[Record], models: Mapping[str, ModelRef]) -> bytes:
    out = []
    for rec in batch:
        d = dict(zip(FIELDS, rec, strict=True))
        m = models.get(rec[5])
        d["model"], d["version"] = (m.name, m.version) if m is not None else (None, None)
        t = rec[0]
        for k in ("duration_s", "upstream_s", "ttfb_s"):
            v = d[k]
            if isinstance(v, float):
                d[k] = round(v, 6)
        d["trace_id"] = trace_id(rec[14])  # the raw traceparent header; parsed here, off the loop
        d["time"] = utc_iso(t)
        out.append(orjson.dumps(d, option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class AccessLog:
    __slots__ = ("_dropped", "_executor", "_fd", "_pending", "models")

    def __init__(self, dropped: Cell, fd: int | None = None) -> None:
        self._pending: list[Record] = []
        self._dropped = dropped
        self._fd = sys.stdout.fileno() if fd is None else fd
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="access-log")
        self.models: Mapping[str, ModelRef] = {}   # set by shell/services.py from the registry

    def add(self, record: Record) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._dropped.value += 1
            return
        self._pending.append(record)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(self._executor, _format, batch, self.models)
            await loop.run_in_executor(self._executor, _write_all, self._fd, data)

    async def run(self) -> None:
        """Flush forever (owned by the server's TaskGroup); a failed write is counted, not fatal."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                try:
                    await self._flush()
                except OSError:
                    self._dropped.value += 1
        finally:
            with contextlib.suppress(OSError):
                await asyncio.shield(self._flush())
            self._executor.shutdown(wait=False)
