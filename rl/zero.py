"""ZeRO stage 2 for the trainer (`optim.zero_stage: 2`): AdamW state and reduced gradients partitioned across ranks.

Each trainable parameter has one owner rank (assigned greedily by size, the same on every rank). After a rank's
backward passes of an optimizer step, every gradient is summed onto its owner (`reduce`) and dropped elsewhere;
the global grad norm is assembled from the owners' shares; each owner clips and steps AdamW on its parameters only,
then broadcasts them. So a rank keeps the AdamW moments (8 bytes per parameter in fp32) of 1/world of the model
and, after the reduction, its gradients: the memory plan of DeepSpeed ZeRO-2, which upstream GLM-TTS trains with.
The result equals one AdamW over the summed gradients (tests/test_distributed.py).

DeepSpeed's own engine is not used: it reduces gradient buckets inside every backward pass, so every rank must run
the same number of backward passes with the same graph, while this trainer's ranks hold whole groups and run as
many micro-batches as their rows need. The reduction here runs once per optimizer step, after all of them.

Checkpoints hold the full optimizer state (gathered on rank 0, in the format of one torch AdamW over every
parameter), so a run resumes with another number of processes, or without sharding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as tdist


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least loaded rank (ties: lowest rank, then index)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ShardedAdamW:
    """AdamW over `params`, each parameter's state on its owner rank only (see the module docstring).

    Use: backward passes as usual (local gradients), then `reduce_clip_step(max_norm)` once per optimizer step."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        rank: int,
        world: int,
        *,
        lr: float,
        betas: tuple,
        weight_decay: float,
        fused: bool | None = None,
    ):
        self.params = list(params)
        self.rank, self.world = rank, world
        self.owner = assign_owners([p.numel() for p in self.params], world)
        self.mine = [i for i, o in enumerate(self.owner) if o == rank]  # global indices this rank steps
        self.hyper = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        owned = [self.params[i] for i in self.mine]
        self.inner = torch.optim.AdamW(owned, **self.hyper, fused=fused) if owned else None
        self.param_groups = self.inner.param_groups if self.inner else [dict(self.hyper)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def reduce_clip_step(self, max_norm: float, allow=None) -> float:
        """Sum each gradient onto its owner, clip by the global norm (as torch's clip_grad_norm_), step the owned
        parameters and broadcast them. Returns the global grad norm before clipping. `allow(norm) -> bool`, when
        given, can veto the step once the global norm is known (the same answer on every rank): then no parameter
        changes and the gradients are dropped."""
        for i, p in enumerate(self.params):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.world > 1:
                tdist.reduce(g, dst=self.owner[i], op=tdist.ReduceOp.SUM)
            p.grad = g if self.owner[i] == self.rank else None
        owned = [self.params[i] for i in self.mine]
        sq = torch.zeros((), dtype=torch.float64, device=self.params[0].device if self.params else "cpu")
        for p in owned:
            sq += p.grad.detach().double().pow(2).sum()
        if self.world > 1:
            tdist.all_reduce(sq, op=tdist.ReduceOp.SUM)
        norm = math.sqrt(float(sq))
        if allow is not None and not allow(norm):
            for p in self.params:
                p.grad = None
            return norm
        if math.isfinite(max_norm) and max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for p in owned:
                    p.grad.mul_(coef)
        if self.inner is not None:
            self.inner.step()
        for i, p in enumerate(self.params):
            if self.world > 1:
                tdist.broadcast(p.data, src=self.owner[i])
            p.grad = None
        return norm

    # --- checkpoints: the full state, in the format of one torch AdamW over every parameter ----------------------
    def state_dict(self) -> dict | None:
        """Collective: every rank calls it. Rank 0 gets the full state dict, the others None."""
        part = {}
        if self.inner is not None:
            inner = self.inner.state_dict()
            part = {
                self.mine[j]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
                for j, s in inner["state"].items()
            }
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world if self.rank == 0 else None
            tdist.gather_object(part, parts, dst=0)
        if self.rank != 0:
            return None
        state = {i: s for p in parts for i, s in p.items()}
        group = {**self.param_groups[0]}
        group.pop("params", None)
        return {
            "state": {i: state[i] for i in sorted(state)},
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, full: dict) -> None:
        """Take this rank's entries of a full state dict (one AdamW over every parameter)."""
        groups = full["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state holds {sum(len(g['params']) for g in groups)} parameters in "
                f"{len(groups)} groups; this model trains {len(self.params)} in one"
            )
        if self.inner is None:
            return
        state = {j: full["state"][i] for j, i in enumerate(self.mine) if i in full["state"]}
        group = {k: v for k, v in groups[0].items() if k != "params"}
        self.inner.load_state_dict({"state": state, "param_groups": [{**group, "params": list(range(len(self.mine)))}]})
