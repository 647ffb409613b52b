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

import math
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


# ---- token level -------------------------------------------------------------------------------------------------
#
# A token-level reward (e.g. `rewards.cer.kwargs.token_level`) also says which stretches of a sample's audio were
# wrong: spans (start_s, end_s) in seconds. With the policy's frame rate r (actions per second of audio: action t of
# a row covers [t / r, (t + 1) / r)), the frames a span covers are
#
#     e_k,i,t = 1   if t < L_i and t / r < end and (t + 1) / r > start   (a span of zero width: the frame holding it)
#
# where L_i is the row's generated speech length (its stop action, if any, is never blamed). The advantage of each
# action is then the sequence's advantage minus the weighted penalties:
#
#     A_i,t = A_i - c * sum_k w_k * e_k,i,t          c = advantage.token_coef, w_k the reward's weight
#
# (upstream GLM-TTS's `normalize_rewards_per_group_token_level` intent: the spans' tokens are pushed down on top of
# the sequence-level credit). Rows without spans (None) keep A_i on every action.


def span_frames(
    spans: list[tuple[tuple[float, float], ...] | None],  # [N] per row its (start_s, end_s) spans, None = unknown
    lengths: torch.Tensor,  # [N] long, generated speech frames per row (the stop action excluded)
    frame_rate: float,  # actions per second of audio (the policy's `speech_rate`)
    num_frames: int,  # T, the width of the rollout's action tensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames inside any span (see above). Returns (covered [N, T] bool, has_spans [N] bool)."""
    if frame_rate <= 0:
        raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
    n = lengths.shape[0]
    if len(spans) != n:
        raise ValueError(f"spans has {len(spans)} rows, lengths {n}")
    covered = torch.zeros(n, num_frames, dtype=torch.bool)
    has = torch.tensor([sp is not None for sp in spans], dtype=torch.bool)
    tol = 1e-9  # a boundary that lands on a frame edge (up to rounding) does not reach into the next frame
    for i, sp in enumerate(spans):
        limit = min(int(lengths[i]), num_frames)
        for start, end in sp or ():
            lo = max(math.floor(start * frame_rate + tol), 0)
            hi = min(max(math.ceil(end * frame_rate - tol), lo + 1), limit)
            if lo < hi:
                covered[i, lo:hi] = True
    return covered, has


def token_level_advantages(
    advantages: torch.Tensor,  # [N] sequence advantages
    penalties: dict[str, torch.Tensor],  # name -> [N, T] bool/float e_k (span_frames' covered)
    weights: dict[str, float],  # name -> the reward's weight w_k
    coef: float,  # c
) -> torch.Tensor:
    """A_i,t = A_i - c * sum_k w_k * e_k,i,t. Returns [N, T] float32 (T from the penalties)."""
    if not penalties:
        raise ValueError("token_level_advantages needs at least one penalty")
    shapes = {tuple(p.shape) for p in penalties.values()}
    if len(shapes) != 1 or next(iter(shapes))[:1] != tuple(advantages.shape):
        raise ValueError(f"penalties must all be [N, T] with N = {advantages.shape[0]}; got {sorted(shapes)}")
    term = sum(float(weights.get(k, 0.0)) * p.to(torch.float64) for k, p in penalties.items())
    return (advantages.to(torch.float64)[:, None] - coef * term).to(torch.float32)
