"""GLM-TTS's two stages trained together, `policy.kind: glmtts_joint`: the LM's speech tokens and the flow's SDE
transitions are both actions of a row, and one advantage per row trains both.

Loads the same upstream checkpoint directory as `glmtts` and `glmtts_flow` (llm/, vq32k-phoneme-tokenizer/, flow/,
hift/) and composes the two: the LM as `glmtts` trains it (full or LoRA on `policy.lora.target_modules`), the DiT as
`glmtts_flow` trains it (full or LoRA on `policy.flow.lora_target_modules`, SDE settings in `policy.flow`).

Group: one prompt and G rows, as in LM GRPO. Row j of group g samples its codes from the LM with the rollout's
sampling parameters (stream (seed, g, j), exactly as `glmtts`), then runs the flow on them with the SDE steps
(stream (seed, g, j + 2^32), a stream no LM row draws from). Its reward thus judges both decisions, and its one
advantage drives both stages' losses (rl/stages.py): the LM's clipped token loss and the flow's clipped transition
loss, each over its own actions, with its own denominators, loss weight (`stages.<lm|flow>.loss_weight`), learning
rate (`stages.<lm|flow>.lr`) and clip range (`stages.<lm|flow>.eps_low/eps_high`); their ratios live on different
scales (a token's log-prob against a per-element Gaussian one), which is why each stage has its own.

Actions of a row: [K flow transitions | the LM's tokens (speech codes + stop)], K = len(policy.flow.sde_steps) for
every row, so the flow's columns stay the first K when rollouts of different lengths are concatenated
(Rollout.cat pads on the right); `action_stages` says which column is which. A row whose LM said nothing has no
flow actions. Teacher forcing splits the columns: the LM re-scores its tokens (same distribution as sampled: RAS,
top-k, top-p, temperature) and the flow recomputes its transitions' means from the recorded states; before any
update both ratios are 1. `loss.kl_coef` uses k3 on the LM's tokens and the closed-form Gaussian KL on the flow's
transitions. Decode: the sampled mel through HiFT (24 kHz). Export: upstream's layout, with both llm/ and
flow/flow.pt trained (LoRA merged).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from policies.glmtts import CheckpointError, GLMTTSPolicy
from policies.glmtts_flow import FLOW_FILE, FlowMelDecoder, FlowPrompt, GLMTTSFlowPolicy
from policies.sampling import row_keys
from rollouts.types import PromptRecord, Rollout, SamplingParams

FLOW_STREAM = 1 << 32  # row j's flow noise is drawn from stream (seed, g, j + FLOW_STREAM): no LM row's stream


class JointActor(torch.nn.Module):
    """The trainable module (the engine wraps it): the LM and the flow's DiT actor as its two children."""

    def __init__(self, lm: torch.nn.Module, flow: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.flow = flow


class GLMTTSJointPolicy:
    """The GLM-TTS LM and flow as one policy with two action stages (module docstring)."""

    speech_rate = 25.0  # the LM's speech codes per second
    actions_are_frames = False  # the first K actions are transitions, not frames: token-level rewards do not apply
    vllm_sampling = False  # the flow's actions are not vLLM's to sample
    stages = ("lm", "flow")  # rl/stages.py: stage 0 the LM's tokens, stage 1 the flow's transitions
    closed_kl_stages = ("flow",)  # reference_kl gives the flow's KL in closed form; the LM's is k3

    def __init__(self, lm: GLMTTSPolicy, flow: GLMTTSFlowPolicy):
        if flow.lm is not lm:
            raise ValueError("the flow stage must sample from the joint policy's own LM")
        self.lm, self.flow = lm, flow
        self.model = JointActor(lm.model, flow.model)

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora=None,
        trust_remote_code: bool = False,
        config: Any = None,  # rl.config.PolicyConfig (its `flow` section) or None for the defaults
    ) -> GLMTTSJointPolicy:
        ckpt_dir = Path(ckpt_dir)
        lm = GLMTTSPolicy.from_pretrained(
            ckpt_dir, dtype=dtype, device=device, lora=lora, trust_remote_code=trust_remote_code
        )
        flow = GLMTTSFlowPolicy.around(lm, ckpt_dir, device=device, lora=lora, config=config, train_lm=True)
        return cls(lm, flow)

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        """The tiny LM, flow and a HiFT whose output follows its mel (as `glmtts_flow`'s)."""
        GLMTTSFlowPolicy.write_tiny(ckpt_dir, texts, seed=seed, vocoder=vocoder)

    @property
    def device(self) -> torch.device:
        return self.lm.device

    @property
    def context_length(self) -> int | None:
        return self.lm.context_length

    @property
    def pad_id(self) -> int:
        return self.lm.pad_id  # pads the LM's columns (the flow's first K are never padding)

    @property
    def num_flow_actions(self) -> int:
        return len(self.flow.settings.sde_steps)

    def encode_text(self, text: str) -> list[int]:
        return self.lm.encode_text(text)

    def prompt_input(self, record: PromptRecord) -> FlowPrompt:
        return self.flow.prompt_input(record)

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        return self.flow.speech_codes(rollout)

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> FlowMelDecoder:
        return self.flow.load_decoder(records, n_timesteps=n_timesteps, dtype=dtype)

    # --- sampling ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_groups(
        self,
        prompts: list[FlowPrompt],
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        max_new_tokens: int = 1000,
        decode: str = "dynamic",
    ) -> Rollout:
        """G rows per prompt: each samples its codes from the LM (as `glmtts`), then its mel from the flow's SDE."""
        lm = self.lm.sample_groups(
            [p.lm for p in prompts],
            group_size,
            params,
            group_ids=group_ids,
            seed=seed,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            max_new_tokens=max_new_tokens,
            decode=decode,
        )
        member = torch.arange(group_size).repeat(len(prompts))
        keys = row_keys(seed, lm.group_ids, member + FLOW_STREAM)
        voices = [prompts[int(i)].voice for i in lm.prompt_index]
        fa = self.flow.sample_flow(voices, lm.codes(self.lm.special.ats), keys)
        return dataclasses.replace(
            lm,
            tokens=torch.cat([fa.tokens, lm.tokens], 1),
            token_mask=torch.cat([fa.mask, lm.token_mask], 1),
            behaviour_logp=torch.cat([fa.logp, lm.behaviour_logp], 1),
            extras=fa.extras,
        )

    # --- the stages' columns ----------------------------------------------------------------------------------
    def action_stages(self, rollout: Rollout) -> torch.Tensor:
        """[N, T] long: 1 (flow) on the first K columns, 0 (lm) on the rest (indices into `stages`)."""
        ids = torch.zeros(rollout.token_mask.shape, dtype=torch.long)
        ids[:, : self.num_flow_actions] = 1
        return ids

    def _split(self, rollout: Rollout) -> tuple[Rollout, Rollout]:
        """(the flow's [N, K] actions with the extras, the LM's [N, T - K] tokens) of the same rows."""
        k = self.num_flow_actions

        def cols(sl: slice, extras: dict) -> Rollout:
            return dataclasses.replace(
                rollout,
                tokens=rollout.tokens[:, sl],
                token_mask=rollout.token_mask[:, sl],
                behaviour_logp=rollout.behaviour_logp[:, sl],
                extras=extras,
            )

        return cols(slice(0, k), rollout.extras), cols(slice(k, None), {})

    # --- teacher forcing --------------------------------------------------------------------------------------
    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] log-probs (and entropies: the LM's, NaN on the flow's columns) of every action, each stage under
        its own current module (with grad) or its reference."""
        flow_part, lm_part = self._split(rollout)
        f_logp, f_ent = self.flow.token_logprobs(flow_part, reference=reference)
        l_logp, l_ent = self.lm.token_logprobs(lm_part, reference=reference)
        dev = l_logp.device
        return torch.cat([f_logp.to(dev), l_logp], 1), torch.cat([f_ent.to(dev), l_ent], 1)

    def reference_kl(self, rollout: Rollout) -> torch.Tensor:
        """[N, T]: the flow's closed-form KL on its K columns (with grad), 0 on the LM's (k3 covers those)."""
        flow_part, lm_part = self._split(rollout)
        kl = self.flow.reference_kl(flow_part)
        return torch.cat([kl, torch.zeros(lm_part.token_mask.shape, device=kl.device, dtype=kl.dtype)], 1)

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """The flow's flow/eta, flow/sde_steps, flow/logprob_mean and flow/frames (glmtts_flow's)."""
        return self.flow.rollout_metrics(self._split(rollout)[0])

    def make_reference(self) -> None:
        self.lm.make_reference()
        self.flow.make_reference()

    # --- parameters and persistence ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.lm.trainable_parameters() + self.flow.trainable_parameters()

    def stage_parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"lm": self.lm.trainable_parameters(), "flow": self.flow.trainable_parameters()}

    def fsdp_units(self) -> list[torch.nn.Module]:
        return self.lm.fsdp_units() + self.flow.fsdp_units()

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Both stages' trainable state, keys prefixed `lm.` and `flow.`."""
        lm, flow = self.lm.state_for_checkpoint(), self.flow.state_for_checkpoint()
        return {f"lm.{k}": v for k, v in lm.items()} | {f"flow.{k}": v for k, v in flow.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        other = sorted(k for k in state if not k.startswith(("lm.", "flow.")))
        if other:
            raise CheckpointError(f"joint policy state: keys outside lm. / flow.: {other[:5]}")
        self.lm.load_checkpoint_state({k[3:]: v for k, v in state.items() if k.startswith("lm.")})
        self.flow.load_checkpoint_state({k[5:]: v for k, v in state.items() if k.startswith("flow.")})

    def export(self, out_dir: Path) -> None:
        """Upstream's layout: llm/ (the trained LM, LoRA merged) and flow/flow.pt (the trained DiT, LoRA merged,
        upstream's keys), every other part of the loaded directory copied as it was."""
        out_dir = Path(out_dir)
        self.lm.export(out_dir)  # llm/ trained; flow/ and the rest copied
        tmp = out_dir / FLOW_FILE.with_name(FLOW_FILE.name + ".partial")
        torch.save(self.flow.merged_flow_state(), tmp)
        tmp.replace(out_dir / FLOW_FILE)
