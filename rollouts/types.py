"""Typed records passed between stages: prompts -> rollouts -> (audio) -> rewards -> rl.

Shapes: N = rows (prompts x group size), P = padded prompt length, T = padded generated length.
Records are frozen; a stage builds new records instead of mutating the ones it received.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """How a rollout was sampled (recorded with it; the policy's sampler reads it)."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    ras: bool = False
    ras_window: int = 10
    ras_tau: float = 0.1

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.ras and (self.ras_window < 1 or self.ras_tau <= 0):
            raise ValueError("ras_window must be >= 1 and ras_tau > 0")

    @property
    def ras_threshold(self) -> float:
        return self.ras_window * self.ras_tau


PROMPT_TOKEN_RATE = 25  # the manifest's prompt speech tokens per second (the 25 Hz S3 tokenizer of rollouts/prepare.py)


@dataclass(frozen=True)
class VocodeResult:
    """A policy's decoded audio, one entry per rollout row."""

    audio: list[np.ndarray | None]  # per row: [S] float32 mono at `sample_rate`, or None
    reasons: list[str | None]  # per row: why it has no audio (None when it has)
    sample_rate: int


@dataclass(frozen=True)
class PromptRecord:
    """One line of a manifest: a voice prompt and the text to synthesise."""

    uttid: str
    prompt_text: str
    target_text: str
    prompt_speech_tokens: np.ndarray | None  # [Tp] int64 speech codes 0..32767 of the voice prompt (GLM-TTS)
    prompt_feat: np.ndarray | None  # [Tf, 80] float32 24 kHz log-mel of the voice prompt (flow condition)
    embedding: np.ndarray | None  # [192] float32 speaker embedding (CAMPPlus)
    prompt_wav: str | None  # path of the voice prompt audio (speaker-similarity reference)
    emotion: int | None  # emotion2vec label index of the target emotion; None = not given
    source: str = ""  # "file:line" it came from, for error messages
    target_speech_tokens: np.ndarray | None = None  # [Tt] int64 codes of the target (syn_speech_token), optional
    prompt_latent: np.ndarray | None = None  # [T, P, D] float32 VoxCPM AudioVAE latent patches of the voice prompt
    # IndexTTS2's prompt arrays by manifest field: prompt_semantic [T, D], prompt_semantic_code [T], prompt_mel [Tm, 80]
    prompt_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    emotion_wav: str | None = None  # an emotion reference clip (IndexTTS2's emotion conditioning), or None


@dataclass(frozen=True)
class Rollout:
    """N sampled sequences, G per prompt, each row tagged with an explicit group id.

    tokens hold LM ids: speech tokens (ats + code) and, for finished rows, the stop token as the last valid
    token; the stop token is trained on (it carries the length decision). Rows are right-padded with `pad_id`.
    """

    prompt_ids: torch.Tensor  # [N, P] long, left-padded prompt ids
    prompt_mask: torch.Tensor  # [N, P] bool
    tokens: torch.Tensor  # [N, T] long, generated ids (speech + stop), right-padded
    token_mask: torch.Tensor  # [N, T] bool, True on trained tokens (generated incl. stop)
    behaviour_logp: torch.Tensor  # [N, T] float32, log-prob of each token under the distribution sampled from
    group_ids: torch.Tensor  # [N] long, explicit group id (one per (prompt, attempt))
    prompt_index: torch.Tensor  # [N] long, index of the row's prompt in `prompts`
    finished: torch.Tensor  # [N] bool, ended with the stop token
    truncated: torch.Tensor  # [N] bool, hit its maximum length without stopping
    lengths: torch.Tensor  # [N] long, generated speech tokens (stop excluded)
    min_lengths: torch.Tensor  # [N] long, stop was masked before this many tokens
    text_lengths: torch.Tensor  # [N] long, target-text tokens (the length bounds scale with it)
    params: SamplingParams  # the sampling distribution the tokens came from
    pad_id: int
    # policy-specific per-row tensors [N, ...] that travel with the rows (a flow policy's SDE states, its mel, ...):
    # select() indexes them and cat() zero-pads their non-row dims to a common size. Token policies leave it empty.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def codes(self, ats: int) -> list[torch.Tensor]:
        """Per row, the generated speech codes (0..C-1), stop and padding removed. list of [L_i] long."""
        return [self.tokens[i, : int(self.lengths[i])] - ats for i in range(self.num_rows)]

    def select(self, rows: torch.Tensor | list[int]) -> Rollout:
        """A new Rollout with only `rows` (in that order)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) else v
        out["extras"] = {k: v.index_select(0, idx.to(v.device)) for k, v in self.extras.items()}
        return Rollout(**out)

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """Concatenate rows of several rollouts (padding prompt and generated parts to a common width)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({p.params for p in parts}) != 1 or len({p.pad_id for p in parts}) != 1:
            raise ValueError("rollouts sampled with different parameters cannot be concatenated")
        p_w = max(p.prompt_ids.shape[1] for p in parts)
        t_w = max(p.tokens.shape[1] for p in parts)
        pad = parts[0].pad_id

        def left(x, width, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return Rollout(
            prompt_ids=torch.cat([left(p.prompt_ids, p_w, pad) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, p_w, False) for p in parts]),
            tokens=torch.cat([right(p.tokens, t_w, pad) for p in parts]),
            token_mask=torch.cat([right(p.token_mask, t_w, False) for p in parts]),
            behaviour_logp=torch.cat([right(p.behaviour_logp, t_w, 0.0) for p in parts]),
            group_ids=torch.cat([p.group_ids for p in parts]),
            prompt_index=torch.cat([p.prompt_index for p in parts]),
            finished=torch.cat([p.finished for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            lengths=torch.cat([p.lengths for p in parts]),
            min_lengths=torch.cat([p.min_lengths for p in parts]),
            text_lengths=torch.cat([p.text_lengths for p in parts]),
            params=parts[0].params,
            pad_id=pad,
            extras=_cat_extras([p.extras for p in parts], [p.num_rows for p in parts]),
        )


def _cat_extras(parts: list[dict[str, torch.Tensor]], rows: list[int]) -> dict[str, torch.Tensor]:
    """Row-concatenate each extra, zero-padding its other dims to the largest; a part without it gets zeros."""
    names = sorted({k for p in parts for k in p})
    out = {}
    for k in names:
        have = [p[k] for p in parts if k in p]
        if len({(t.dtype, t.ndim) for t in have}) != 1:
            raise ValueError(f"extras[{k!r}] differs in dtype or rank between the rollouts")
        shape = [max(t.shape[d] for t in have) for d in range(1, have[0].ndim)]
        chunks = []
        for p, n in zip(parts, rows):
            z = torch.zeros(n, *shape, dtype=have[0].dtype, device=have[0].device)
            if k in p:
                t = p[k]
                z[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t.to(z.device)
            chunks.append(z)
        out[k] = torch.cat(chunks)
    return out
