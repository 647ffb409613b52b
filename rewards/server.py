"""Serve any scorer over HTTP: `ttsrl serve-reward --scorer NAME [--config FILE] [--host 127.0.0.1] [--port N]`.

    POST /score    a batch in the wire format (rewards/wire.py) -> values, validity, reasons, sub-scores
    GET  /health   the scorer, its class and model arguments, readiness and counters

Binds to 127.0.0.1 unless told otherwise. With a token (TTSRL_REWARD_TOKEN, --token-file, or --token, which every
local user can read in `ps`)
every request needs `Authorization: Bearer <token>` (401 otherwise). Requests larger than `max_request_mb` get
413, more than `max_batch` samples 413, malformed JSON 400, a malformed batch 422 naming the sample and the field;
a scorer that raises gives 500 with the error. One batch is scored at a time (models are not re-entrant);
requests queue, and a request whose client has given up while it was queued (its connection closed, or longer
queued than the `X-Client-Timeout` seconds the client sent) is dropped unscored (counted as `abandoned`), so a
client's retry never waits behind its own abandoned attempt.
"""

import asyncio
import hmac
import json
import logging
import time

from rewards.base import Scorer
from rewards.wire import WireError, decode_request, encode_result

log = logging.getLogger("ttsrl.reward_service")


def create_app(
    scorer: Scorer,
    name: str,
    *,
    describe: dict | None = None,
    token: str | None = None,
    max_request_mb: float = 256.0,
    max_batch: int = 1024,
):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from starlette.requests import ClientDisconnect

    app = FastAPI(title=f"ttsrl reward service: {name}", docs_url=None, redoc_url=None, openapi_url=None)
    lock = asyncio.Lock()  # one batch at a time, in arrival order
    stats = {"requests": 0, "samples": 0, "errors": 0, "abandoned": 0, "busy_s": 0.0, "started": time.time()}
    limit = int(max_request_mb * 1024 * 1024)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    @app.get("/health")
    async def health(request: Request):
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        return {
            "scorer": name,
            **(describe or {}),
            "ready": True,
            "max_batch": max_batch,
            "needs_prompt_audio": bool(getattr(scorer, "needs_prompt_audio", False)),
            "max_request_mb": max_request_mb,
            **{k: v for k, v in stats.items() if k != "started"},
            "uptime_s": time.time() - stats["started"],
        }

    @app.post("/score")
    async def score(request: Request):
        arrived = time.monotonic()
        try:
            patience = float(request.headers.get("x-client-timeout", "inf"))
        except ValueError:
            return error(400, "X-Client-Timeout must be a number of seconds")
        if not authorised(request):
            return error(401, "missing or wrong bearer token")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return error(413, f"request of {int(declared)} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    return error(413, f"request exceeds the limit of {limit} bytes")
        except ClientDisconnect:
            stats["abandoned"] += 1
            log.warning("ttsrl reward service %s: a client disconnected while sending its request", name)
            return error(499, "the client went away while sending the request")
        # parsing and base64 decoding of a large body run off the event loop: /health and other requests stay live
        status, parsed = await run_in_threadpool(_parse, bytes(body), max_batch)
        if status != 200:
            return error(status, parsed)
        samples = parsed

        def run():
            t0 = time.perf_counter()
            try:
                return scorer(samples)
            finally:
                stats["busy_s"] += time.perf_counter() - t0

        async with lock:
            if time.monotonic() - arrived > patience or await request.is_disconnected():  # the client gave up
                stats["abandoned"] += 1
                return error(499, "the client went away while the request was queued; not scored")
            try:
                res = await run_in_threadpool(run)
                if res.values.shape != (len(samples),):
                    raise ValueError(f"the scorer returned {res.values.shape[0]} values for {len(samples)} samples")
            except Exception as e:  # noqa: BLE001 - report, do not crash the server
                stats["errors"] += 1
                return error(500, f"scorer error: {type(e).__name__}: {e}")
        stats["requests"] += 1
        stats["samples"] += len(samples)
        return encode_result(res)

    return app


def _parse(body: bytes, max_batch: int) -> tuple[int, object]:
    """(200, samples) or (HTTP status, error message) for a request body."""
    try:
        payload = json.loads(body)
    except RecursionError:
        return 400, "the body is nested too deeply to be a request"
    except (ValueError, UnicodeDecodeError) as e:
        return 400, f"the body is not valid JSON: {e}"
    try:
        return 200, decode_request(payload, max_batch)
    except WireError as e:
        return (413 if str(e).startswith("too many samples") else 422), str(e)
    except (TypeError, ValueError, KeyError, OverflowError, RecursionError) as e:  # a shape decode_request misses
        return 422, f"malformed batch: {type(e).__name__}: {e}"


def serve(scorer: Scorer, name: str, *, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(create_app(scorer, name, **kw), host=host, port=port, log_level="warning")
