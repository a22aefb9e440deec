"""The request target check: what routes match and what backends get is one path, never outside it."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.target import Target, TargetError, parse_target

# (method, raw target) -> (forward, path, authority)
ACCEPTED = {
    "plain": ("POST", "/v1/models/fraud:predict", "/v1/models/fraud:predict", "/v1/models/fraud:predict", None),
    "query_untouched": ("GET", "/a/b?x=../y&z=%2e%2e&n=%00", "/a/b?x=../y&z=%2e%2e&n=%00", "/a/b", None),
    "encoded_slash_decoded_for_matching": ("GET", "/tenants%2Fa/x", "/tenants%2Fa/x", "/tenants/a/x", None),
    "encoding_kept_for_the_backend": ("GET", "/a%20b/caf%C3%A9", "/a%20b/caf%C3%A9", "/a b/café", None),
    "dots_inside_names": ("GET", "/a/.b/..c/.../d.", "/a/.b/..c/.../d.", "/a/.b/..c/.../d.", None),
    "empty_segments_kept": ("GET", "//a//b/", "//a//b/", "//a//b/", None),
    "params_kept": ("GET", "/a;v=1/b;.", "/a;v=1/b;.", "/a;v=1/b;.", None),
    "double_encoded_slash_without_dots": ("GET", "/a/%252Fb", "/a/%252Fb", "/a/%2Fb", None),
    "absolute_form": ("GET", "http://internal/tenants/a/x?q=1", "/tenants/a/x?q=1", "/tenants/a/x", "internal"),
    "absolute_form_any_case_userinfo_dropped": ("GET", "HTTPS://u:p@internal:8443", "/", "/", "internal:8443"),
    "absolute_form_query_only": ("GET", "http://h?q=1", "/?q=1", "/", "h"),
    "options_with_a_path": ("OPTIONS", "/v1/models", "/v1/models", "/v1/models", None),
}

REFUSED = {
    "dotdot": ("GET", "/tenants/a/../b/predict"),
    "dotdot_encoded": ("GET", "/tenants/a/%2e%2e/b/predict"),
    "dotdot_encoded_upper": ("GET", "/tenants/a/%2E%2E/b"),
    "dotdot_half_encoded": ("GET", "/tenants/a/.%2e/b"),
    "dotdot_half_encoded_2": ("GET", "/tenants/a/%2E./b"),
    "dotdot_encoded_slash": ("GET", "/tenants/a/..%2Fb/predict"),
    "dotdot_all_encoded": ("GET", "/tenants/a%2f%2e%2e%2fb/predict"),
    "dotdot_encoded_backslash": ("GET", "/tenants/a/..%5Cb/predict"),
    "dotdot_backslash": ("GET", "/tenants/a/..\\b/predict"),
    "dotdot_at_end": ("GET", "/tenants/a/.."),
    "dot": ("GET", "/tenants/a/./b"),
    "dot_at_end": ("GET", "/a/."),
    "dotdot_with_params": ("GET", "/tenants/a/..;x=1/b"),
    "dot_with_params": ("GET", "/a/.;/b"),
    "dotdot_double_encoded": ("GET", "/tenants/a/%252e%252e/b"),
    "dotdot_double_encoded_slash": ("GET", "/tenants/a%252f..%252fb"),
    "nul": ("GET", "/a%00b"),
    "crlf": ("GET", "/a%0d%0aX-Injected:%201"),
    "del": ("GET", "/a%7F"),
    "nul_double_encoded": ("GET", "/a%2500"),
    "bad_percent": ("GET", "/a%zz"),
    "bad_percent_at_end": ("GET", "/a%2"),
    "lone_percent": ("GET", "/a%"),
    "overlong_utf8_dot": ("GET", "/%c0%ae%c0%ae/b"),
    "not_utf8": ("GET", "/%ff"),
    "fragment": ("GET", "/a?b#c"),
    "space": ("GET", "/a b"),
    "tab": ("GET", "/a\tb"),
    "raw_nul": ("GET", "/a\x00b"),
    "raw_non_ascii": ("GET", "/caf\u00e9"),
    "raw_surrogate": ("GET", "/a\udcff"),
    "empty": ("GET", ""),
    "asterisk_not_options": ("GET", "*"),
    "authority_form": ("GET", "internal:443"),
    "connect": ("CONNECT", "internal:443"),
    "connect_origin_form": ("CONNECT", "/x"),
    "relative": ("GET", "a/b"),
    "other_scheme": ("GET", "ftp://x/y"),
    "no_host": ("GET", "http:///x"),
    "only_userinfo": ("GET", "http://u@/x"),
    "absolute_form_dotdot": ("GET", "http://h/tenants/a/../b"),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_targets(name):
    """A normal target reaches the backend as sent, and routes match its decoded path."""
    method, raw, forward, path, authority = ACCEPTED[name]
    assert parse_target(method, raw) == Target(forward, path, authority)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_targets_are_400(name):
    """A target that a backend could read outside its route is refused with 400."""
    method, raw = REFUSED[name]
    with pytest.raises(TargetError) as e:
        parse_target(method, raw)
    assert e.value.status_hint == 400 and e.value.reason


def test_options_asterisk_is_no_route():
    """`OPTIONS *` is well formed but about the whole server: no route serves it (404)."""
    with pytest.raises(TargetError) as e:
        parse_target("OPTIONS", "*")
    assert e.value.status_hint == 404


# --- properties ------------------------------------------------------------------------------

def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, as written there."""
    inp, out = path, list[str]()
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith(("./", "/./")):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            if out:
                out.pop()
        elif inp == "/..":
            inp = "/"
            if out:
                out.pop()
        elif inp in (".", ".."):
            inp = ""
        else:
            end = inp.find("/", 1 if inp.startswith("/") else 0)
            end = len(inp) if end == -1 else end
            out.append(inp[:end])
            inp = inp[end:]
    return "".join(out)


def backend_reads(forward: str, decodings: int, drop_params: bool) -> str:
    """A model of the backends behind us: the path decoded once or twice, "\\" taken for "/",
    `;params` dropped (Tomcat-like) or not, dot-segments removed (nginx, most frameworks)."""
    path = forward.partition("?")[0]
    for _ in range(decodings):
        path = unquote(path, errors="replace")
    path = path.replace("\\", "/")
    if drop_params:
        path = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    return remove_dot_segments(path)


# pieces a target is made of: separators, dots and their encodings, escapes, forms
PIECES = ["/", "//", ".", "..", "...", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "a", "tenants", "b",
          "%00", "%0a", "%", "%25", "%252e", "%252f", "%2", "?", ";", ";x", "%3b", "*", ":", "@", "%c0%ae",
          "%e2%80%ae", "%ff", "%41", "~", "-"]
ODD = ["#", "\u00e9", " ", "\t", "\x00", "\x7f", "http://h", "HTTPS://u@h:1"]
TARGETS = st.one_of(
    st.tuples(st.sampled_from(["/", "/", "/", "http://h/", "HTTP://u@h:8/", "http://h"]),
              st.lists(st.sampled_from(PIECES), max_size=14)).map(lambda t: t[0] + "".join(t[1])),
    st.lists(st.sampled_from(PIECES + ODD), max_size=14).map("".join),
    st.text(max_size=30),
)
METHODS = st.sampled_from(["GET", "POST", "OPTIONS"])  # CONNECT: in the table


@settings(max_examples=400, deadline=None)
@given(method=METHODS, raw=TARGETS)
def test_any_target_is_refused_or_has_no_dot_segment(method, raw):
    """Whatever the target, it is refused, or its decoded path starts with "/" and has no dot-segment."""
    try:
        t = parse_target(method, raw)
    except TargetError as e:
        status = e.status_hint
        assert status in (400, 404)
        return
    assert t.path.startswith("/") and t.forward.startswith("/")
    for segment in re.split(r"[/\\]", t.path):
        assert segment.partition(";")[0] not in (".", "..")
    assert not re.search(r"[\x00-\x1f\x7f]", t.path)
    assert re.fullmatch(r"[\x21-\x7e]+", t.forward) and "#" not in t.forward
    # nothing rewritten but the absolute-form's scheme and authority
    assert raw == t.forward or (t.authority is not None and (raw.endswith(t.forward) or t.forward.startswith("/?")
                                                            or t.forward == "/"))


@settings(max_examples=400, deadline=None)
@given(method=METHODS, raw=TARGETS, decodings=st.sampled_from([1, 2]), drop_params=st.booleans())
def test_backend_never_reads_a_path_outside_the_matched_prefix(method, raw, decodings, drop_params):
    """For an accepted target, every prefix its path matched is a prefix of what the backend reads."""
    try:
        t = parse_target(method, raw)
    except TargetError:
        return
    seen = backend_reads(t.forward, decodings, drop_params)
    if decodings == 1 and not drop_params:
        assert seen == t.path.replace("\\", "/")
    # prefixes as a config writes them: no "%", "\\" or ";" (those are the backend's to interpret)
    end = len(t.path)
    for c in "%\\;":
        if c in t.path:
            end = min(end, t.path.index(c))
    for i in range(1, end + 1):
        assert seen.startswith(t.path[:i]), (t, seen)
