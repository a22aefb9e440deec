"""Whole-file writes that are atomic and never follow a link planted where they write.

`write_atomically(path, data)`: the new content goes to a temp file made by
`tempfile.mkstemp` in `path`'s folder (O_CREAT|O_EXCL, a random name, mode 0600 until
`mode` is set by fchmod: it can be neither an existing file nor a symlink someone planted),
is fsynced, renamed over `path` (rename replaces a symlink at `path` itself, never its
target), and the folder is fsynced. A crash leaves the old file or the new one; a failure
removes the temp file and raises OSError.

`Snapshots`: which generation of an owner's in-memory state is on disk, so that the newest
one is written once and an older one never after it. Users: shell/state.py
(`state_dir/state.json`) and shell/rollout_driver.py (`state_dir/rollouts.json`).

Users of `write_atomically`: those two (0600) and shell/reference.py (the `sidecar reference`
output, 0644). The sample log appends to one file and opens it with
O_NOFOLLOW instead (shell/samplelog.py).

`write_atomically` blocks: call it through `asyncio.to_thread` on the loop (`Snapshots.save`
does). Imports: stdlib.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """temp (mkstemp) + write + fsync + rename over `path` + fsync of the folder. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Snapshots:
    """The generations of an owner's state and the one on disk. The owner calls `changed()` on
    every change and `await save(path, render)` when it wants the state kept; `render` makes the
    file's bytes from the state as it is then. A save whose generation a newer save already
    wrote is skipped; without a path nothing is written (and nothing stays dirty)."""

    def __init__(self) -> None:
        self._generation = 0   # bumped per change
        self._written = 0      # the generation on disk
        self._lock = asyncio.Lock()

    def changed(self) -> None:
        self._generation += 1

    @property
    def dirty(self) -> bool:
        return self._generation != self._written

    async def save(self, path: Path | None, render: Callable[[], bytes]) -> None:
        """Write the newest snapshot atomically, off the loop. Raises OSError (it stays dirty)."""
        if path is None:
            self._written = self._generation
            return
        async with self._lock:
            generation = self._generation
            if generation == self._written:
                return   # a newer save already wrote this snapshot
            await asyncio.to_thread(write_atomically, path, render())
            self._written = generation
