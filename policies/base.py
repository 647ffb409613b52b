"""The policy contract: what the trainer (rl/trainer.py) calls on a policy, and the registry `policy.kind` picks from.

A policy is one file implementing `Policy` plus one line in `POLICIES`. The trainer names no concrete policy: it
builds prompt inputs from manifest records, samples groups with behaviour log-probs, re-scores the sampled actions
teacher-forced (under the policy or the frozen reference), and saves / restores the trainable state.

Shapes: N = rows (prompts x group size), T = padded number of actions per row.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rollouts.types import PromptRecord, Rollout, SamplingParams, VocodeResult

# kind -> "module:Class"; a new policy is one line here (imported only when picked)
POLICIES: dict[str, str] = {
    "glmtts": "policies.glmtts:GLMTTSPolicy",
    "glmtts_flow": "policies.glmtts_flow:GLMTTSFlowPolicy",
    "glmtts_joint": "policies.glmtts_joint:GLMTTSJointPolicy",
    "voxcpm": "policies.voxcpm:VoxCPMPolicy",
    "indextts2": "policies.indextts2:IndexTTS2Policy",
}


class PromptInputLike(Protocol):
    """A policy's model input for one record; `text_len` bounds the output length (min/max ratio of actions)."""

    text_len: int


class Decoder(Protocol):
    """A policy's vocoder: a rollout's actions -> audio (loaded by `Policy.load_decoder`)."""

    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        """Audio per row; `seeds[i]` seeds row i's decoder noise (the trainer shares one per group); rows decoded
        `batch_size` at a time."""
        ...


@runtime_checkable
class Policy(Protocol):
    """The contract the trainer talks to."""

    model: torch.nn.Module  # the trainable module (train() / eval() are switched by the trainer)

    @property
    def device(self) -> torch.device: ...

    @property
    def context_length(self) -> int | None:
        """The model's context window (prompt + generated tokens must fit), None when it has none."""
        ...

    @property
    def pad_id(self) -> int:
        """The id padding a rollout's tokens (to rebuild a saved rollout)."""
        ...

    actions_are_frames: bool  # action t of a row is its audio frame t (token-level rewards need it)
    vllm_sampling: bool  # sampling.backend vllm can sample it

    @property
    def speech_rate(self) -> float:
        """Generated actions (frames) per second of audio: a row's duration is `lengths / speech_rate` seconds."""
        ...

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        """Per row its [L_i] discrete speech codes (what rewards may read; empty for a continuous policy)."""
        ...

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> Decoder:
        """The policy's own vocoder, from its checkpoint directory, for rollouts of these records; a record
        lacking what decoding needs is a ManifestError naming its file, line and field."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a text as the policy's tokenizer reads it (used to bound text lengths)."""
        ...

    def prompt_input(self, record: PromptRecord) -> PromptInputLike:
        """The model input of one manifest record (texts as normalised by rollouts/text.py)."""
        ...

    def sample_groups(
        self,
        prompts: list[Any],
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float,
        max_ratio: float,
        max_new_tokens: int,
        decode: str,
    ) -> Rollout:
        """G = group_size samples per prompt, rows grouped by prompt; behaviour log-probs [N, T] of the taken
        actions under `params`; each row seeded from (seed, its group id, its index) only."""
        ...

    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ([N, T] log-probs of the rollout's actions, [N, T] entropies) under the policy (with
        grad) or the frozen reference; the same distribution the sampler drew from."""
        ...

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """The policy's own per-step metrics, as means over the rollout's rows (the trainer averages them over the
        ranks and logs them as they are named); {} when it has none."""
        ...

    def make_reference(self) -> None:
        """Keep a frozen copy of the initial weights (or the LoRA base) for `reference=True`."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def fsdp_units(self) -> list[torch.nn.Module]:
        """Submodules of `model` that FSDP2 shards as units of their own under `optim.zero_stage: 3` (the
        transformer blocks; rl/engine.py); the rest is sharded as one unit. Called once, before the sharding; from
        then on a forward must run each unit the same number of times on every rank, whatever the data (each
        unit's gather is a collective). [] shards the model as one unit."""
        ...

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The trainable state only (full weights, or the adapters + modules_to_save)."""
        ...

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(self, out_dir: Path) -> None:
        """Write the trained model to `out_dir` (new, empty) in the model's released layout, loadable by
        `from_pretrained` and by the model's own code (LoRA merged into the weights)."""
        ...


class StagedPolicy(Protocol):
    """Optional members of a policy whose actions belong to named stages (rl/stages.py). A policy that names one
    stage (`stages = ("lm",)`) needs only `stages`: it gains `<stage>/...` metrics and `stages.<name>.*` settings.
    One with several (glmtts_joint: LM tokens and flow transitions) also says which column is which and splits its
    trainable parameters between them; each stage then has its own loss, denominators, clip range, learning rate
    and gradient clipping. `closed_kl_stages` names the stages whose KL to the reference `reference_kl` gives in
    closed form ([N, T], with grad; 0 elsewhere), used for `loss.kl_coef` instead of the k3 estimate."""

    stages: tuple[str, ...]
    closed_kl_stages: tuple[str, ...]

    def action_stages(self, rollout: Rollout) -> torch.Tensor:
        """[N, T] long: the index into `stages` of each action column."""
        ...

    def stage_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """Per stage its share of `trainable_parameters()` (each parameter in exactly one stage)."""
        ...

    def reference_kl(self, rollout: Rollout) -> torch.Tensor:
        """[N, T] closed-form per-action KL(current || reference) on the `closed_kl_stages` columns, with grad."""
        ...


class PolicyClass(Protocol):
    """A registered policy class: loads a local checkpoint directory in the model's released layout, strictly."""

    def from_pretrained(
        self,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        lora: Any,
        trust_remote_code: bool,
        config: Any = None,  # rl.config.PolicyConfig: the policy's own section (e.g. policy.flow) is read from it
    ) -> Policy: ...

    def write_tiny(self, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        """Write a tiny random checkpoint in the released layout (`policy.build_tiny`), covering these texts;
        with `vocoder`, the decoder's weights too. Parts already there are kept."""
        ...


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A policy's checkpoint state: its trainable tensors by name (CPU, contiguous)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.named_parameters() if v.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy a checkpoint's state into the module's trainable tensors; every name must match with its shape
    (ValueError naming `what` and the first missing, unexpected and mis-shaped names otherwise)."""
    own = {k: v for k, v in module.named_parameters() if v.requires_grad}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(
            f"{what} state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {bad[:5]}"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k].to(p.device, p.dtype))


def policy_class(kind: str) -> PolicyClass:
    """The class registered as `kind` (ValueError naming the known kinds otherwise)."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy kind {kind!r}; registered: {', '.join(sorted(POLICIES))}")
    module, name = POLICIES[kind].split(":")
    return getattr(importlib.import_module(module), name)
