"""The sample log: JSON lines of sampled requests and responses, written by one thread.

Owns one log file (a route's `monitor.log`): a queue bounded by lines and by bytes, the one
writer thread that drains it, size-based rotation and the error policy. The producer is the
monitor's worker thread (shell/monitor.py), which has already parsed and redacted the
payloads; `put` serialises the record there (orjson), so that what waits in the queue is
the line's bytes, whose size is known. Nothing here runs on the event loop.

Line format (one JSON object per line):

    {"time": "2024-05-01T12:00:00.123Z", "request_id": "...", "route": "fraud",
     "backend": "canary", "model": "fraud" | null, "version": "7" | null, "status": 200,
     "request": {...} | null, "response": {...} | null}

`model` and `version` are the backend's (docs/registry.md) when the line is made.

`request`/`response` are the parsed bodies with the `redact` paths replaced by
"[redacted]"; null when a body was not JSON or (response) was not read whole.

Rotation: before a line would take the file past `max_bytes`, the file is renamed to
`path.1` (`path.1` to `path.2`, ... up to `keep`; the oldest is removed) and a new file is
started; `keep: 0` keeps no old file. A single line longer than `max_bytes` still goes out,
alone in its file.

The queue (a slow disk, a FIFO nobody reads, an NFS mount that hangs): lines wait while the
writer is behind, up to MAX_QUEUE lines and `max_queue_bytes` bytes (monitor.log, default
64 MiB). The bytes are counted from `put` until the writer has written or lost the line, so
the batch in the writer's hands (blocked in open() or write()) is inside the bound too. A
line that does not fit is dropped and counted by reason (`queue_full`: the line bound,
`queue_bytes`: the byte bound; a line longer than `max_queue_bytes` never fits), and a
warning is logged at most once per DROP_LOG_EVERY_S. The bound is read on every `put`, so a
reload changes it for the running writer (`retune`).

NOTE (approximation): the bound counts the lines' bytes, not the Python objects around them
(a bytes object adds 33 bytes; the queue a few pointers per line), and the writer joins at
most MAX_BATCH_BYTES (or one longer line) into one buffer for its write, a transient copy.

Errors: the disk is untrusted. An OSError (ENOSPC, EROFS, EACCES, ENOTDIR, ELOOP...) is
counted in `errors` (one per failed operation), logged at most once per LOG_EVERY_S, and the
lines of that batch are counted as lost (`write_error`); the file is reopened after RETRY_S.
The file is opened with O_NOFOLLOW: a symlink at `path` (planted where the sidecar writes)
is refused as an error, never written through; a FIFO or a file in a symlinked folder is
fine. Nothing ever raises into the proxy.

Counters are plain ints, each written by one thread only (see NOTE in `_count_lost`), and
read at scrape time: the producer's `dropped_*` and `_put_bytes`, the writer's `written`,
`errors`, `lost` and `_done_bytes`. The bytes queued are `_put_bytes - _done_bytes`: the
producer may read a stale `_done_bytes`, which only overstates the queue for a moment.

Imports: stdlib, orjson, sidecar.config.plan, sidecar.core.throttle.
"""

from __future__ import annotations

import contextlib
import errno
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
MAX_BATCH_BYTES: Final = 1024**2      # a batch stops growing past this (one longer line still goes alone)
LOG_EVERY_S: Final = 30.0
DROP_LOG_EVERY_S: Final = 5.0
RETRY_S: Final = 1.0
OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
# `reason` of sidecar_sample_log_dropped_total: a fixed enumeration (never request data)
DROP_REASONS: Final = ("queue_full", "queue_bytes", "write_error", "closed")
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
        self.written = 0          # lines written (writer thread)
        self.errors = 0           # failed file operations (writer thread)
        self.lost = 0             # lines lost: write errors (writer thread)
        self.dropped_full = 0     # lines dropped: MAX_QUEUE lines waiting (producer thread)
        self.dropped_bytes = 0    # lines dropped: max_queue_bytes would be passed (producer thread)
        self.dropped_closed = 0   # lines dropped: the log was closed (producer thread)
        self._put_bytes = 0       # bytes of the lines ever queued (producer thread)
        self._done_bytes = 0      # bytes of the lines written or lost (writer thread)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self._log_every = Throttle(LOG_EVERY_S)
        self._drop_log_every = Throttle(DROP_LOG_EVERY_S)  # producer thread, as _drops_unlogged
        self._drops_unlogged = 0
        self._thread = threading.Thread(target=self._run, name=f"sample-log-{route}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"SampleLog({self.route!r}, {str(self.plan.path)!r}, written={self.written}, "
                f"dropped={self.dropped_total}, queued_bytes={self.queued_bytes}, errors={self.errors})")

    @property
    def dropped(self) -> int:
        """Lines the producer could not queue (every reason but write errors)."""
        return self.dropped_full + self.dropped_bytes + self.dropped_closed

    @property
    def dropped_total(self) -> int:
        return self.dropped + self.lost

    def dropped_by_reason(self) -> dict[str, int]:
        """For sidecar_sample_log_dropped_total{reason}: every reason of DROP_REASONS."""
        return {"queue_full": self.dropped_full, "queue_bytes": self.dropped_bytes,
                "write_error": self.lost, "closed": self.dropped_closed}

    @property
    def queued_bytes(self) -> int:
        """Bytes of the lines queued or in the writer's hands (at most `max_queue_bytes`)."""
        return self._put_bytes - self._done_bytes

    def retune(self, plan: SampleLogPlan) -> None:
        """Take a reloaded plan that differs only in `max_queue_bytes` (same fingerprint)."""
        assert plan.fingerprint == self.plan.fingerprint and plan.path == self.plan.path
        self.plan = plan   # one reference swap: put() reads the bound, the writer path/max_bytes/keep

    def put(self, record: dict[str, Any]) -> bool:
        """Serialise and queue one record; False (and counted) when it does not fit or the log closed."""
        if self._closing.is_set():
            self.dropped_closed += 1
            return False
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        if self.queued_bytes + len(line) > self.plan.max_queue_bytes:
            self.dropped_bytes += 1
            self._dropped_now("queue_bytes")
            return False
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped_full += 1
            self._dropped_now("queue_full")
            return False
        self._put_bytes += len(line)
        return True

    def _dropped_now(self, reason: str) -> None:
        self._drops_unlogged += 1
        if self._drop_log_every.try_pass(time.monotonic()):
            n, self._drops_unlogged = self._drops_unlogged, 0
            log.warning("sample log %s (route %s): the writer is behind; %d line(s) dropped since the last warning "
                        "(last reason %s; %d bytes wait; bounds: %d lines, max_queue_bytes %d); counted in "
                        "sidecar_sample_log_dropped_total, the proxy keeps serving",
                        self.plan.path, self.route, n, reason, self.queued_bytes, self._queue.maxsize,
                        self.plan.max_queue_bytes)

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
                size = len(first) if isinstance(first, bytes) else 0
                while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                    size += len(item) if isinstance(item, bytes) else 0
                stop = any(r is _STOP for r in batch)
                lines = [r for r in batch if isinstance(r, bytes)]
                try:
                    self._write(lines)
                finally:   # written or lost: out of the queue's bytes either way
                    self._done_bytes += sum(map(len, lines))
                if stop:
                    return
        finally:
            self._close_fd()

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
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
        view = memoryview(lines[0] if len(lines) == 1 else b"".join(lines))
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]
        self.written += len(lines)

    def _open(self) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._fd = os.open(self.plan.path, OPEN_FLAGS, 0o640)
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
        # NOTE: `lost` (and `_done_bytes`) are written by this thread only and `dropped_*` (and
        # `_put_bytes`) by the producer only, so no increment is ever lost to a race.
        self.lost += n

    def _failed(self, what: str, e: OSError) -> None:
        self.errors += 1
        if self._log_every.try_pass(time.monotonic()):
            hint = " (the path is a symlink: the sample log never writes through one)" \
                if e.errno == errno.ELOOP else ""
            log.warning("sample log %s (route %s): %s failed: %s%s; lines are dropped and counted "
                        "(sidecar_sample_log_errors_total), the proxy keeps serving",
                        self.plan.path, self.route, what, e, hint)
