"""The clipped policy-gradient loss (PPO / GRPO / DAPO / GSPO / Dr.GRPO family).

Per token t of sequence i, with advantage A_i (or a per-token A_i,t from a token-level reward):

    ratio_i,t = exp(logp_i,t - anchor_logp_i,t)                      ratio_level="token"
    ratio_i   = exp( sum_t m_i,t (logp - anchor)_i,t / sum_t m_i,t )   ratio_level="sequence" (GSPO)
    L_i,t     = -min(ratio * A_i, clamp(ratio, 1 - eps_low, 1 + eps_high) * A_i)

Aggregation over the valid tokens m (`agg_loss`), with the denominators N_tok (valid tokens), N_seq (sequences
holding at least one valid token) and N_rows (rows, valid or not):
    token_mean     sum m L / N_tok                                   (DAPO, upstream GLM-TTS)
    seq_mean       sum_i ( sum_t m L / sum_t m ) / N_seq             (GRPO; sequences without tokens add nothing)
    seq_sum_const  sum m L / (N_rows * norm_len)                     (Dr.GRPO; norm_len a fixed length)

Optional KL to a reference, k3 estimator: kl_t = exp(ref - logp) - (ref - logp) - 1, added as
kl_coef * (sum m kl / N_tok); or, when the policy gives it in closed form (`kl_tokens`, e.g. the flow policy's
Gaussian transitions: ||mean - mean_ref||^2 / (2 std^2)), that per-token KL in place of k3.

Whose denominators. Without `denom`, `policy_loss` uses the batch's own (N_* counted from `mask`), so its loss is
the batch's mean. A minibatch split into micro-batches (and over ranks) must instead divide every micro-batch's
sums by the WHOLE minibatch's denominators, over all ranks (`LossDenominators`, as verl's `agg_loss` takes
`batch_num_tokens` / `global_batch_size`): then each micro-batch's loss is already its share of the minibatch loss,
and summing the micro-batches' gradients (backward of each) and the ranks' gradients (all-reduce SUM, not mean)
gives exactly the gradient of the whole minibatch's loss, whatever the split. Dividing by a micro-batch's own
denominators and averaging is not the same when micro-batches hold different numbers of tokens or sequences.

The anchor: `anchor_logp` is either the behaviour (old) policy's log-probs or a frozen reference's; the caller
chooses. With an old-policy anchor and a single update per rollout the ratio is exactly 1 and the clip never
binds (the loss is then plain policy gradient); the clip only acts with several minibatches or epochs per rollout.
With a reference anchor (upstream GLM-TTS) the clip is a trust region around the initial model, so widening
eps over training lets the policy drift further from it.

Log-ratios are clamped to [-20, 20] before exp() so that a token whose probability vanished cannot produce
inf * 0 = NaN; the clamp is far outside any clip range, so it never changes a clipped objective.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

_LOG_RATIO_LIMIT = 20.0

Agg = Literal["token_mean", "seq_mean", "seq_sum_const"]


@dataclass(frozen=True)
class LossDenominators:
    """The denominators of one minibatch's loss: counted over ALL its rows, on all ranks, not over one micro-batch.

    tokens:   valid tokens, sum of the [B, T] mask over every row of the minibatch (token_mean, and the KL term)
    seqs:     rows with at least one valid token (seq_mean)
    rows:     rows, with or without valid tokens (seq_sum_const)
    norm_len: seq_sum_const's fixed length (e.g. sampling.max_new_tokens); None when not used. `policy_loss`
              fills it from its `norm_len` argument when None here.

    Counts are plain numbers (an all-reduce SUM of each rank's counts), so the loss needs no device sync. A zero
    count divides as 1 (the sums over no tokens are 0 then)."""

    tokens: float
    seqs: float
    rows: float
    norm_len: int | None = None

    def __post_init__(self):
        for name in ("tokens", "seqs", "rows"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"LossDenominators.{name} must be a finite count >= 0, got {v!r}")
        if self.seqs > self.tokens or self.seqs > self.rows:
            raise ValueError(
                f"LossDenominators: seqs ({self.seqs}) cannot exceed tokens ({self.tokens}) or rows ({self.rows})"
            )

    @classmethod
    def from_mask(cls, mask: torch.Tensor, norm_len: int | None = None) -> LossDenominators:
        """The counts of one [B, T] mask (one rank's rows; all-reduce SUM them for the global ones). Syncs."""
        valid = mask.bool()
        return cls(
            tokens=float(valid.sum()), seqs=float(valid.any(-1).sum()), rows=float(mask.shape[0]), norm_len=norm_len
        )


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, agg: Agg, denom: LossDenominators) -> torch.Tensor:
    """Aggregate per-token losses [B, T] over the valid tokens of `mask` [B, T], dividing by `denom` (see the module
    docstring: token_mean sum / tokens, seq_mean sum of per-sequence means / seqs, seq_sum_const sum / (rows *
    norm_len)). With the batch's own denominators (`LossDenominators.from_mask(mask)`) this is its mean loss; with
    a minibatch's global ones it is this batch's share of the minibatch loss, so shares add up. Masked entries
    may hold NaN/inf: they are replaced by 0 (no value, no gradient)."""
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(
            f"per_token and mask must share one [B, T] shape; got {tuple(per_token.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if agg == "token_mean":
        return per_token.sum() / max(denom.tokens, 1.0)
    if agg == "seq_mean":
        tok_per_seq = valid.sum(-1).to(per_token.dtype)
        return (per_token.sum(-1) / tok_per_seq.clamp(min=1.0)).sum() / max(denom.seqs, 1.0)
    if agg == "seq_sum_const":
        if denom.norm_len is None or denom.norm_len <= 0:
            raise ValueError("agg='seq_sum_const' needs norm_len > 0 (e.g. the maximum generation length)")
        return per_token.sum() / (max(denom.rows, 1.0) * denom.norm_len)
    raise ValueError(f"agg must be token_mean, seq_mean or seq_sum_const, got {agg!r}")


@dataclass
class LossOutput:
    """Without `denom`: the batch's own means. With `denom`: this micro-batch's shares of the minibatch's loss
    (sum them over micro-batches and ranks). `metrics` are always this batch's own (local) values."""

    loss: torch.Tensor  # scalar: pg + kl_coef * kl
    pg: torch.Tensor  # scalar policy-gradient term (aggregated as `agg` says)
    kl: torch.Tensor  # scalar k3 KL: token sum / tokens (0 without a reference)
    metrics: dict[str, float] = field(default_factory=dict)


def policy_loss(
    logp: torch.Tensor,  # [B, T] log-probs of the taken tokens under the current policy (with grad)
    anchor_logp: torch.Tensor,  # [B, T] the same under the anchor (old or reference); no grad taken
    advantages: torch.Tensor,  # [B] per sequence, or [B, T] per token (token-level rewards, rl/advantages.py)
    mask: torch.Tensor,  # [B, T] bool/0-1: tokens that count
    *,
    eps_low: float,
    eps_high: float,
    ratio_level: Literal["token", "sequence"] = "token",
    agg: Agg = "token_mean",
    norm_len: int | None = None,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,  # [B, T], required when kl_coef > 0 (unless kl_tokens is given)
    denom: LossDenominators | None = None,
    kl_tokens: torch.Tensor | None = None,  # [B, T] per-token KL to the reference in closed form (with grad)
) -> LossOutput:
    """Returns LossOutput. `denom` None: pg and kl are this batch's own means (local denominators). `denom` given
    (the whole minibatch's counts over all ranks): pg = agg_loss(..., denom) and kl = token sum / denom.tokens, so
    `loss` is directly this micro-batch's share: backward each micro-batch's loss and sum gradients over ranks.
    `norm_len` fills denom.norm_len when that is None (they must agree when both are given).
    Metrics (always local): clip/low_frac, clip/high_frac (sign-aware, over valid tokens), ratio/mean, ratio/min,
    ratio/max, kl (token mean, 0 without a reference), pg_loss (this batch's own aggregate)."""
    if logp.dim() != 2 or anchor_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, anchor_logp and mask must share one [B, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(anchor_logp.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be [B]={logp.shape[0]} or [B, T]={tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    if eps_low < 0 or eps_high < 0:
        raise ValueError("eps_low and eps_high must be >= 0")
    if ref_logp is None and kl_tokens is None and kl_coef != 0.0:
        raise ValueError("kl_coef > 0 needs ref_logp (or kl_tokens)")
    if kl_tokens is not None and kl_tokens.shape != logp.shape:
        raise ValueError(f"kl_tokens must be [B, T]={tuple(logp.shape)}, got {tuple(kl_tokens.shape)}")
    local = LossDenominators.from_mask(mask, norm_len)
    if denom is not None:
        if denom.norm_len is None:
            denom = dataclasses.replace(denom, norm_len=norm_len)
        elif norm_len is not None and norm_len != denom.norm_len:
            raise ValueError(f"norm_len={norm_len} disagrees with denom.norm_len={denom.norm_len}")
        if local.tokens > denom.tokens or local.seqs > denom.seqs or local.rows > denom.rows:
            raise ValueError(
                f"denom ({denom}) is smaller than this batch's own counts ({local}): it must count the "
                f"whole minibatch over all ranks"
            )
    m = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv  # [B, 1] or [B, T]
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
    pg = agg_loss(per_token, mask, agg, denom if denom is not None else local)

    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    kl_local = kl
    if kl_tokens is not None or ref_logp is not None:
        if kl_tokens is not None:  # the policy's closed form (e.g. two Gaussians' KL)
            kl_tok = torch.where(valid, kl_tokens.to(logp.dtype), torch.zeros_like(logp))
        else:  # k3: exp(d) - d - 1 with d = ref - logp, unbiased and >= 0
            assert ref_logp is not None
            delta = (ref_logp.detach() - logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
            kl_tok = torch.where(valid, torch.exp(delta) - delta - 1.0, torch.zeros_like(delta))
        kl_sum = kl_tok.sum()
        kl_local = kl_sum / max(local.tokens, 1.0)
        kl = kl_sum / max(denom.tokens, 1.0) if denom is not None else kl_local
    loss = pg + kl_coef * kl

    with torch.no_grad():
        pg_local = pg if denom is None else agg_loss(per_token.detach(), mask, agg, local)
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
            "kl": float(kl_local.detach()),
            "pg_loss": float(pg_local.detach()),
        }
    return LossOutput(loss=loss, pg=pg, kl=kl, metrics=metrics)


def staged_loss(
    logp: torch.Tensor,  # [B, T] every action's log-prob under the current policy (with grad)
    anchor_logp: torch.Tensor,  # [B, T] the same under the anchor
    advantages: torch.Tensor,  # [B] or [B, T], shared by every stage
    masks: list[torch.Tensor],  # per stage s, [B, T]: its actions that count (disjoint)
    denoms: list[LossDenominators],  # per stage, its minibatch's counts (of its own actions)
    *,
    eps: list[tuple[float, float]],  # per stage (eps_low, eps_high)
    weights: list[float],  # per stage, its loss weight w_s
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,  # [B, T] for the stages with a k3 KL
    kl_tokens: torch.Tensor | None = None,  # [B, T] closed-form KL, for the stages in `closed`
    closed: list[bool] | None = None,  # per stage: its KL is `kl_tokens` (else k3 on `ref_logp`)
    ratio_level: Literal["token", "sequence"] = "token",
    agg: Agg = "token_mean",
    norm_len: int | None = None,
) -> tuple[torch.Tensor, list[LossOutput]]:
    """The loss of a policy whose actions come in stages (rl/stages.py): L = sum_s w_s (pg_s + kl_coef kl_s), each
    stage's `policy_loss` over its own actions with its own clip range and denominators. Returns (L, the stages'
    LossOutputs, unweighted). One stage with weight 1 is exactly `policy_loss`'s loss."""
    n = len(masks)
    if not (len(denoms) == len(eps) == len(weights) == n) or n == 0:
        raise ValueError("masks, denoms, eps and weights need one entry per stage")
    closed = closed if closed is not None else [False] * n
    total: torch.Tensor | None = None
    outs = []
    for s in range(n):
        kl_on = kl_coef > 0
        res = policy_loss(
            logp,
            anchor_logp,
            advantages,
            masks[s],
            eps_low=eps[s][0],
            eps_high=eps[s][1],
            ratio_level=ratio_level,
            agg=agg,
            norm_len=norm_len,
            kl_coef=kl_coef,
            ref_logp=ref_logp if kl_on and not closed[s] else None,
            denom=denoms[s],
            kl_tokens=kl_tokens if kl_on and closed[s] else None,
        )
        term = weights[s] * res.loss
        total = term if total is None else total + term
        outs.append(res)
    assert total is not None
    return total, outs
