"""A small blocking client of a running sidecar's admin API, for the CLI (docs/reference/cli.md).

Blocking on purpose (urllib): a CLI call is one request, and this keeps the commands free
of event loops. Errors are split the way scripts need them:

    AdminUnreachable   nothing answered (refused, unknown host, timeout)   -> exit 3
    AdminRefused       the API answered 4xx/5xx; carries status and the JSON error -> exit 1

Imports: stdlib only.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

DEFAULT_ADMIN: Final = "http://127.0.0.1:9901"
ADMIN_ENV: Final = "SIDECAR_ADMIN"
TOKEN_ENV: Final = "SIDECAR_ADMIN_TOKEN"


class AdminUnreachable(Exception):
    """No answer from the admin API."""


class AdminRefused(Exception):
    """The admin API answered with an error status."""

    def __init__(self, status: int, doc: Any, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.doc = doc
        self.message = message


def default_admin() -> str:
    return os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN


def default_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def _reason_text(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


class AdminClient:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer of a 2xx; AdminRefused or AdminUnreachable otherwise."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("accept", "application/json")
        if data is not None:
            req.add_header("content-type", "application/json")
        if self.token:
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                doc = json.loads(raw)
                message = doc["error"]["message"]
            except (ValueError, KeyError, TypeError):
                doc, message = None, raw.decode("utf-8", "replace").strip() or (e.reason or "error")
            raise AdminRefused(e.code, doc, f"{e.code}: {message}") from None
        except urllib.error.URLError as e:
            raise AdminUnreachable(f"cannot reach the admin API at {self.base_url}: {_reason_text(e.reason)}") \
                from None
        except (TimeoutError, ConnectionError) as e:
            raise AdminUnreachable(f"cannot reach the admin API at {self.base_url}: {_reason_text(e)}") from None

    def status(self) -> Any:
        return self.request("GET", "/admin/status")

    def reload(self) -> Any:
        return self.request("POST", "/admin/reload")

    def set_weights(self, route: str, weights: dict[str, float]) -> Any:
        return self.request("PUT", f"/admin/routes/{urllib.parse.quote(route, safe='')}/weights", weights)

    def clear_weights(self, route: str) -> Any:
        return self.request("DELETE", f"/admin/routes/{urllib.parse.quote(route, safe='')}/weights")

    def rollout(self, route: str) -> Any:
        return self.request("GET", f"/admin/routes/{urllib.parse.quote(route, safe='')}/rollout")

    def rollout_action(self, route: str, action: str) -> Any:
        return self.request("POST", f"/admin/routes/{urllib.parse.quote(route, safe='')}/rollout/"
                                    f"{urllib.parse.quote(action, safe='')}")
