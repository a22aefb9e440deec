"""Errors the sidecar makes itself, each with the HTTP status and type it becomes (docs/reference/http.md#errors).

    SidecarError                      (status, type)
    ├── BadRequest                    400 bad_request          malformed target, body or framing
    ├── NoRoute                       404 no_route
    ├── MethodNotAllowed              405 method_not_allowed   + Allow
    ├── RequestTimeout                408 request_timeout      body not received in time
    ├── BodyTooLarge                  413 body_too_large
    ├── ExpectationFailed             417 expectation_failed   an Expect other than 100-continue
    ├── UpstreamError                 502 upstream_error       reset, refused, garbage
    ├── UpstreamTimeout               504 upstream_timeout     deadline or try timeout
    ├── NoBackendAvailable            503 no_backend_available + Retry-After
    ├── Overloaded                    503 overloaded           + Retry-After (load shedding)
    ├── StoreUnavailable              503 store_unavailable    the fleet's store (admin changes only)
    ├── ClientDisconnected            499 client_disconnected  the client left mid-upload (metrics only)
    └── InternalError                 500 internal             a bug in the sidecar (logged)

    ConfigError                       not an HTTP error: a list of (place, message)

Like h11's `error_status_hint`, the status lives on the class, so the proxy turns any of
them into an answer in one place (shell/proxy.py `error_response`). Imports: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass


class SidecarError(Exception):
    status: int = 500
    type: str = "internal"
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SidecarError):
    status, type = 400, "bad_request"


class RequestTimeout(SidecarError):
    status, type = 408, "request_timeout"


class NoRoute(SidecarError):
    status, type = 404, "no_route"


class MethodNotAllowed(SidecarError):
    status, type = 405, "method_not_allowed"

    def __init__(self, message: str, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow


class BodyTooLarge(SidecarError):
    status, type = 413, "body_too_large"


class ExpectationFailed(SidecarError):
    status, type = 417, "expectation_failed"


class UpstreamError(SidecarError):
    status, type = 502, "upstream_error"


class UpstreamTimeout(SidecarError):
    status, type = 504, "upstream_timeout"


class NoBackendAvailable(SidecarError):
    status, type, retry_after_s = 503, "no_backend_available", 1


class Overloaded(SidecarError):
    status, type, retry_after_s = 503, "overloaded", 1


class StoreUnavailable(SidecarError):
    """The fleet's store cannot be reached: an admin change that must go through it is refused."""

    status, type = 503, "store_unavailable"
    retry_after_s = 1


class ClientDisconnected(SidecarError):
    """The client went away before its request was read: nobody receives the answer; 499 (as
    nginx counts it) keeps it apart from the sidecar's and the backends' errors in metrics."""

    status, type = 499, "client_disconnected"


class InternalError(SidecarError):
    status, type = 500, "internal"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: `place` reads like `routes[0].split`."""

    place: str
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}" if self.place else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every issue found, not only the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        assert issues, "a ConfigError without issues"
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues
