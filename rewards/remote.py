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
import os
import time
from typing import Sequence

import numpy as np

from rewards.base import Sample, ScoreResult
from rewards.wire import ENCODINGS, WireError, decode_result, encode_request

# FunASR configures the root logger at INFO, which would print every request httpx sends; failures are counted
# and reported here instead
logging.getLogger("httpx").setLevel(logging.WARNING)


class RemoteScorer:
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
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or batch_size < 1 or max_concurrency < 1:
            raise ValueError("timeout_s > 0, retries >= 0, backoff_s >= 0, batch_size >= 1, max_concurrency >= 1")
        if audio_encoding not in ENCODINGS:
            raise ValueError(f"audio_encoding must be one of {ENCODINGS}")
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.token = token if token is not None else os.environ.get("TTSRL_REWARD_TOKEN")
        self.batch_size, self.max_concurrency, self.encoding = batch_size, max_concurrency, audio_encoding
        self._stats = self._zero()

    @staticmethod
    def _zero() -> dict:
        return {"requests": 0, "errors": 0, "failed_requests": 0, "latency_s": 0.0}

    def pop_stats(self) -> dict:
        """Counters since the last call: requests sent, failed attempts, requests given up on, seconds waiting."""
        out, self._stats = self._stats, self._zero()
        return out

    def health(self) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/health", headers=self._headers(), timeout=self.timeout_s)
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
                except (WireError, ValueError) as e:
                    error = f"bad response: {e}"
                    self._stats["errors"] += 1
                    continue
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
