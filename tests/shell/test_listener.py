"""The proxy listener's accept loop (shell/listener.py `FairSite`), on uvloop as in production."""

from __future__ import annotations

import asyncio
import socket
import time

from tests.conftest import MakeSidecar
from tests.harness import until

BURST = 64


def _open_connections(sc: object) -> float:
    return float(sc.services.metrics.open_connections.read()[0][1])  # type: ignore[attr-defined]


async def test_a_burst_of_new_connections_is_accepted_at_the_next_turn_of_a_busy_loop(
        upstreams, make_sidecar: MakeSidecar):
    """Connections waiting in the listen queue are all taken at the next turn of the event loop,
    however long each turn takes (libuv alone takes one per turn: a burst of new connections to a
    busy sidecar waited seconds, docs/performance.md#the-tail); then each is served."""
    up = await upstreams.start()
    sc = await make_sidecar({"backends": {"m": {"url": up.url}}, "routes": [{"name": "r", "split": {"m": 1}}]})
    loop = asyncio.get_running_loop()
    turns = 0
    handle: list[asyncio.Handle] = []

    def busy_turn() -> None:  # every turn of the loop does 5 ms of other work, as under load
        nonlocal turns
        turns += 1
        end = time.perf_counter() + 0.005
        while time.perf_counter() < end:
            pass
        handle[:] = [loop.call_soon(busy_turn)]

    # blocking connects from the loop's own thread: the kernel completes them, they wait to be accepted
    socks = [socket.create_connection(("127.0.0.1", sc.proxy_port), timeout=5) for _ in range(BURST)]
    try:
        assert _open_connections(sc) == 0
        handle.append(loop.call_soon(busy_turn))
        try:
            await until(lambda: _open_connections(sc) == BURST, timeout_s=20, what="the burst accepted")
        finally:
            handle[0].cancel()
        assert turns <= 8, f"{BURST} connections took {turns} turns of the loop to accept"
        request = b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for s in socks:
            s.sendall(request)
        for s in socks:
            head = await asyncio.to_thread(s.recv, 65536)
            assert head.startswith(b"HTTP/1.1 200 "), head[:80]
    finally:
        for s in socks:
            s.close()


async def test_a_stopped_listener_refuses_new_connections(upstreams, make_sidecar: MakeSidecar):
    """Once the drain stops accepting, the listening socket is closed: a new connection is refused."""
    up = await upstreams.start()
    sc = await make_sidecar({"backends": {"m": {"url": up.url}}, "routes": [{"name": "r", "split": {"m": 1}}]})
    port = sc.proxy_port
    sc.request_stop()
    await until(lambda: sc.proxy.closing, what="the drain started")

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False

    await until(refused, what="connections refused")
