"""Shared fixtures: fake upstreams (tests/upstreams.py), an in-process sidecar from a config
dict on ephemeral loopback ports, and an aiohttp client. Everything real, over sockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml

from sidecar.config.load import LoadedConfig, config_version, load_config, parse_config
from sidecar.shell.server import Sidecar
from tests.upstreams import UpstreamFactory

MakeSidecar = Callable[..., Awaitable[Sidecar]]


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


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, the loop `sidecar run` uses in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
async def make_sidecar() -> AsyncIterator[MakeSidecar]:
    running: list[tuple[Sidecar, asyncio.Task[int]]] = []

    async def make(config: dict[str, Any], *, access_log_fd: int | None = None, path: Path | None = None,
                   config_poll_s: float | None = None) -> Sidecar:
        """With `path`, the config is written there and loaded from it, so it can be reloaded."""
        text = yaml.safe_dump(sidecar_config(config))
        if path is not None:
            await asyncio.to_thread(path.write_text, text)
            loaded = await asyncio.to_thread(load_config, path)
        else:
            cfg, secrets = parse_config(text, env=os.environ)
            loaded = LoadedConfig(cfg, config_version(cfg), None, secrets)
        sc = Sidecar(loaded, access_log_fd=access_log_fd, config_poll_s=config_poll_s)
        task = asyncio.ensure_future(sc.run())
        ready = asyncio.ensure_future(sc.ready.wait())
        await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()  # raises what went wrong
            raise AssertionError("sidecar stopped before it was ready")
        assert sc.ready.is_set(), "sidecar not ready within 10 s"
        running.append((sc, task))
        return sc

    try:
        yield make
    finally:
        for sc, _ in running:
            sc.request_stop()
        for _, task in running:
            await asyncio.wait_for(task, 15)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
