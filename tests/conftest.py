"""Shared fixtures: fake upstreams (tests/upstreams.py), an in-process sidecar from a config
dict on ephemeral loopback ports, and an aiohttp client. Everything real, over sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import uvloop

from sidecar.shell.server import Sidecar
from tests.harness import SidecarFactory, sidecar_config
from tests.upstreams import UpstreamFactory

__all__ = ["MakeSidecar", "sidecar_config"]

MakeSidecar = Callable[..., Awaitable[Sidecar]]


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
    factory = SidecarFactory()
    try:
        yield factory.make
    finally:
        await factory.aclose()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
