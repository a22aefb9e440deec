"""Whole-file writes that are atomic and never follow a link planted where they write.

`write_atomically(path, data)`: the new content goes to a temp file made by
`tempfile.mkstemp` in `path`'s folder (O_CREAT|O_EXCL, a random name, mode 0600 until
`mode` is set by fchmod: it can be neither an existing file nor a symlink someone planted),
is fsynced, renamed over `path` (rename replaces a symlink at `path` itself, never its
target), and the folder is fsynced. A crash leaves the old file or the new one; a failure
removes the temp file and raises OSError.

Users: shell/state.py (`state_dir/state.json`, 0600) and shell/reference.py (the
`sidecar reference` output, 0644). The sample log appends to one file and opens it with
O_NOFOLLOW instead (shell/samplelog.py).

Blocking: call it through `asyncio.to_thread` on the loop. Imports: stdlib.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
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
