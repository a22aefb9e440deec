"""A sans-IO HTTP/1.1 response parser for upstream answers (RFC 9112): an adapter over llhttp.

Bytes go in with `feed(data)` (and `feed_eof()` when the peer closes); events come out:
a `Head` (status, headers, framing), body pieces (`bytes`), then `END`. It never touches
a socket, so it is tested with any split of the input (tests/core/test_http1.py) and
against h11 (tests/core/test_http1_differential.py).

Why httptools in core: it is the C parser llhttp (Node.js's) behind a thin Cython binding,
with no I/O, no event loop and no global state; aiohttp and uvicorn run on it. core/ stays
pure (tests/test_layering.py lets this module alone import it). llhttp does the byte work:
status line, header syntax, Content-Length digits and duplicates, chunk framing. This
adapter adds what a proxy that reuses connections needs and llhttp does not give:

- One answer per `reset`. Any byte after the answer's end is a `ProtocolError`, whether in
  the same `feed` (a second `on_message_begin`) or later: a server that answers twice would
  otherwise hand its extra answer to the next client on the connection. llhttp silently
  skips CR and LF between messages; those are found by counting the CR/LF run that ends
  the input against the one that ends the answer (`_end_tail`, see `on_message_complete`).
- HEAD: llhttp cannot be told to skip the body, so for a `head_request` the answer ends at
  its head (Head with length 0, then END) and any byte after it is refused as above.
- Answers to HEAD and 204/304 answers are never reused (`keep_alive=False`): a server that
  sends a body after them anyway would have it read as the next client's answer.
- Interim 1xx answers (100, 103) are skipped, at most `MAX_INTERIM_ANSWERS` per answer;
  101 is refused (we never ask for an upgrade).
- Refused although llhttp accepts: HTTP versions other than 1.0 and 1.1 (llhttp takes 0.9
  and 2.0), statuses outside 100-599, any Transfer-Encoding but a single `chunked` (llhttp
  would de-chunk `gzip, chunked` and we would relay it without its gzip coding), an empty
  line before the status line, NUL in the reason phrase, and heads, chunk lines or
  trailers over `MAX_HEAD_BYTES`.
- Refused by llhttp itself (strict mode, no leniencies set): bare CR, LF, NUL or other
  controls in header values, obs-fold, a Content-Length that is not digits or overflows
  64 bits, two Content-Length headers (even equal ones), Content-Length with
  Transfer-Encoding, chunk sizes with spaces or over 64 bits, LF (or whitespace before a
  name) in a chunk extension, chunk data not followed by CRLF, lines not ended by CRLF.
- Still lenient (llhttp): CR/LF between an interim answer and the next are skipped. They
  cannot end or shift an answer (tests/core/test_http1_differential.py says so against h11).

NOTE, approximations in the size bounds: httptools hands a header over only once it has
ended (it joins the pieces of one that spans reads), so a head or trailers still arriving
are bounded by the bytes fed without producing anything (`_stalled`), and a head that ends
within one read is measured from its parsed headers, llhttp having trimmed the whitespace
around values (`_count_head`), after its header list was built: at most one read's worth.

Framing (RFC 9112 6.3): HEAD requests and 1xx/204/304 answers have no body;
`Transfer-Encoding: chunked`; `Content-Length`; otherwise the body runs until the
connection closes (never reused). Trailers are read, bounded and dropped.

Cost: one llhttp parser per connection, reused while each answer ends on a keep-alive
boundary (httptools has no reset: a new one is two mallocs and a dozen getattr). The parser
and its llhttp hold each other (the callbacks are bound methods): a cycle per connection,
left to the garbage collector. All body pieces llhttp hands over within one `feed` become
one `bytes` event, so a feed yields at most Head, one body piece and END however many
chunks it holds. Per header, the Python work is a strip, two decodes and, for three name
lengths, a lower(): framing and the event-stream check read nothing else.

Imports: stdlib, httptools.
"""

from __future__ import annotations

from typing import Final

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpResponseParser

MAX_HEAD_BYTES: Final = 64 * 1024
# 100 Continue and 103 Early Hints before the real answer; more than this is a loop, not hints
MAX_INTERIM_ANSWERS: Final = 8


class ProtocolError(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response."""


class _End:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END: Final = _End()


class Head:
    __slots__ = ("chunked", "event_stream", "headers", "keep_alive", "length", "reason", "status")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], keep_alive: bool,
                 length: int | None, chunked: bool, event_stream: bool = False) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive
        self.length = length      # body bytes when Content-Length framed (0: no body); None otherwise
        self.chunked = chunked
        self.event_stream = event_stream  # Content-Type text/event-stream: relayed event by event

    def __repr__(self) -> str:
        return f"Head({self.status}, length={self.length}, chunked={self.chunked}, keep_alive={self.keep_alive})"


Event = Head | bytes | _End

# what ends every head and every chunked body: CRLF CRLF after a byte that is neither
_HEAD_END_TAIL: Final = 4


def _crlf_tail(data: bytes) -> int:
    """How many CR and LF bytes end `data`: a short loop (usually a chunk's CRLF), C beyond that."""
    n = len(data)
    i = n
    while i and data[i - 1] in b"\r\n":
        i -= 1
        if n - i > 8:
            return n - len(data.rstrip(b"\r\n"))
    return n - i


class ResponseParser:
    """Parses one response at a time; `reset` before the next one on the same connection.

    The llhttp callbacks (`on_*`) are methods of this object; `on_body` is the bound
    `append` of the body list itself, so a chunk costs no Python frame. A callback refuses
    by raising ProtocolError; httptools wraps it in HttpParserCallbackError and `feed`
    unwraps it. After a ProtocolError the parser is unusable until `reset` (the proxy closes
    the connection anyway).
    """

    __slots__ = ("_body", "_chunked", "_clean", "_crlf_run", "_end_tail", "_ended", "_event_stream", "_head_bytes",
                 "_head_request", "_head_room", "_headers", "_interim", "_length", "_llhttp", "_llhttp_keep_alive",
                 "_out", "_reason", "_stalled", "_started", "_version_seen", "head", "on_body")

    def __init__(self, head_request: bool = False) -> None:
        self._body: list[bytes] = []
        self.on_body = self._body.append
        self._clean = False  # no llhttp parser yet
        self._out: list[Event] = []
        self.reset(head_request)

    def reset(self, head_request: bool = False) -> None:
        # `_clean`: llhttp stands at a message boundary of a keep-alive connection, so the
        # next answer can go to the same parser; anything else gets a fresh one
        if not self._clean:
            self._llhttp = HttpResponseParser(self)
            self._clean = True
        self._head_request = head_request
        self.head: Head | None = None
        self._ended = False
        self._started = False
        self._version_seen = False  # the first head's version is 1.0 or 1.1 (see feed)
        self._interim = 0
        self._head_bytes = 0    # heads counted so far (see feed), then trailers
        self._head_room = 0
        self._stalled = 0
        self._crlf_run = 0      # CR/LF bytes that end everything fed so far
        self._end_tail = -1     # CR/LF bytes that end the answer, once llhttp has completed it
        self._body.clear()
        self._begin()

    def _begin(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        self._length: int | None = None
        self._chunked = False
        self._event_stream = False
        self._llhttp_keep_alive = False

    @property
    def done(self) -> bool:
        return self._ended

    @property
    def idle(self) -> bool:
        """Nothing of a response has arrived yet."""
        return not self._started

    def _refuse(self, reason: str) -> ProtocolError:
        self._clean = False
        return ProtocolError(reason)

    # -- bytes in, events out ------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        if not data:
            return []
        if self.done:  # (the property: mypy would hold `_ended` False past the callbacks)
            raise self._refuse("data after the end of the response")
        if self.head is None:
            if not self._started:
                # llhttp skips CR/LF before a status line; an answer starts with "HTTP/"
                if data[0] == 13 or data[0] == 10:
                    raise self._refuse("invalid response: empty line before the status line")
                self._started = True
                # the usual case, read off the first bytes: llhttp's get_http_version()
                # formats a string, a twentieth of a small answer's parse
                self._version_seen = data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))
            # every byte since `reset` belongs to a head so far (interim ones included): a
            # head that ends in this feed is at most this long, so only a longer feed needs
            # its head counted (`_count_head`)
            self._head_room = MAX_HEAD_BYTES - self._stalled - len(data)
        out: list[Event] = []
        self._out = out
        try:
            self._llhttp.feed_data(data)
        except HttpParserCallbackError as e:
            self._clean = False
            cause = e.__context__
            if cause is None:
                raise ProtocolError(f"invalid response: {e}") from None
            raise cause from None  # our ProtocolError; anything else is a bug and surfaces as itself
        except HttpParserError as e:
            if self._ended:  # llhttp's "Data after `Connection: close`", in our words
                raise self._refuse("data after the end of the response") from None
            raise self._refuse(f"invalid response: {e}") from None
        except HttpParserUpgrade:  # llhttp only upgrades on 101, refused at its head: defensive
            raise self._refuse("protocol upgrades are not supported") from None
        if self._body:
            if self._ended:  # llhttp read a body after a HEAD answer's head
                raise self._refuse("data after the end of the response")
            self._flush()
        # the CR/LF run that ends the input so far (see on_message_complete)
        last = data[-1]
        if last == 10 or last == 13:
            k = _crlf_tail(data)
            run = self._crlf_run + k if k == len(data) else k
        else:
            run = 0
        self._crlf_run = run
        if self._ended and run > self._end_tail >= 0:
            raise self._refuse("data after the end of the response")
        if out:
            self._stalled = 0
        else:
            # bytes with nothing to show: a head, chunk line or trailers still arriving
            # (httptools buffers a header until it ends, so the callbacks cannot bound it)
            self._stalled += len(data)
            if self._stalled > MAX_HEAD_BYTES:
                raise self._refuse("response head too large" if self.head is None else
                                   "chunk line or trailers too large")
        return out

    def feed_eof(self) -> list[Event]:
        """The peer closed: ends a close-delimited body; nothing when idle or done; else an error."""
        if self._ended or not self._started:
            return []
        head = self.head
        if head is not None and head.length is None and not head.chunked:
            self._ended = True
            return [END]
        raise self._refuse("connection closed before the response was complete")

    def _flush(self) -> bytes:
        body = self._body
        piece = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._out.append(piece)
        return piece

    # -- llhttp callbacks (called from within feed_data) ---------------------------------------

    def on_message_begin(self) -> None:
        self._clean = False
        if self._ended:
            raise ProtocolError("data after the end of the response")
        if self._interim:
            self._begin()  # the real answer after an interim one

    def on_status(self, reason: bytes) -> None:
        # called once per feed the reason spans (httptools joins header pieces, not these)
        if b"\x00" in reason:  # llhttp takes any byte but CR and LF; h11 refuses NUL, as we do in values
            raise ProtocolError("NUL in the reason phrase")
        self._reason = self._reason + reason if self._reason else reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is not None:
            self._on_trailer(name, value)
            return
        value = value.rstrip(b" \t")  # llhttp strips the leading whitespace only
        n = len(name)
        if n == 14 or n == 17 or n == 12:  # content-length, transfer-encoding, content-type
            lname = name.lower()
            if lname == b"content-length":
                # llhttp has checked the digits, overflow and duplicates; this keeps int()
                # from ever raising whatever llhttp lets through
                if len(value) > 18 or not value.isdigit():
                    raise ProtocolError("invalid Content-Length")
                self._length = int(value)
            elif lname == b"transfer-encoding":
                # only a single `chunked`: any other coding we would relay without its
                # Transfer-Encoding header (hop-by-hop), i.e. corrupt the body
                if self._chunked or value.lower() != b"chunked":
                    raise ProtocolError("unsupported Transfer-Encoding")
                self._chunked = True
            elif lname == b"content-type":
                self._event_stream = value[:17].lower() == b"text/event-stream"
        # names are tokens (llhttp refuses anything else), so ASCII: the cheaper default decode
        self._headers.append((name.decode(), value.decode("latin-1")))

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        """Trailers are read, counted and dropped (hop-by-hop by our policy)."""
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError("trailers too large")

    def on_headers_complete(self) -> None:
        p = self._llhttp
        if self._version_seen:
            self._version_seen = False  # for the first head only: an interim one may follow
        else:
            version = p.get_http_version()
            if version != "1.1" and version != "1.0":
                raise ProtocolError(f"unsupported HTTP version {version}")
        status = p.get_status_code()
        if status < 200:
            if status == 101:
                raise ProtocolError("protocol upgrades are not supported")
            if status < 100:
                raise ProtocolError(f"invalid status {status}")
            self._interim += 1
            if self._interim > MAX_INTERIM_ANSWERS:
                raise ProtocolError("too many interim (1xx) answers")
            self._count_head()  # rare: always counted, as they may come in earlier feeds
            return  # llhttp completes it (no body) and parses the real answer next
        if status > 599:
            raise ProtocolError(f"invalid status {status}")
        if self._head_room < 0:
            self._count_head()
        keep_alive = self._llhttp_keep_alive = p.should_keep_alive()  # reset by llhttp at message end
        reason = self._reason.decode("latin-1")
        if self._head_request or status == 204 or status == 304:
            # no body, whatever the head declares; never reused (see the module docstring)
            head = Head(status, reason, self._headers, False, 0, False, self._event_stream)
        elif self._chunked:
            # Content-Length with chunked was refused by llhttp (RFC 9112 6.1: "ought to be
            # handled as an error"), so no `length is None` check here
            head = Head(status, reason, self._headers, keep_alive, None, True, self._event_stream)
        elif self._length is not None:
            head = Head(status, reason, self._headers, keep_alive, self._length, False, self._event_stream)
        else:
            head = Head(status, reason, self._headers, False, None, False, self._event_stream)  # until close
        self.head = head
        self._head_bytes = 0  # trailers get their own MAX_HEAD_BYTES
        self._out.append(head)
        if self._head_request:
            self._ended = True
            self._out.append(END)

    def _count_head(self) -> None:
        """Add the head just parsed to `_head_bytes`; approximate, as llhttp trims the
        whitespace around values. Its list was built first: at most one read's worth."""
        size = self._head_bytes + len(self._reason) + 15  # "HTTP/1.1 200 " and CRLF
        for name, value in self._headers:
            size += len(name) + len(value) + 4  # ": " and CRLF
        self._head_bytes = size
        if size > MAX_HEAD_BYTES:
            raise ProtocolError("response head too large")

    def on_message_complete(self) -> None:
        if self.head is None:
            return  # an interim answer
        self._clean = self._llhttp_keep_alive
        if self._ended:  # a HEAD answer, already ended at its head; llhttp found no body
            if self._body:
                raise ProtocolError("data after the end of the response")
            self._end_tail = _HEAD_END_TAIL
            return
        # llhttp skips CR and LF after a message, so "nothing after the end" is checked in
        # `feed` as: the CR/LF run that ends the input is the one that ends the answer. Here,
        # that answer's run: a head and a chunked body end in CRLF CRLF after another byte;
        # a Content-Length body ends as its bytes do, and if those are all CR/LF the run goes
        # on into the head's end (in this feed) or into what came before (`_crlf_run`).
        tail = _HEAD_END_TAIL
        if self._body:
            piece = self._flush()
            if not self._chunked:
                last = piece[-1]
                tail = _crlf_tail(piece) if last == 10 or last == 13 else 0
                if tail == len(piece):
                    out = self._out
                    tail += _HEAD_END_TAIL if out[0] is self.head else self._crlf_run
        self._end_tail = tail
        self._ended = True
        self._out.append(END)
