"""A scorer that lives in a reward service (`ttsrl serve-reward`), used like any local scorer:

    rewards:
      cer:
        scorer: remote
        weight: 1.0
        kwargs: {url: "http://gpu-host:8001", timeout_s: 60, retries: 3}

`url` may name several replicas of the same service: a list, or one comma-separated string (for `--set`):
`url: ["http://gpu-a:8001", "http://gpu-b:8001"]` or `url: "http://gpu-a:8001,http://gpu-b:8001"`.

A batch is cut into requests of `batch_size` samples, sent concurrently: at most `max_concurrency` in flight
per replica, each to the replica with the fewest outstanding requests (ties: round robin, so equal replicas
take turns from request to request and from step to step). A request that fails on one replica (cannot
connect, times out, an HTTP error, a malformed answer) is sent at once to the next replica that has not failed
it yet; a replica that failed is skipped for `cooldown_s` seconds (new requests go to the others) and then
tried again. When every replica has failed a request, it is retried up to `retries` times with exponential
backoff (`backoff_s`, doubling), again over every replica; a 4xx or malformed answer is not asked of the same
replica again (the request itself is wrong, or that replica is). With one url this is exactly a single
service retried `retries` times. Samples whose request still fails are **invalid**, with the errors as the
reason: never 0. Counters per call (`service/<name>/requests`, `errors`, `failed_requests`, `latency_s`, and with
several replicas `failovers` and `replica/<i>/requests|errors|latency_s`) are logged by the trainer through
`pop_stats`; `replica_stats()` gives the per-replica totals since the scorer was built.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from rewards.base import KwargError, Sample, ScoreResult, require
from rewards.wire import ENCODINGS, WireError, decode_result, encode_request

# FunASR configures the root logger at INFO, which would print every request httpx sends; failures are counted
# and reported here instead
logging.getLogger("httpx").setLevel(logging.WARNING)

# 4xx answers about the request itself (the same on every replica): they do not put the replica in cool-down
_REQUEST_ERRORS = (400, 413, 422)


class RewardServiceError(RuntimeError):
    """A reward service cannot be reached or is not ready (raised by RemoteScorer.check before training)."""


@dataclass
class _Replica:
    url: str
    down_until: float = 0.0  # time.monotonic() before which new requests avoid this replica (cool-down)
    requests: int = 0  # totals since the scorer was built
    errors: int = 0
    latency_s: float = 0.0  # summed over requests
    win_requests: int = 0  # since the last pop_stats
    win_errors: int = 0
    win_latency_s: float = 0.0


def parse_urls(url: object) -> list[str]:
    """The replicas' base URLs from the `url` kwarg: one URL, a list of them, or a comma-separated string.
    Raises KwargError("url", ...) for a wrong type, an empty entry, a scheme other than http(s), or a duplicate."""
    if isinstance(url, str):
        entries, multi = url.split(","), "," in url
    elif isinstance(url, (list, tuple)):
        entries, multi = list(url), True
    else:
        raise KwargError("url", f"must be an http(s) URL, a list of them or a comma-separated string, got {url!r}")
    require(bool(entries), "url", "must name at least one reward service URL, got an empty list")
    urls: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f" (entry {i} of {url!r})" if multi else ""
        require(isinstance(entry, str), "url", f"entries must be strings, got {entry!r}{where}")
        u = entry.strip() if multi else entry
        require(bool(u), "url", f"entry {i} is empty in {url!r} (a stray comma?)" if multi else "must not be empty")
        require(u.startswith(("http://", "https://")), "url", f"must start with http:// or https://, got {u!r}{where}")
        require(bool(urlsplit(u).netloc), "url", f"names no host: {u!r}{where}")
        u = u.rstrip("/")
        key = u.lower()
        require(key not in seen, "url", f"lists {u!r} twice (entries {seen.get(key)} and {i} of {url!r})")
        seen[key] = i
        urls.append(u)
    return urls


class RemoteScorer:
    needs_prompt_audio = False  # set from the service's /health by check()

    def __init__(
        self,
        url: str | list[str],
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        token: str | None = None,
        batch_size: int = 64,
        max_concurrency: int = 4,
        audio_encoding: str = "float32",
        cooldown_s: float = 5.0,
    ):
        """url: the service's base URL, or several replicas (a list, or comma-separated); token: bearer token
        (default: $TTSRL_REWARD_TOKEN); max_concurrency: requests in flight per replica; audio_encoding: float32
        (exact) or pcm16 (half the bytes); cooldown_s: how long new requests avoid a replica that failed."""
        self.check_kwargs(
            url=url,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            batch_size=batch_size,
            max_concurrency=max_concurrency,
            audio_encoding=audio_encoding,
            cooldown_s=cooldown_s,
        )
        self.urls = parse_urls(url)
        self.url = self.urls[0]  # the service (the first replica): one url behaves exactly as before
        self.replicas = [_Replica(u) for u in self.urls]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.token = token if token is not None else os.environ.get("TTSRL_REWARD_TOKEN")
        self.batch_size, self.max_concurrency, self.encoding = batch_size, max_concurrency, audio_encoding
        self.cooldown_s = cooldown_s
        self._rr = 0  # round-robin position for ties between equally loaded replicas
        self._lock = threading.Lock()  # counters
        self._stats = self._zero()

    @classmethod
    def check_kwargs(
        cls,
        url: object = "",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        batch_size: int = 64,
        max_concurrency: int = 4,
        audio_encoding: str = "float32",
        cooldown_s: float = 5.0,
        **_: object,
    ) -> None:
        """Range checks of the constructor's arguments (no network)."""
        parse_urls(url)
        for key, value, ok, want in (
            ("timeout_s", timeout_s, lambda v: v > 0, "> 0"),
            ("retries", retries, lambda v: v >= 0, ">= 0"),
            ("backoff_s", backoff_s, lambda v: v >= 0, ">= 0"),
            ("batch_size", batch_size, lambda v: v >= 1, ">= 1"),
            ("max_concurrency", max_concurrency, lambda v: v >= 1, ">= 1"),
            ("cooldown_s", cooldown_s, lambda v: v >= 0, ">= 0"),
        ):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require(number and ok(value), key, f"must be a finite number {want}, got {value!r}")
        require(audio_encoding in ENCODINGS, "audio_encoding", f"must be one of {ENCODINGS}, got {audio_encoding!r}")

    # ---- health ---------------------------------------------------------------------------------------------

    def check(self) -> dict:
        """Fail fast before training: GET /health of every replica, once. With one url, raises RewardServiceError
        naming the url and the error. With several, warns (stderr) for each replica that fails, naming its url,
        puts it in cool-down, and raises only when none is ready (naming every url and its error), or when the
        ready ones run different scorer classes. Returns the /health answer of the first ready replica."""
        if len(self.replicas) == 1:
            info, problem = self._probe(self.url)
            if problem is not None:
                raise RewardServiceError(f"reward service {problem}")
            self.needs_prompt_audio = bool(info.get("needs_prompt_audio", False))
            return info
        with ThreadPoolExecutor(max_workers=min(len(self.urls), 16), thread_name_prefix="health") as pool:
            probes = list(pool.map(self._probe, self.urls))
        problems = [p for _, p in probes if p is not None]
        ready = [(rep, info) for rep, (info, p) in zip(self.replicas, probes) if p is None]
        if not ready:
            raise RewardServiceError(
                f"none of the {len(self.urls)} reward service replicas is ready: " + "; ".join(problems)
            )
        classes = {str(info["class"]) for _, info in ready if "class" in info}
        if len(classes) > 1:  # replicas of one reward must run one scorer (their model paths may differ per host)
            raise RewardServiceError(
                "reward service replicas run different scorers: "
                + ", ".join(f"{rep.url} runs {info.get('class')!r}" for rep, info in ready)
            )
        now = time.monotonic()
        for rep, (_, problem) in zip(self.replicas, probes):
            if problem is not None:
                rep.down_until = now + self.cooldown_s
                print(
                    f"ttsrl: warning: reward service replica {problem}; using the other {len(ready)} of "
                    f"{len(self.urls)} replicas until it answers",
                    file=sys.stderr,
                )
        self.needs_prompt_audio = any(bool(info.get("needs_prompt_audio", False)) for _, info in ready)
        return ready[0][1]

    def _probe(self, url: str) -> tuple[dict, str | None]:
        """(the /health answer, None) or ({}, what is wrong, starting with the url)."""
        try:
            info = self.health(url)
        except Exception as e:  # noqa: BLE001 - refused, timed out, 401, not JSON, ...
            return {}, f"{url} is not answering /health: {type(e).__name__}: {e}"
        if not isinstance(info, dict) or info.get("ready") is not True:
            return {}, f"{url} is not ready: /health answered {str(info)[:200]}"
        return info, None

    def health(self, url: str | None = None) -> dict:
        """GET /health of one replica (default: the first)."""
        import httpx

        r = httpx.get(f"{url or self.url}/health", headers=self._headers(), timeout=min(self.timeout_s, 30.0))
        r.raise_for_status()
        return r.json()

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # ---- counters -------------------------------------------------------------------------------------------

    @staticmethod
    def _zero() -> dict:
        return {"requests": 0, "errors": 0, "failed_requests": 0, "latency_s": 0.0}

    def pop_stats(self) -> dict:
        """Counters since the last call: requests sent, failed attempts, requests given up on, seconds waiting;
        with several replicas also `failovers` (requests sent on to another replica after a failure) and per
        replica `replica/<i>/requests`, `replica/<i>/errors` and `replica/<i>/latency_s` (mean seconds per
        request, failed ones included; 0 without requests). The trainer logs them as service/<name>/<key>."""
        with self._lock:
            out, self._stats = self._stats, self._zero()
            if len(self.replicas) > 1:
                out.setdefault("failovers", 0)
                for i, rep in enumerate(self.replicas):
                    out[f"replica/{i}/requests"] = rep.win_requests
                    out[f"replica/{i}/errors"] = rep.win_errors
                    out[f"replica/{i}/latency_s"] = rep.win_latency_s / rep.win_requests if rep.win_requests else 0.0
                    rep.win_requests, rep.win_errors, rep.win_latency_s = 0, 0, 0.0
        return out

    def replica_stats(self) -> dict[str, float]:
        """Per-replica totals since the scorer was built (replica i is self.urls[i]): `remote/<i>/requests`,
        `remote/<i>/errors` (failed attempts), `remote/<i>/latency_s` (mean seconds per request, failed ones
        included; 0 without requests) and `remote/<i>/cooling_down` (1 while new requests avoid it)."""
        now = time.monotonic()
        out: dict[str, float] = {}
        with self._lock:
            for i, rep in enumerate(self.replicas):
                out[f"remote/{i}/requests"] = float(rep.requests)
                out[f"remote/{i}/errors"] = float(rep.errors)
                out[f"remote/{i}/latency_s"] = rep.latency_s / rep.requests if rep.requests else 0.0
                out[f"remote/{i}/cooling_down"] = float(rep.down_until > now)
        return out

    def _count(self, rep: _Replica, seconds: float, failed: bool) -> None:
        with self._lock:
            self._stats["requests"] += 1
            rep.requests += 1
            rep.win_requests += 1
            rep.latency_s += seconds
            rep.win_latency_s += seconds
            if failed:
                self._stats["errors"] += 1
                rep.errors += 1
                rep.win_errors += 1

    def _bump(self, key: str) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + 1

    # ---- scoring --------------------------------------------------------------------------------------------

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        samples = list(samples)
        chunks = [samples[i : i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        t0 = time.perf_counter()
        results = asyncio.run(self._score_all(chunks)) if chunks else []
        with self._lock:
            self._stats["latency_s"] += time.perf_counter() - t0
        return _concat(results)

    async def _score_all(self, chunks: list[list[Sample]]) -> list[ScoreResult]:
        import httpx

        sched = _Scheduler(self)
        # the server drops a request that waited in its queue longer than this client waits for an answer
        headers = {**self._headers(), "X-Client-Timeout": f"{self.timeout_s:g}"}
        async with httpx.AsyncClient(timeout=self.timeout_s, headers=headers) as client:
            return list(await asyncio.gather(*(self._score_chunk(client, sched, c) for c in chunks)))

    async def _score_chunk(self, client, sched: _Scheduler, chunk: list[Sample]) -> ScoreResult:
        body = encode_request(chunk, self.encoding)
        errors: dict[int, str] = {}  # replica -> its latest error for this request
        refused: set[int] = set()  # replicas that answered 4xx or malformed: not asked again for this request
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            asked: set[int] = set()
            while (i := await sched.acquire(asked | refused)) is not None:
                if asked:
                    self._bump("failovers")
                asked.add(i)
                try:
                    result, error, final = await self._post(client, self.replicas[i], body, len(chunk))
                finally:
                    await sched.release(i)
                if result is not None:
                    return result
                errors[i] = error
                if final:
                    refused.add(i)
            if len(refused) == len(self.replicas):
                break
        self._bump("failed_requests")
        n = len(chunk)
        if len(self.replicas) == 1:
            reason = f"reward service {self.url} failed: {errors.get(0, 'no attempt made')}"
        else:
            reason = f"reward service: all {len(self.replicas)} replicas failed: " + "; ".join(
                f"{self.urls[i]}: {e}" for i, e in sorted(errors.items())
            )
        return ScoreResult(np.full(n, np.nan), np.zeros(n, dtype=bool), {}, [reason] * n)

    async def _post(self, client, rep: _Replica, body: dict, n: int) -> tuple[ScoreResult | None, str, bool]:
        """One attempt on one replica: (result, "", False), or (None, the error, whether asking this replica
        again for this request is pointless). A failure puts the replica in cool-down, unless it was a 4xx about
        the request itself."""
        import httpx

        t0 = time.perf_counter()
        result, error, final, cool = None, "", False, True
        try:
            r = await client.post(f"{rep.url}/score", json=body)
        except httpx.HTTPError as e:  # timeouts, refused connections, broken transfers
            error = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                try:
                    result = decode_result(r.json(), n)
                except (WireError, ValueError) as e:  # a malformed answer is a failed request: its samples invalid
                    error, final = f"malformed response: {e}", True
            else:
                error = f"HTTP {r.status_code}: {_message(r)}"
                final = r.status_code < 500  # the request is wrong (for this replica); sending it again won't help
                cool = r.status_code not in _REQUEST_ERRORS
        self._count(rep, time.perf_counter() - t0, failed=result is None)
        if result is not None:
            rep.down_until = 0.0
        elif cool:
            rep.down_until = time.monotonic() + self.cooldown_s
        return result, error, final


class _Scheduler:
    """One call's request placement: the replica with the fewest outstanding requests among those not excluded,
    preferring replicas not in cool-down, at most `max_concurrency` in flight on each (ties: round robin)."""

    def __init__(self, scorer: RemoteScorer):
        self.scorer = scorer
        self.outstanding = [0] * len(scorer.replicas)
        self.cond = asyncio.Condition()

    async def acquire(self, exclude: set[int]) -> int | None:
        """A replica for the next attempt (waits while the right ones are full), or None when all are excluded."""
        sc, n = self.scorer, len(self.outstanding)
        async with self.cond:
            while True:
                candidates = [i for i in range(n) if i not in exclude]
                if not candidates:
                    return None
                now = time.monotonic()
                pool = [i for i in candidates if sc.replicas[i].down_until <= now] or candidates
                free = [i for i in pool if self.outstanding[i] < sc.max_concurrency]
                if free:
                    i = min(free, key=lambda j: (self.outstanding[j], (j - sc._rr) % n))
                    sc._rr = (i + 1) % n
                    self.outstanding[i] += 1
                    return i
                await self.cond.wait()

    async def release(self, i: int) -> None:
        async with self.cond:
            self.outstanding[i] -= 1
            self.cond.notify_all()


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
    spans = [x for r in results for x in (r.spans or [None] * len(r.values))] if any(r.spans for r in results) else []
    return ScoreResult(
        np.concatenate([r.values for r in results]), np.concatenate([r.valid for r in results]), subs, reasons, spans
    )
