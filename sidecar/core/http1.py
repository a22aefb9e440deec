"""A sans-IO HTTP/1.1 response parser for upstream answers (RFC 9112), as h11 is.

Bytes go in with `feed(data)` (and `feed_eof()` when the peer closes); events come out:
a `Head` (status, headers, framing), body pieces (`bytes`), then `END`. It never touches
a socket, so it is tested with any split of the input (tests/core/test_http1.py).

Framing (RFC 9112 6.3), in order: HEAD requests and 1xx/204/304 answers have no body;
`Transfer-Encoding: chunked` (overrides Content-Length; such a connection is not reused);
`Content-Length`; otherwise the body runs until the connection closes. Interim 1xx
answers (100 Continue, 103 Early Hints) are skipped. Anything else malformed is a
`ProtocolError`: the proxy answers 502 and closes the connection.

Imports: stdlib only.
"""

from __future__ import annotations

from typing import Final

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_CHUNK_LINE: Final = 4096


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
        self.length = length      # body bytes when Content-Length framed; None otherwise
        self.chunked = chunked
        self.event_stream = event_stream  # Content-Type text/event-stream: relayed event by event

    def __repr__(self) -> str:
        return f"Head({self.status}, length={self.length}, chunked={self.chunked}, keep_alive={self.keep_alive})"


Event = Head | bytes | _End

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_EOF, _DONE = range(8)
# RFC 9110 token characters; `name.translate(None, _TOKEN)` is empty exactly when every byte
# of a header name is one of them (checked in C, not byte by byte in Python)
_TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ResponseParser:
    """Parses one response at a time; `reset` before the next one on the same connection."""

    __slots__ = ("_buf", "_head_request", "_remaining", "_state", "head")

    def __init__(self, head_request: bool = False) -> None:
        self.reset(head_request)

    def reset(self, head_request: bool = False) -> None:
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0
        self._head_request = head_request
        self.head: Head | None = None

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def idle(self) -> bool:
        """Nothing of a response has arrived yet."""
        return self._state == _HEAD and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        out: list[Event] = []
        while True:
            state = self._state
            if state == _LENGTH:
                if not buf:
                    break
                n = self._remaining
                if len(buf) <= n:
                    out.append(buf)
                    self._remaining = n - len(buf)
                    buf = b""
                    if self._remaining == 0:
                        self._state = _DONE
                        out.append(END)
                    break
                out.append(buf[:n])
                buf = buf[n:]
                self._state = _DONE
                out.append(END)
                continue
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise ProtocolError("response head too large")
                    break
                head = self._parse_head(buf[:end])
                buf = buf[end + 4:]
                if head is None:  # interim 1xx: the real answer follows
                    continue
                self.head = head
                out.append(head)
                if head.chunked:
                    self._state = _CHUNK_SIZE
                elif head.length is not None:
                    if head.length == 0:
                        self._state = _DONE
                        out.append(END)
                    else:
                        self._state, self._remaining = _LENGTH, head.length
                else:
                    self._state = _UNTIL_EOF
                continue
            if state == _UNTIL_EOF:
                if buf:
                    out.append(buf)
                    buf = b""
                break
            if state == _CHUNK_SIZE:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    break
                text = buf[:nl].split(b";", 1)[0].strip()
                if not text or any(c not in b"0123456789abcdefABCDEF" for c in text):
                    raise ProtocolError(f"invalid chunk size {bytes(buf[:nl][:20])!r}")
                size = int(text, 16)
                buf = buf[nl + 2:]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._state, self._remaining = _CHUNK_DATA, size
                continue
            if state == _CHUNK_DATA:
                if not buf:
                    break
                n = self._remaining
                piece = buf[:n]
                buf = buf[n:]
                out.append(piece)
                self._remaining = n - len(piece)
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
                continue
            if state == _CHUNK_CRLF:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                buf = buf[2:]
                self._state = _CHUNK_SIZE
                continue
            if state == _TRAILERS:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise ProtocolError("trailers too large")
                    break
                line, buf = buf[:nl], buf[nl + 2:]
                if not line:  # trailers are dropped (hop-by-hop by our policy)
                    self._state = _DONE
                    out.append(END)
                continue
            # _DONE: bytes after a complete response on a keep-alive connection are a
            # protocol violation (the server answered something we did not ask)
            if buf:
                raise ProtocolError("data after the end of the response")
            break
        self._buf = buf
        return out

    def feed_eof(self) -> list[Event]:
        """The peer closed: ends a close-delimited body, else the response is incomplete."""
        if self._state == _UNTIL_EOF:
            self._state = _DONE
            return [END]
        if self._state == _DONE:
            return []
        raise ProtocolError("connection closed before the response was complete")

    def _parse_head(self, block: bytes) -> Head | None:
        lines = block.split(b"\r\n")
        status_line = lines[0]
        if len(status_line) < 12 or not status_line.startswith(b"HTTP/1.") or status_line[8:9] != b" ":
            raise ProtocolError(f"invalid status line {bytes(status_line[:40])!r}")
        minor = status_line[7:8]
        code = status_line[9:12]
        if not code.isdigit() or (len(status_line) > 12 and status_line[12:13] != b" "):
            raise ProtocolError(f"invalid status line {bytes(status_line[:40])!r}")
        status = int(code)
        if status < 100:
            raise ProtocolError(f"invalid status {status}")
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("protocol upgrades are not supported")
            return None
        reason = status_line[13:].decode("latin-1")
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        connection = b""
        event_stream = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name.translate(None, _TOKEN):
                raise ProtocolError(f"invalid header line {bytes(line[:40])!r}")
            value = value.strip(b" \t")
            lname = name.lower()
            if lname == b"content-length":
                if not value.isdigit():
                    raise ProtocolError("invalid Content-Length")
                n = int(value)
                if length is not None and n != length:
                    raise ProtocolError("conflicting Content-Length headers")
                length = n
            elif lname == b"transfer-encoding":
                codings = [c.strip().lower() for c in value.split(b",")]
                if codings[-1] != b"chunked":
                    raise ProtocolError("unsupported Transfer-Encoding")
                chunked = True
            elif lname == b"connection":
                connection += b"," + value.lower()
            elif lname == b"content-type":
                event_stream = value[:17].lower() == b"text/event-stream"
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        keep_alive = b"close" not in connection if minor == b"1" else b"keep-alive" in connection
        if self._head_request or status in (204, 304):
            return Head(status, reason, headers, keep_alive, 0, False, event_stream)
        if chunked:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length; do not reuse
            return Head(status, reason, headers, keep_alive and length is None, None, True, event_stream)
        if length is None:
            keep_alive = False  # close-delimited body
        return Head(status, reason, headers, keep_alive, length, False, event_stream)
