"""The sans-IO upstream response parser: any split of the bytes gives the same answer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.http1 import END, Head, ProtocolError, ResponseParser


def run(data: bytes, cuts: list[int], head_request: bool = False, eof: bool = False):
    p = ResponseParser(head_request)
    events = []
    last = 0
    for c in sorted(set(cuts)):
        events += p.feed(data[last:c])
        last = c
    events += p.feed(data[last:])
    if eof:
        events += p.feed_eof()
    head = events[0]
    assert isinstance(head, Head)
    body = b"".join(e for e in events[1:] if isinstance(e, bytes))
    return head, body, events[-1] is END


def chunk_encode(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for s in sizes:
        if i >= len(body):
            break
        piece = body[i:i + s]
        out += f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n"
        i += s
    if i < len(body):
        out += f"{len(body) - i:X}\r\n".encode() + body[i:] + b"\r\n"
    return out + b"0\r\nx-trailer: 1\r\n\r\n"


bodies = st.binary(max_size=300)
cut_lists = st.lists(st.integers(0, 600), max_size=8)


@settings(max_examples=200, deadline=None)
@given(bodies, cut_lists)
def test_content_length_any_split(body, cuts):
    """A Content-Length answer parses the same however the bytes are split."""
    data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A:  b \r\n\r\n" % len(body) + body
    head, got, ended = run(data, cuts)
    assert (head.status, head.length, head.keep_alive, got, ended) == (200, len(body), True, body, True)
    assert ("X-A", "b") in head.headers


@settings(max_examples=200, deadline=None)
@given(bodies, st.lists(st.integers(1, 50), max_size=10), cut_lists)
def test_chunked_any_split(body, sizes, cuts):
    """A chunked answer (with extensions and trailers) decodes to its body for any split."""
    data = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk_encode(body, sizes)
    head, got, ended = run(data, cuts)
    assert (head.status, head.chunked, got, ended) == (201, True, body, True)


def test_close_delimited_body_ends_at_eof():
    """An HTTP/1.0-style answer without length runs until the connection closes; not reused."""
    head, body, ended = run(b"HTTP/1.0 200 OK\r\n\r\nhello", [7, 20], eof=True)
    assert body == b"hello" and ended and not head.keep_alive


def test_interim_answers_are_skipped_and_bodyless_statuses():
    """100 Continue is skipped; 204 and HEAD answers have no body whatever they declare."""
    head, body, ended = run(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", [])
    assert head.status == 204 and body == b"" and ended
    head, body, ended = run(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", [], head_request=True)
    assert head.status == 200 and body == b"" and ended


def test_connection_close_is_not_reused():
    """`Connection: close` (or HTTP/1.0 without keep-alive) marks the connection not reusable."""
    assert not run(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", [])[0].keep_alive
    assert run(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", [])[0].keep_alive


@pytest.mark.parametrize("data", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
])
def test_garbage_is_a_protocol_error(data):
    """Bytes that are not a valid answer raise ProtocolError (the proxy answers 502)."""
    with pytest.raises(ProtocolError):
        ResponseParser().feed(data)


def test_truncated_answer_at_eof_is_an_error():
    """A connection that closes mid-body is an incomplete answer, not a short success."""
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(ProtocolError):
        p.feed_eof()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    """Random bytes give events or a ProtocolError, never another exception."""
    p = ResponseParser()
    try:
        p.feed(data)
        p.feed_eof()
    except ProtocolError:
        pass
