"""Headless Chromium driven over the DevTools protocol (a websocket, aiohttp's client): load a
page at a given window width, wait for a condition in the page, evaluate JavaScript, take a
full-page screenshot. For the status page tests (tests/shell/test_status_page.py).

Invariants: one fresh profile per browser (`--user-data-dir`), every wait bounded, the
process killed and awaited on exit. Imports: stdlib, aiohttp, pytest, tests.harness.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.harness import missing, until

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*")


class Browser:
    """`async with Browser(profile) as b: await b.open(url, width)`; one page (tab)."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.errors: list[str] = []   # exceptions thrown by the page's scripts (Runtime events)

    async def __aenter__(self) -> Browser:
        if not CHROMIUM.exists():  # noqa: ASYNC240 (a stat, before anything runs)
            missing("headless Chromium is not installed (/usr/bin/chromium; .ci/run installs it)")
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        await until(port_file.exists, 30, "chromium's DevTools port")
        await until(lambda: len(port_file.read_text().split()) >= 2, 5, "DevToolsActivePort written")
        port = int(port_file.read_text().split()[0])
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        targets: list[dict[str, Any]] = []

        async def page_target() -> bool:
            nonlocal targets
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:  # type: ignore[union-attr]
                targets = [t for t in await r.json() if t.get("type") == "page"]
            return bool(targets)

        await until(page_target, 15, "a page target")
        self._ws = await self._session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are ignored)."""
        assert self._ws is not None
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        async with asyncio.timeout(30):
            while True:
                msg = await self._ws.receive_json()
                if msg.get("method") == "Runtime.exceptionThrown":
                    details = msg["params"]["exceptionDetails"]
                    self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
                if msg.get("id") == msg_id:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    result: dict[str, Any] = msg["result"]
                    return result

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited when it is a promise)."""
        res = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def open(self, url: str, width: int, height: int = 900) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout_s: float = 20, what: str = "page condition") -> None:
        """Poll a JavaScript expression until it is truthy (the page renders on its own timers)."""
        async def holds() -> bool:
            return bool(await self.eval(
                f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"))
        try:
            await until(holds, timeout_s, what)
        except TimeoutError as e:
            banner = await self.eval("document.getElementById('banner')?.textContent")
            data = await self.eval("JSON.stringify(document.body.dataset)")
            raise AssertionError(f"{e}; banner: {banner!r}; body data: {data}; script errors: {self.errors}") from None

    async def screenshot(self, path: Path, width: int) -> None:
        """The whole page (its full height) as a PNG at `path`."""
        height = int(await self.eval("document.documentElement.scrollHeight"))
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=min(height, 6000),
                        deviceScaleFactor=1, mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
