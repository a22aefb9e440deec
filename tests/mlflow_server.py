"""A real MLflow tracking server for the registry tests: `mlflow server` on a SQLite store and a free loopback port.

MLflow is a test-only dependency (the `dev` extra); the sidecar never imports it. The server
is found beside the running Python (the test virtualenv), else on PATH, else at
`SIDECAR_TEST_MLFLOW`. It starts in its own process group and is stopped (SIGTERM, then
SIGKILL) with everything it spawned. Versions are registered through its REST API, as the
tests' users would (`RestClient`).
Imports: stdlib, aiohttp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import free_port

START_TIMEOUT_S = 240.0   # a cold start imports MLflow twice (CLI, then the uvicorn worker): ~20 s idle, far more busy


def mlflow_executable() -> str | None:
    beside = Path(sys.executable).parent / "mlflow"
    if beside.exists():
        return str(beside)
    return os.environ.get("SIDECAR_TEST_MLFLOW") or shutil.which("mlflow")



@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """Start `mlflow server` in `folder`; yield its URL once /health answers; stop it."""
    exe = mlflow_executable()
    if exe is None:
        raise RuntimeError("mlflow not found: install the test dependencies (pip install -e '.[dev]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = folder / "mlflow.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder, env=env,
            start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up within {START_TIMEOUT_S}s: "
                                   f"{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class RestClient:
    """MLflow's REST API, the calls the tests make to set up and read the registry."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.base = f"{url}/api/2.0/mlflow"

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(f"{self.base}/{path}", json=body) as r:
            doc: dict[str, Any] = await r.json()
            assert r.status == 200, (path, r.status, doc)
            return doc

    async def _get(self, path: str, **params: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/{path}", params=params) as r:
            doc: dict[str, Any] = await r.json()
            assert r.status == 200, (path, r.status, doc)
            return doc

    async def register(self, name: str, versions: int) -> None:
        """A registered model with `versions` versions ("1", "2", ...)."""
        await self._post("registered-models/create", {"name": name})
        for i in range(1, versions + 1):
            doc = await self._post("model-versions/create", {"name": name, "source": f"s3://models/{name}/{i}"})
            assert doc["model_version"]["version"] == str(i)

    async def set_alias(self, name: str, alias: str, version: str) -> None:
        await self._post("registered-models/alias", {"name": name, "alias": alias, "version": version})

    async def alias(self, name: str, alias: str) -> str:
        doc = await self._get("registered-models/alias", name=name, alias=alias)
        version: str = doc["model_version"]["version"]
        return version

    async def tags(self, name: str, version: str) -> dict[str, str]:
        doc = await self._get("model-versions/get", name=name, version=version)
        return {t["key"]: t["value"] for t in doc["model_version"].get("tags", [])}
