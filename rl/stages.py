"""The stages of a policy's actions: each trained with its own loss weight, learning rate and clip range.

A policy whose rows hold actions of several kinds (`glmtts_joint`: LM speech tokens and flow SDE transitions) names
them in `stages` and says per column which one an action is (`action_stages`). Their log-ratios live on different
scales (a token's log-prob against a per-element Gaussian one), so the update treats each stage as a loss of its
own, over its own actions, with its own denominators:

    L = sum_s w_s * (pg_s + kl_coef * kl_s)

where pg_s is `rl/losses.py` `policy_loss` over stage s's actions alone (`stages.<s>.eps_low/eps_high`, falling back
to `loss.eps_*`), its denominators counting stage s's actions of the minibatch, and w_s = `stages.<s>.loss_weight`.
One advantage per row drives every stage. When the stages train parameters of their own (`stage_parameters`:
glmtts_joint's LM and DiT), each stage's parameters are one AdamW parameter group (`stages.<s>.lr`, else
`optim.lr`) and each group's gradient is clipped to `optim.grad_clip` on its own, so that one stage's gradient
scale does not shrink the other's step. When they share them (voxcpm: the same LMs decide a patch's denoising and
its stop), there is one group and one clip, and `stages.<s>.lr` is refused.

A policy that names one stage (`glmtts`: lm, `glmtts_flow`: flow) is trained exactly as before; it only gains the
`<stage>/...` metrics. A policy that names none is one unnamed stage and logs none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rl.configlib import ConfigError
from rl.schedules import Schedule

# the per-stage metrics, logged as <stage>/<key> for a policy that names its stages (rl/trainer.py step_metrics)
STAGE_METRICS = (
    "loss",
    "pg_loss",
    "kl",
    "clip/low_frac",
    "clip/high_frac",
    "clip/eps_low",
    "clip/eps_high",
    "ratio/mean",
    "ratio/min",
    "ratio/max",
    "grad_norm",
    "lr",
)


@dataclass(frozen=True)
class Stage:
    name: str  # the policy's name for it ("" for a policy that names no stages)
    index: int  # its value in policy.action_stages()
    loss_weight: float
    lr: float
    eps_low: Schedule
    eps_high: Schedule
    closed_kl: bool  # the policy gives this stage's KL to the reference in closed form (policy.reference_kl)

    def key(self, metric: str) -> str:
        return f"{self.name}/{metric}"


def plan_stages(cfg, policy) -> list[Stage]:
    """The policy's stages with their settings (`cfg.stages`, else loss.* / optim.*). ConfigError for a configured
    stage the policy does not have, or when every stage's loss weight is 0."""
    names = tuple(getattr(policy, "stages", ()) or ())
    kind = cfg.policy.kind
    for key in cfg.stages:
        if key not in names:
            have = ", ".join(names) if names else "none (it trains as one)"
            raise ConfigError(f"stages.{key}: policy.kind {kind} has no stage {key!r}; its stages: {have}")
    shared = len(names) > 1 and not callable(getattr(policy, "stage_parameters", None))
    for key, st in cfg.stages.items():
        if shared and st.lr is not None:
            raise ConfigError(
                f"stages.{key}.lr: policy.kind {kind}'s stages share their parameters (one optimizer group); "
                f"set optim.lr instead"
            )
    closed = set(getattr(policy, "closed_kl_stages", ()) or ())
    stages = []
    for i, name in enumerate(names or ("",)):
        st = cfg.stages.get(name)
        stages.append(
            Stage(
                name=name,
                index=i,
                loss_weight=st.loss_weight if st is not None else 1.0,
                lr=st.lr if st is not None and st.lr is not None else cfg.optim.lr,
                eps_low=st.eps_low if st is not None and st.eps_low is not None else cfg.loss.eps_low,
                eps_high=st.eps_high if st is not None and st.eps_high is not None else cfg.loss.eps_high,
                closed_kl=name in closed,
            )
        )
    if all(s.loss_weight == 0 for s in stages):
        raise ConfigError(f"stages: every stage of policy.kind {kind} has loss_weight 0, so nothing would train")
    return stages


def stage_masks(policy, rollout, mask: torch.Tensor, stages: list[Stage]) -> list[torch.Tensor]:
    """Per stage, the [N, T] mask of its actions among `mask` [N, T] (one stage: `mask` itself)."""
    if len(stages) == 1:
        return [mask]
    ids = policy.action_stages(rollout).to(mask.device)
    if ids.shape != mask.shape:
        raise ValueError(f"action_stages gave {tuple(ids.shape)}, the rollout's actions are {tuple(mask.shape)}")
    return [mask & (ids == s.index) for s in stages]


def param_groups(policy, stages: list[Stage]) -> list[dict[str, Any]]:
    """One AdamW parameter group per stage (its parameters and learning rate), in stage order; one group (at
    optim.lr) when the stages share their parameters."""
    if len(stages) == 1 or not callable(getattr(policy, "stage_parameters", None)):
        return [{"params": policy.trainable_parameters(), "lr": stages[0].lr}]
    own = policy.stage_parameters()
    params = [list(own[s.name]) for s in stages]
    every = {id(p) for p in policy.trainable_parameters()}
    grouped = [id(p) for ps in params for p in ps]
    if len(grouped) != len(set(grouped)) or set(grouped) != every:
        raise ValueError("stage_parameters() must split trainable_parameters() between the stages, each once")
    return [{"params": ps, "lr": s.lr} for ps, s in zip(params, stages)]


def combined_norm(norms: list[float]) -> float:
    """The global gradient norm from the stages' norms."""
    return math.sqrt(sum(n * n for n in norms))
