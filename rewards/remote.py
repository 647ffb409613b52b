"""A scorer that lives in a reward service (`ttsrl serve-reward`), used like any local scorer:

    rewards:
      cer:
        scorer: remote
        weight: 1.0
        kwargs: {url: "http://gpu-host:8001", timeout_s: 60, retries: 3}

A batch is cut into requests of `batch_size` samples, sent concurrently (at most `max_concurrency` at a time).
A request that times out, cannot connect or gets a 5xx is retried up to `retries` times with exponential backoff
(`backoff_s`, doubling); a 4xx is not retried (the request itself is wrong). Samples whose request still fails
are **invalid**, with the error as the reason: never 0. Counters per call (`service/<name>/requests`, `errors`,
`failed_requests`, `latency_s`) are logged by the trainer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Sequence

import numpy as np

from rewards.base import Sample, ScoreResult, require
from rewards.wire import ENCODINGS, WireError, decode_result, encode_request

# FunASR configures the root logger at INFO, which would print every request httpx sends; failures are counted
# and reported here instead
logging.getLogger("httpx").setLevel(logging.WARNING)


class RewardServiceError(RuntimeError):
    """A reward service cannot be reached or is not ready (raised by RemoteScorer.check before training)."""


class RemoteScorer:
    needs_prompt_audio = False  # set from the service's /health by check()

    def __init__(
        self,
        url: str,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        token: str | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
        audio_encoding: str = "float32",
    ):
        """url: the service's base URL; token: bearer token (default: $TTSRL_REWARD_TOKEN); audio_encoding:
        float32 (exact) or pcm16 (half the bytes)."""
        self.check_kwargs(url=url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, batch_size=batch_size,
                          max_concurrency=max_concurrency, audio_encoding=audio_encoding)
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.token = token if token is not None else os.environ.get("TTSRL_REWARD_TOKEN")
        self.batch_size, self.max_concurrency, self.encoding = batch_size, max_concurrency, audio_encoding
        self._stats = self._zero()

    @classmethod
    def check_kwargs(cls, url: str = "", timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                     batch_size: int = 64, max_concurrency: int = 4, audio_encoding: str = "float32",
                     **_: object) -> None:
        """Range checks of the constructor's arguments (no network)."""
        require(isinstance(url, str) and url.startswith(("http://", "https://")), "url",
                f"must start with http:// or https://, got {url!r}")
        for key, value, ok, want in (("timeout_s", timeout_s, lambda v: v > 0, "> 0"),
                                     ("retries", retries, lambda v: v >= 0, ">= 0"),
                                     ("backoff_s", backoff_s, lambda v: v >= 0, ">= 0"),
                                     ("batch_size", batch_size, lambda v: v >= 1, ">= 1"),
                                     ("max_concurrency", max_concurrency, lambda v: v >= 1, ">= 1")):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require(number and ok(value), key, f"must be a finite number {want}, got {value!r}")
        require(audio_encoding in ENCODINGS, "audio_encoding", f"must be one of {ENCODINGS}, got {audio_encoding!r}")

    def check(self) -> dict:
        """Fail fast before training: GET /health, once. Raises RewardServiceError naming the url and the error."""
        try:
            info = self.health()
        except Exception as e:  # noqa: BLE001 - refused, timed out, 401, not JSON, ...
            raise RewardServiceError(
                f"reward service {self.url} is not answering /health: {type(e).__name__}: {e}") from None
        if not isinstance(info, dict) or info.get("ready") is not True:
            raise RewardServiceError(f"reward service {self.url} is not ready: /health answered {str(info)[:200]}")
        self.needs_prompt_audio = bool(info.get("needs_prompt_audio", False))
        return info

    @staticmethod
    def _zero() -> dict:
        return {"requests": 0, "errors": 0, "failed_requests": 0, "latency_s": 0.0}

    def pop_stats(self) -> dict:
        """Counters since the last call: requests sent, failed attempts, requests given up on, seconds waiting."""
        out, self._stats = self._stats, self._zero()
        return out

    def health(self) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/health", headers=self._headers(), timeout=min(self.timeout_s, 30.0))
        r.raise_for_status()
        return r.json()

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        samples = list(samples)
        chunks = [samples[i: i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        t0 = time.perf_counter()
        results = asyncio.run(self._score_all(chunks)) if chunks else []
        self._stats["latency_s"] += time.perf_counter() - t0
        return _concat(results)

    async def _score_all(self, chunks: list[list[Sample]]) -> list[ScoreResult]:
        import httpx

        sem = asyncio.Semaphore(self.max_concurrency)
        # the server drops a request that waited in its queue longer than this client waits for an answer
        headers = {**self._headers(), "X-Client-Timeout": f"{self.timeout_s:g}"}
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=headers) as client:
            async def one(chunk):
                async with sem:
                    return await self._score_chunk(client, chunk)

            return list(await asyncio.gather(*(one(c) for c in chunks)))

    async def _score_chunk(self, client, chunk: list[Sample]) -> ScoreResult:
        import httpx

        body = encode_request(chunk, self.encoding)
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            self._stats["requests"] += 1
            try:
                r = await client.post(f"{self.url}/score", json=body)
            except httpx.HTTPError as e:  # timeouts, refused connections, broken transfers
                error = f"{type(e).__name__}: {e}"
                self._stats["errors"] += 1
                continue
            if r.status_code == 200:
                try:
                    return decode_result(r.json(), len(chunk))
                except (WireError, ValueError) as e:  # a malformed answer is a failed request: its samples invalid
                    error = f"malformed response: {e}"
                    self._stats["errors"] += 1
                    break
            self._stats["errors"] += 1
            error = f"HTTP {r.status_code}: {_message(r)}"
            if r.status_code < 500:
                break  # the request is wrong; sending it again will not help
        self._stats["failed_requests"] += 1
        n = len(chunk)
        return ScoreResult(np.full(n, np.nan), np.zeros(n, dtype=bool), {},
                           [f"reward service {self.url} failed: {error}"] * n)


def _message(r) -> str:
    try:
        return str(r.json().get("error", r.text))[:300]
    except ValueError:
        return r.text[:300]


def _concat(results: list[ScoreResult]) -> ScoreResult:
    if not results:
        return ScoreResult(np.zeros(0), np.zeros(0, dtype=bool), {}, [])
    keys = sorted({k for r in results for k in r.sub_scores})
    subs = {k: np.concatenate([r.sub_scores.get(k, np.full(len(r.values), np.nan)) for r in results]) for k in keys}
    reasons = [x for r in results for x in (r.reasons or [None] * len(r.values))]
    return ScoreResult(np.concatenate([r.values for r in results]), np.concatenate([r.valid for r in results]),
                       subs, reasons)
