"""Multi-reward group advantages: normalize -> weighted fuse -> normalize.

For rewards r_k (NaN = invalid), weights w_k and explicit group ids g:

    stage 1   z_k,i = (r_k,i - mean_g(r_k)) / (std_g(r_k) + eps)      over the valid entries of group g
              z_k,i = 0  when r_k,i is invalid, or for the whole group when std_g(r_k) < min_std
    fuse      s_i   = sum_k w_k z_k,i                                   (keys with weight 0 or absent are ignored)
    stage 2   group: A_i = (s_i - mean_g(s)) / (std_g(s) + eps), and A_i = 0 for a group whose std_g(s) < min_std
              batch: A_i = (s_i - mean(s)) / (std(s) + eps)             over the whole batch

std uses `std_ddof` (0 = population, 1 = Bessel). A sample whose every weighted reward is invalid gets A = 0, is
`informative=False` and is left out of every statistic. A group "carries signal" (is informative) when the
std of its fused scores s is >= min_std and not zero.

Defaults reproduce the upstream GLM-TTS normaliser (np.std, no eps, 1e-2 threshold, group-level second norm).
`std_ddof=1, eps=1e-4, min_std=0, second_norm="batch"` reproduces TRL's
`multi_objective_aggregation="normalize_then_sum"` (GDPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

_ZERO_STD = 1e-12  # a fused std at or below this is "no spread at all", whatever min_std says


@dataclass(frozen=True)
class AdvantageResult:
    advantages: torch.Tensor  # [N] float32
    informative: torch.Tensor  # [N] bool: the sample's group carries signal and the sample has a valid reward
    stats: dict[str, float] = field(default_factory=dict)  # see normalize_fuse_normalize


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids [N] to dense indices 0..G-1. Returns (index [N], G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_mean_std(
    values: torch.Tensor,  # [N] float64
    valid: torch.Tensor,  # [N] bool
    gidx: torch.Tensor,  # [N] long in 0..G-1
    num_groups: int,
    ddof: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group mean, std (given ddof) and count over valid entries. Returns three [G] tensors.

    A group with count <= ddof has std 0 (there is no spread to measure) and mean 0 when empty.
    """
    v = torch.where(valid, values, torch.zeros_like(values))
    count = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, gidx, valid.to(values.dtype))
    total = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, gidx, v)
    mean = total / count.clamp(min=1)
    dev = torch.where(valid, values - mean[gidx], torch.zeros_like(values))
    sq = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, gidx, dev * dev)
    denom = (count - ddof).clamp(min=1)
    std = torch.where(count > ddof, (sq / denom).sqrt(), torch.zeros_like(sq))
    return mean, std, count


def _masked_mean_std(values: torch.Tensor, valid: torch.Tensor, ddof: int) -> tuple[float, float]:
    x = values[valid]
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = x.mean()
    if n <= ddof:
        return float(mean), 0.0
    return float(mean), float(((x - mean) ** 2).sum().div(n - ddof).sqrt())


def normalize_fuse_normalize(
    rewards: dict[str, torch.Tensor],  # name -> [N] float, NaN = invalid
    group_ids: torch.Tensor,  # [N] long, explicit group ids (equal prompts in different groups stay apart)
    weights: dict[str, float],  # name -> weight; 0 or absent = ignored
    *,
    std_ddof: int = 0,
    eps: float = 0.0,
    min_std: float = 1e-2,
    second_norm: Literal["group", "batch"] = "group",
) -> AdvantageResult:
    """Advantages per sample from several rewards. See the module docstring for the formulas.

    stats holds, for every reward k given: `reward/k/mean`, `reward/k/std` (raw, valid entries, population std),
    `reward/k/invalid` (count); for every weighted k: `reward/k/norm_mean`, `reward/k/norm_std` (of z over
    valid entries); and `adv/frac_uninformative` (fraction of groups without signal), `adv/mean`, `adv/std`.
    """
    if second_norm not in ("group", "batch"):
        raise ValueError(f"second_norm must be 'group' or 'batch', got {second_norm!r}")
    if std_ddof < 0 or eps < 0 or min_std < 0:
        raise ValueError("std_ddof, eps and min_std must be >= 0")
    n = group_ids.shape[0]
    missing = [k for k, w in weights.items() if w != 0.0 and k not in rewards]
    if missing:
        raise KeyError(f"weights name rewards that were not computed: {missing}; computed: {sorted(rewards)}")
    for k, r in rewards.items():
        if r.shape != (n,):
            raise ValueError(f"reward '{k}' has shape {tuple(r.shape)}, expected ({n},) like group_ids")

    gidx, num_groups = group_index(group_ids)
    stats: dict[str, float] = {}
    fused = torch.zeros(n, dtype=torch.float64)
    any_valid = torch.zeros(n, dtype=torch.bool)

    for k, r in rewards.items():
        r64 = r.detach().to(torch.float64).cpu()
        valid = ~torch.isnan(r64)
        stats[f"reward/{k}/mean"], stats[f"reward/{k}/std"] = _masked_mean_std(r64, valid, 0)
        stats[f"reward/{k}/invalid"] = float((~valid).sum())
        w = float(weights.get(k, 0.0))
        if w == 0.0:
            continue
        mean_g, std_g, _ = group_mean_std(r64, valid, gidx, num_groups, std_ddof)
        degenerate = (std_g < min_std) | (std_g + eps == 0)  # [G]
        z = (r64 - mean_g[gidx]) / torch.where(degenerate, torch.ones_like(std_g), std_g + eps)[gidx]
        z = torch.where(valid & ~degenerate[gidx], z, torch.zeros_like(z))
        stats[f"reward/{k}/norm_mean"], stats[f"reward/{k}/norm_std"] = _masked_mean_std(z, valid, 0)
        fused += w * z
        any_valid |= valid

    s_mean_g, s_std_g, s_count = group_mean_std(fused, any_valid, gidx, num_groups, std_ddof)
    informative_g = (s_count > 0) & (s_std_g >= min_std) & (s_std_g > _ZERO_STD)  # [G]
    if second_norm == "group":
        adv = (fused - s_mean_g[gidx]) / torch.where(informative_g, s_std_g + eps, torch.ones_like(s_std_g))[gidx]
        adv = torch.where(informative_g[gidx], adv, torch.zeros_like(adv))
    else:
        mean, std = _masked_mean_std(fused, any_valid, std_ddof)
        denom = std + eps
        adv = (fused - mean) / denom if denom > 0 else torch.zeros_like(fused)
    adv = torch.where(any_valid, adv, torch.zeros_like(adv))
    informative = informative_g[gidx] & any_valid

    stats["adv/frac_uninformative"] = float((~informative_g).to(torch.float64).mean()) if num_groups else 0.0
    stats["adv/mean"], stats["adv/std"] = _masked_mean_std(adv, any_valid, 0)
    return AdvantageResult(advantages=adv.to(torch.float32), informative=informative, stats=stats)


def fused_reward_mean(stats: dict[str, float], weights: dict[str, float]) -> float:
    """sum_k w_k * mean(valid r_k): the weighted raw reward, robust to invalid entries (`reward/fused/mean`)."""
    total = 0.0
    for k, w in weights.items():
        if w == 0.0:
            continue
        m = stats.get(f"reward/{k}/mean", float("nan"))
        total += w * m
    return total
