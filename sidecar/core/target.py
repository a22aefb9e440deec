"""The request target (RFC 9112 3.2): the one checked path that routes match on and backends get.

A request target is untrusted text with two readers: the sidecar, which picks a route by its
path prefix, and the backend, which picks a model (a tenant, a virtual host) by the same path
after decoding and normalising it its own way. When the two read it differently, a request
matched to one route reaches another route's resources: `/tenants/a/../b/predict` matched
`path_prefix: /tenants/a/` and nginx behind it served tenant B. So the target is checked
once, here, and both readers get the result of that one check:

    parse_target(method, raw) -> Target(forward, path, authority)     or raises TargetError

    forward    origin-form, exactly as received (percent-encoding untouched), with "?query":
               what the backend gets after its base path; always starts with "/"
    path       the path percent-decoded once ("%2F" -> "/"), no query: what routes match on
    authority  the host of an absolute-form target (userinfo dropped), else None

Rules, in order. A refusal becomes 400 `bad_request` unless said otherwise. Clients normalise
a URL before sending it (every HTTP library and browser does), so a legitimate one never meets
a refusal; an ambiguous target is refused rather than normalised, because any normalisation we
chose could differ from the backend's.

1. Characters: visible ASCII only (0x21-0x7E). A space, a control character or a raw
   non-ASCII byte is refused, and so is `#` (a fragment is never part of a request target).
2. Form (RFC 9112 3.2):
       origin-form   `/p?q`          forwarded as it is
       absolute-form `http://h/p?q`  (http or https, any case) forwarded as `/p?q` (`/` or `/?q`
                                     when the path is empty); the authority goes no further
                                     (the backend gets its own Host), userinfo included
       asterisk-form `*`             OPTIONS only; no route serves "the whole server": 404
       anything else: authority-form (`h:443`), CONNECT (a tunnel), a relative path
       (`a/b`), another scheme (`ftp://`), an absolute URL without a host: refused
3. Percent-encoding, in the path: every `%` starts `%XX` (two hex digits, any case), and the
   decoded bytes are UTF-8 (an overlong `%c0%ae` is not; some old servers read it as ".").
4. The decoded path has no control character (U+0000-U+001F, U+007F): `%00`, `%0a`, ...
5. Dot-segments: split at "/" and at "\\" (decoded or literal: backends decode `%2F` and
   `%5C`, and some take a backslash for a separator), no segment is `.` or `..`, nor starts
   with `.;` or `..;` (Tomcat-like servers drop `;parameters` before normalising). This
   refuses `..`, `%2e%2e`, `%2E.`, `.%2e`, `..%2f`, `..%5C`, `..\\`, `..;x`.
6. Rules 4 and 5 again on the path decoded a second time, for a backend (or a framework
   behind it) that decodes twice: `%252e%252e` is refused. A third decoding is not checked.

Nothing else is rewritten: the path keeps its percent-encoding, case, empty segments ("//")
and `;parameters`; the query (only rule 1 applies to it) is the application's business.

Invariant (property-tested in tests/core/test_target.py): for an accepted target, a backend
that percent-decodes `forward`'s path once or twice, takes "\\" for "/" and removes
dot-segments (RFC 3986 5.2.4) reads a path that starts with every prefix `path` starts with
(prefixes without "%" or "\\"): the backend never receives a path outside the matched
route's prefix.

Imports: stdlib only.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple
from urllib.parse import unquote

# rule 2: scheme "://" authority, then path and query
_ABSOLUTE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", re.S)
_SCHEMES: Final = frozenset({"http", "https"})
# rule 3: a "%" not followed by two hex digits
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# rule 4
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# rule 5
_SEPARATOR: Final = re.compile(r"[/\\]")
_DOT_SEGMENTS: Final = frozenset({".", ".."})


class TargetError(ValueError):
    """A refused request target. `status_hint` is the HTTP status it should become, as h11's
    `ProtocolError.error_status_hint`: 400, or 404 for `OPTIONS *` (no route serves it)."""

    def __init__(self, reason: str, status_hint: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_hint = status_hint


class Target(NamedTuple):
    """A checked request target: `forward` goes to the backend, `path` is matched.

    A NamedTuple, not a frozen dataclass: one is made per request, and a tuple is the
    cheapest immutable object to make.
    """

    forward: str                 # origin-form, raw (percent-encoded as received), with "?query"
    path: str                    # percent-decoded once, no query
    authority: str | None = None  # the host of an absolute-form target, else None


def parse_target(method: str, raw: str) -> Target:
    """The checked target of a request line (see the module docstring), or TargetError."""
    if method == "CONNECT":
        raise TargetError("CONNECT (a tunnel) is not proxied")
    # rule 1, with str methods that run in C: printable ASCII is 0x20-0x7E
    if not raw or not raw.isascii() or not raw.isprintable() or " " in raw or "#" in raw:
        raise TargetError("the request target has a space, a control character, a non-ASCII byte or a fragment")
    authority: str | None = None
    if raw[0] == "/":
        forward = raw
    elif raw == "*":
        if method == "OPTIONS":
            raise TargetError("OPTIONS * asks about the server as a whole; no route serves it", 404)
        raise TargetError("the asterisk-form target (*) is for OPTIONS only")
    else:
        m = _ABSOLUTE.fullmatch(raw)
        if m is None:
            raise TargetError("the request target is neither a path (/...) nor an absolute http(s) URL")
        scheme, authority, rest = m.groups()
        authority = authority.rpartition("@")[2]
        if scheme.lower() not in _SCHEMES or not authority:
            raise TargetError("an absolute request target must be an http(s) URL with a host")
        forward = rest if rest.startswith("/") else "/" + rest
    path = forward.partition("?")[0]
    if "%" in path:
        if _BAD_PERCENT.search(path) is not None:
            raise TargetError("malformed percent-encoding in the path")
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise TargetError("the path is not UTF-8 once percent-decoded") from None
        _check(decoded, "")
        if "%" in decoded:  # rule 6: what a backend that decodes twice would read
            _check(unquote(decoded, errors="replace"), " decoded twice")
    else:  # no escapes: rule 1 left no control character to find
        decoded = path
        if "." in path:
            _check(path, "")
    return Target(forward, decoded, authority)


def _check(decoded: str, when: str) -> None:
    """Rules 4 and 5 on a decoded path."""
    if _CONTROL.search(decoded) is not None:
        raise TargetError(f"a control character in the path{when}")
    if "." in decoded:
        for segment in _SEPARATOR.split(decoded):
            if segment.partition(";")[0] in _DOT_SEGMENTS:
                raise TargetError(f"a dot-segment (. or ..) in the path{when}")
