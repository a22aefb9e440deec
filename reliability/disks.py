"""Disks that fail writes, for the sample-log and state-dir rows of the fault matrix.

`bad_disk("readonly")` and `bad_disk("full")` yield a `BadDisk`: a folder to put a state
dir in, a file path to put a sample log at, and how the fault was made (for the table).
The real thing is used when this process may mount (root with CAP_SYS_ADMIN, as in the
development sandbox): a 64 KiB tmpfs mounted read-only (EROFS), or one filled to the last
byte (ENOSPC). Otherwise:

- read-only: a folder with mode 0555 (EACCES) when not root; as root without mount rights
  (chmod does not stop root) a regular file where the folder should be (ENOTDIR);
- full: `/dev/full`, which accepts open() and answers every write with ENOSPC; as a state
  dir it is not a folder (mkdir fails: EEXIST).

Mounts are detached with `umount -l` on exit, so a sidecar still holding a file there does
not keep the mount busy; the folder is removed.

Imports: stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DiskKind = Literal["readonly", "full"]


@dataclass(frozen=True)
class BadDisk:
    folder: Path        # a state_dir here fails to write
    file: Path          # a sample log here fails to write
    how: str            # for the table: what the fault is made of, and the errno it gives


def _mount(target: Path, options: str) -> bool:
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _umount(target: Path) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=10, check=False)


@functools.cache
def can_mount() -> bool:
    """Whether this process may mount a tmpfs (tried once)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="sidecar-mount-probe-"))
    try:
        if not _mount(probe, "size=4k"):
            return False
        _umount(probe)
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _fill(folder: Path) -> None:
    """Write until the file system says ENOSPC."""
    with (folder / "filler").open("wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


@contextlib.contextmanager
def bad_disk(kind: DiskKind) -> Iterator[BadDisk]:
    root = Path(tempfile.mkdtemp(prefix=f"sidecar-{kind}-disk-"))
    mounted = False
    try:
        if can_mount():
            options = "ro,size=64k" if kind == "readonly" else "size=64k"
            mounted = _mount(root, options)
        if mounted:
            if kind == "full":
                _fill(root)
                yield BadDisk(root / "state", root / "samples.jsonl", "64 KiB tmpfs filled up: ENOSPC")
            else:
                yield BadDisk(root / "state", root / "samples.jsonl", "tmpfs mounted read-only: EROFS")
        elif kind == "full":
            yield BadDisk(Path("/dev/full"), Path("/dev/full"),
                          "/dev/full: ENOSPC on write (as state_dir: not a folder)")
        elif os.geteuid() != 0:
            root.chmod(0o555)
            yield BadDisk(root / "state", root / "samples.jsonl", "folder with mode 0555: EACCES")
        else:
            blocker = root / "not-a-folder"
            blocker.write_bytes(b"")
            yield BadDisk(blocker / "state", blocker / "samples.jsonl",
                          "a file where the folder should be (root ignores mode 0555): ENOTDIR")
    finally:
        if mounted:
            _umount(root)
        with contextlib.suppress(OSError):
            root.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
