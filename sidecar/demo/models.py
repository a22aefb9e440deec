"""Bundled example model servers for `sidecar demo` (and for tests that want a real model).

What this module owns:

- `ModelSpec`: what one fake model does: its name and version, a `shift` added to its
  logit (so a canary's scores drift), a `disagree_share` of instances it scores
  differently (a shadow that disagrees now and then), and injected latency, errors and hangs.
- `make_model_app(spec)`: an aiohttp app answering like TF-Serving and like an OpenAI-style
  LLM server:
    POST /v1/models/{name}:predict   {"instances": [...]} -> {"predictions": [...], "model", "version"}
    GET  /v1/models/{name}           TF-Serving model status
    GET  /health                     200 while serving
    POST /v1/chat/completions        JSON, or `text/event-stream` token chunks with "stream": true
- The fraud scorer: logistic regression with fixed weights over log amount, age and a
  country one-hot (`score_instances`).
- `start_model_server(spec)` -> `RunningModel` (served on a port; `spec` swappable live),
  and `make_instances(n, rng, drift)`, the demo driver's traffic.

Rules: malformed input is a 400 with a JSON error, never a 500 (a demo model must not make
the sidecar look broken). Randomness comes from one seeded numpy Generator per app, and
every model call draws the same three numbers (latency, error, hang) whatever the spec
says, so a run is reproducible for a seed and a request order. Every wait (latency, token
delay, hang) ends when the server stops, and handlers are cancelled when their client
leaves, so stopping is quick and leaves no task behind.

Imports: the standard library, numpy, orjson and aiohttp only: `sidecar demo` must run on
the installed package, and the demo models stand in for somebody else's servers, so they
share no code with the sidecar in front of them.
"""

from __future__ import annotations

import asyncio
import math
import time
import zlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal, Self, TypedDict

import numpy as np
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from numpy.typing import NDArray

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

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

# --- the fraud scorer ------------------------------------------------------------------

COUNTRIES: Final = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "PL", "BR", "IN", "NG")
_COUNTRY_SHARES: Final = np.array([0.30, 0.12, 0.14, 0.10, 0.05, 0.06, 0.06, 0.05, 0.05, 0.04, 0.03])
_COUNTRY_INDEX: Final = {code: i for i, code in enumerate(COUNTRIES)}
_OTHER_COUNTRY: Final = len(COUNTRIES)  # unknown or missing country: its own one-hot slot

# Fixed weights. Logit = intercept + amount term + age term + country term + shift.
_INTERCEPT: Final = -2.0
_W_LOG_AMOUNT: Final = 0.9  # per e-fold of (1 + amount) above that of a 60.0 payment
_LOG_AMOUNT_REF: Final = math.log1p(60.0)
_W_AGE: Final = -0.35  # per 15 years above 40
_W_COUNTRY: Final = np.array([0.0, 0.1, -0.2, 0.0, -0.1, 0.2, 0.15, 0.3, 0.8, 0.6, 1.2, 0.5])
_DEFAULT_AGE: Final = 40.0
_LOGIT_CLIP: Final = 40.0  # keeps np.exp finite: no overflow warning on absurd inputs
DISAGREE_SHIFT: Final = 1.5  # added to the logit of the instances a `disagree_share` picks

MAX_INSTANCES: Final = 10_000
MAX_AMOUNT: Final = 1e12
MAX_AGE: Final = 150.0


class BadInput(ValueError):
    """A request body the model cannot read; the message names the place."""


def _number(value: object, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{where}: expected a number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:
        raise BadInput(f"{where}: number too large") from None
    if not lo <= x <= hi:  # also rejects NaN
        raise BadInput(f"{where}: {x} is outside [{lo:g}, {hi:g}]")
    return x


def _parse_instances(instances: object) -> tuple[FloatArray, FloatArray, IntArray]:
    """Instances -> (amount, age, country index) arrays.

    An instance is an object {"amount": float, "age": number?, "country": str?} (other keys
    ignored, unknown countries share one slot), a number (the amount), or a list of numbers
    read as [amount, age, ...] (further numbers are ignored).
    """
    if not isinstance(instances, list) or not instances:
        raise BadInput('"instances" must be a non-empty list')
    if len(instances) > MAX_INSTANCES:
        raise BadInput(f'"instances" has {len(instances)} items; at most {MAX_INSTANCES}')
    n = len(instances)
    amount = np.empty(n, dtype=np.float64)
    age = np.empty(n, dtype=np.float64)
    country = np.empty(n, dtype=np.intp)
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if isinstance(inst, dict):
            if "amount" not in inst:
                raise BadInput(f"{where}.amount: missing")
            amount[i] = _number(inst["amount"], f"{where}.amount", 0.0, MAX_AMOUNT)
            raw_age = inst.get("age")
            age[i] = _DEFAULT_AGE if raw_age is None else _number(raw_age, f"{where}.age", 0.0, MAX_AGE)
            code = inst.get("country")
            if code is not None and not isinstance(code, str):
                raise BadInput(f"{where}.country: expected a string, got {type(code).__name__}")
            country[i] = _COUNTRY_INDEX.get(code.upper(), _OTHER_COUNTRY) if code else _OTHER_COUNTRY
        elif isinstance(inst, list):
            if not inst:
                raise BadInput(f"{where}: empty list")
            amount[i] = _number(inst[0], f"{where}[0]", 0.0, MAX_AMOUNT)
            age[i] = _number(inst[1], f"{where}[1]", 0.0, MAX_AGE) if len(inst) > 1 else _DEFAULT_AGE
            for j, extra in enumerate(inst[2:], start=2):
                _number(extra, f"{where}[{j}]", -math.inf, math.inf)
            country[i] = _OTHER_COUNTRY
        else:
            amount[i] = _number(inst, where, 0.0, MAX_AMOUNT)
            age[i] = _DEFAULT_AGE
            country[i] = _OTHER_COUNTRY
    return amount, age, country


def _disagrees(amount: FloatArray, share: float) -> NDArray[np.bool_]:
    """The instances a model with `disagree_share` scores differently: chosen by the amount's
    cents, so the same instance is always chosen (or never) and about `share` of them are."""
    cents = np.round(amount * 100.0) % 100.0
    chosen: NDArray[np.bool_] = cents < share * 100.0
    return chosen


def _fraud_scores(
    amount: FloatArray, age: FloatArray, country: IntArray, shift: float, disagree_share: float = 0.0
) -> FloatArray:
    logit = (
        _INTERCEPT
        + _W_LOG_AMOUNT * (np.log1p(amount) - _LOG_AMOUNT_REF)
        + _W_AGE * (age - _DEFAULT_AGE) / 15.0
        + _W_COUNTRY[country]
        + shift
    )
    if disagree_share > 0:
        logit = logit + DISAGREE_SHIFT * _disagrees(amount, disagree_share)
    clipped = np.clip(logit, -_LOGIT_CLIP, _LOGIT_CLIP)
    scores: FloatArray = 1.0 / (1.0 + np.exp(-clipped))
    return scores


def score_instances(instances: object, shift: float = 0.0, disagree_share: float = 0.0) -> list[float]:
    """What the model answers for these instances (raises BadInput like the server's 400)."""
    amount, age, country = _parse_instances(instances)
    scores: list[float] = _fraud_scores(amount, age, country, shift, disagree_share).tolist()
    return scores


class Instance(TypedDict):
    amount: float
    country: str
    age: int


def make_instances(n: int, rng: np.random.Generator, drift: float = 0.0) -> list[Instance]:
    """`n` payment instances for the demo's traffic.

    amount ~ lognormal around 60 (drift moves its log-mean by `drift`), country from
    COUNTRIES with fixed shares (drift tilts them towards the riskier end of the list),
    age ~ normal(41 - 4*drift, 12) rounded and clipped to [18, 95].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    amount = rng.lognormal(mean=math.log(60.0) + drift, sigma=1.0, size=n)
    shares = _COUNTRY_SHARES * np.exp(drift * np.linspace(-1.0, 1.0, len(COUNTRIES)))
    country = rng.choice(len(COUNTRIES), size=n, p=shares / shares.sum())
    age = np.clip(np.rint(rng.normal(41.0 - 4.0 * drift, 12.0, size=n)), 18, 95)
    return [
        Instance(amount=round(float(a), 2), country=COUNTRIES[int(c)], age=int(g))
        for a, c, g in zip(amount, country, age, strict=True)
    ]


# --- the server ------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One fake model. Mutable: a running server reads it on every request."""

    name: str
    version: str
    shift: float = 0.0  # added to the logit: a canary with shift > 0 scores higher
    disagree_share: float = 0.0  # share of instances (picked by their amount's cents) scored DISAGREE_SHIFT higher
    latency_s: float = 0.002  # mean; lognormal jitter (sigma 0.5) around it
    error_rate: float = 0.0  # share of model calls answered 503
    hang_rate: float = 0.0  # share of model calls never answered (until stop or client leaves)
    token_delay_s: float = 0.02  # between streamed chat tokens
    seed: int = 0


LATENCY_SIGMA: Final = 0.5
MAX_LATENCY_FACTOR: Final = 50.0  # a jittered delay is at most this many means
MAX_TOKENS: Final = 512
DEFAULT_MAX_TOKENS: Final = 16
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
SHUTDOWN_TIMEOUT_S: Final = 2.0

_VOCAB: Final = (
    "the", "model", "thinks", "this", "payment", "looks", "fine", "risky", "canary", "stable",
    "traffic", "is", "shifting", "slowly", "and", "every", "token", "streams", "on", "time",
)  # fmt: skip


@dataclass(eq=False)
class _ModelState:
    spec: ModelSpec
    rng: np.random.Generator
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0  # model calls (predict, chat), not status or health


_STATE: Final = web.AppKey("sidecar_demo_model", _ModelState)


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def _abort(request: web.BaseRequest) -> web.StreamResponse:
    """Drop the connection; aiohttp then fails to send the returned response and lets it go."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response()


async def _pause(state: _ModelState, delay_s: float) -> bool:
    """Sleep `delay_s`; False if the server started stopping first."""
    if delay_s <= 0:
        return not state.stopping.is_set()
    try:
        async with asyncio.timeout(delay_s):
            await state.stopping.wait()
    except TimeoutError:
        return True
    return False


async def _misbehave(state: _ModelState) -> Literal["ok", "error", "gone"]:
    """Apply the spec's hang, latency and error injection to one model call."""
    spec = state.spec
    z = float(state.rng.standard_normal())
    u_error = float(state.rng.random())
    u_hang = float(state.rng.random())
    if u_hang < spec.hang_rate:
        await state.stopping.wait()  # or the handler is cancelled when the client leaves
        return "gone"
    if spec.latency_s > 0:
        mu = math.log(spec.latency_s) - LATENCY_SIGMA**2 / 2  # so that the mean is latency_s
        delay_s = min(math.exp(mu + LATENCY_SIGMA * z), MAX_LATENCY_FACTOR * spec.latency_s)
        if not await _pause(state, delay_s):
            return "gone"
    return "error" if u_error < spec.error_rate else "ok"


def _version_headers(spec: ModelSpec) -> dict[str, str]:
    return {"x-model-name": spec.name, "x-model-version": spec.version}


async def _predict(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    spec = state.spec
    name = request.match_info["name"]
    if name != spec.name:
        return _json(404, {"error": f"Servable not found for request: Latest({name})"})
    state.requests += 1
    try:
        payload = orjson.loads(await request.read())
        if not isinstance(payload, dict):
            raise BadInput("body must be a JSON object")
        instances = payload.get("instances", payload.get("inputs"))
        amount, age, country = _parse_instances(instances)
    except (orjson.JSONDecodeError, BadInput) as exc:
        return _json(400, {"error": str(exc)})
    match await _misbehave(state):
        case "gone":
            return _abort(request)
        case "error":
            return _json(503, {"error": "injected failure"}, _version_headers(spec))
    scores = _fraud_scores(amount, age, country, spec.shift, spec.disagree_share)
    return _json(
        200,
        {"predictions": scores.tolist(), "model": spec.name, "version": spec.version},
        _version_headers(spec),
    )


async def _model_status(request: web.Request) -> web.StreamResponse:
    spec = request.app[_STATE].spec
    name = request.match_info["name"]
    if name != spec.name:
        return _json(404, {"error": f"Could not find any versions of model {name}"})
    status = {"error_code": "OK", "error_message": ""}
    return _json(
        200, {"model_version_status": [{"version": spec.version, "state": "AVAILABLE", "status": status}]}
    )


async def _health(request: web.Request) -> web.StreamResponse:
    spec = request.app[_STATE].spec
    return _json(200, {"status": "ok", "model": spec.name, "version": spec.version})


def _openai_error(status: int, message: str, kind: str) -> web.Response:
    return _json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})


def _parse_chat(body: object) -> tuple[str, int, bool]:
    """-> (prompt: the last message's content, max_tokens, stream)."""
    if not isinstance(body, dict):
        raise BadInput("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInput('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise BadInput(f"messages[{i}]: expected an object with a string content")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadInput(f'"max_tokens" must be an integer in [1, {MAX_TOKENS}]')
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadInput('"stream" must be a boolean')
    prompt: str = messages[-1]["content"]
    return prompt, max_tokens, stream


def _tokens(prompt: str, n: int, seed: int) -> list[str]:
    """Deterministic "generation": the same prompt and seed give the same tokens."""
    rng = np.random.default_rng([seed, zlib.crc32(prompt.encode())])
    picks = rng.integers(0, len(_VOCAB), size=n)
    return [(" " if i else "") + _VOCAB[int(k)] for i, k in enumerate(picks)]


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    spec = state.spec
    state.requests += 1
    try:
        prompt, max_tokens, stream = _parse_chat(orjson.loads(await request.read()))
    except (orjson.JSONDecodeError, BadInput) as exc:
        return _openai_error(400, str(exc), "invalid_request_error")
    match await _misbehave(state):  # the latency part is the time to the first token
        case "gone":
            return _abort(request)
        case "error":
            return _openai_error(503, "injected failure", "server_error")
    tokens = _tokens(prompt, max_tokens, spec.seed)
    completion_id = f"chatcmpl-{spec.name}-{spec.version}-{state.requests}"
    created = int(time.time())

    if not stream:
        # A non-streamed answer still takes the generation time, as a real LLM's does.
        if not await _pause(state, spec.token_delay_s * (len(tokens) - 1)):
            return _abort(request)
        return _json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": spec.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(tokens)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(tokens),
                    "total_tokens": len(prompt.split()) + len(tokens),
                },
            },
            _version_headers(spec),
        )

    def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": spec.name,
                "choices": [choice],
            }
        )

    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_version_headers(spec)}
    )
    try:
        await resp.prepare(request)
        for i, token in enumerate(tokens):
            if i and not await _pause(state, spec.token_delay_s):
                return _abort(request)
            await resp.write(
                chunk({"role": "assistant", "content": token} if i == 0 else {"content": token}, None)
            )
        await resp.write(chunk({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:  # the client left between two tokens
        return _abort(request)
    return resp


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx/5xx (unknown path, wrong method, body too large) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _json(exc.status, {"error": exc.reason}, allow)


def make_model_app(spec: ModelSpec) -> web.Application:
    """The model's aiohttp app (serve it with handler_cancellation=True, as start_model_server does)."""
    app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY_BYTES)
    state = _ModelState(spec=spec, rng=np.random.default_rng(spec.seed))
    app[_STATE] = state

    async def wake_waiters(_: web.Application) -> None:
        state.stopping.set()  # hangs and delays end now, not after the runner's shutdown timeout

    app.on_shutdown.append(wake_waiters)
    app.router.add_post(r"/v1/models/{name:[^/:]+}:predict", _predict)
    app.router.add_get("/v1/models/{name}", _model_status)
    app.router.add_get("/health", _health)
    app.router.add_post("/v1/chat/completions", _chat)
    return app


class RunningModel:
    """A model app served on a port. `spec` may be replaced, or its fields changed, live."""

    def __init__(self, runner: web.AppRunner, state: _ModelState, host: str, port: int) -> None:
        self._runner: web.AppRunner | None = runner
        self._state = state
        self.host = host
        self.port = port
        url_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        url_host = f"[{url_host}]" if ":" in url_host else url_host
        self.url = f"http://{url_host}:{port}"

    def __repr__(self) -> str:
        spec = self._state.spec
        return f"<RunningModel {spec.name} v{spec.version} {self.url} requests={self.requests}>"

    @property
    def spec(self) -> ModelSpec:
        return self._state.spec

    @spec.setter
    def spec(self, spec: ModelSpec) -> None:
        self._state.spec = spec

    @property
    def requests(self) -> int:
        """Model calls served (predict and chat), not status or health checks."""
        return self._state.requests

    async def stop(self) -> None:
        """Stop listening, end hangs and delays, close connections. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._state.stopping.set()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def start_model_server(spec: ModelSpec, host: str = "127.0.0.1", port: int = 0) -> RunningModel:
    """Serve `make_model_app(spec)` on host:port (0: an ephemeral port; see `.url`, `.port`)."""
    app = make_model_app(spec)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return RunningModel(runner, app[_STATE], host, bound_port)
