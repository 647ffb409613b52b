"""The clipped policy-gradient loss (PPO / GRPO / DAPO / GSPO / Dr.GRPO family).

Per token t of sequence i, with advantage A_i:

    ratio_i,t = exp(logp_i,t - anchor_logp_i,t)                      ratio_level="token"
    ratio_i   = exp( sum_t m_i,t (logp - anchor)_i,t / sum_t m_i,t )   ratio_level="sequence" (GSPO)
    L_i,t     = -min(ratio * A_i, clamp(ratio, 1 - eps_low, 1 + eps_high) * A_i)

Aggregation over the valid tokens m:
    token_mean     sum m L / sum m                                   (DAPO, upstream GLM-TTS)
    seq_mean       mean_i ( sum_t m L / sum_t m )                    (GRPO; sequences without tokens skipped)
    seq_sum_const  sum m L / (B * norm_len)                          (Dr.GRPO; B = rows, norm_len given)

Optional KL to a reference, k3 estimator: kl_t = exp(ref - logp) - (ref - logp) - 1, added as
kl_coef * (token mean of kl_t).

The anchor: `anchor_logp` is either the behaviour (old) policy's log-probs or a frozen reference's; the caller
chooses. With an old-policy anchor and a single update per rollout the ratio is exactly 1 and the clip never
binds (the loss is then plain policy gradient); the clip only acts with several minibatches or epochs per rollout.
With a reference anchor (upstream GLM-TTS) the clip is a trust region around the initial model, so widening
eps over training lets the policy drift further from it.

Log-ratios are clamped to [-20, 20] before exp() so that a token whose probability vanished cannot produce
inf * 0 = NaN; the clamp is far outside any clip range, so it never changes a clipped objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

_LOG_RATIO_LIMIT = 20.0


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: pg + kl_coef * kl
    pg: torch.Tensor  # scalar policy-gradient term (aggregated as `agg` says)
    kl: torch.Tensor  # scalar token-mean k3 KL (0 without a reference)
    metrics: dict[str, float] = field(default_factory=dict)

    def __iter__(self):  # `loss, metrics = policy_loss(...)`
        return iter((self.loss, self.metrics))


def policy_loss(
    logp: torch.Tensor,  # [B, T] log-probs of the taken tokens under the current policy (with grad)
    anchor_logp: torch.Tensor,  # [B, T] the same under the anchor (old or reference); no grad taken
    advantages: torch.Tensor,  # [B]
    mask: torch.Tensor,  # [B, T] bool/0-1: tokens that count
    *,
    eps_low: float,
    eps_high: float,
    ratio_level: Literal["token", "sequence"] = "token",
    agg: Literal["token_mean", "seq_mean", "seq_sum_const"] = "token_mean",
    norm_len: int | None = None,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,  # [B, T], required when kl_coef > 0
) -> LossOutput:
    """Returns LossOutput (unpacks as `loss, metrics`). The pg and kl terms are kept apart so that micro-batches
    can weight them by their own denominators (sequences or tokens). Metrics: clip/low_frac, clip/high_frac (sign-aware, over valid tokens),
    ratio/mean, ratio/min, ratio/max, kl (token mean, 0 without a reference), pg_loss."""
    if logp.dim() != 2 or anchor_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, anchor_logp and mask must share one [B, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(anchor_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B]={logp.shape[0]}, got {tuple(advantages.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError("eps_low and eps_high must be >= 0")
    m = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)[:, None]  # [B, 1]
    log_ratio = (logp - anchor_logp.detach()).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    valid = mask.bool()
    log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))  # padding carries no ratio, no NaN
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)  # [B, T]
    elif ratio_level == "sequence":
        seq = log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
        ratio = torch.exp(seq)[:, None].expand_as(logp)  # [B, T]
    else:
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")

    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))

    n_tok = m.sum()
    if agg == "token_mean":
        pg = per_token.sum() / n_tok.clamp(min=1.0)
    elif agg == "seq_mean":
        tok_per_seq = m.sum(-1)
        has = tok_per_seq > 0
        seq_loss = per_token.sum(-1) / tok_per_seq.clamp(min=1.0)
        pg = seq_loss[has].sum() / has.sum().clamp(min=1)
    elif agg == "seq_sum_const":
        if norm_len is None or norm_len <= 0:
            raise ValueError("agg='seq_sum_const' needs norm_len > 0 (e.g. the maximum generation length)")
        pg = per_token.sum() / (logp.shape[0] * norm_len)
    else:
        raise ValueError(f"agg must be token_mean, seq_mean or seq_sum_const, got {agg!r}")

    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        delta = (ref_logp.detach() - logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        kl_tok = torch.where(valid, torch.exp(delta) - delta - 1.0, torch.zeros_like(delta))
        kl = kl_tok.sum() / n_tok.clamp(min=1.0)
    elif kl_coef != 0.0:
        raise ValueError("kl_coef > 0 needs ref_logp")
    loss = pg + kl_coef * kl

    with torch.no_grad():
        n = valid.sum().clamp(min=1)
        r = ratio.detach()
        low = (r < 1.0 - eps_low) & (adv < 0) & valid
        high = (r > 1.0 + eps_high) & (adv > 0) & valid
        rv = r[valid]
        metrics = {
            "clip/low_frac": float(low.sum() / n),
            "clip/high_frac": float(high.sum() / n),
            "ratio/mean": float(rv.mean()) if rv.numel() else 1.0,
            "ratio/min": float(rv.min()) if rv.numel() else 1.0,
            "ratio/max": float(rv.max()) if rv.numel() else 1.0,
            "kl": float(kl.detach()),
            "pg_loss": float(pg.detach()),
        }
    return LossOutput(loss=loss, pg=pg, kl=kl, metrics=metrics)
