"""The sample log writer: rotation, keep, bounded queue, and disk errors that never raise."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

from sidecar.config.plan import SampleLogPlan
from sidecar.shell.samplelog import SampleLog, rotated_name


def plan(path: Path, max_bytes: int = 1024, keep: int = 2) -> SampleLogPlan:
    return SampleLogPlan(path=path, sample=1.0, redact=(), max_bytes=max_bytes, keep=keep, fingerprint="x")


def wait(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def record(i: int) -> dict[str, object]:
    return {"request_id": f"r{i:04d}", "request": {"x": i, "pad": "p" * 60}}


def test_rotation_keeps_n_files_under_max_bytes(tmp_path: Path):
    """Past max_bytes the log rotates to .1, .2; older files are removed; no file exceeds the cap."""
    path = tmp_path / "samples.jsonl"
    log = SampleLog("r", plan(path, max_bytes=1024, keep=2))
    for i in range(100):
        assert log.put(record(i))
    wait(lambda: log.written == 100)
    log.close()
    log.join(5)
    files = [path, rotated_name(path, 1), rotated_name(path, 2)]
    assert all(f.exists() for f in files)
    assert not rotated_name(path, 3).exists()
    assert all(f.stat().st_size <= 1024 for f in files)
    # the newest lines are in `path`, older ones in .1, then .2; every line is whole JSON
    ids = [orjson.loads(line)["request_id"] for f in reversed(files) for line in f.read_bytes().splitlines()]
    assert ids == sorted(ids) and ids[-1] == "r0099"
    assert log.errors == 0 and log.dropped_total == 0


def test_keep_zero_keeps_only_the_current_file(tmp_path: Path):
    """With keep: 0 a full file is started afresh and nothing else is kept."""
    path = tmp_path / "s.jsonl"
    log = SampleLog("r", plan(path, max_bytes=1024, keep=0))
    for i in range(50):
        log.put(record(i))
    wait(lambda: log.written == 50)
    log.close()
    log.join(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]
    assert path.stat().st_size <= 1024


def test_full_queue_drops_and_counts(tmp_path: Path):
    """A full queue drops the record and counts it, without blocking the producer."""
    path = tmp_path / "s.jsonl"
    log = SampleLog("r", plan(path, max_bytes=10**6), max_queue=1)
    results = [log.put(record(i)) for i in range(500)]
    assert not all(results)
    wait(lambda: log.written + log.dropped_total == 500)
    assert log.dropped == results.count(False)
    log.close()
    log.join(5)


def test_unwritable_path_is_counted_never_raised(tmp_path: Path):
    """A path that cannot be opened (here: under a regular file) counts errors and lost lines."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log = SampleLog("r", plan(blocker / "s.jsonl"))
    for i in range(5):
        log.put(record(i))
    wait(lambda: log.dropped_total == 5)
    assert log.errors >= 1 and log.written == 0
    log.close()
    log.join(5)
    assert log.put(record(9)) is False  # closed: dropped and counted
    assert log.dropped_total == 6


def test_recovers_when_the_directory_appears(tmp_path: Path):
    """After a failed open the writer retries, so a log directory created later starts working."""
    d = tmp_path / "later"
    log = SampleLog("r", plan(d / "s.jsonl"))
    log.put(record(0))
    wait(lambda: log.dropped_total == 1)
    d.mkdir()
    time.sleep(1.1)  # RETRY_S
    log.put(record(1))
    wait(lambda: log.written == 1)
    log.close()
    log.join(5)
    assert [orjson.loads(x)["request_id"] for x in (d / "s.jsonl").read_bytes().splitlines()] == ["r0001"]
