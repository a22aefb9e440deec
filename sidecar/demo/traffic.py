"""The demo's clients: fraud-scoring requests at a steady rate, delayed feedback labels, and
now and then a streamed chat completion, all through the sidecar's main listener.

Owns `Traffic`: its tasks (run inside the caller's TaskGroup, ended by `stop()`) and the
tally of what the clients saw. It knows the sidecar only by its URL, as any client would.

- Requests go out at `rate` per second over `CLIENTS` connections, one payment each, with a
  user id from `USERS` (so the sticky split keeps each user on one version) and, for
  `EU_SHARE` of them, `x-region: eu`.
- Labels: each answered fraud request gets its ground truth a moment later, posted in
  batches to the feedback path with the answer's `x-request-id`. The truth is drawn from
  v1's own score (a calibrated model: a payment scored 0.3 is fraud 30 % of the time), so
  the live accuracy is what a calibrated scorer earns. Requests routed to `fraud-eu` (after
  the reload) are not labelled: that route keeps no feedback.
- From `campaign()` on, most payments come from `CAMPAIGN_COUNTRIES`: the drift
  check sees the country mix move, while scores and accuracy hardly change (the model
  weighs these countries about as it weighs the usual mix).

Imports: the standard library, aiohttp, numpy, orjson, `sidecar.demo.models` and
`sidecar.demo.scenario`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import numpy as np
import orjson

from sidecar.demo.models import make_instances, score_instances
from sidecar.demo.scenario import CHAT, EU_SHARE, FEEDBACK, PREDICT, REGION_HEADER, USER_HEADER, USERS

CLIENTS: Final = 8
LABEL_DELAY_S: Final = 1.0  # a label is posted this long after its answer
LABEL_BATCH: Final = 500  # labels per feedback post (the sidecar takes up to 1000)
MAX_WAITING_LABELS: Final = 20_000  # bounded: past it the oldest labels are never posted
CHAT_EVERY_S: Final = 2.0
CAMPAIGN_COUNTRIES: Final = ("DE", "FR", "NL", "ES", "IT")
CAMPAIGN_SHARE: Final = 0.7  # share of payments during the campaign that come from CAMPAIGN_COUNTRIES
REQUEST_TIMEOUT: Final = aiohttp.ClientTimeout(total=10, sock_connect=2)
_JSON: Final = {"content-type": "application/json"}


@dataclass
class Tally:
    """What the clients saw (client side; the sidecar's own figures come from its admin API)."""

    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # 0: no answer (connection error, timeout)
    answered_by: Counter[str] = field(default_factory=Counter)  # x-sidecar-backend of each answer
    after_retry: int = 0  # answers whose x-sidecar-attempts was above 1
    fallbacks: int = 0  # answers from the route's static fallback
    labels_posted: int = 0
    label_outcomes: Counter[str] = field(default_factory=Counter)
    label_errors: int = 0  # feedback posts that failed as a whole
    chats: int = 0
    chat_first_token_s: list[float] = field(default_factory=list)
    chat_tokens: int = 0
    chat_errors: int = 0

    @property
    def client_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status == 0 or status >= 500)


class Traffic:
    """Clients of one sidecar at `proxy_url`; `run()` until `stop()`."""

    def __init__(self, proxy_url: str, rate: float, seed: int = 0) -> None:
        self.proxy_url = proxy_url
        self.rate = rate
        self.tally = Tally()
        self._rng = np.random.default_rng(seed)
        self._stopping = asyncio.Event()
        self._campaign = False
        self._eu_routed = False
        self._labels: deque[tuple[float, str, int]] = deque(maxlen=MAX_WAITING_LABELS)  # (due, id, label)
        self._next_send = 0.0

    def campaign(self) -> None:
        """From now on most payments come from CAMPAIGN_COUNTRIES."""
        self._campaign = True

    def eu_routed(self) -> None:
        """Called as the config with route `fraud-eu` goes in: its requests get no labels."""
        self._eu_routed = True

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=CLIENTS + 4)
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
            self._next_send = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                for _ in range(CLIENTS):
                    tg.create_task(self._client(session))
                tg.create_task(self._post_labels(session))
                tg.create_task(self._chat(session))

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` (pacing, not synchronisation); False once stopping."""
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._stopping.wait()
            except TimeoutError:
                pass
        return not self._stopping.is_set()

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while True:
            # Shared pacing: each client takes the next free slot of the one schedule.
            slot = self._next_send = max(self._next_send + 1.0 / self.rate, time.monotonic() - 1.0)
            if not await self._pause(slot - time.monotonic()):
                return
            await self._one_request(session)

    async def _one_request(self, session: aiohttp.ClientSession) -> None:
        instances = make_instances(1, self._rng)
        if self._campaign and self._rng.random() < CAMPAIGN_SHARE:
            instances[0]["country"] = CAMPAIGN_COUNTRIES[int(self._rng.integers(len(CAMPAIGN_COUNTRIES)))]
        eu = bool(self._rng.random() < EU_SHARE)
        headers = {**_JSON, USER_HEADER: f"user-{int(self._rng.integers(USERS))}"}
        if eu:
            headers[REGION_HEADER] = "eu"
        labelled = not (eu and self._eu_routed)
        truth = int(self._rng.random() < score_instances(instances)[0])
        self.tally.sent += 1
        try:
            async with session.post(self.proxy_url + PREDICT, data=orjson.dumps({"instances": instances}),
                                    headers=headers) as resp:
                body = await resp.read()
                status = resp.status
                backend = resp.headers.get("x-sidecar-backend", "(sidecar)")
                attempts = resp.headers.get("x-sidecar-attempts", "1")
                request_id = resp.headers.get("x-request-id")
        except (aiohttp.ClientError, TimeoutError):
            self.tally.statuses[0] += 1
            return
        self.tally.statuses[status] += 1
        self.tally.answered_by[backend] += 1
        self.tally.after_retry += attempts != "1"
        if backend.startswith("fallback"):
            self.tally.fallbacks += 1
        elif status == 200 and labelled and request_id and b'"predictions":[' in body:
            self._labels.append((time.monotonic() + LABEL_DELAY_S, request_id, truth))

    async def _post_labels(self, session: aiohttp.ClientSession) -> None:
        while await self._pause(0.5):
            now = time.monotonic()
            batch: list[dict[str, object]] = []
            while self._labels and self._labels[0][0] <= now and len(batch) < LABEL_BATCH:
                _, request_id, label = self._labels.popleft()
                batch.append({"request_id": request_id, "label": label})
            if not batch:
                continue
            try:
                async with session.post(self.proxy_url + FEEDBACK, data=orjson.dumps(batch), headers=_JSON) as resp:
                    answer = orjson.loads(await resp.read()) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
                answer = None
            if not isinstance(answer, dict):
                self.tally.label_errors += 1
                continue
            self.tally.labels_posted += len(batch)
            self.tally.label_outcomes.update({k: int(v) for k, v in answer.get("counts", {}).items()})

    async def _chat(self, session: aiohttp.ClientSession) -> None:
        body = orjson.dumps({"model": "demo", "stream": True, "max_tokens": 12,
                             "messages": [{"role": "user", "content": "is this payment risky?"}]})
        while await self._pause(CHAT_EVERY_S):
            self.tally.chats += 1
            t0 = time.monotonic()
            first: float | None = None
            try:
                async with session.post(self.proxy_url + CHAT, data=body, headers=_JSON) as resp:
                    if resp.status != 200:
                        self.tally.chat_errors += 1
                        await resp.read()
                        continue
                    async for line in resp.content:
                        if line.startswith(b"data: {") and b'"content"' in line:
                            first = time.monotonic() - t0 if first is None else first
                            self.tally.chat_tokens += 1
            except (aiohttp.ClientError, TimeoutError):
                self.tally.chat_errors += 1
                continue
            if first is not None:
                self.tally.chat_first_token_s.append(first)
