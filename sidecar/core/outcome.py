"""The one definition of what a try's outcome is and whether it failed.

docs/resilience.md: a try fails when it is a connect error, a timeout, a reset or a 5xx. A 4xx is the
model's answer: no retry, no fallback, no breaker count. Every consumer (retries, circuit
breakers, outlier ejection, metrics, access log) classifies through here, once per try, as
linkerd's classifier does: an answer carries its Outcome from where it is read
(shell/upstream.py `Answer.outcome`), a failure from where it is mapped (`map_exception`),
and the request's own, the answer the client got, travels on its `Exchange`
(shell/proxy.py); consumers ask `.failed`, never a status or a string.

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

    failed: bool                     # set below, per member: whether the try failed


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
# A plain attribute of each member, read on every try: a property would hash the member
# (Enum's __hash__ is Python code) on each read.
for _outcome in Outcome:
    _outcome.failed = _outcome in _FAILED
del _outcome

# Members as module names where every answer reads them: in CPython 3.11 an Enum member read
# through its class costs about five times a global (EnumType's attribute lookup).
_OK, _CLIENT_ERROR, _SERVER_ERROR = Outcome.OK, Outcome.CLIENT_ERROR, Outcome.SERVER_ERROR


def classify_status(status: int) -> Outcome:
    """Outcome of a try that produced an HTTP answer with this status."""
    if status >= 500:
        return _SERVER_ERROR
    if status >= 400:
        return _CLIENT_ERROR
    return _OK
