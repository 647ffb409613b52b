"""Turning a rollout into scorer samples, and running the configured scorers over them."""

from __future__ import annotations

import functools
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from rewards.base import Sample, Scorer, ScoreResult, build_scorer
from rollouts.types import PROMPT_TOKEN_RATE, PromptRecord, Rollout, VocodeResult


def samples_from_rollout(
    rollout: Rollout,
    records: list[PromptRecord],  # records[rollout.prompt_index[i]] is row i's prompt
    codes: list[torch.Tensor],  # per row its [L_i] speech codes (the policy's `speech_codes`)
    speech_rate: float,  # the policy's generated frames per second of audio (durations in seconds)
    vocoded: VocodeResult | None = None,  # audio per row (None: not vocoded)
    prompt_audio: dict[str, tuple[np.ndarray, int] | None] | None = None,  # uttid -> (waveform, rate)
) -> list[Sample]:
    out = []
    for i in range(rollout.num_rows):
        rec = records[int(rollout.prompt_index[i])]
        pa = (prompt_audio or {}).get(rec.uttid)
        out.append(
            Sample(
                uttid=rec.uttid,
                group_id=int(rollout.group_ids[i]),
                target_text=rec.target_text,
                prompt_text=rec.prompt_text,
                codes=codes[i].numpy(),
                finished=bool(rollout.finished[i]),
                prompt_codes=rec.prompt_speech_tokens
                if rec.prompt_speech_tokens is not None
                else np.zeros(0, np.int64),
                emotion=rec.emotion,
                duration_s=int(rollout.lengths[i]) / speech_rate,
                prompt_duration_s=prompt_seconds(rec),
                audio=None if vocoded is None else vocoded.audio[i],
                sample_rate=None if vocoded is None else vocoded.sample_rate,
                prompt_audio=None if pa is None else pa[0],
                prompt_sample_rate=None if pa is None else pa[1],
            )
        )
    return out


def prompt_seconds(rec: PromptRecord) -> float:
    """The voice prompt's duration: its speech tokens at 25 per second (GLM-TTS), else its wav's length (read from
    the file header), else NaN (unknown)."""
    if rec.prompt_speech_tokens is not None:
        return len(rec.prompt_speech_tokens) / PROMPT_TOKEN_RATE
    if rec.prompt_wav:
        return _wav_seconds(rec.prompt_wav)
    return float("nan")


@functools.lru_cache(maxsize=4096)
def _wav_seconds(path: str) -> float:
    import soundfile as sf

    try:
        return float(sf.info(path).duration)
    except (RuntimeError, OSError):
        return float("nan")


def build_scorers(rewards_cfg: dict) -> dict[str, Scorer]:
    """rewards config (name -> RewardConfig) -> name -> scorer instance. Unknown names/kwargs raise."""
    return {name: build_scorer(r.scorer, dict(r.kwargs), f"rewards.{name}") for name, r in rewards_cfg.items()}


@dataclass
class Scores:
    values: dict[str, torch.Tensor]  # name -> [N] float32, NaN = invalid
    results: dict[str, ScoreResult]
    errors: dict[str, int] = field(default_factory=dict)  # name -> scorer calls that raised
    service: dict[str, dict] = field(default_factory=dict)  # name -> counters of remote scorers (pop_stats)


def score(
    scorers: dict[str, Scorer],
    samples: list[Sample],
    invalid: list[str | None] | None = None,
    *,
    concurrent: bool = True,
) -> Scores:
    """Run every scorer on every sample, all scorers at once (one thread each; remote scorers send their requests
    asynchronously inside theirs). `invalid[i]` (e.g. "empty generation") makes sample i invalid for every reward
    without asking the scorers. A scorer that raises makes its reward invalid for the whole batch (with the error
    as the reason), and the error is printed and counted; training goes on."""
    n = len(samples)
    invalid = invalid or [None] * n
    keep = [i for i in range(n) if invalid[i] is None]
    batch = [samples[i] for i in keep]

    def run(item):
        name, scorer = item
        m = len(batch)
        try:
            res = scorer(batch) if m else ScoreResult(np.zeros(0), np.zeros(0, dtype=bool), {}, [])
            if res.values.shape != (m,):
                raise ValueError(f"returned {res.values.shape[0]} values for {m} samples")
            return _finite_or_invalid(res), 0
        except Exception as e:  # noqa: BLE001 - a failed reward is invalid, never a crash or a 0
            print(f"ttsrl: scorer '{name}' failed on a batch of {m}: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
            reason = f"scorer error: {type(e).__name__}: {e}"
            return ScoreResult(np.full(m, np.nan), np.zeros(m, dtype=bool), {}, [reason] * m), 1

    items = list(scorers.items())
    if concurrent and len(items) > 1:
        with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="scorer") as pool:
            outs = list(pool.map(run, items))
    else:
        outs = [run(it) for it in items]
    results, errors, service = {}, {}, {}
    for (name, scorer), (res, failed) in zip(items, outs):
        results[name] = _expand(res, keep, invalid)
        if failed:
            errors[name] = failed
        if hasattr(scorer, "pop_stats"):
            service[name] = scorer.pop_stats()
    values = {k: torch.from_numpy(np.where(r.valid, r.values, np.nan)).float() for k, r in results.items()}
    return Scores(values=values, results=results, errors=errors, service=service)


def _finite_or_invalid(res: ScoreResult) -> ScoreResult:
    """A value marked valid must be a finite number: NaN or inf marked valid becomes invalid, with the reason (so it
    is counted by max_invalid_frac and can never reach the advantages)."""
    valid = np.asarray(res.valid, dtype=bool)
    bad = valid & ~np.isfinite(np.asarray(res.values, dtype=np.float64))
    if not bad.any():
        return res
    reasons = list(res.reasons) if res.reasons else [None] * len(valid)
    values = np.asarray(res.values, dtype=np.float64).copy()
    for i in np.flatnonzero(bad):
        reasons[i] = f"the scorer marked a non-finite value ({values[i]}) valid"
    values[bad] = np.nan
    spans = [None if b else sp for sp, b in zip(res.spans, bad)] if res.spans else []
    return ScoreResult(values, valid & ~bad, dict(res.sub_scores), reasons, spans)


def _expand(res: ScoreResult, keep: list[int], invalid: list[str | None]) -> ScoreResult:
    """Scatter a result over the scored subset back to all samples; the others are invalid with their reason."""
    n = len(invalid)
    if len(keep) == n:
        return res
    values = np.full(n, np.nan)
    valid = np.zeros(n, dtype=bool)
    reasons = list(invalid)
    values[keep], valid[keep] = res.values, res.valid
    for j, i in enumerate(keep):
        reasons[i] = res.reasons[j] if res.reasons else None
    subs = {}
    for k, v in res.sub_scores.items():
        full = np.full(n, np.nan)
        full[keep] = v
        subs[k] = full
    spans: list = []
    if res.spans:
        spans = [None] * n
        for j, i in enumerate(keep):
            spans[i] = res.spans[j]
    return ScoreResult(values, valid, subs, reasons, spans)


def select_scores(scores: Scores, rows: list[int]) -> Scores:
    idx = np.asarray(rows, dtype=np.int64)
    results = {
        k: ScoreResult(
            r.values[idx],
            r.valid[idx],
            {s: v[idx] for s, v in r.sub_scores.items()},
            [r.reasons[i] for i in idx] if r.reasons else [],
            [r.spans[i] for i in idx] if r.spans else [],
        )
        for k, r in scores.results.items()
    }
    values = {k: v[torch.from_numpy(idx)] for k, v in scores.values.items()}
    return Scores(values=values, results=results, errors=dict(scores.errors), service=dict(scores.service))


def cat_scores(parts: list[Scores]) -> Scores:
    names = list(parts[0].results)
    results, values, errors = {}, {}, {}
    for k in names:
        rs = [p.results[k] for p in parts]
        subs = {s: np.concatenate([r.sub_scores[s] for r in rs]) for s in rs[0].sub_scores}
        reasons = [x for r in rs for x in (r.reasons or [None] * len(r.values))]
        spans = [x for r in rs for x in (r.spans or [None] * len(r.values))] if any(r.spans for r in rs) else []
        results[k] = ScoreResult(
            np.concatenate([r.values for r in rs]), np.concatenate([r.valid for r in rs]), subs, reasons, spans
        )
        values[k] = torch.cat([p.values[k] for p in parts])
    service: dict[str, dict] = {}
    for p in parts:
        for k, v in p.errors.items():
            errors[k] = errors.get(k, 0) + v
        for k, stats in p.service.items():
            acc = service.setdefault(k, {})
            for key, v in stats.items():
                acc[key] = acc.get(key, 0) + v
    return Scores(values=values, results=results, errors=errors, service=service)
