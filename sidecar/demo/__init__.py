"""Example model servers and traffic for `sidecar demo`; public entry points only.

Owns nothing itself: it re-exports `sidecar.demo.models`. Imports: the standard library,
aiohttp, numpy and orjson (through `models`), so the demo runs on the installed package
alone.
"""

from sidecar.demo.models import (
    COUNTRIES,
    BadInput,
    Instance,
    ModelSpec,
    RunningModel,
    make_instances,
    make_model_app,
    score_instances,
    start_model_server,
)

__all__ = [
    "COUNTRIES",
    "BadInput",
    "Instance",
    "ModelSpec",
    "RunningModel",
    "make_instances",
    "make_model_app",
    "score_instances",
    "start_model_server",
]
