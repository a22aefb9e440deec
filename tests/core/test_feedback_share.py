"""Feedback shared across a fleet, the pure parts: a prediction's record in the store, the
buckets it goes to and is looked up in, and when the shell calls the store."""

from __future__ import annotations

import math

import pytest

from sidecar.core.feedback import LocalPendingStore, Miss, Pending
from sidecar.core.feedback_share import MAX_BUCKETS, Buckets, Schedule, decode, encode


@pytest.mark.parametrize("predicted", [None, 0, 1, -(2**63), 2**63 - 1, 0.25, -1e100, "fraud", "façade ✓", ""])
@pytest.mark.parametrize("score", [None, 0.0, 0.91, 1e100])
def test_a_record_reads_back_as_the_prediction_it_was(predicted, score):
    p = Pending("canary", 12.5, predicted, score, (0, 3, -1))
    got = decode(encode(p), 99.0)
    assert got == Pending("canary", 99.0, predicted, score, (0, 3, -1))
    assert got is not None and type(got.predicted) is type(predicted)


def test_a_float_class_stays_a_float_and_an_int_an_int():
    """accuracy compares class keys: 1 and 1.0 must not trade places on the way through the store."""
    assert decode(encode(Pending("b", 0, 1.0, None, ())), 0).predicted.__class__ is float   # type: ignore[union-attr]
    assert decode(encode(Pending("b", 0, 1, None, ())), 0).predicted.__class__ is int       # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [b"", b"not json", b"{}", b"[1,2,3]", b'["b",null,null,[1.5]]',
                                 b'[1,null,null,[]]', b'["b",[1],null,[]]', b'["b",1,"x",[]]',
                                 b'["b",1,NaN,[]]', b'["b",1,null,{}]', b"\xff\xfe"])
def test_a_value_that_is_not_a_record_is_refused(raw):
    assert decode(raw, 0.0) is None


def test_buckets_keep_a_prediction_at_least_keep_and_find_it_all_that_time():
    b = Buckets.of(keep_s=600.0, sync_every_s=1.0)
    assert b.span_s == 600.0 / MAX_BUCKETS
    for handed in (0.0, 1764640000.3, 1764640037.49, 1764640075.0):
        bucket = b.bucket(handed)
        expires = b.expires_at_ms(bucket) / 1000
        assert handed + b.keep_s <= expires <= handed + b.keep_s + b.span_s + 1e-6
        # a label posted any time until it expires (and a span early, a clock ahead) looks there
        for later in (handed - b.span_s, handed, handed + 1, handed + b.keep_s / 2, expires - 1e-3):
            assert bucket in b.lookup(later), (handed, later)
    assert len(b.lookup(1764640000.0)) <= MAX_BUCKETS + 4


def test_short_keeps_use_spans_of_sync_every():
    b = Buckets.of(keep_s=2.0, sync_every_s=1.0)
    assert b.span_s == 1.0 and b.lookup(100.0) == [101, 100, 99, 98, 97, 96]
    with pytest.raises(ValueError, match="above 0"):
        Buckets.of(0, 1)


def test_schedule_hands_over_every_interval_and_backs_off_after_a_failure():
    s = Schedule(1.0)
    assert s.publish_due(10.0) and not s.publish_due(10.5) and s.publish_due(11.0)
    s.failed(11.2)
    assert not s.usable(11.5) and not s.publish_due(12.1)
    assert s.usable(12.2) and s.publish_due(12.2)
    with pytest.raises(ValueError, match="above 0"):
        Schedule(0)


def test_a_local_store_hands_over_its_pending_and_forgets_only_those():
    store = LocalPendingStore(keep_s=10.0, max_pending=100)
    store.add_many([(f"id{i}", Pending("stable", float(i), i % 2, 0.5, (i,))) for i in range(5)], 4.0)
    items = store.items()
    assert [rid for rid, _ in items] == [f"id{i}" for i in range(5)]
    assert [rid for rid, _ in store.items(2)] == ["id0", "id1"]      # a hand-over takes the oldest first
    assert items[3][1] == Pending("stable", 3.0, 1, 0.5, (3,))
    store.discard(["id1", "id3", "never"])
    assert [rid for rid, _ in store.items()] == ["id0", "id2", "id4"]
    got = store.join_many(["id1", "id2"], 5.0)
    assert isinstance(got[0], Miss) and got[0].outcome == "unknown"    # handed over: not joined here
    assert isinstance(got[1], Pending)
    c = store.counts()
    assert c.pending == 2 and c.expired_total == 0 and c.added_total == 5
    assert math.isclose(store.items()[0][1].at, 0.0)
