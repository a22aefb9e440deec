"""The sans-IO upstream response parser: any split of the bytes gives the same answer."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import http1
from sidecar.core.http1 import END, Event, Head, ProtocolError, ResponseParser, _End


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


# -- llhttp adapter: what a reused upstream connection needs ---------------------------------


def feed_all(data: bytes, cuts: Iterable[int] = (), head_request: bool = False, eof: bool = True) -> list[Event]:
    """Every event, feeding `data` cut at `cuts`; raises what the parser raises."""
    p = ResponseParser(head_request)
    events: list[Event] = []
    last = 0
    for c in sorted(set(cuts)):
        events += p.feed(data[last:c])
        last = c
    events += p.feed(data[last:])
    if eof:
        events += p.feed_eof()
    return events


def first_head(events: list[Event]) -> Head:
    head = events[0]
    assert isinstance(head, Head)
    return head


def splits(data: bytes):
    """The whole input, every cut into two, and byte by byte."""
    yield ()
    for i in range(1, len(data)):
        yield (i,)
    yield tuple(range(1, len(data)))


def assert_refused(data: bytes, head_request: bool = False) -> None:
    for cuts in splits(data):
        with pytest.raises(ProtocolError):
            feed_all(data, cuts, head_request)


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("data", [
    pytest.param(OK_HEAD + b"X: a\rb\r\nContent-Length: 0\r\n\r\n", id="bare-CR-in-value"),
    pytest.param(OK_HEAD + b"X: a\nb\r\nContent-Length: 0\r\n\r\n", id="bare-LF-in-value"),
    pytest.param(OK_HEAD + b"X: a\x00b\r\nContent-Length: 0\r\n\r\n", id="NUL-in-value"),
    pytest.param(OK_HEAD + b"X: a\x01b\r\nContent-Length: 0\r\n\r\n", id="control-in-value"),
    pytest.param(OK_HEAD + b"X: a\x7fb\r\nContent-Length: 0\r\n\r\n", id="DEL-in-value"),
    pytest.param(b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n", id="NUL-in-reason"),
    pytest.param(OK_HEAD + b"X: a\r\n b\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(OK_HEAD + b"X : a\r\nContent-Length: 0\r\n\r\n", id="space-before-colon"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="LF-line-ends"),
    pytest.param(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="empty-line-first"),
    pytest.param(OK_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", id="CL-5000-digits"),
    pytest.param(OK_HEAD + b"Content-Length: 18446744073709551616\r\n\r\n", id="CL-over-64-bits"),
    pytest.param(OK_HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", id="CL-conflicting"),
    pytest.param(OK_HEAD + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na", id="CL-duplicate"),
    pytest.param(OK_HEAD + b"Content-Length: 1, 1\r\n\r\na", id="CL-list"),
    pytest.param(OK_HEAD + b"Content-Length: -1\r\n\r\n", id="CL-negative"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", id="CL-and-TE"),
    pytest.param(b"HTTP/1.9 200 OK\r\nContent-Length: 0\r\n\r\n", id="HTTP/1.9"),
    pytest.param(b"HTTP/1.x 200 OK\r\nContent-Length: 0\r\n\r\n", id="HTTP/1.x"),
    pytest.param(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", id="HTTP/2.0"),
    pytest.param(b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n", id="HTTP/0.9"),
    pytest.param(b"HTTP/1.1 999 OK\r\nContent-Length: 0\r\n\r\n", id="status-999"),
    pytest.param(b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n", id="status-600"),
    pytest.param(b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n", id="status-099"),
    pytest.param(CHUNKED + b" 5 \r\nhello\r\n0\r\n\r\n", id="chunk-size-spaces"),
    pytest.param(CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n", id="chunk-size-trailing-space"),
    pytest.param(CHUNKED + b"5;a=b\nc\r\nhello\r\n0\r\n\r\n", id="LF-in-chunk-extension"),
    pytest.param(CHUNKED + b"5;a=b\rc\r\nhello\r\n0\r\n\r\n", id="CR-in-chunk-extension"),
    pytest.param(CHUNKED + b"1" + b"0" * 17 + b"\r\n", id="chunk-size-over-64-bits"),
    pytest.param(CHUNKED + b"5\r\nhello\n0\r\n\r\n", id="chunk-without-CRLF"),
    pytest.param(CHUNKED + b"5\r\nhello\r\n0\r\nT: a\rb\r\n\r\n", id="bare-CR-in-trailer"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", id="TE-gzip-chunked"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc", id="TE-chunked-gzip"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\nabc", id="TE-gzip"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: identity\r\n\r\nabc", id="TE-identity"),
    pytest.param(OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 id="TE-twice"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", id="101"),
])
def test_malformed_answers_are_refused_however_split(data):
    """Each strictness case is a ProtocolError (a clean 502), never another exception, at any split."""
    assert_refused(data)


def test_refusals_say_why():
    """The error names the problem, for the 502's log line."""
    cases = {
        OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n": "unsupported Transfer-Encoding",
        b"HTTP/2.0 200 OK\r\n\r\n": "unsupported HTTP version 2.0",
        b"HTTP/1.1 999 OK\r\n\r\n": "invalid status 999",
        b"HTTP/1.1 101 Switching\r\n\r\n": "protocol upgrades are not supported",
        OK_HEAD + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n": "invalid response: Duplicate Content-Length",
        OK_HEAD + b"Content-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n": "data after the end of the response",
    }
    for data, reason in cases.items():
        with pytest.raises(ProtocolError) as e:
            ResponseParser().feed(data)
        assert str(e.value) == reason, data


def head_of(size: int) -> bytes:
    line = b"X-Filler: " + b"a" * 990 + b"\r\n"  # 1002 bytes
    return OK_HEAD + line * (size // len(line)) + b"Content-Length: 0\r\n\r\n"


@pytest.mark.parametrize("read", [1 << 20, 1024, 1])
def test_head_over_64_kib_is_refused_in_one_read_or_many(read):
    """A 70 KiB head is refused whether it comes in one read, 1 KiB reads or byte by byte."""
    data = head_of(70 * 1024)
    with pytest.raises(ProtocolError, match="response head too large"):
        feed_all(data, range(read, len(data), read))


@pytest.mark.parametrize("read", [1 << 20, 1024])
def test_head_under_64_kib_is_accepted(read):
    """A 60 KiB head (60 headers of 1 KB) is an answer like any other."""
    data = head_of(60 * 1024)
    head = first_head(feed_all(data, range(read, len(data), read)))
    assert isinstance(head, Head) and len(head.headers) == 62


def test_interim_heads_count_towards_the_head_limit():
    """Interim answers' heads and the final head share the 64 KiB, in one read or several."""
    interim = b"HTTP/1.1 103 Early Hints\r\n" + b"Link: <" + b"a" * 40_000 + b">\r\n\r\n"
    data = interim + head_of(30 * 1024)
    for cuts in ((), (len(interim),)):
        with pytest.raises(ProtocolError, match="too large"):
            feed_all(data, cuts)


@pytest.mark.parametrize("read", [1 << 20, 1024])
def test_trailers_over_64_kib_are_refused(read):
    """Trailers are dropped, but bounded like a head: 70 KiB of them is a ProtocolError."""
    data = CHUNKED + b"1\r\na\r\n0\r\n" + (b"T: " + b"t" * 997 + b"\r\n") * 70 + b"\r\n"
    with pytest.raises(ProtocolError, match="too large"):
        feed_all(data, range(read, len(data), read))


def test_endless_chunk_extension_is_refused():
    """A chunk line that never ends (arriving over many reads) is refused past 64 KiB."""
    p = ResponseParser()
    p.feed(CHUNKED + b"1;x=")
    for _ in range(64):
        assert p.feed(b"y" * 1024) == []
    with pytest.raises(ProtocolError, match="chunk line or trailers too large"):
        p.feed(b"y" * 1024)


def test_many_small_chunks_are_linear_and_coalesced():
    """A 256 KiB body in 1-byte chunks, in one read: one body event, well under 100 ms (the old
    parser copied the rest of the buffer per chunk: quadratic, seconds)."""
    body = bytes(range(256)) * 1024
    data = CHUNKED + b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    best = float("inf")
    events: list[Event] = []
    for _ in range(3):
        t0 = time.process_time()  # CPU time: the test machines are shared
        events = ResponseParser().feed(data)
        best = min(best, time.process_time() - t0)
    assert [type(e) for e in events] == [Head, bytes, _End] and events[1] == body
    assert best < 0.1, best


def test_events_per_feed_are_bounded():
    """Fed in 4 KiB reads, each read gives at most Head, one body piece and END."""
    body = b"x" * 100_000
    data = CHUNKED + b"".join(b"1;e=1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n"
    p = ResponseParser()
    got = b""
    for i in range(0, len(data), 4096):
        events = p.feed(data[i:i + 4096])
        pieces = [e for e in events if isinstance(e, bytes)]
        assert len(events) <= 3 and len(pieces) <= 1
        got += b"".join(pieces)
    assert got == body and p.done


SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"


@pytest.mark.parametrize("first", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
])
@pytest.mark.parametrize("extra", [SECOND, b"\r\n", b"\n", b"\r", b"X"])
def test_bytes_after_the_answer_are_refused_however_split(first, extra):
    """A second answer, or even one stray CRLF, after the end: refused in the same read or a later one."""
    assert feed_all(first)[-1] is END
    assert_refused(first + extra)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=12).map(lambda b: b.replace(b"a", b"\r").replace(b"b", b"\n")), st.booleans(),
       st.sampled_from([b"", b"\r", b"\n", b"\r\n", b"\r\n\r\n"]), cut_lists)
def test_body_ending_in_crlf_is_not_mistaken_for_data_after_the_end(body, chunked, extra, cuts):
    """Bodies that are (or end in) CR/LF parse; one more CR or LF after them is refused, any split."""
    if chunked:
        data = CHUNKED + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    if extra:
        with pytest.raises(ProtocolError, match="data after the end"):
            feed_all(data + extra, cuts)
    else:
        events = feed_all(data, cuts)
        assert b"".join(e for e in events if isinstance(e, bytes)) == body and events[-1] is END


def test_head_answer_ends_at_its_head():
    """HEAD: the answer ends with its head, whatever Content-Length or chunking it declares."""
    for declared in (b"Content-Length: 99\r\n", b"Transfer-Encoding: chunked\r\n", b"", b"Content-Length: 0\r\n"):
        data = OK_HEAD + declared + b"\r\n"
        for cuts in splits(data):
            events = feed_all(data, cuts, head_request=True)
            assert len(events) == 2 and events[1] is END
            assert first_head(events).length == 0 and not first_head(events).keep_alive


@pytest.mark.parametrize("after", [b"hello", b"\r\n", SECOND])
@pytest.mark.parametrize("declared", [b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b""])
def test_body_after_a_head_answer_is_refused(declared, after):
    """A server that sends a body after a HEAD answer is refused, not read as the next answer."""
    assert_refused(OK_HEAD + declared + b"\r\n" + after, head_request=True)


@pytest.mark.parametrize(("data", "head_request", "keep_alive"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", True, False),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, False),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", False, False),
    (b"HTTP/1.1 200 OK\r\n\r\nuntil close", False, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False, False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", False, False),
])
def test_which_connections_are_reused(data, head_request, keep_alive):
    """Only answers whose end is certain are reused: never after HEAD, 204, 304 or a close-delimited body."""
    head = first_head(feed_all(data, head_request=head_request))
    assert head.keep_alive is keep_alive


def test_interim_answers_are_bounded():
    """Up to 8 interim answers (100, 103 with hints) are skipped; a 9th is refused."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nok"
    data = b"HTTP/1.1 100 Continue\r\n\r\n" + hints * 7 + final
    for cuts in ((), (25,), (40, 200), tuple(range(1, len(data)))):
        events = feed_all(data, cuts)
        head = first_head(events)
        assert head.status == 200 and head.headers == [("Content-Length", "2"), ("X", "y")]
        assert events[-1] is END
    with pytest.raises(ProtocolError, match="interim"):
        feed_all(hints * 9 + final)


def test_head_fields_are_as_received():
    """Names keep their case, order and repeats; values lose surrounding whitespace; SSE is spotted."""
    data = (b"HTTP/1.1 200 Fine  Thanks\r\nSet-Cookie: a=1\r\nset-cookie:b=2 \t\r\nX-Empty:\r\n"
            b"Content-Type: Text/Event-Stream; charset=utf-8\r\nX-Obs: caf\xe9\r\nContent-Length: 0\r\n\r\n")
    head = first_head(feed_all(data))
    assert (head.status, head.reason, head.length, head.chunked, head.event_stream) == (200, "Fine  Thanks", 0,
                                                                                        False, True)
    assert head.headers == [("Set-Cookie", "a=1"), ("set-cookie", "b=2"), ("X-Empty", ""),
                            ("Content-Type", "Text/Event-Stream; charset=utf-8"), ("X-Obs", "caf\xe9"),
                            ("Content-Length", "0")]
    chunked = first_head(feed_all(CHUNKED + b"0\r\n\r\n"))
    assert (chunked.length, chunked.chunked, chunked.event_stream) == (None, True, False)


def test_reason_split_across_reads_is_whole():
    """A reason phrase cut by a read boundary arrives whole (llhttp reports it piece by piece)."""
    data = b"HTTP/1.1 404 Not Found Here\r\nContent-Length: 0\r\n\r\n"
    for cuts in splits(data):
        assert first_head(feed_all(data, cuts)).reason == "Not Found Here"


def test_feed_eof():
    """EOF ends a close-delimited body; is nothing when idle or done; else the answer is incomplete."""
    assert ResponseParser().feed_eof() == []
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.feed_eof() == []
    p = ResponseParser()
    assert [type(e) for e in p.feed(b"HTTP/1.1 200 OK\r\n\r\nab")] == [Head, bytes]
    assert p.feed_eof() == [END] and p.done
    for partial in (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n", CHUNKED + b"5\r\nab"):
        p = ResponseParser()
        p.feed(partial)
        with pytest.raises(ProtocolError, match="closed before"):
            p.feed_eof()


def test_one_llhttp_parser_serves_a_keep_alive_connection():
    """Answers on a reused connection go through one llhttp parser; after a close or error, a fresh one."""
    p = ResponseParser()
    first = p._llhttp
    for i in range(3):
        p.reset()
        assert p.idle and not p.done
        events = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
        assert events[1] == b"%d" % i and events[2] is END and p.done
    assert p._llhttp is first  # white-box: the per-answer cost this saves is in the module docstring
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b"garbage"):
        p.reset()
        with contextlib.suppress(ProtocolError):
            p.feed(bad)
        p.reset(head_request=True)
        assert [type(e) for e in p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n")] == [Head, _End]
        assert p._llhttp is not first


def test_a_bug_in_the_adapter_is_not_disguised_as_a_protocol_error(monkeypatch):
    """Only the upstream's bytes become ProtocolError; our own exceptions surface as themselves."""
    def broken(*args: object) -> None:
        raise RuntimeError("bug")
    monkeypatch.setattr(http1, "Head", broken)
    with pytest.raises(RuntimeError, match="bug"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
