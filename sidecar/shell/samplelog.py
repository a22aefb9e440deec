"""The sample log: JSON lines of sampled requests and responses, written by one thread.

Owns one log file (a route's `monitor.log`): a bounded queue, the one writer thread that
drains it, size-based rotation and the error policy. The producer is the monitor's worker
thread (shell/monitor.py), which has already parsed and redacted the payloads; this module
only serialises (orjson) and writes. Nothing here runs on the event loop.

Line format (one JSON object per line):

    {"time": "2024-05-01T12:00:00.123Z", "request_id": "...", "route": "fraud",
     "backend": "canary", "status": 200, "request": {...} | null, "response": {...} | null}

`request`/`response` are the parsed bodies with the `redact` paths replaced by
"[redacted]"; null when a body was not JSON or (response) was not read whole.

Rotation: before a line would take the file past `max_bytes`, the file is renamed to
`path.1` (`path.1` to `path.2`, ... up to `keep`; the oldest is removed) and a new file is
started; `keep: 0` keeps no old file. A single line longer than `max_bytes` still goes out,
alone in its file.

Errors: the disk is untrusted. An OSError (ENOSPC, EROFS, EACCES, ENOTDIR...) is counted in
`errors` (one per failed operation), logged at most once per LOG_EVERY_S, and the lines of
that batch are counted in `dropped`; the file is reopened after RETRY_S. A full queue drops
the line and counts it in `dropped`. Nothing ever raises into the proxy.

Counters are plain ints, each written by one thread only (`dropped` by the producer and by
the writer for lost batches: see NOTE in `_count_lost`), and read at scrape time.

Imports: stdlib, orjson, sidecar.config.plan, sidecar.core.throttle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.config.plan import SampleLogPlan
from sidecar.core.throttle import Throttle

log = logging.getLogger("sidecar.samplelog")

MAX_QUEUE: Final = 10_000
MAX_BATCH: Final = 512
LOG_EVERY_S: Final = 30.0
RETRY_S: Final = 1.0
_STOP: Final = object()


class _ReopenFailed(OSError):
    """Rotation could not open the new file (already counted and logged by `_open`)."""


def rotated_name(path: Path, i: int) -> Path:
    """`samples.jsonl` -> `samples.jsonl.1` (the most recent rotated file) ... `.keep`."""
    return path.with_name(f"{path.name}.{i}")


class SampleLog:
    """One log file and its writer thread. `put` from any one thread; `close` from the loop."""

    def __init__(self, route: str, plan: SampleLogPlan, max_queue: int = MAX_QUEUE) -> None:
        self.route = route
        self.plan = plan
        self.written = 0        # lines written (writer thread)
        self.errors = 0         # failed file operations (writer thread)
        self.dropped = 0        # lines lost: queue full (producer thread)
        self.lost = 0           # lines lost: write errors (writer thread)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self._log_every = Throttle(LOG_EVERY_S)
        self._thread = threading.Thread(target=self._run, name=f"sample-log-{route}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"SampleLog({self.route!r}, {str(self.plan.path)!r}, written={self.written}, "
                f"dropped={self.dropped + self.lost}, errors={self.errors})")

    @property
    def dropped_total(self) -> int:
        return self.dropped + self.lost

    def put(self, record: dict[str, Any]) -> bool:
        """Queue one record; False (and counted) when the queue is full or the log closed."""
        if self._closing.is_set():
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        """Ask the writer to finish what is queued and stop. Never blocks."""
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_STOP)

    def join(self, timeout_s: float) -> None:
        """Blocking: wait for the writer to end (call from a thread, not the loop)."""
        self._thread.join(timeout_s)

    # -- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    first = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(r is _STOP for r in batch)
                self._write([r for r in batch if r is not _STOP])
                if stop:
                    return
        finally:
            self._close_fd()

    def _write(self, records: list[Any]) -> None:
        if not records:
            return
        lines = [orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records]
        if self._fd is None and not self._open():
            self._count_lost(len(lines))
            return
        pending: list[bytes] = []
        pending_size = 0
        done = 0
        try:
            for line in lines:
                if self._size + pending_size + len(line) > self.plan.max_bytes and self._size + pending_size > 0:
                    self._flush(pending)
                    done += len(pending)
                    pending, pending_size = [], 0
                    self._rotate()
                pending.append(line)
                pending_size += len(line)
            self._flush(pending)
            done += len(pending)
        except OSError as e:
            if not isinstance(e, _ReopenFailed):
                self._failed("write", e)
            self._count_lost(len(lines) - done)
            self._close_fd()
            self._retry_at = time.monotonic() + RETRY_S

    def _flush(self, lines: list[bytes]) -> None:
        if not lines:
            return
        assert self._fd is not None
        view = memoryview(b"".join(lines))
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]
        self.written += len(lines)

    def _open(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._fd = os.open(self.plan.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            self._failed("open", e)
            self._close_fd()
            self._retry_at = time.monotonic() + RETRY_S
            return False
        return True

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.keep (dropped); then a fresh path. Raises OSError."""
        self._close_fd()
        path, keep = self.plan.path, self.plan.keep
        if keep == 0:
            path.unlink(missing_ok=True)
        else:
            rotated_name(path, keep).unlink(missing_ok=True)
            for i in range(keep - 1, 0, -1):
                src = rotated_name(path, i)
                if src.exists():
                    src.replace(rotated_name(path, i + 1))
            path.replace(rotated_name(path, 1))
        if not self._open():
            raise _ReopenFailed(f"cannot reopen {path} after rotation")

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _count_lost(self, n: int) -> None:
        # NOTE: `lost` is written by this thread only and `dropped` by the producer only, so
        # no increment is ever lost to a race; the metric reports their sum.
        self.lost += n

    def _failed(self, what: str, e: OSError) -> None:
        self.errors += 1
        if self._log_every.try_pass(time.monotonic()):
            log.warning("sample log %s (route %s): %s failed: %s; lines are dropped and counted "
                        "(sidecar_sample_log_errors_total), the proxy keeps serving",
                        self.plan.path, self.route, what, e)
