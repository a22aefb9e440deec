"""Shadow agreement: does a shadow's answer match the primary's, within tolerance?

Owns the comparison rule (`compare_values`), the rolling agreement ratio behind
`mirror_agreement_ratio` and `/admin/mirrors` (`AgreementWindow`), and the bounded list of
recent disagreements shown there (`DisagreementLog`). The mirror shell evaluates
`mirror.compare.path` (sidecar.core.jsonpath) on both answers, calls `compare_values`, records
the verdict, and redacts values before adding a `Disagreement` (docs/reference/admin-api.md#mirrors: "redacted as the
sample log is"); nothing here redacts, awaits or reads a clock.

The rule (docs/shadow.md#comparison-rules): a request agrees when every compared element
does. Elements are compared by kind:

- numbers (int or float, never bool): equal, or |a-b| <= tolerance (absolute), or, when
  rel_tolerance > 0, |a-b| <= rel_tolerance * max(|a|, |b|). NaN never agrees, not even
  with NaN; an infinity agrees only with the same infinity. For floats the absolute test
  allows a few ulps of slack (see NOTE in `_numbers_agree`), so `tolerance: 0.01` accepts
  0.5 vs 0.51;
- strings, bools and None: by equality, and a bool is never equal to a number;
- lists: same length, element by element; dicts: same keys, value by value; both by the
  same rules, recursively (depth of the answer, which a JSON parser already bounded).

Imports: standard library only.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

_INF: Final = float("inf")
_ULP_SLACK: Final = 4 * sys.float_info.epsilon


class Verdict(StrEnum):
    """What comparing one mirrored request came to."""

    AGREE = "agree"
    DISAGREE = "disagree"
    MISSING = "missing"  # the path found nothing on either side: nothing to compare


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _numbers_agree(a: int | float, b: int | float, tolerance: float, rel_tolerance: float) -> bool:
    if a == b:  # exact, also for huge ints and equal infinities; False for NaN
        return True
    try:
        diff = abs(a - b)
        # NaN (diff != diff) and infinite differences never agree (inf <= rel * inf would hold)
        if diff != diff or diff == _INF:
            return False
        if diff <= tolerance:
            return True
        scale = max(abs(a), abs(b))
        # NOTE: float subtraction is off by an ulp or so, and 0.51 - 0.5 is
        # 0.010000000000000009: without this slack a difference of exactly `tolerance` in
        # decimal would disagree. Floats only: ints subtract exactly.
        if (isinstance(a, float) or isinstance(b, float)) and diff <= tolerance + _ULP_SLACK * scale:
            return True
        return rel_tolerance > 0 and diff <= rel_tolerance * scale
    except OverflowError:
        # an int beyond float range meeting a float: not a model's answer; call it different
        return False


def _agree(a: Any, b: Any, tolerance: float, rel_tolerance: float) -> bool:
    """One pair of values, by the rules of the module docstring."""
    if _is_number(a):
        return _is_number(b) and _numbers_agree(a, b, tolerance, rel_tolerance)
    if _is_number(b):
        return False
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_agree(x, y, tolerance, rel_tolerance) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_agree(v, b[k], tolerance, rel_tolerance) for k, v in a.items())
        )
    if isinstance(b, (list, dict)):
        return False
    # str, bool, None: numbers are handled above, so True == 1 cannot sneak through here
    return bool(a == b)


def compare_values(
    primary: list[Any], shadow: list[Any], tolerance: float, rel_tolerance: float = 0.0
) -> Verdict:
    """Verdict for the values one path found in the primary's and the shadow's answers.

    Both empty: MISSING (not counted in the agreement ratio). One empty, or different
    lengths: DISAGREE. Otherwise AGREE when every pair agrees.
    """
    if not primary:
        return Verdict.MISSING if not shadow else Verdict.DISAGREE
    if len(primary) != len(shadow):
        return Verdict.DISAGREE
    for a, b in zip(primary, shadow, strict=True):
        if not _agree(a, b, tolerance, rel_tolerance):
            return Verdict.DISAGREE
    return Verdict.AGREE


@dataclass(frozen=True, slots=True)
class Disagreement:
    """One mirrored request whose answers differed, as `/admin/mirrors` lists it.

    `primary` and `shadow` are the values the path found (already redacted by the caller);
    `at` is wall-clock time (epoch seconds), since it is shown to people.
    """

    request_id: str
    path: str
    primary: Any
    shadow: Any
    at: float


class AgreementWindow:
    """Share of agreeing requests over the last `size` compared ones, plus lifetime totals.

    MISSING verdicts are not comparisons and do not enter the window. A ring of 0/1 bytes
    and a running sum make `record` and `ratio` O(1).
    """

    __slots__ = (
        "_agreed_in_window",
        "_count",
        "_next",
        "_ring",
        "agreed_total",
        "disagreed_total",
        "missing_total",
    )

    def __init__(self, size: int = 1000) -> None:
        if size < 1:
            raise ValueError(f"an agreement window needs size >= 1, got {size}")
        self._ring = bytearray(size)
        self._next = 0  # slot the next record goes into (the oldest once the ring is full)
        self._count = 0
        self._agreed_in_window = 0
        self.agreed_total = 0
        self.disagreed_total = 0
        self.missing_total = 0  # only counted by record_verdict

    def __repr__(self) -> str:
        return f"AgreementWindow(size={self.size}, count={self._count}, ratio={self.ratio})"

    @property
    def size(self) -> int:
        return len(self._ring)

    @property
    def count(self) -> int:
        """How many verdicts the window holds now (at most `size`)."""
        return self._count

    @property
    def ratio(self) -> float | None:
        """Agreeing share (0 to 1) of the verdicts in the window; None before the first."""
        return self._agreed_in_window / self._count if self._count else None

    def record(self, agreed: bool) -> None:
        """Add one compared request, pushing out the oldest once the window is full."""
        bit = 1 if agreed else 0
        ring = self._ring
        i = self._next
        if self._count == len(ring):
            self._agreed_in_window -= ring[i]
        else:
            self._count += 1
        ring[i] = bit
        self._agreed_in_window += bit
        self._next = i + 1 if i + 1 < len(ring) else 0
        if agreed:
            self.agreed_total += 1
        else:
            self.disagreed_total += 1

    def record_verdict(self, verdict: Verdict) -> None:
        """`record` for AGREE/DISAGREE; MISSING only counts in `missing_total`."""
        if verdict == Verdict.MISSING:
            self.missing_total += 1
        else:
            self.record(verdict == Verdict.AGREE)


class DisagreementLog:
    """The last `maxlen` disagreements; older ones fall off."""

    __slots__ = ("_items",)

    def __init__(self, maxlen: int = 50) -> None:
        if maxlen < 0:
            raise ValueError(f"a disagreement log needs maxlen >= 0, got {maxlen}")
        self._items: deque[Disagreement] = deque(maxlen=maxlen)

    def __repr__(self) -> str:
        return f"DisagreementLog(maxlen={self.maxlen}, len={len(self._items)})"

    def __len__(self) -> int:
        return len(self._items)

    @property
    def maxlen(self) -> int:
        maxlen = self._items.maxlen
        assert maxlen is not None
        return maxlen

    def add(self, item: Disagreement) -> None:
        self._items.append(item)

    def items(self) -> list[Disagreement]:
        """The kept disagreements, newest first."""
        return list(reversed(self._items))
