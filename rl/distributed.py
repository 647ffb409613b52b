"""Data parallelism for the trainer (under `accelerate launch`), reduced to the few operations it needs.

Every rank runs the same step plan (prompts, group ids, resampling decisions); each generation request's slots are
split into contiguous shards, one per rank, so a group is never split across ranks. Ranks exchange only what the
plan and the statistics need (informativeness, per-row rewards, loss denominators); gradients are the engine's
(rl/engine.py: DDP or FSDP2). With one process every operation is the identity.
"""

from __future__ import annotations

import torch


class Dist:
    def __init__(self, accelerator):
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.main = accelerator.is_main_process
        self._accelerator = accelerator

    def shard(self, n: int) -> list[int]:
        """This rank's contiguous share of positions 0..n-1 (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (1 if self.rank < extra else 0)))

    def gather(self, obj) -> list:
        """obj from every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks."""
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def sum(self, x: float) -> float:
        return float(self.sum_(torch.tensor([float(x)], dtype=torch.float64))[0]) if self.world > 1 else float(x)

    def max(self, x: float) -> float:
        return max(self.gather(float(x)))

    def min(self, x: float) -> float:
        return min(self.gather(float(x)))

    def barrier(self) -> None:
        self._accelerator.wait_for_everyone()
