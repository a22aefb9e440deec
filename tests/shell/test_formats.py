"""The one timestamp format of the logs and the one lenient JSON reading of bodies."""

from __future__ import annotations

from sidecar.shell.formats import load_json, utc_iso


def test_timestamps_are_utc_with_milliseconds():
    """Log lines carry UTC times to the millisecond, truncated, with a Z."""
    assert utc_iso(0.0) == "1970-01-01T00:00:00.000Z"
    assert utc_iso(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"


def test_bodies_that_are_not_json_read_as_nothing():
    """An empty or non-JSON body reads as None, so every path finds nothing in it."""
    assert load_json(b'{"a": [1]}') == {"a": [1]}
    assert load_json(b"") is None and load_json(None) is None
    assert load_json(b"<html>") is None
