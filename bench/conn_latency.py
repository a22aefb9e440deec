#!/usr/bin/env python3
"""Per-connection latencies of a closed-loop load: which connections wait, and when.

wrk reports one latency distribution for all its connections. This driver (stdlib only, one
thread, blocking connects then non-blocking keep-alive exchanges) keeps each connection's
own latencies, so unfairness between connections shows: the spread of completed requests per
connection, each connection's worst latency, and the first request of each connection apart
from the rest (a new connection's first request also waits for the server to accept it).

    python3 bench/conn_latency.py 127.0.0.1:18110 --connections 128 --seconds 8
    python3 bench/conn_latency.py 127.0.0.1:18110 --connections 128 --seconds 8 --settle 1

`--settle S`: open every connection, wait S seconds, then start sending: the accept of a
burst of connections is then out of the measured latencies. Run it pinned away from the
server (`taskset -c 0`); it needs far less CPU than the server under test.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import time

DEFAULT_BODY = (b'{"instances": [{"amount": 42.5, "country": "DE", "merchant": "m-1234", "hour": 13, '
                b'"device": "ios", "history": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}]}')


class Conn:
    __slots__ = ("buf", "lat", "no", "sent", "sock")

    def __init__(self, no: int, sock: socket.socket) -> None:
        self.no, self.sock, self.buf, self.sent = no, sock, b"", 0.0
        self.lat: list[float] = []


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("address", help="host:port of the proxy")
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--settle", type=float, default=0.0, help="seconds between connecting and the first requests")
    ap.add_argument("--path", default="/v1/models/fraud:predict")
    args = ap.parse_args()
    host, port = args.address.rsplit(":", 1)
    body = DEFAULT_BODY
    request = (f"POST {args.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sel = selectors.DefaultSelector()
    conns: list[Conn] = []
    for i in range(args.connections):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        conns.append(Conn(i, s))
        sel.register(s, selectors.EVENT_READ, conns[-1])
    if args.settle:
        time.sleep(args.settle)
    for c in conns:
        c.sent = time.perf_counter()
        c.sock.sendall(request)
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        for key, _ in sel.select(0.1):
            c = key.data
            data = c.sock.recv(65536)
            if not data:
                raise SystemExit(f"connection {c.no} closed by the server")
            buf = c.buf = c.buf + data
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            length = int(buf[:head_end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buf) < head_end + 4 + length:
                continue
            c.buf = buf[head_end + 4 + length:]
            now = time.perf_counter()
            c.lat.append(now - c.sent)
            c.sent = now
            c.sock.sendall(request)
    for c in conns:
        c.sock.close()
    lats = [c.lat for c in conns]
    every = sorted(x for lat in lats for x in lat)
    later = sorted(x for lat in lats for x in lat[1:])
    firsts = sorted(lat[0] for lat in lats if lat)
    counts = sorted(len(lat) for lat in lats)
    worst = sorted(max(lat) for lat in lats if lat)
    n = len(every)
    print(f"requests {n} ({n / args.seconds:.0f}/s) over {args.connections} connections")
    print(f"all:          p50 {pct(every, .5):.1f}  p99 {pct(every, .99):.1f}  p99.9 {pct(every, .999):.1f}"
          f"  max {every[-1] * 1e3:.1f} ms")
    print(f"first of each connection: p50 {pct(firsts, .5):.1f}  max {firsts[-1] * 1e3:.1f} ms")
    if later:
        print(f"later ones:   p50 {pct(later, .5):.1f}  p99 {pct(later, .99):.1f}  max {later[-1] * 1e3:.1f} ms")
    print(f"completed per connection: min {counts[0]}  median {counts[len(counts) // 2]}  max {counts[-1]}")
    print(f"worst latency per connection: median {pct(worst, .5):.1f}  max {worst[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
