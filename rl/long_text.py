"""Synthesis of whole texts as upstream GLM-TTS's `generate_long` does it, for `ttsrl eval`.

A target text is normalised, split into pieces of about 30-60 characters (`split_by_len`) and each piece normalised
again (rollouts/text.py). Piece k is generated with a prompt made of the voice prompt and the pieces already
generated: text ids [prompt text + " "][piece 1]..[piece k-1] and speech codes [prompt codes][codes 1]..[codes k-1]
(upstream's cache). When the cached codes plus the estimated codes of piece k (cached codes per cached text token
x its text tokens) exceed 750, cached pieces are dropped from the oldest on, the voice prompt never. Every piece is
vocoded with the original voice prompt (its codes, mel and embedding) and the audio of the pieces is concatenated.
A text of one piece is exactly the one-shot prompt layout of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_LLM_SEQ_INP_LEN = 750  # upstream: cap on cached + estimated speech tokens in a prompt


@dataclass
class LongJob:
    """One item: its key (group id and seed offset), LM ids of the prompt text + " " and of each piece."""

    key: int
    prompt_ids: list[int]
    piece_ids: list[list[int]]
    voice: object  # rollouts.token2wav.VoicePrompt
    where: str = ""
    cache_text: list[list[int]] = field(default_factory=list)
    cache_codes: list[list[int]] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    truncated: bool = False
    failed: dict = field(default_factory=dict)  # stage -> reason


def cached_prompt(job: LongJob, next_ids: list[int], max_len: int | None = None) -> tuple[list[int], list[int]]:
    """upstream get_cached_prompt: (text ids, speech codes) of the prompt for the next piece; prunes job's cache."""
    max_len = MAX_LLM_SEQ_INP_LEN if max_len is None else max_len
    if len(job.cache_text) > 1:
        n_text = sum(len(t) for t in job.cache_text)
        ratio = sum(len(c) for c in job.cache_codes) / (n_text if n_text > 0 else 1.0)
        estimate = int(ratio * len(next_ids))
        while sum(len(c) for c in job.cache_codes) + estimate > max_len and len(job.cache_codes) > 1:
            job.cache_text.pop(1)
            job.cache_codes.pop(1)
    return [i for t in job.cache_text for i in t], [c for cs in job.cache_codes for c in cs]


def synthesize_long(policy, token2wav, jobs: list[LongJob], params, *, seed: int) -> None:
    """Generate every piece of every job, round by round (round r: piece r of each job that has one, in one batch).
    Fills job.audio (one array per piece), job.truncated and job.failed."""
    import torch

    from policies.glmtts import PromptInput

    s = policy.special
    for job in jobs:
        job.cache_text, job.cache_codes = [list(job.prompt_ids)], [[int(c) for c in job.voice.tokens]]
        if not job.piece_ids or any(not p for p in job.piece_ids):
            job.failed["synthesis"] = f"{job.where}: field 'target_text': encodes to no tokens"
    for r in range(max((len(j.piece_ids) for j in jobs), default=0)):
        active = [j for j in jobs if r < len(j.piece_ids) and not j.failed]
        if not active:
            continue
        inputs = []
        for j in active:
            text_ids, codes = cached_prompt(j, j.piece_ids[r])
            ids = text_ids + j.piece_ids[r] + [s.boa] + [c + s.ats for c in codes]
            inputs.append(PromptInput(ids=ids, text_len=len(j.piece_ids[r])))
        try:
            with torch.no_grad():
                ro = policy.sample_groups(
                    inputs, 1, params, group_ids=[j.key for j in active], seed=seed if r == 0 else seed * 7919 + r
                )
            codes = ro.codes(s.ats)
            voc = token2wav(codes, [j.voice for j in active], [seed * 1_000_003 + j.key + 104_729 * r for j in active])
        except (ValueError, RuntimeError) as e:  # the whole round failed for these items
            for j in active:
                j.failed["synthesis"] = f"{type(e).__name__}: {e}"
            continue
        for n, j in enumerate(active):
            j.truncated = j.truncated or bool(ro.truncated[n])
            if voc.audio[n] is None:
                j.failed["vocoder"] = voc.reasons[n] if r == 0 else f"piece {r + 1}: {voc.reasons[n]}"
                continue
            j.audio.append(voc.audio[n])
            j.cache_text.append(list(j.piece_ids[r]))
            j.cache_codes.append([int(c) for c in codes[n]])


__all__ = ["MAX_LLM_SEQ_INP_LEN", "LongJob", "cached_prompt", "synthesize_long"]
