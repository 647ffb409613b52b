"""The data-parallel engine of the update: torch DDP (replicated weights) or FSDP2 (sharded), under `accelerate launch`.

`optim.zero_stage` picks it when the run has more than one process:
- 0: `DistributedDataParallel`. Gradients are all-reduced in buckets while the backward pass runs; the micro-batches
  of a minibatch accumulate locally (`no_sync`) and only the last backward communicates.
- 2: FSDP2 (`torch.distributed.fsdp.fully_shard`) over the whole model as one unit, `reshard_after_forward=False`:
  the weights are gathered for each forward and kept through its backward, the gradients are reduce-scattered and
  a rank keeps the gradients and AdamW moments of 1/N of every weight (DeepSpeed ZeRO-2's memory plan, which
  upstream GLM-TTS trains with).
- 3: FSDP2 with each of the policy's blocks (`Policy.fsdp_units`) a unit of its own and `reshard_after_forward=True`:
  the weights too are sharded, and only one block's are whole at a time (ZeRO-3).
With one process the engine is the identity.

Both engines sum gradients over ranks (the loss already divides by the global denominators, rl/losses.py) and both
need every rank to run the same number of forward / backward passes per optimizer step: the trainer pads a rank's
micro-batches with zero-weight ones (`padding_loss`). The policy's forward runs as the forward of a root module
around `policy.model` (`logprobs`), so the engine's hooks see it whichever submodules the policy calls. Sampling
runs inside `gathered()`, which gathers the sharded weights once for the whole round (ranks sample different
numbers of tokens, so per-forward gathers could not line up).

Checkpoints hold full tensors in the format of one torch AdamW over `policy.trainable_parameters()` (gathered from
the shards), so a run resumes with another number of processes or another engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as tdist

from policies.base import Policy
from rl.distributed import Dist
from rollouts.types import Rollout


class _Root(torch.nn.Module):
    """`policy.model` as the only child; forward(fn, ...) = fn(...): a policy method run as the engine's forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _sum_hook(state, bucket):
    """DDP communication hook: sum (DDP's default averages) a gradient bucket over ranks."""
    fut = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Engine:
    """Wraps the policy's module for the update (see the module docstring)."""

    def __init__(self, policy: Policy, dist: Dist, zero_stage: int):
        self.policy, self.dist = policy, dist
        self.kind = "single" if dist.world == 1 else ("ddp" if zero_stage == 0 else "fsdp")
        self.wrapper = _Root(policy.model)
        self.module: torch.nn.Module = self.wrapper
        self._zero3 = zero_stage == 3
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = policy.device
            ddp = DistributedDataParallel(
                self.wrapper,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # the policy's buffers are constants
                gradient_as_bucket_view=True,  # no second copy of the gradients
            )
            ddp.register_comm_hook(None, _sum_hook)
            self.module = self._ddp = ddp
        elif self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            blocks = list(policy.fsdp_units()) if self._zero3 else []  # zero_stage 2: the model is one unit
            units = [fully_shard(b, reshard_after_forward=self._zero3) for b in blocks]
            units.append(fully_shard(self.wrapper, reshard_after_forward=self._zero3))
            for unit in units:
                unit.set_gradient_divide_factor(1.0)  # a sum over ranks,
                unit.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no pre-scaled sum)
            with torch.no_grad():
                self.wrapper(lambda: None)  # FSDP2 initialises from its root's first forward
            for unit in units:
                unit.reshard()  # the module's parameters are the shards again (what the optimizer must hold)
            self._units = units

    # --- forward / backward -----------------------------------------------------------------------------------
    def logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """policy.token_logprobs through the engine (the reference of a replicated model needs no engine)."""
        if reference and self.kind != "fsdp":
            return self.policy.token_logprobs(rollout, reference=True)
        return self.module(self.policy.token_logprobs, rollout, reference=reference)

    def reference_kl(self, rollout: Rollout) -> torch.Tensor:
        """policy.reference_kl (a closed-form per-action KL to the reference, with grad) through the engine."""
        fn = self.policy.reference_kl  # type: ignore[attr-defined]  # an optional member of the contract
        return self.module(fn, rollout)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward + backward: DDP communicates in the last one only."""
        if self.kind == "ddp" and not last:
            with self._ddp.no_sync():
                yield
        else:
            yield

    @staticmethod
    def padding_loss(logp: torch.Tensor) -> torch.Tensor:
        """A zero-weight loss over a padding micro-batch: every trainable weight in the graph, zero gradients."""
        return logp.sum() * 0.0

    def clip_grad_norm(self, accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip by the global norm (over every rank's shard under FSDP2); returns the norm before clipping."""
        if self.kind != "fsdp":
            return float(accelerator.clip_grad_norm_(params, max_norm))
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Sampling (many small forwards, a different number on every rank) with the full weights on every rank:
        FSDP2 gathers them once here (a collective: every rank enters together) and shards them again after."""
        if self.kind != "fsdp":
            yield
            return
        for m in self._units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in self._units:
                m.reshard()
                m.set_reshard_after_forward(self._zero3, recurse=False)
            # forget the order the sampling ran the units in (backward prefetching follows the recorded forward
            # order, which must be the update's, the same on every rank)
            self._units[-1].reset_iter_state()  # the root

    # --- checkpoints ------------------------------------------------------------------------------------------
    def policy_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's checkpoint state as full tensors (a collective under FSDP2); rank 0 gets it, others None."""
        state = self.policy.state_for_checkpoint() if self.kind == "fsdp" or self.dist.main else {}
        if self.kind == "fsdp":
            state = {k: _full(v) for k, v in state.items()}
        return state if self.dist.main else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state dict with full tensors (a collective under FSDP2); rank 0 gets it, others None."""
        sd = optimizer.state_dict()
        if self.kind == "fsdp":
            sd = {**sd, "state": {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}}
        return sd if self.dist.main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict) -> None:
        """Load a full state dict (one AdamW over every trainable parameter); FSDP2 keeps its ranks' shards."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        count = sum(len(g["params"]) for g in full.get("param_groups", []))
        if count != len(params):
            raise ValueError(f"optimizer state holds {count} parameters; this model trains {len(params)}")
        if self.kind == "fsdp":
            from torch.distributed.tensor import DTensor, distribute_tensor

            state = {}
            for i, s in full["state"].items():
                p = params[int(i)]
                state[i] = {
                    k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape
                    else v
                    for k, v in s.items()
                }
            full = {**full, "state": state}
        optimizer.load_state_dict(full)

    def all_finite(self, params: list[torch.nn.Parameter]) -> bool:
        return all_finite(params, self.dist)


def all_finite(params: list[torch.nn.Parameter], dist: Dist) -> bool:
    """Every weight finite, on every rank (the same answer everywhere; each rank checks its shards)."""
    ok = all(bool(torch.isfinite(_local(p.detach())).all()) for p in params)
    return dist.min(1.0 if ok else 0.0) == 1.0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def padding_rows(dist: Dist, rollout: Rollout | None) -> Rollout | None:
    """One row any rank holds (a collective), for the zero-weight micro-batches of a rank with fewer micro-batches
    (`rollout`: this rank's rows, None when it holds none); None when no rank has a row."""
    n = rollout.num_rows if rollout is not None else 0
    if dist.min(float(n)) > 0 and rollout is not None:
        return rollout.select(torch.tensor([0]))
    every = dist.gather(rollout.select(torch.tensor([0])) if rollout is not None and n else None)
    return next((r for r in every if r is not None), None)
