"""The bundled demo models answer like TF-Serving and an OpenAI-style LLM, on real sockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from sidecar.demo import (
    COUNTRIES,
    ModelSpec,
    RunningModel,
    make_instances,
    score_instances,
    start_model_server,
)

TIMEOUT = aiohttp.ClientTimeout(total=5)
INSTANCES = [
    {"amount": 120.5, "country": "DE", "age": 31},
    {"amount": 4999.0, "country": "NG", "age": 22},
    {"amount": 3.2, "country": "XX", "age": 70},
    {"amount": 60.0},
]


@pytest.fixture
async def model() -> AsyncIterator[RunningModel]:
    running = await start_model_server(ModelSpec("fraud", "1", latency_s=0.0, token_delay_s=0.005))
    async with running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        yield s


async def predict(
    session: aiohttp.ClientSession, model: RunningModel, body: object
) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{model.url}/v1/models/fraud:predict", json=body) as resp:
        return resp.status, await resp.json()


async def test_predict_scores_each_instance(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """Each instance gets one score in [0, 1], with the model's name and version."""
    status, got = await predict(session, model, {"instances": INSTANCES})
    assert status == 200
    assert got["model"] == "fraud"
    assert got["version"] == "1"
    assert len(got["predictions"]) == len(INSTANCES)
    assert all(0.0 <= p <= 1.0 for p in got["predictions"])
    assert got["predictions"] == score_instances(INSTANCES)
    assert model.requests == 1


async def test_predict_is_deterministic(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """The same input always gets the same scores."""
    _, first = await predict(session, model, {"instances": INSTANCES})
    _, second = await predict(session, model, {"instances": INSTANCES})
    assert first["predictions"] == second["predictions"]


async def test_predict_accepts_lists_of_numbers(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """Numbers and [amount, age, ...] lists are accepted too."""
    status, got = await predict(session, model, {"instances": [120.5, [120.5, 31], [1.0, 2.0, 3.0]]})
    assert status == 200
    assert len(got["predictions"]) == 3
    assert all(0.0 <= p <= 1.0 for p in got["predictions"])


async def test_shift_raises_scores(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """A canary with a positive shift scores every instance higher."""
    _, stable = await predict(session, model, {"instances": INSTANCES})
    model.spec.shift = 1.0  # live change, as a demo's canary drift would
    _, canary = await predict(session, model, {"instances": INSTANCES})
    assert all(c > s for c, s in zip(canary["predictions"], stable["predictions"], strict=True))


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b"{}",
        b'{"instances": []}',
        b'{"instances": "x"}',
        b'{"instances": [{"country": "DE"}]}',
        b'{"instances": [{"amount": "12"}]}',
        b'{"instances": [{"amount": -1}]}',
        b'{"instances": [{"amount": 1, "age": 1e300}]}',
        b'{"instances": [{"amount": 1, "country": 7}]}',
        b'{"instances": [[]]}',
        b'{"instances": [true]}',
        b'{"instances": [null]}',
        b'{"instances": [[1, "a"]]}',
        b"\xff\xfe",
    ],
)
async def test_malformed_input_is_400(
    model: RunningModel, session: aiohttp.ClientSession, body: bytes
) -> None:
    """Malformed input gets a 400 with a JSON error, never a 500."""
    async with session.post(f"{model.url}/v1/models/fraud:predict", data=body) as resp:
        assert resp.status == 400
        assert isinstance((await resp.json())["error"], str)


async def test_unknown_model_and_path(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """Another model's name is 404, an unknown path 404, a wrong method 405, all JSON."""
    async with session.post(f"{model.url}/v1/models/other:predict", json={"instances": [1.0]}) as resp:
        assert resp.status == 404
        assert "other" in (await resp.json())["error"]
    async with session.get(f"{model.url}/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "Not Found"}
    async with session.get(f"{model.url}/v1/models/fraud:predict") as resp:
        assert resp.status in (404, 405)
        await resp.json()


async def test_status_and_health(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """Model status reads like TF-Serving's; /health is 200; neither counts as a model call."""
    async with session.get(f"{model.url}/v1/models/fraud") as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "model_version_status": [
                {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            ]
        }
    async with session.get(f"{model.url}/health") as resp:
        assert resp.status == 200
    assert model.requests == 0


async def test_error_rate_answers_503(model: RunningModel, session: aiohttp.ClientSession) -> None:
    """error_rate=1 makes every model call a 503."""
    model.spec.error_rate = 1.0
    status, got = await predict(session, model, {"instances": INSTANCES})
    assert status == 503
    assert got == {"error": "injected failure"}


async def test_hang_ends_on_stop(session: aiohttp.ClientSession) -> None:
    """A hanging model never answers; stopping it is still quick."""
    running = await start_model_server(ModelSpec("fraud", "1", hang_rate=1.0))
    try:
        with pytest.raises(TimeoutError):
            async with session.post(
                f"{running.url}/v1/models/fraud:predict",
                json={"instances": [1.0]},
                timeout=aiohttp.ClientTimeout(total=0.1),
            ):
                pass
    finally:
        started = time.monotonic()
        await running.stop()
    assert time.monotonic() - started < 1.0


async def test_chat_stream_yields_tokens_then_done(
    model: RunningModel, session: aiohttp.ClientSession
) -> None:
    """A streamed chat completion sends one event per token, a stop chunk, then [DONE]."""
    body = {"model": "fraud", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with session.post(f"{model.url}/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = []
        while event := await resp.content.readuntil(b"\n\n"):
            assert event.startswith(b"data: ")
            events.append(event[len(b"data: ") : -2])
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 6
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)

    async with session.post(f"{model.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        whole = await resp.json()
    assert whole["choices"][0]["message"]["content"] == streamed
    assert whole["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"{}",
        b'{"messages": []}',
        b'{"messages": [{"content": 1}]}',
        b'{"messages": [{"content": "x"}], "stream": "yes"}',
    ],
)
async def test_chat_malformed_is_400(
    model: RunningModel, session: aiohttp.ClientSession, body: bytes
) -> None:
    """Malformed chat requests get an OpenAI-style 400."""
    async with session.post(f"{model.url}/v1/chat/completions", data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


def test_make_instances_is_seeded_and_drifts() -> None:
    """Traffic is reproducible for a seed, and drift moves amounts up."""
    a = make_instances(500, np.random.default_rng(7))
    b = make_instances(500, np.random.default_rng(7))
    assert a == b
    assert len(a) == 500
    assert {i["country"] for i in a} <= set(COUNTRIES)
    assert all(18 <= i["age"] <= 95 and i["amount"] >= 0 for i in a)
    drifted = make_instances(500, np.random.default_rng(7), drift=1.0)
    assert np.median([i["amount"] for i in drifted]) > np.median([i["amount"] for i in a])
    assert score_instances(a)  # the generator's output is valid model input


def test_a_disagreeing_model_differs_on_a_stable_share_of_instances() -> None:
    """A shadow with disagree_share 0.1 scores about 10 % of payments higher, the same ones every time."""
    instances = make_instances(4000, np.random.default_rng(7))
    plain = np.array(score_instances(instances))
    shadow = np.array(score_instances(instances, disagree_share=0.1))
    differs = shadow > plain + 0.02
    assert 0.08 < differs.mean() < 0.12
    assert np.all(shadow >= plain)
    again = np.array(score_instances(instances, disagree_share=0.1))
    assert np.array_equal(shadow, again)
