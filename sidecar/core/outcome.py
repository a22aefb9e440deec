"""The one definition of what a try's outcome is and whether it failed.

docs/resilience.md: a try fails when it is a connect error, a timeout, a reset or a 5xx. A 4xx is the
model's answer: no retry, no fallback, no breaker count. Every consumer (retries, circuit
breakers, outlier ejection, metrics, access log) classifies through here, once per try, as
linkerd's classifier does.

Imports: standard library only.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What one upstream try came to. The values are the `outcome` metric label."""

    OK = "ok"                        # 1xx-3xx answer
    CLIENT_ERROR = "4xx"             # the model refused the input: its answer, not a failure
    SERVER_ERROR = "5xx"
    CONNECT_ERROR = "connect_error"  # refused, unreachable, DNS
    TIMEOUT = "timeout"              # no headers within first_byte/per-try timeout, or deadline
    RESET = "reset"                  # connection closed before/while the answer was read
    PROTOCOL_ERROR = "protocol_error"  # bytes that are not HTTP: treated like a reset
    STREAM_BROKEN = "stream_broken"  # a streamed answer broke after bytes reached the client
    CANCELLED = "cancelled"          # a hedge that lost the race, or the client went away

    @property
    def failed(self) -> bool:
        return self in _FAILED


_FAILED = frozenset(
    {
        Outcome.SERVER_ERROR,
        Outcome.CONNECT_ERROR,
        Outcome.TIMEOUT,
        Outcome.RESET,
        Outcome.PROTOCOL_ERROR,
        Outcome.STREAM_BROKEN,
    }
)


def classify_status(status: int) -> Outcome:
    """Outcome of a try that produced an HTTP answer with this status."""
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.OK
