"""Weighted backend choice for a route: random by weight, or sticky by key.

Sticky choice is weighted rendezvous hashing (Schindelhauer & Schomaker, "Weighted
distributed hash tables"): every backend b gets the score  w_b / -ln(u(key, b)),  u uniform
in (0, 1) and derived from a hash of the key and the backend's name; the highest score wins.
Invariants this gives, which the tests check as properties:

- weights are respected: P(b wins) = w_b / sum(w);
- monotone: when w_b grows and the other weights stay or shrink, b's score grows and every
  other score stays or shrinks, so no key on b moves away (docs/reference/http.md#the-split);
- deterministic across processes and restarts (blake2b + splitmix64, never `hash()`), so
  every replica of a fleet puts a key on the same backend;
- removing a backend (circuit open, unhealthy) only moves the keys that were on it.

Imports: stdlib only. Random numbers come in as floats in [0, 1).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

_M64 = (1 << 64) - 1
_TWO64 = float(1 << 64)


def key_hash(key: str | bytes) -> int:
    """A stable 64-bit hash of a sticky key or a backend name."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    """splitmix64's finaliser: spreads (key hash XOR backend seed) over 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Split:
    """The weights of one route, compiled once; picks are O(log n) random or O(n) sticky."""

    __slots__ = ("_cum", "_seeds", "_total", "names", "weights")

    def __init__(self, weights: Sequence[tuple[str, float]]) -> None:
        assert weights, "a split needs at least one backend"
        self.names: tuple[str, ...] = tuple(n for n, _ in weights)
        self.weights: tuple[float, ...] = tuple(float(w) for _, w in weights)
        assert all(w >= 0 for w in self.weights) and 0 < sum(self.weights) < math.inf
        self._cum = list(accumulate(self.weights))
        self._total = self._cum[-1]
        self._seeds = tuple(key_hash(n) for n in self.names)

    def __repr__(self) -> str:
        return f"Split({dict(zip(self.names, self.weights, strict=True))})"

    def shares(self, available: Sequence[bool] | None = None) -> list[float]:
        """Effective share of each backend (0..1) after leaving out unavailable ones."""
        ws = self.weights if available is None else [
            w if ok else 0.0 for w, ok in zip(self.weights, available, strict=True)
        ]
        total = sum(ws)
        return [w / total if total > 0 else 0.0 for w in ws]

    def pick_random(self, r: float, available: Sequence[bool] | None = None) -> int | None:
        """Index of a backend chosen by weight with r in [0, 1); None when nothing is left."""
        if available is None:
            i = bisect_right(self._cum, r * self._total)
            # r * total can round up to total itself; the last positive weight takes it
            while i >= len(self._cum) or self.weights[i] == 0:
                i -= 1
            return i
        total = 0.0
        for w, ok in zip(self.weights, available, strict=True):
            if ok:
                total += w
        if total <= 0:
            return None
        x = r * total
        last = None
        for i, (w, ok) in enumerate(zip(self.weights, available, strict=True)):
            if ok and w > 0:
                last = i
                x -= w
                if x < 0:
                    return i
        return last

    def pick_sticky(self, h: int, available: Sequence[bool] | None = None) -> int | None:
        """Index of the backend whose weighted rendezvous score for key hash `h` is highest."""
        best, best_score = None, -1.0
        for i, w in enumerate(self.weights):
            if w <= 0 or (available is not None and not available[i]):
                continue
            u = (_mix(h ^ self._seeds[i]) + 0.5) / _TWO64  # in (0, 1), never 0 or 1
            score = w / -math.log(u)
            if score > best_score:
                best, best_score = i, score
        return best
