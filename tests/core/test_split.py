"""Properties of the weighted split and sticky weighted rendezvous hashing."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.split import Split, key_hash

names = ["a", "b", "c", "d", "e"]
weight_lists = st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), min_size=1, max_size=5).filter(
    lambda ws: sum(ws) > 0.01 * max(ws) > 0)


@settings(max_examples=60, deadline=None)
@given(weight_lists, st.integers(0, 2**32))
def test_random_pick_respects_weights(weights, seed):
    """Over 4000 random picks each backend's share is within 5 sigma of its weight share."""
    split = Split(list(zip(names, weights, strict=False)))
    rng = random.Random(seed)
    n = 4000
    counts = [0] * len(weights)
    for _ in range(n):
        i = split.pick_random(rng.random())
        assert i is not None
        counts[i] += 1
    total = sum(weights)
    for c, w in zip(counts, weights, strict=True):
        p = w / total
        assert abs(c - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1
        if w == 0:
            assert c == 0


@settings(max_examples=60, deadline=None)
@given(weight_lists)
def test_sticky_pick_respects_weights(weights):
    """Over 4000 distinct keys the sticky assignment follows the weights within 5 sigma."""
    split = Split(list(zip(names, weights, strict=False)))
    n = 4000
    counts = [0] * len(weights)
    for k in range(n):
        i = split.pick_sticky(key_hash(f"user-{k}"))
        assert i is not None
        counts[i] += 1
    total = sum(weights)
    for c, w in zip(counts, weights, strict=True):
        p = w / total
        assert abs(c - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1


@settings(max_examples=200, deadline=None)
@given(weight_lists, st.data())
def test_sticky_is_monotone_when_a_weight_grows(weights, data):
    """When one backend's weight grows and others stay or shrink, no key on it moves away."""
    grow = data.draw(st.integers(0, len(weights) - 1))
    factor = data.draw(st.floats(min_value=1.0, max_value=100.0))
    shrink = data.draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=len(weights),
                                max_size=len(weights)))
    new = [w * factor if i == grow else w * s for i, (w, s) in enumerate(zip(weights, shrink, strict=True))]
    if weights[grow] == 0 or sum(new) <= 0:
        return
    before, after = Split(list(zip(names, weights, strict=False))), Split(list(zip(names, new, strict=False)))
    for k in range(300):
        h = key_hash(f"k{k}")
        if before.pick_sticky(h) == grow:
            assert after.pick_sticky(h) == grow


def test_sticky_is_deterministic_across_processes():
    """A key's hash is fixed (blake2b), so every replica of a fleet agrees on its backend."""
    import hashlib

    assert key_hash("user-42") == int.from_bytes(hashlib.blake2b(b"user-42", digest_size=8).digest(), "little")
    split = Split([("stable", 90), ("canary", 10)])
    assert [split.pick_sticky(key_hash(f"u{i}")) for i in range(10)] == [
        split.pick_sticky(key_hash(f"u{i}")) for i in range(10)]


def test_unavailable_backends_are_left_out_and_only_their_keys_move():
    """Leaving a backend out renormalises the rest; keys on other backends stay put."""
    split = Split([("a", 1), ("b", 1), ("c", 1)])
    rng = random.Random(1)
    assert all(split.pick_random(rng.random(), [True, False, True]) in (0, 2) for _ in range(500))
    assert split.pick_random(0.5, [False, False, False]) is None
    for k in range(300):
        h = key_hash(str(k))
        full = split.pick_sticky(h)
        part = split.pick_sticky(h, [True, False, True])
        if full != 1:
            assert part == full
    assert split.shares([True, False, True]) == [0.5, 0.0, 0.5]


def test_random_pick_edges():
    """r close to 1 never picks a zero-weight backend at the end."""
    split = Split([("a", 1), ("b", 0)])
    assert split.pick_random(0.9999999999999999) == 0
    assert split.pick_random(0.0) == 0
