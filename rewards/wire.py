"""The JSON wire format of the reward service (`POST /score`), shared by the server and the client.

Request:
    {"samples": [{"uttid": str, "group_id": int, "target_text": str, "prompt_text": str,
                  "codes": [int], "finished": bool, "prompt_codes": [int], "emotion": int | null,
                  "duration_s": float | null, "prompt_duration_s": float | null,
                  "audio": AUDIO | null, "prompt_audio_ref": str | null}, ...],
     "prompt_audio": {ref: AUDIO}}                       # each voice prompt once, however many samples use it
    AUDIO = {"encoding": "float32" | "pcm16", "sample_rate": int, "data": base64 of little-endian samples}
Response:
    {"values": [float | null], "valid": [bool], "reasons": [str | null], "sub_scores": {name: [float | null]}}

float32 audio is exact (remote scores equal local ones); pcm16 halves the bytes and rounds to 16 bits.
"""

from __future__ import annotations

import base64
import hashlib
import math

import numpy as np

from rewards.base import Sample, ScoreResult

ENCODINGS = ("float32", "pcm16")


class WireError(ValueError):
    """A request or response does not follow the wire format; the message names the sample and the field."""


def encode_audio(wav: np.ndarray, rate: int, encoding: str) -> dict:
    if encoding == "float32":
        data = np.ascontiguousarray(wav, dtype="<f4").tobytes()
    elif encoding == "pcm16":
        data = (np.clip(np.asarray(wav, np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    else:
        raise WireError(f"audio encoding must be one of {ENCODINGS}, got {encoding!r}")
    return {"encoding": encoding, "sample_rate": int(rate), "data": base64.b64encode(data).decode("ascii")}


def decode_audio(obj, where: str) -> tuple[np.ndarray, int]:
    if not isinstance(obj, dict):
        raise WireError(f"{where}: expected an audio object {{encoding, sample_rate, data}}")
    enc, rate, data = obj.get("encoding"), obj.get("sample_rate"), obj.get("data")
    if enc not in ENCODINGS:
        raise WireError(f"{where}.encoding: must be one of {ENCODINGS}, got {enc!r}")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise WireError(f"{where}.sample_rate: must be a positive integer, got {rate!r}")
    if not isinstance(data, str):
        raise WireError(f"{where}.data: must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, base64.binascii.Error) as e:
        raise WireError(f"{where}.data: not valid base64 ({e})") from None
    width = 4 if enc == "float32" else 2
    if len(raw) % width:
        raise WireError(f"{where}.data: {len(raw)} bytes is not a whole number of {enc} samples")
    if enc == "float32":
        return np.frombuffer(raw, dtype="<f4").astype(np.float32), rate
    return (np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32767.0), rate


def _seconds(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # NaN (unknown) travels as null


def encode_request(samples: list[Sample], encoding: str = "float32") -> dict:
    prompts: dict[str, dict] = {}
    out = []
    for s in samples:
        ref = None
        if s.prompt_audio is not None:
            ref = hashlib.blake2b(np.ascontiguousarray(s.prompt_audio).tobytes(), digest_size=12).hexdigest()
            if ref not in prompts:
                prompts[ref] = encode_audio(s.prompt_audio, s.prompt_sample_rate or 0, encoding)
        out.append(
            {
                "uttid": s.uttid,
                "group_id": int(s.group_id),
                "target_text": s.target_text,
                "prompt_text": s.prompt_text,
                "codes": [int(c) for c in s.codes],
                "finished": bool(s.finished),
                "prompt_codes": [int(c) for c in s.prompt_codes],
                "emotion": s.emotion,
                "duration_s": _seconds(s.duration_s),
                "prompt_duration_s": _seconds(s.prompt_duration_s),
                "audio": None if s.audio is None else encode_audio(s.audio, s.sample_rate or 0, encoding),
                "prompt_audio_ref": ref,
            }
        )
    return {"samples": out, "prompt_audio": prompts}


def decode_request(obj, max_samples: int) -> list[Sample]:
    if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list):
        raise WireError("the body must be a JSON object with a 'samples' list")
    items = obj["samples"]
    if len(items) > max_samples:
        raise WireError(f"too many samples: {len(items)} (this server takes at most {max_samples} per request)")
    prompts_in = obj.get("prompt_audio") or {}
    if not isinstance(prompts_in, dict):
        raise WireError("'prompt_audio' must map references to audio objects")
    prompts = {ref: decode_audio(a, f"prompt_audio[{ref!r}]") for ref, a in prompts_in.items()}
    samples = []
    for i, it in enumerate(items):
        where = f"samples[{i}]"
        if not isinstance(it, dict):
            raise WireError(f"{where}: expected an object")

        def field(name, types, required=True, default=None, *, it=it, where=where):  # bind this sample
            if name not in it or it[name] is None:
                if required:
                    raise WireError(f"{where}.{name}: missing")
                return default
            v = it[name]
            if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):  # JSON true is not an int
                raise WireError(f"{where}.{name}: expected {types.__name__}, got {type(v).__name__}")
            return v

        codes = field("codes", list, required=False, default=[])
        prompt_codes = field("prompt_codes", list, required=False, default=[])
        for name, arr in (("codes", codes), ("prompt_codes", prompt_codes)):
            if not all(isinstance(c, int) and not isinstance(c, bool) and -(2**63) <= c < 2**63 for c in arr):
                raise WireError(f"{where}.{name}: must be a list of 64-bit integers")
        audio = it.get("audio")
        wav, rate = decode_audio(audio, f"{where}.audio") if audio is not None else (None, None)
        ref = it.get("prompt_audio_ref")
        if ref is not None and not isinstance(ref, str):
            raise WireError(f"{where}.prompt_audio_ref: expected str, got {type(ref).__name__}")
        if ref is not None and ref not in prompts:
            raise WireError(f"{where}.prompt_audio_ref: {ref!r} is not in prompt_audio")
        pwav, prate = prompts[ref] if ref is not None else (None, None)
        emotion = it.get("emotion")
        if emotion is not None and (isinstance(emotion, bool) or not isinstance(emotion, int)):
            raise WireError(f"{where}.emotion: must be an integer or null")
        durations = {}
        for name in ("duration_s", "prompt_duration_s"):
            v = it.get(name)
            v = math.nan if v is None else v
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (not math.isnan(v) and not 0 <= v < math.inf):
                raise WireError(f"{where}.{name}: must be a finite number of seconds >= 0 or null")
            durations[name] = float(v)
        samples.append(
            Sample(
                uttid=field("uttid", str),
                group_id=field("group_id", int, required=False, default=0),
                target_text=field("target_text", str),
                prompt_text=field("prompt_text", str, required=False, default=""),
                codes=np.asarray(codes, dtype=np.int64),
                finished=bool(field("finished", bool, required=False, default=True)),
                prompt_codes=np.asarray(prompt_codes, dtype=np.int64),
                emotion=emotion,
                **durations,
                audio=wav,
                sample_rate=rate,
                prompt_audio=pwav,
                prompt_sample_rate=prate,
            )
        )
    return samples


def _num(x: float):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def encode_result(res: ScoreResult) -> dict:
    n = len(res.values)
    return {
        "values": [_num(v) if ok else None for v, ok in zip(res.values.tolist(), res.valid.tolist())],
        "valid": [bool(v) for v in res.valid],
        "reasons": list(res.reasons) if res.reasons else [None] * n,
        "sub_scores": {k: [_num(x) for x in v.tolist()] for k, v in res.sub_scores.items()},
        **({"spans": [None if sp is None else [list(x) for x in sp] for sp in res.spans]} if res.spans else {}),
    }


def _spans(items, n: int) -> list:
    """`spans` (optional): n entries, each null or a list of [start_s, end_s] pairs, 0 <= start <= end, finite."""
    if items is None:
        return []
    if not isinstance(items, list) or len(items) != n:
        raise WireError(f"spans: expected a list of {n} entries (null or a list of [start_s, end_s] pairs)")
    out: list = []
    for i, sp in enumerate(items):
        if sp is None:
            out.append(None)
            continue
        ok = isinstance(sp, list) and all(
            isinstance(x, list)
            and len(x) == 2
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in x)
            and 0 <= x[0] <= x[1]
            for x in sp
        )
        if not ok:
            raise WireError(f"spans[{i}]: expected null or a list of [start_s, end_s] with 0 <= start <= end")
        out.append(tuple((float(a), float(b)) for a, b in sp))
    return out


def _numbers(items, n: int, where: str) -> np.ndarray:
    """A JSON list of n numbers or nulls -> float64 [n] (null -> NaN). Booleans and strings are refused."""
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} entries" if isinstance(items, list) else type(items).__name__
        raise WireError(f"{where}: expected a list of {n} numbers or nulls, got {got}")
    out = np.full(n, np.nan)
    for i, v in enumerate(items):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise WireError(f"{where}[{i}]: expected a number or null, got {v!r}")
        out[i] = float(v)
    return out


def decode_result(obj, n: int) -> ScoreResult:
    """A response body -> ScoreResult, validated: n values (numbers or null), n JSON booleans, n reasons (strings
    or null), sub-scores of n numbers each; a value marked valid must be finite. Anything else is a WireError."""
    if not isinstance(obj, dict):
        raise WireError(f"the response must be a JSON object, got {type(obj).__name__}")
    values = _numbers(obj.get("values"), n, "values")
    valid_in = obj.get("valid")
    if not isinstance(valid_in, list) or len(valid_in) != n or not all(isinstance(v, bool) for v in valid_in):
        raise WireError(f"valid: expected a list of {n} JSON booleans, got {str(valid_in)[:80]}")
    valid = np.array(valid_in, dtype=bool)
    bad = np.flatnonzero(valid & ~np.isfinite(values))
    if bad.size:
        raise WireError(f"values[{int(bad[0])}]: {values[bad[0]]} is marked valid but is not a finite number")
    reasons = obj.get("reasons")
    if reasons is None:
        reasons = [None] * n
    if not isinstance(reasons, list) or len(reasons) != n or not all(r is None or isinstance(r, str) for r in reasons):
        raise WireError(f"reasons: expected a list of {n} strings or nulls")
    subs_in = obj.get("sub_scores") or {}
    if not isinstance(subs_in, dict):
        raise WireError("sub_scores: expected an object of name -> list of numbers")
    subs = {str(k): _numbers(v, n, f"sub_scores[{k!r}]") for k, v in subs_in.items()}
    values[~valid] = np.nan
    reasons = [r if not ok else None for r, ok in zip(reasons, valid.tolist())]
    reasons = [
        r or (None if ok else "the reward service marked it invalid without a reason")
        for r, ok in zip(reasons, valid.tolist())
    ]
    spans = _spans(obj.get("spans"), n)
    spans = [sp if ok else None for sp, ok in zip(spans, valid.tolist())] if spans else []
    return ScoreResult(values, valid, subs, reasons, spans)
