"""Dynamic resampling of groups whose rewards are all alike (no learning signal).

Which groups are uninformative is measured on a subset of reward keys (the GLM-TTS report drops SIM from the
check; default: every weighted key except `sim`): the fused score of those keys is computed exactly as for the
advantages, and a group whose fused std is below `min_std` carries no signal.

Two modes, both pure bookkeeping (the trainer generates and scores; this module decides what comes next):

    reroll  re-sample only the uninformative groups' prompts (same prompts, new samples), up to `max_tries`
            generation attempts per step in all (upstream GLM-TTS: 3), then keep what there is.
    refill  DAPO: drop uninformative groups and draw new prompts until the batch holds `num_prompts` informative
            groups, up to `max_gen_batches` generation rounds; then raise, or keep what there is and top the
            batch up with the latest uninformative groups (`on_exhausted="keep"`).
    off     one generation, keep everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rl.advantages import group_index, normalize_fuse_normalize


def check_keys(weights: dict[str, float], keys: list[str] | None) -> list[str]:
    """The reward keys measured for the informativeness check. None = every weighted key except `sim`."""
    weighted = [k for k, w in weights.items() if w != 0.0]
    if keys is None:
        chosen = [k for k in weighted if k != "sim"]
        return chosen or weighted
    unknown = [k for k in keys if k not in weighted]
    if unknown:
        raise ValueError(f"dynamic_sampling.keys names rewards without weight: {unknown}; weighted: {weighted}")
    return list(keys)


def informative_groups(
    rewards: dict[str, torch.Tensor],  # name -> [N], NaN = invalid
    group_ids: torch.Tensor,  # [N]
    weights: dict[str, float],
    keys: list[str],
    *,
    min_std: float,
    std_ddof: int = 0,
) -> dict[int, bool]:
    """group id -> whether the fused score over `keys` varies within the group (std >= min_std)."""
    sub_w = {k: weights[k] for k in keys}
    res = normalize_fuse_normalize(
        {k: rewards[k] for k in keys}, group_ids, sub_w, std_ddof=std_ddof, min_std=min_std, second_norm="group"
    )
    gidx, num_groups = group_index(group_ids)
    uniq = torch.unique(group_ids)
    out = {}
    for g in range(num_groups):
        out[int(uniq[g])] = bool(res.informative[gidx == g].any())
    return out


class DynamicSamplingExhausted(RuntimeError):
    """refill mode ran out of generation rounds before the batch held enough informative groups."""


@dataclass(frozen=True)
class Request:
    """What to generate next: one group per slot. fresh=True: new prompts for these slots; False: re-sample."""

    slots: tuple[int, ...]
    fresh: bool


@dataclass(frozen=True)
class GroupResult:
    slot: int  # the slot the group was generated for
    group_id: int  # the group's explicit id in the rollout records
    informative: bool


class DynamicSampling:
    """The per-step resampling plan. Use: `while (req := plan.next_request()): ...; plan.record(results)`."""

    def __init__(
        self,
        mode: Literal["off", "reroll", "refill"],
        num_prompts: int,
        *,
        max_tries: int = 3,
        max_gen_batches: int = 4,
        on_exhausted: Literal["keep", "error"] = "keep",
    ):
        if mode not in ("off", "reroll", "refill"):
            raise ValueError(f"unknown dynamic sampling mode {mode!r}")
        if num_prompts < 1 or max_tries < 1 or max_gen_batches < 1:
            raise ValueError("num_prompts, max_tries and max_gen_batches must be >= 1")
        self.mode = mode
        self.num_prompts = num_prompts
        self.max_tries = max_tries
        self.max_gen_batches = max_gen_batches
        self.on_exhausted = on_exhausted
        self.generations = 0  # generation rounds so far (`resample/tries`)
        self.discarded = 0  # uninformative groups generated and dropped (`resample/discarded_groups`)
        self._by_slot: dict[int, GroupResult] = {}  # reroll/off: the current group of each slot
        self._kept: list[GroupResult] = []  # refill: informative groups, in the order they came
        self._spare: list[GroupResult] = []  # refill: uninformative groups, latest last
        self._next_slot = 0
        self._pending: Request | None = None
        self._done = False

    def _new_slots(self, n: int) -> Request:
        slots = tuple(range(self._next_slot, self._next_slot + n))
        self._next_slot += n
        return Request(slots=slots, fresh=True)

    def next_request(self) -> Request | None:
        if self._pending is not None:
            raise RuntimeError("record() the results of the previous request first")
        if self._done:
            return None
        if self.generations == 0:
            req = self._new_slots(self.num_prompts)
        elif self.mode == "off":
            req = None
        elif self.mode == "reroll":
            pending = tuple(s for s, r in sorted(self._by_slot.items()) if not r.informative)
            req = Request(slots=pending, fresh=False) if pending and self.generations < self.max_tries else None
        else:
            deficit = self.num_prompts - len(self._kept)
            if deficit <= 0:
                req = None
            elif self.generations >= self.max_gen_batches:
                if self.on_exhausted == "error":
                    raise DynamicSamplingExhausted(
                        f"refill: only {len(self._kept)} of {self.num_prompts} groups were informative after "
                        f"{self.generations} generation rounds (dynamic_sampling.max_gen_batches); raise it, "
                        f"lower dynamic_sampling.min_std, or set dynamic_sampling.on_exhausted=keep"
                    )
                req = None
            else:
                req = self._new_slots(deficit)
        if req is None:
            self._done = True
        self._pending = req
        return req

    def record(self, results: list[GroupResult]) -> None:
        req = self._pending
        if req is None:
            raise RuntimeError("record() without a pending request")
        got = sorted(r.slot for r in results)
        if got != sorted(req.slots):
            raise ValueError(f"results cover slots {got}, the request asked for {sorted(req.slots)}")
        self._pending = None
        self.generations += 1
        if self.mode in ("off", "reroll"):
            for r in results:
                if r.slot in self._by_slot:
                    self.discarded += 1
                self._by_slot[r.slot] = r
            return
        for r in sorted(results, key=lambda r: r.slot):
            if r.informative:
                self._kept.append(r)
            else:
                self._spare.append(r)

    def selected(self) -> list[GroupResult]:
        """The groups to train on, in slot order. Call once next_request() has returned None."""
        if not self._done:
            raise RuntimeError("the plan is not finished: call next_request() until it returns None")
        if self.mode in ("off", "reroll"):
            return [self._by_slot[s] for s in sorted(self._by_slot)]
        kept = list(self._kept)
        deficit = self.num_prompts - len(kept)
        fill = self._spare[len(self._spare) - deficit :] if deficit > 0 else []
        self.discarded = len(self._spare) - len(fill)
        return sorted(kept + fill, key=lambda r: r.slot)
