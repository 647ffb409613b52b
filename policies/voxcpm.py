"""VoxCPM2 as a GRPO policy, `policy.kind: voxcpm`: continuous autoregressive speech with flow-SDE actions and a
sampled stop.

Loads a VoxCPM checkpoint directory in its released layout (config.json, model.safetensors | pytorch_model.bin,
audiovae.safetensors | audiovae.pth, the tokenizer), strictly, into this project's own model code
(policies/voxcpm_model.py, equal to the `voxcpm` package's on random weights: tests/test_voxcpm_model.py).

Every generated patch i of a row (4 AudioVAE frames, 6.25 per second for VoxCPM2) holds K + 1 actions:
  - K SDE transitions of its LocDiT sampler (the steps in `policy.voxcpm.sde_steps`; the other steps stay the
    released Euler ODE with CFG 2.0 and CFG-Zero*), each a Gaussian x_t -> x_next with the ODE's marginals
    (Flow-GRPO, policies/flow_sde.py, VoxCPM's time convention: noise at t = 1). Its log-prob is computed in float32
    and, with `logprob: mean` (the default), averaged over the patch's D x P elements, as the GLM-TTS flow policy's;
  - one stop decision: stop ~ Bernoulli(softmax(stop_logits / stop_temperature)[1]) instead of the released argmax,
    allowed from patch min_len + 1 on (as released).
Columns of a row: patch-major, [patch 0: SDE 1..K, stop | patch 1: ... ], so rows of different lengths line up when
rollouts are concatenated (Rollout.cat pads on the right). The two kinds are the policy's two stages (`dit` and
`stop`, rl/stages.py): each gets its own loss, denominators and clip range (`stages.dit|stop.*`); they share the
parameters (the LMs decide both), so there is one optimizer group.

Sampling: every row of a group in one batch with KV caches for both LMs (the released loop is batch-1), its noise and
stop draws from its own stream (seed, group, member): policies/voxcpm_rollout.py. Teacher forcing: one causal pass of
both LMs over [prompt | generated patches] and batched LocDiT velocities for the recorded transitions; before any
update the ratio is 1. `loss.kl_coef`: the closed-form Gaussian KL on the `dit` actions, k3 on the stop decisions.
Evaluation (`ttsrl eval`) samples as released: the ODE everywhere, the argmax stop, the released retry of a row
longer than 6 patches per text token (up to 3 tries).

Trainable: everything but the AudioVAE, or LoRA (peft) on VoxCPM's own targets (`policy.voxcpm.lora_lm|dit|proj`,
`policy.lora.r|alpha|dropout`). Decode: the AudioVAE decoder (48 kHz for VoxCPM2), the prompt's context patches
decoded with the row and cut, as released. Export: VoxCPM's layout with the LoRA merged, plus, with LoRA, its own
LoRA format (lora_config.json + lora_weights.safetensors) that the `voxcpm` package loads onto the base checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.base import load_trainable_state, trainable_state
from policies.voxcpm_io import VoxCPMCheckpointError, load_voxcpm, save_voxcpm, write_tiny_voxcpm
from policies.voxcpm_model import VoxCPM2, zero_init_steps
from policies.voxcpm_rollout import (
    GroupRollout,
    SamplingSpec,
    VoxPrompt,
    build_prompt,
    decode_rollout,
    encode_patches,
    gaussian_kl_to_reference,
    sample_groups,
    teacher_forced_logprobs,
)
from rollouts.types import PromptRecord, Rollout, SamplingParams, VocodeResult

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the released LoRAConfig's target_modules_lm / _dit
PROJ_TARGETS = ("enc_to_lm_proj", "lm_to_dit_proj", "res_to_dit_proj", "fusion_concat_proj")


@dataclass(frozen=True)
class VoxCPMSettings:
    """policy.voxcpm (rl/config.py VoxCPMPolicyConfig), as the policy reads it."""

    eta: float = 0.7
    sde_steps: tuple[int, ...] = (1, 2)
    noise: str = "flow_grpo"
    n_timesteps: int = 10
    cfg_value: float = 2.0
    stop_temperature: float = 1.0
    min_len: int = 2
    max_len_ratio: float = 6.0
    logprob: str = "mean"
    prompt_mode: str = "continuation"
    lora_lm: bool = True
    lora_dit: bool = True
    lora_proj: bool = False

    def __post_init__(self) -> None:
        first = zero_init_steps(self.n_timesteps)
        if not self.sde_steps or any(not first <= k < self.n_timesteps for k in self.sde_steps):
            raise ValueError(f"policy.voxcpm.sde_steps must be steps in [{first}, {self.n_timesteps})")
        if self.eta <= 0 or self.logprob not in ("mean", "sum") or self.noise not in ("flow_grpo", "constant"):
            raise ValueError("policy.voxcpm: eta > 0, logprob mean or sum, noise flow_grpo or constant")
        if self.prompt_mode not in ("continuation", "reference", "both"):
            raise ValueError(f"policy.voxcpm.prompt_mode: unknown {self.prompt_mode!r}")

    @classmethod
    def from_config(cls, vc: Any) -> VoxCPMSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: getattr(vc, k) for k in fields}
        values["sde_steps"] = tuple(sorted(int(k) for k in vc.sde_steps))
        return cls(**values)


@dataclass(frozen=True)
class VoxPromptInput:
    """One manifest record as VoxCPM reads it."""

    prompt: VoxPrompt  # the conditioning sequence (policies/voxcpm_rollout.py)
    text_len: int  # target-text tokens (the length cap scales with it)
    prompt_text_len: int  # prompt-text tokens (rl/guards.py bounds it)
    source: str = ""

    @property
    def ids(self) -> list[int]:  # every conditioning position (rl/guards.py checks them against the context)
        return self.prompt.tokens.tolist()


class VoxCPMPolicy:
    """The VoxCPM2 policy (module docstring)."""

    actions_are_frames = False  # a column is an SDE transition or a stop decision, not an audio frame
    vllm_sampling = False
    stages = ("dit", "stop")  # rl/stages.py: one loss, clip range and denominators each; shared parameters
    closed_kl_stages = ("dit",)  # reference_kl: the Gaussian transitions' KL in closed form; stop: k3
    pad_id = -1

    def __init__(self, model: VoxCPM2, tokenizer, settings: VoxCPMSettings, *, ckpt_dir: str, lora=None):
        self.tokenizer, self.settings, self.ckpt_dir = tokenizer, settings, ckpt_dir
        model.audio_vae.requires_grad_(False).eval()
        self.lora = bool(lora is not None and lora.enabled)
        self.lora_cfg = lora
        self.model: Any
        if self.lora:
            self.model = _apply_lora(model, lora, settings)  # a peft PeftModel around the network
            self.net: VoxCPM2 = self.model.get_base_model()  # the network, the adapters injected
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(not name.startswith("audio_vae."))
            self.model = self.net = model
        self._reference: VoxCPM2 | None = None
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora=None,
        trust_remote_code: bool = False,  # the tokenizer is read by transformers' fast tokenizer: no code runs
        config: Any = None,  # rl.config.PolicyConfig (its `voxcpm` section) or None for the defaults
    ) -> VoxCPMPolicy:
        vc = getattr(config, "voxcpm", None)
        settings = VoxCPMSettings() if vc is None else VoxCPMSettings.from_config(vc)
        model, tok = load_voxcpm(ckpt_dir, device=device, dtype=dtype)
        return cls(model, tok, settings, ckpt_dir=str(ckpt_dir), lora=lora)

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        """A tiny random VoxCPM2 (AudioVAE included: it is the decoder) in the released layout."""
        if not (Path(ckpt_dir) / "config.json").exists():
            write_tiny_voxcpm(ckpt_dir, texts, seed=seed)
            print(f"ttsrl: wrote a tiny random VoxCPM2 to {ckpt_dir}")

    @property
    def device(self) -> torch.device:
        return self.net.stop_head.weight.device

    @property
    def context_length(self) -> int | None:
        return int(self.net.cfg.max_length)

    @property
    def speech_rate(self) -> float:
        """Patches per second of output audio (6.25 for VoxCPM2: 48 kHz / (4 patches x 1920 samples))."""
        vae = self.net.audio_vae
        return vae.out_sample_rate / (self.net.patch_size * vae.decode_chunk_size)

    @property
    def sample_rate(self) -> int:
        return int(self.net.audio_vae.out_sample_rate)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text))

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        return [torch.zeros(0, dtype=torch.long) for _ in range(rollout.num_rows)]  # continuous: no codes

    # --- prompts ----------------------------------------------------------------------------------------------
    def prompt_latent(self, record: PromptRecord, pad: str) -> torch.Tensor:
        """The voice prompt's latent patches [T, P, D], zero-padded on the left (continuation) or the right (a
        reference), as the released prompt encoder: for continuation the manifest's `prompt_latent` (`ttsrl prepare
        --policy voxcpm`) when it has one, else the `prompt_speech` wav through the AudioVAE (librosa at the VAE's
        rate; once per wav and padding)."""
        from rollouts.manifest import ManifestError

        if record.prompt_latent is not None and pad == "left":
            lat = torch.from_numpy(np.asarray(record.prompt_latent, np.float32))
            want = (self.net.patch_size, self.net.feat_dim)
            if tuple(lat.shape[1:]) != want:
                raise ManifestError(
                    f"{record.source}: field 'prompt_latent': patches of {tuple(lat.shape[1:])}, the model's are {want}"
                )
            return lat
        if not record.prompt_wav:
            raise ManifestError(
                f"{record.source}: field 'prompt_speech' is missing (and no prompt_latent); VoxCPM needs the prompt"
            )
        key = f"{record.prompt_wav}:{pad}"
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self.encode_wav(record.prompt_wav, pad, record.source)
        return self._prompt_cache[key]

    def encode_wav(self, path: str | Path, padding: str, where: str = "") -> torch.Tensor:
        import librosa

        from rollouts.manifest import ManifestError

        try:
            wav, _ = librosa.load(str(path), sr=self.net.audio_vae.sample_rate, mono=True)
        except Exception as e:  # librosa raises several kinds for unreadable audio
            raise ManifestError(f"{where}: field 'prompt_speech': cannot read {path} as audio: {e}") from None
        if wav.size == 0:
            raise ManifestError(f"{where}: field 'prompt_speech': {path} holds no audio")
        return encode_patches(self.net, torch.from_numpy(wav), padding).cpu()

    def prompt_input(self, record: PromptRecord) -> VoxPromptInput:
        """The released prompt layout of `policy.voxcpm.prompt_mode` (texts as `data.text_normalize` made them;
        line breaks and runs of spaces collapsed as the released generate does)."""
        from rollouts.manifest import ManifestError

        target = re.sub(r"\s+", " ", record.target_text.replace("\n", " "))
        text_len = len(self.encode_text(target))
        if text_len == 0:
            raise ManifestError(f"{record.source}: field 'syn_text': encodes to no tokens")
        mode = self.settings.prompt_mode
        cont = mode in ("continuation", "both")
        prompt = build_prompt(
            self.tokenizer,
            target,
            self.net.patch_size,
            self.net.feat_dim,
            prompt_text=record.prompt_text if cont else "",
            prompt_feats=self.prompt_latent(record, "left") if cont else None,
            ref_feats=self.prompt_latent(record, "right") if mode in ("reference", "both") else None,
        )
        p_len = len(self.encode_text(record.prompt_text)) if cont else 0
        return VoxPromptInput(prompt, text_len, p_len, record.source)

    # --- sampling ---------------------------------------------------------------------------------------------
    def spec(self, stochastic: bool = True) -> SamplingSpec:
        s = self.settings
        return SamplingSpec(
            s.n_timesteps,
            s.cfg_value,
            1.0,
            s.sde_steps if stochastic else (),
            s.eta,
            s.noise,
            s.stop_temperature,
            s.min_len,
            stochastic,
        )

    def max_patches(self, text_len: int, max_new_tokens: int) -> int:
        """The released length cap int(text tokens x max_len_ratio + 10), within sampling.max_new_tokens."""
        return max(1, min(int(text_len * self.settings.max_len_ratio + 10), max_new_tokens))

    @torch.no_grad()
    def sample_groups(
        self,
        prompts: list[VoxPromptInput],
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float = 0.0,
        max_ratio: float = 0.0,
        max_new_tokens: int = 1000,
        decode: str = "dynamic",
    ) -> Rollout:
        """G rows per prompt in one batch: SDE steps on `sde_steps`, the stop head sampled; row j of group g from
        its own stream (seed, g, j). The LM sampling parameters (`params`: temperature, top-k, ...) and the
        token/text ratios do not apply: VoxCPM's sampling is `policy.voxcpm`'s."""
        s = self.settings
        caps = [self.max_patches(p.text_len, max_new_tokens) for p in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            ro = sample_groups(
                self.net,
                [p.prompt for p in prompts],
                group_size,
                seed,
                sde_steps=s.sde_steps,
                eta=s.eta,
                stop_temperature=s.stop_temperature,
                min_len=s.min_len,
                max_len=max(caps),
                n_steps=s.n_timesteps,
                cfg_value=s.cfg_value,
                noise_schedule=s.noise,
                group_ids=group_ids,
                prompt_max_len=caps,
            )
        finally:
            self.model.train(was_training)
        return self.to_rollout(ro, prompts, group_size, params)

    def to_rollout(
        self, ro: GroupRollout, prompts: list[VoxPromptInput], group_size: int, params: SamplingParams
    ) -> Rollout:
        """The contract's Rollout: actions patch-major [N, L * (K + 1)], the continuous data in `extras`."""
        n, length, k = ro.sde_logp.shape
        sde_lp = self._reduce(ro.sde_logp)
        steps = torch.tensor(self.settings.sde_steps, device=ro.patches.device).view(1, 1, -1).expand(n, length, k)
        tokens = torch.cat([steps, ro.stop_action.long().unsqueeze(-1)], -1)
        mask = torch.cat([ro.sde_mask, ro.stop_mask.unsqueeze(-1)], -1)
        logp = torch.cat([sde_lp, ro.stop_logp.unsqueeze(-1)], -1)
        rows = torch.arange(len(prompts)).repeat_interleave(group_size)
        text_len = torch.tensor([prompts[int(i)].text_len for i in rows])
        prompt_ids, prompt_mask = _left_pad([prompts[int(i)].prompt.tokens for i in rows])
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            tokens=tokens.masked_fill(~mask, self.pad_id).flatten(1).cpu(),
            token_mask=mask.flatten(1).cpu(),
            behaviour_logp=(logp * mask).flatten(1).float().cpu(),
            group_ids=ro.group_ids.cpu(),
            prompt_index=rows,
            finished=ro.finished.cpu(),
            truncated=(~ro.finished).cpu(),
            lengths=ro.lengths.cpu(),
            min_lengths=torch.full((n,), self.settings.min_len + 1),
            text_lengths=text_len,
            params=params,
            pad_id=self.pad_id,
            extras=_extras(ro, [prompts[int(i)].prompt for i in rows]),
        )

    def _reduce(self, sde_logp: torch.Tensor) -> torch.Tensor:
        """Summed Gaussian log-probs -> per element (logprob mean) or as they are (sum)."""
        if self.settings.logprob == "sum":
            return sde_logp
        return sde_logp / float(self.net.patch_size * self.net.feat_dim)

    @torch.no_grad()
    def synthesize(
        self, prompts: list[VoxPromptInput], *, seed: int, keys: list[int], max_patches: int = 4096, tries: int = 3
    ) -> list[tuple[np.ndarray, bool]]:
        """Evaluation as released (`ttsrl eval`): the ODE on every LocDiT step, the argmax stop, at most
        int(text tokens x max_len_ratio + 10) patches (within `max_patches`, the released 4096), and a row of
        max_len_ratio patches per text token or more sampled again (new noise), `tries` times in all, the last kept,
        as the released retry_badcase. Item i draws from stream (seed + attempt, keys[i], 0). Returns (waveform at
        `sample_rate`, truncated) per prompt."""
        s = self.settings
        out: list[tuple[np.ndarray, bool] | None] = [None] * len(prompts)
        todo, was_training = list(range(len(prompts))), self.model.training
        self.model.eval()
        try:
            for attempt in range(tries):
                caps = [self.max_patches(prompts[i].text_len, max_patches) for i in todo]
                ro = sample_groups(
                    self.net,
                    [prompts[i].prompt for i in todo],
                    1,
                    seed + attempt,
                    min_len=s.min_len,
                    max_len=max(caps),
                    n_steps=s.n_timesteps,
                    cfg_value=s.cfg_value,
                    stochastic=False,
                    group_ids=[keys[i] for i in todo],
                    prompt_max_len=caps,
                )
                wavs = decode_rollout(self.net, ro)
                again = []
                for j, i in enumerate(todo):
                    out[i] = (wavs[j].float().cpu().numpy(), not bool(ro.finished[j]))
                    if int(ro.lengths[j]) >= prompts[i].text_len * s.max_len_ratio:
                        again.append(i)
                todo = again
                if not todo:
                    break
        finally:
            self.model.train(was_training)
        return [o for o in out if o is not None]

    # --- teacher forcing --------------------------------------------------------------------------------------
    def group_rollout(self, rollout: Rollout) -> GroupRollout:
        """The sampler's record of a contract Rollout (its extras), for teacher forcing and decoding."""
        e, n = rollout.extras, rollout.num_rows
        k = len(self.settings.sde_steps)
        length = e["patches"].shape[1]
        cols = rollout.tokens.view(n, -1, k + 1)[:, :length]
        mask = rollout.token_mask.view(n, -1, k + 1)[:, :length]
        dev = self.device
        prompts, index = _row_prompts(e, rollout.group_ids)
        return GroupRollout(
            spec=self.spec(),
            prompts=prompts,
            prompt_index=index.to(dev),
            group_ids=rollout.group_ids.to(dev),
            members=torch.zeros(n, dtype=torch.long, device=dev),
            row_seeds=torch.zeros(n, dtype=torch.long, device=dev),
            patches=e["patches"].to(dev),
            lengths=rollout.lengths.to(dev),
            finished=rollout.finished.to(dev),
            x_t=e["x_t"].to(dev),
            x_next=e["x_next"].to(dev),
            mean=torch.zeros_like(e["x_t"], device=dev),
            std=e["std"].to(dev),
            sde_logp=torch.zeros(n, length, k, device=dev),
            sde_mask=mask[..., :k].to(dev),
            stop_action=(cols[..., k] == 1).to(dev),
            stop_logp=torch.zeros(n, length, device=dev),
            stop_mask=mask[..., k].to(dev),
        )

    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] log-probs of every recorded action (SDE transitions reduced as policy.voxcpm.logprob, stop
        decisions as they are) under the current weights (with grad) or the reference; NaN entropies."""
        ro = self.group_rollout(rollout)
        with self._net_for(reference) as net:
            tf = teacher_forced_logprobs(net, ro)
        out = self._columns(rollout, self._reduce(tf.sde_logp), tf.stop_logp)
        return out, torch.full_like(out, float("nan"))

    def reference_kl(self, rollout: Rollout) -> torch.Tensor:
        """[N, T]: the closed-form KL(current || reference) of each SDE transition (with grad), reduced as the
        log-probs; 0 on the stop columns (k3 covers those)."""
        ro = self.group_rollout(rollout)
        tf = teacher_forced_logprobs(self.net, ro)
        with torch.no_grad(), self._net_for(True) as ref_net:
            ref = teacher_forced_logprobs(ref_net, ro)
        kl = self._reduce(gaussian_kl_to_reference(tf, ref, ro))
        return self._columns(rollout, kl, torch.zeros_like(tf.stop_logp))

    def _columns(self, rollout: Rollout, sde: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        """[N, L, K] and [N, L] -> the rollout's [N, T] patch-major columns (0 where masked or past L)."""
        n, t = rollout.token_mask.shape
        per = torch.cat([sde, stop.unsqueeze(-1)], -1).flatten(1)
        out = torch.nn.functional.pad(per, (0, t - per.shape[1]))
        return out * rollout.token_mask.to(out.device)

    def action_stages(self, rollout: Rollout) -> torch.Tensor:
        """[N, T] long: 0 (dit) on the SDE columns, 1 (stop) on each patch's stop column."""
        k = len(self.settings.sde_steps)
        slot = torch.arange(rollout.token_mask.shape[1]) % (k + 1)
        return (slot == k).long().expand(rollout.token_mask.shape).clone()

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """voxcpm/eta and voxcpm/sde_steps (the sampler's settings), voxcpm/logprob_mean (an SDE action's mean
        behaviour log-prob), voxcpm/stop_logprob_mean, voxcpm/patches (per row) and voxcpm/stopped_frac."""
        stages = self.action_stages(rollout)
        m = rollout.token_mask

        def mean(sel: torch.Tensor) -> float:
            return float(rollout.behaviour_logp[sel].mean()) if bool(sel.any()) else float("nan")

        return {
            "voxcpm/eta": self.settings.eta,
            "voxcpm/sde_steps": float(len(self.settings.sde_steps)),
            "voxcpm/logprob_mean": mean(m & (stages == 0)),
            "voxcpm/stop_logprob_mean": mean(m & (stages == 1)),
            "voxcpm/patches": float(rollout.lengths.float().mean()),
            "voxcpm/stopped_frac": float(rollout.finished.float().mean()),
        }

    # --- reference ----------------------------------------------------------------------------------------------
    def make_reference(self) -> None:
        """Freeze a copy of the initial weights (LoRA: the base with the adapters disabled)."""
        if self.lora:
            return
        vae = self.net.audio_vae
        self.net.audio_vae = None  # type: ignore[assignment]  # the frozen AudioVAE is shared, not copied
        try:
            self._reference = copy.deepcopy(self.net).requires_grad_(False).eval()
        finally:
            self.net.audio_vae = vae
        self._reference.audio_vae = vae

    @contextlib.contextmanager
    def _net_for(self, reference: bool) -> Iterator[VoxCPM2]:
        if not reference:
            yield self.net
        elif self.lora:
            with self.model.disable_adapter():
                yield self.net
        else:
            if self._reference is None:
                raise RuntimeError("make_reference() was not called")
            yield self._reference

    # --- decoding ---------------------------------------------------------------------------------------------
    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> VoxCPMDecoder:
        """The AudioVAE decoder over each row's patches (vocoder.n_timesteps and dtype do not apply)."""
        return VoxCPMDecoder(self)

    # --- parameters and persistence ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[torch.nn.Module]:
        """[]: the whole model is one FSDP2 unit. Teacher forcing calls the LocDiT once per chunk of recorded
        transitions, a number that differs between ranks, so its blocks cannot be units of their own."""
        return []

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The trainable tensors: the adapters with LoRA, else every weight but the AudioVAE's."""
        return trainable_state(self.model)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            load_trainable_state(self.model, state, "voxcpm policy")
        except ValueError as e:
            raise VoxCPMCheckpointError(str(e)) from None

    def export(self, out_dir: Path) -> None:
        """VoxCPM's released layout with the trained weights (LoRA merged), loadable by `voxcpm` and by
        `from_pretrained`; with LoRA also lora_config.json + lora_weights.safetensors (VoxCPM's LoRA format, the
        adapters over the loaded base checkpoint)."""
        lora = None
        if self.lora:
            lora = {"config": self.released_lora_config(), "weights": self.released_lora_weights(), "base_model": ""}
            lora["base_model"] = str(Path(self.ckpt_dir).resolve())
        merged = copy.deepcopy(self.model).merge_and_unload() if self.lora else self.net
        save_voxcpm(merged, self.tokenizer, out_dir, lora=lora)

    def released_lora_config(self) -> dict[str, Any]:
        s, lc = self.settings, self.lora_cfg
        return {
            "enable_lm": s.lora_lm,
            "enable_dit": s.lora_dit,
            "enable_proj": s.lora_proj,
            "r": int(lc.r),
            "alpha": int(lc.alpha),
            "dropout": float(lc.dropout),
            "target_modules_lm": list(LM_TARGETS),
            "target_modules_dit": list(LM_TARGETS),
            "target_proj_modules": list(PROJ_TARGETS),
        }

    def released_lora_weights(self) -> dict[str, torch.Tensor]:
        """peft's `<path>.lora_A.default.weight` [r, in] / `lora_B` [out, r] -> VoxCPM's `<path>.lora_A` / `.lora_B`
        (same shapes; both scale by alpha / r)."""
        out = {}
        for name, v in self.net.named_parameters():
            m = re.fullmatch(r"(.+)\.(lora_[AB])\.default\.weight", name)
            if m:
                out[f"{m.group(1)}.{m.group(2)}"] = v.detach().cpu().contiguous()
        return out


class VoxCPMPromptFrontend:
    """`ttsrl prepare --policy voxcpm`: each voice prompt's AudioVAE latent patches (`prompt_latent`, padded on the
    left as the released continuation prompt), encoded once so that training does not encode them again."""

    def __init__(self, policy: VoxCPMPolicy):
        self.policy = policy

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu") -> VoxCPMPromptFrontend:
        return cls(VoxCPMPolicy.from_pretrained(model_dir, device=device))

    def features(self, prompt: str | Path) -> dict[str, np.ndarray]:
        lat = self.policy.encode_wav(prompt, "left", str(prompt))
        return {"prompt_latent": lat.numpy().astype(np.float32)}

    def codes(self, path: str | Path) -> np.ndarray:
        raise ValueError("target_wav gives GLM-TTS speech tokens; VoxCPM has none (leave target_wav out)")


class VoxCPMDecoder:
    """Each row's patches through the AudioVAE decoder (deterministic: the seeds are not used), `batch_size` rows
    of one prompt at a time."""

    def __init__(self, policy: VoxCPMPolicy):
        self.policy = policy

    @torch.no_grad()
    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        n = rollout.num_rows
        audio: list[np.ndarray | None] = [None] * n
        reasons: list[str | None] = [None] * n
        ro = self.policy.group_rollout(rollout)
        step = batch_size or n
        for start in range(0, n, step):
            rows = list(range(start, min(n, start + step)))
            part = _select_group_rollout(ro, rows)
            for i, wav in zip(rows, decode_rollout(self.policy.net, part)):
                if int(rollout.lengths[i]) == 0:
                    reasons[i] = "empty generation: no patches"
                else:
                    audio[i] = wav.float().cpu().numpy()
        return VocodeResult(audio=audio, reasons=reasons, sample_rate=self.policy.sample_rate)


# --- helpers --------------------------------------------------------------------------------------------------------
def _apply_lora(model: VoxCPM2, lora, s: VoxCPMSettings) -> torch.nn.Module:
    """peft LoRA on VoxCPM's own targets: both LMs' and the LocDiT's q/k/v/o_proj, and the projections."""
    from peft import LoraConfig, get_peft_model

    parts = []
    if s.lora_lm:
        parts.append(r"(base_lm|residual_lm)\..*\.(" + "|".join(LM_TARGETS) + ")")
    if s.lora_dit:
        parts.append(r"feat_decoder\.estimator\..*\.(" + "|".join(LM_TARGETS) + ")")
    if s.lora_proj:
        parts.append("(" + "|".join(PROJ_TARGETS) + ")")
    if not parts:
        raise ValueError("policy.lora.enabled with none of policy.voxcpm.lora_lm / lora_dit / lora_proj")
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="^(" + "|".join(parts) + ")$",
        init_lora_weights="gaussian",
        bias="none",
    )
    return get_peft_model(model, cfg)


def _left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[0] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - s.shape[0] :] = s
        mask[i, width - s.shape[0] :] = True
    return ids, mask


def _extras(ro: GroupRollout, prompts: list[VoxPrompt]) -> dict[str, torch.Tensor]:
    """The rollout's per-row tensors: the patches, every SDE transition, and each row's prompt (right-padded)."""
    n = len(prompts)
    t = max(p.tokens.shape[0] for p in prompts)
    c = max(1, max(p.context.shape[0] for p in prompts))
    ps, d = prompts[0].feats.shape[1:]
    out = {
        "patches": ro.patches.float().cpu(),
        "x_t": ro.x_t.float().cpu(),
        "x_next": ro.x_next.float().cpu(),
        "std": ro.std.float().cpu(),
        "p_tokens": torch.zeros(n, t, dtype=torch.long),
        "p_text_mask": torch.zeros(n, t, dtype=torch.long),
        "p_feat_mask": torch.zeros(n, t, dtype=torch.long),
        "p_feats": torch.zeros(n, t, ps, d),
        "p_len": torch.tensor([p.tokens.shape[0] for p in prompts]),
        "context": torch.zeros(n, c, ps, d),
        "context_len": torch.tensor([p.context.shape[0] for p in prompts]),
    }
    for i, p in enumerate(prompts):
        m = p.tokens.shape[0]
        out["p_tokens"][i, :m], out["p_text_mask"][i, :m], out["p_feat_mask"][i, :m] = (
            p.tokens,
            p.text_mask,
            p.feat_mask,
        )
        out["p_feats"][i, :m] = p.feats.float()
        out["context"][i, : p.context.shape[0]] = p.context.float()
    return out


def _row_prompts(e: dict[str, torch.Tensor], group_ids: torch.Tensor) -> tuple[list[VoxPrompt], torch.Tensor]:
    """One VoxPrompt per group (its rows share it) from the extras, and each row's index into them."""
    prompts: list[VoxPrompt] = []
    seen: dict[int, int] = {}
    index = []
    for i, g in enumerate(group_ids.tolist()):
        if g not in seen:
            m, c = int(e["p_len"][i]), int(e["context_len"][i])
            seen[g] = len(prompts)
            prompts.append(
                VoxPrompt(
                    e["p_tokens"][i, :m],
                    e["p_text_mask"][i, :m],
                    e["p_feats"][i, :m],
                    e["p_feat_mask"][i, :m],
                    e["context"][i, :c],
                )
            )
        index.append(seen[g])
    return prompts, torch.tensor(index, dtype=torch.long)


def _select_group_rollout(ro: GroupRollout, rows: list[int]) -> GroupRollout:
    """Rows of a GroupRollout (its prompts kept whole: rows index into them)."""
    idx = torch.tensor(rows, device=ro.patches.device)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(ro):
        v = getattr(ro, f.name)
        out[f.name] = v.index_select(0, idx) if isinstance(v, torch.Tensor) else v
    return GroupRollout(**out)
