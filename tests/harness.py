"""An in-process sidecar from a config dict, on ephemeral loopback ports: what the
`make_sidecar` fixture (tests/conftest.py) and the reliability scripts (reliability/faults.py)
both start; and `until`, the one bounded poll for states that have no event to wait on.
Imports: stdlib, yaml, sidecar."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from sidecar.config.load import LoadedConfig, config_version, load_config, parse_config
from sidecar.shell.history import EVERY_S
from sidecar.shell.server import Sidecar


def sidecar_config(config: dict[str, Any]) -> dict[str, Any]:
    """Test defaults: loopback port 0, no access log, a drain that does not wait."""
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "access_log": False,
        "drain": {"delay": 0, "grace": 2},
    }
    base.update(config)
    return base


async def until(cond: Callable[[], object], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a plain or async condition until it holds; TimeoutError after `timeout_s`.

    Only for states the code under test reaches by itself with no event to wait on: traffic
    counts, health flags, retired pools, metric values read over HTTP.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                got = cond()
                if inspect.isawaitable(got):
                    got = await got
                if got:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise TimeoutError(f"{what} not reached within {timeout_s}s") from None


class SidecarFactory:
    """Starts sidecars (each `run()` in its own task) and stops them all in `aclose()`."""

    def __init__(self) -> None:
        self.running: list[tuple[Sidecar, asyncio.Task[int]]] = []

    async def make(self, config: dict[str, Any], *, access_log_fd: int | None = None, path: Path | None = None,
                   config_poll_s: float | None = None, history_every_s: float = EVERY_S) -> Sidecar:
        """With `path`, the config is written there and loaded from it, so it can be reloaded;
        `history_every_s` samples the status page's history faster than the 5 s default."""
        text = yaml.safe_dump(sidecar_config(config))
        if path is not None:
            await asyncio.to_thread(path.write_text, text)
            loaded = await asyncio.to_thread(load_config, path)
        else:
            cfg, secrets = parse_config(text, env=os.environ)
            loaded = LoadedConfig(cfg, config_version(cfg), None, secrets)
        sc = Sidecar(loaded, access_log_fd=access_log_fd, config_poll_s=config_poll_s,
                     history_every_s=history_every_s)
        task = asyncio.ensure_future(sc.run())
        ready = asyncio.ensure_future(sc.ready.wait())
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises what went wrong
            raise AssertionError("sidecar stopped before it was ready")
        assert sc.ready.is_set(), "sidecar not ready within 30 s"
        self.running.append((sc, task))
        return sc

    async def aclose(self) -> None:
        for sc, _ in self.running:
            sc.request_stop()
        for _, task in self.running:
            await asyncio.wait_for(task, 15)
        self.running.clear()


def missing(what: str) -> NoReturn:
    """A tool a test needs is not installed: skip on a developer's machine, fail in CI (`CI=true`, set by
    .ci/run, which installs every such tool)."""
    if os.environ.get("CI") == "true":
        pytest.fail(what)
    pytest.skip(what)


def free_port() -> int:
    """A loopback port free now. Another process can take it before it is bound: callers that start a
    server on it either retry (reliability/soak.py) or bind within milliseconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
