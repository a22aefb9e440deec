"""At most one pass per key every `every_s`: the rate limit of repeated log lines.

Every degraded mode is counted each time and logged sometimes (Envoy's STYLE: a log and a
stat): the stat counts them all, and a `Throttle` decides which ones also make a log line.
One per owner (the proxy's per-route lines, the mirrors' drops, a sample log's write
errors), each used by one thread.

Time: `now` is monotonic seconds, passed in. The first call for a key always passes. Keys
are config names, so the map stays as small as the config.

Imports: standard library only.
"""

from __future__ import annotations

from collections.abc import Hashable


class Throttle:
    __slots__ = ("_last", "every_s")

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[Hashable, float] = {}

    def __repr__(self) -> str:
        return f"<Throttle every {self.every_s:g}s, {len(self._last)} keys>"

    def try_pass(self, now: float, key: Hashable = None) -> bool:
        """True (and the pass is recorded) when `key` has not passed in the last `every_s`."""
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self._last[key] = now
        return True
