"""GLM-TTS's second stage as a GRPO policy (Flow-GRPO): the flow-matching DiT, `policy.kind: glmtts_flow`.

Loads the same upstream checkpoint directory as `glmtts` (llm/, vq32k-phoneme-tokenizer/, flow/, hift/). The LM
is frozen and only picks the speech codes; the policy is the flow's DiT estimator, which turns codes into mel.

Group: one prompt and one code sequence (sampled once per group by the frozen LM, from the group's own random
stream; or, with `policy.flow.codes: manifest`, the manifest's fixed `syn_speech_token`, e.g. the codes of a
recording of the text), and its G members are G noise trajectories of the flow, so the advantages measure only what
the flow decides.

Sampler: the upstream Euler ODE on the cosine t-schedule (noise at t = 0, data at t = 1, sigma_min 1e-6) with
classifier-free guidance exactly as upstream (v = (1 + 0.7) v_cond - 0.7 v_uncond, the unconditional branch
without prompt mel, speaker and, with speech_token_cfg, tokens), except on the steps in `policy.flow.sde_steps`,
which take the SDE with the ODE's marginals (policies/flow_sde.py, Flow-GRPO's noise g = eta sqrt(n / (1 - n)),
n = 1 - t, or DanceGRPO's constant g = eta):

    x_next = x + v dt + (g^2 / 2) score(x, v, t) dt + g sqrt(dt) eps          (dt > 0 here)

Each SDE step of a row is one action: the whole state [T, 80] (the voice prompt's frames included: they are part
of the state the DiT reads) goes to x_next with a Gaussian log-prob computed in float32. Reduction: the MEAN over
the row's valid elements (frames x 80), not the sum. Summed over the elements, one AdamW step of the tiny run
(lr 2e-3, 13 560 elements per action) already moves log-ratios by 3.6 (median; 28 at most), ratios of e^3.6, and
a real clip of 10 s has 40 000 elements: every ratio would sit outside any clip range. The mean (Flow-GRPO's
choice) is a per-element log-ratio, small enough for a clip range to hold (the same step moves it by 2e-3 at most:
clip at about that, as Flow-GRPO clips at 1e-4). `policy.flow.logprob: sum` gives the exact trajectory likelihood
instead. With eta = 0 the sampler is the upstream ODE (to 1e-5, tested).

Teacher-forced log-probs: each recorded transition's mean is recomputed under the current (or reference) DiT
from the recorded state, time and conditions, in batches; before any update the ratio is 1. The DiT runs without
dropout (upstream trains it with 0.1): dropout would make the recomputed mean random and the ratio noisy.
Trainable: the DiT estimator, full (its token embedding frozen) or LoRA (peft) on its linear layers; the LM, the
speaker projection and HiFT are frozen. Decode: the sampled mel through HiFT (24 kHz), as the upstream vocoder.
Export: `flow/flow.pt` in upstream's layout (LoRA merged), every other part of the loaded directory copied.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.flow_sde import FlowTime, diffusion_coefficient, sde_step_mean_std
from policies.glmtts import CheckpointError, GLMTTSPolicy, PromptInput
from policies.sampling import row_keys
from rollouts.token2wav import VoicePrompt, load_flow, load_hift
from rollouts.types import PromptRecord, Rollout, SamplingParams, VocodeResult

GLMTTS_TIME = FlowTime(data_at=1.0, sigma_min=1e-6)
# the per-group fields a flow rollout takes from its group's codes (one LM row, or the manifest's codes)
_GROUP_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "group_ids",
    "finished",
    "truncated",
    "lengths",
    "min_lengths",
    "text_lengths",
)
FLOW_FILE = Path("flow") / "flow.pt"


@dataclass(frozen=True)
class FlowSettings:
    """policy.flow (rl/config.py FlowPolicyConfig), as the policy reads it."""

    eta: float = 0.7
    sde_steps: tuple[int, ...] = (1, 2)
    noise: str = "flow_grpo"
    n_timesteps: int = 10
    logprob: str = "mean"
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.ff.0.0", "ff.ff.2")
    codes: str = "lm"  # lm: sampled once per group by the frozen LM; manifest: the record's syn_speech_token

    def __post_init__(self) -> None:
        if self.eta < 0 or self.n_timesteps < 1 or self.noise not in ("flow_grpo", "constant"):
            raise ValueError("policy.flow: eta >= 0, n_timesteps >= 1, noise flow_grpo or constant")
        if self.codes not in ("lm", "manifest"):
            raise ValueError(f"policy.flow.codes must be lm or manifest, got {self.codes!r}")
        if self.logprob not in ("mean", "sum"):
            raise ValueError(f"policy.flow.logprob must be mean or sum, got {self.logprob!r}")
        if not self.sde_steps or any(not 0 <= k < self.n_timesteps for k in self.sde_steps):
            raise ValueError(f"policy.flow.sde_steps must be steps in [0, {self.n_timesteps}), got {self.sde_steps}")
        if len(set(self.sde_steps)) != len(self.sde_steps):
            raise ValueError(f"policy.flow.sde_steps has a step twice: {self.sde_steps}")


@dataclass(frozen=True)
class FlowPrompt:
    lm: PromptInput  # the frozen LM's prompt (it samples the group's codes)
    voice: VoicePrompt  # the flow's conditions: prompt codes, prompt mel, speaker embedding
    source: str = ""
    codes: np.ndarray | None = None  # [Tt] the manifest's fixed target codes (policy.flow.codes manifest)

    @property
    def text_len(self) -> int:
        return self.lm.text_len

    @property
    def ids(self) -> list[int]:  # the LM prompt (rl/guards.py checks it against the LM's context)
        return self.lm.ids


@dataclass
class FlowBatch:
    """The flow's inputs for N rows (padded to Tm mel frames), as upstream's sample() builds them."""

    cond: torch.Tensor  # [N, Tm, C] prompt mel (+ projected speaker), zeros past the prompt
    aligned: torch.Tensor  # [N, Tm] long, token ids aligned to the mel frames
    spk: torch.Tensor  # [N, 192] normalised speaker embedding
    mask: torch.Tensor  # [N, Tm] bool, valid frames
    prompt_frames: torch.Tensor  # [N] long
    frames: list[int] = field(default_factory=list)  # per row, its valid frames


@dataclass(frozen=True)
class FlowActions:
    """The flow's actions of N rows: K = len(sde_steps) SDE transitions each."""

    tokens: torch.Tensor  # [N, K] long, the SDE step of each action (-1 where the row has none)
    mask: torch.Tensor  # [N, K] bool, rows with codes
    logp: torch.Tensor  # [N, K] float32 behaviour log-probs (0 where masked)
    extras: dict[str, torch.Tensor]  # per row: codes, mel, frames, the recorded transitions and conditions


class FlowActor(torch.nn.Module):
    """The trainable module (the engine wraps it): the DiT estimator, dropout always off (see the docstring)."""

    def __init__(self, estimator: torch.nn.Module):
        super().__init__()
        self.estimator = estimator
        self.train(False)

    def train(self, mode: bool = True) -> FlowActor:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.estimator(*args, **kwargs)


def guided_velocity(
    estimator: torch.nn.Module, x: torch.Tensor, fb: FlowBatch, t: torch.Tensor, cfg_rate: float, token_cfg: bool
) -> torch.Tensor:
    """(1 + w) v(x | cond) - w v(x | no cond), one batch of 2N rows as upstream. x [N, Tm, M], t [N] -> [N, Tm, M]."""
    n = x.shape[0]
    v = estimator(
        torch.cat([x, x]),
        torch.cat([fb.cond, torch.zeros_like(fb.cond)]),
        torch.cat([fb.aligned, torch.zeros_like(fb.aligned) if token_cfg else fb.aligned]),
        torch.cat([t, t]),
        torch.cat([fb.mask, fb.mask]),
        torch.cat([fb.spk, torch.zeros_like(fb.spk)]),
    )
    return (1.0 + cfg_rate) * v[:n] - cfg_rate * v[n:]


def transition_logprob(
    x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor, reduce: str
) -> torch.Tensor:
    """log N(x_next; mean, std^2) per row over its valid frames (mask [N, Tm]), summed or averaged over the valid
    elements. x_next, mean [N, Tm, M]; std [N, 1, 1] > 0. Returns [N] float32."""
    s = std.float()
    lp = -((x_next.float() - mean.float()) ** 2) / (2.0 * s * s) - torch.log(s) - 0.5 * np.log(2.0 * np.pi)
    m = mask[..., None].to(lp.dtype)
    total = (lp * m).flatten(1).sum(1)
    return total / (m.flatten(1).sum(1) * x_next.shape[-1]).clamp(min=1.0) if reduce == "mean" else total


class GLMTTSFlowPolicy:
    """The GLM-TTS flow stage as a policy: the frozen LM picks codes, the flow's DiT is trained (module docstring)."""

    speech_rate = 25.0  # the LM's speech codes per second (durations come from the codes)
    actions_are_frames = False  # an action is a whole denoising transition: token-level rewards do not apply
    vllm_sampling = False
    stages = ("flow",)  # rl/stages.py: its actions' metrics are flow/loss, flow/ratio/*, ...
    closed_kl_stages = ("flow",)  # reference_kl gives the KL in closed form

    def __init__(
        self, lm: GLMTTSPolicy, flow, hift, settings: FlowSettings, *, ckpt_dir: str, lora=None, train_lm=False
    ):
        """`lm` samples the codes; frozen here unless `train_lm` (the joint policy trains it: glmtts_joint)."""
        self.lm = lm
        if not train_lm:
            self.lm.model.requires_grad_(False).eval()
        self.flow = flow.eval().requires_grad_(False)
        self.hift = hift.eval().requires_grad_(False)
        self.settings = settings
        self.ckpt_dir = ckpt_dir
        estimator = self.flow.estimator
        self.lora = bool(lora is not None and lora.enabled)
        if self.lora:
            estimator = _apply_lora(estimator, lora, settings.lora_target_modules)
        else:
            estimator.requires_grad_(True)
            estimator.text_emb_layer.text_embed.requires_grad_(False)  # the token embedding stays as released
        self.model = FlowActor(estimator)
        self._reference: torch.nn.Module | None = None

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
    ) -> GLMTTSFlowPolicy:
        ckpt_dir = Path(ckpt_dir)
        lm = GLMTTSPolicy.from_pretrained(
            ckpt_dir, dtype=dtype, device=device, lora=None, trust_remote_code=trust_remote_code
        )
        return cls.around(lm, ckpt_dir, device=device, lora=lora, config=config)

    @classmethod
    def around(
        cls, lm: GLMTTSPolicy, ckpt_dir: Path, *, device, lora, config: Any, train_lm: bool = False
    ) -> GLMTTSFlowPolicy:
        """The flow stage of `ckpt_dir` (flow/ trained, hift/ decoding, both loaded strictly) around a loaded LM."""
        for part in ("flow", "hift"):
            if not (ckpt_dir / part).is_dir():
                raise CheckpointError(f"{ckpt_dir}: missing {part}/ (the flow policy trains flow/, decodes with hift/)")
        flow, hift = load_flow(ckpt_dir), load_hift(ckpt_dir)
        fc = getattr(config, "flow", None)
        settings = FlowSettings() if fc is None else settings_from_config(fc)
        return cls(lm, flow.to(device), hift.to(device), settings, ckpt_dir=str(ckpt_dir), lora=lora, train_lm=train_lm)

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        """The tiny LM, flow and a HiFT whose output follows its mel (the flow is the policy: always written)."""
        from rollouts.tiny_vocoder import write_tiny_vocoder

        ckpt_dir = Path(ckpt_dir)
        GLMTTSPolicy.write_tiny(ckpt_dir, texts, seed=seed, vocoder=False)
        if not (ckpt_dir / "flow").exists():
            write_tiny_vocoder(ckpt_dir, seed=seed, mel_sensitive=True)
            print(f"ttsrl: wrote a tiny random flow + HiFT (its output follows the mel) to {ckpt_dir}")

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    @property
    def context_length(self) -> int | None:
        return self.lm.context_length

    @property
    def pad_id(self) -> int:
        return -1  # actions are SDE step indices

    def encode_text(self, text: str) -> list[int]:
        return self.lm.encode_text(text)

    def prompt_input(self, record: PromptRecord) -> FlowPrompt:
        from rollouts.manifest import ManifestError

        if record.prompt_feat is None or record.embedding is None:
            missing = "prompt_speech_feat" if record.prompt_feat is None else "embedding"
            raise ManifestError(f"{record.source}: field '{missing}' is missing; the flow policy needs it")
        codes = None
        if self.settings.codes == "manifest":
            if record.target_speech_tokens is None:
                raise ManifestError(
                    f"{record.source}: field 'syn_speech_token' is missing; policy.flow.codes manifest trains the "
                    f"flow on each line's fixed target codes"
                )
            codes = record.target_speech_tokens
        voice = VoicePrompt(record.prompt_speech_tokens, record.prompt_feat, record.embedding)
        return FlowPrompt(self.lm.prompt_input(record), voice, record.source, codes)

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        codes = rollout.extras["codes"]
        return [codes[i, : int(rollout.lengths[i])] for i in range(rollout.num_rows)]

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> FlowMelDecoder:
        """HiFT over the mel the policy sampled (the flow already ran: n_timesteps and dtype do not apply)."""
        return FlowMelDecoder(self.hift)

    # --- the flow's inputs ------------------------------------------------------------------------------------
    def flow_batch(self, voices: list[VoicePrompt], codes: list[torch.Tensor]) -> FlowBatch:
        """Conditions for each row: [prompt codes + generated codes] aligned to the mel frames, prompt mel, speaker."""
        dev = self.device
        tokens = [
            torch.cat([torch.as_tensor(v.tokens, dtype=torch.long), c.long().cpu()]) for v, c in zip(voices, codes)
        ]
        feats = [torch.as_tensor(np.asarray(v.feat, np.float32)) for v in voices]
        emb = torch.as_tensor(np.stack([np.asarray(v.embedding, np.float32) for v in voices]), device=dev)
        cond, aligned, spk, mask, frames = self.flow.conditions(tokens, feats, emb)
        prompt_frames = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
        return FlowBatch(cond=cond, aligned=aligned, spk=spk, mask=mask, prompt_frames=prompt_frames, frames=frames)

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
        """Codes once per group (from the frozen LM, its stream (seed, group, 0) with `params`; or the manifest's
        fixed codes with policy.flow.codes manifest), then G flow trajectories per group: row j of group g draws its
        initial noise and every SDE noise from (seed, g, j)."""
        bounds = dict(min_ratio=min_ratio, max_ratio=max_ratio, max_new_tokens=max_new_tokens)
        if self.settings.codes == "manifest":
            codes, lm = self._manifest_codes(prompts, group_ids, **bounds)
        else:
            lm_ro = self.lm.sample_groups(
                [p.lm for p in prompts], 1, params, group_ids=group_ids, seed=seed, decode=decode, **bounds
            )
            codes = lm_ro.codes(self.lm.special.ats)
            lm = {k: getattr(lm_ro, k) for k in _GROUP_FIELDS}
        rows = torch.arange(len(prompts)).repeat_interleave(group_size)  # row -> its prompt
        keys = row_keys(
            seed, torch.tensor(group_ids).repeat_interleave(group_size), torch.arange(group_size).repeat(len(prompts))
        )
        fa = self.sample_flow([prompts[int(r)].voice for r in rows], [codes[int(g)] for g in rows], keys)
        return Rollout(
            **{k: v[rows] for k, v in lm.items()},
            tokens=fa.tokens,
            token_mask=fa.mask,
            behaviour_logp=fa.logp,
            prompt_index=rows,
            params=params,
            pad_id=-1,
            extras=fa.extras,
        )

    def _manifest_codes(
        self, prompts: list[FlowPrompt], group_ids: list[int], **bounds
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Each prompt's fixed codes (the manifest's syn_speech_token) and its group's per-prompt fields."""
        rb = self.lm.row_batch([p.lm for p in prompts], 1, **bounds)
        codes = []
        for p in prompts:
            if p.codes is None:
                raise ValueError(f"{p.source}: no fixed codes (policy.flow.codes manifest needs syn_speech_token)")
            codes.append(torch.as_tensor(p.codes, dtype=torch.long))
        n = len(prompts)
        return codes, {
            "prompt_ids": rb.prompt_ids,
            "prompt_mask": rb.prompt_mask,
            "group_ids": torch.tensor(group_ids, dtype=torch.long),
            "finished": torch.ones(n, dtype=torch.bool),  # a recording's codes end where it ends
            "truncated": torch.zeros(n, dtype=torch.bool),
            "lengths": torch.tensor([c.numel() for c in codes]),
            "min_lengths": rb.min_len,
            "text_lengths": rb.text_len,
        }

    @torch.no_grad()
    def sample_flow(self, voices: list[VoicePrompt], codes: list[torch.Tensor], keys: torch.Tensor) -> FlowActions:
        """Row i's mel from its voice prompt and speech codes (the ODE with SDE steps), its initial noise and every
        SDE noise drawn from the stream keys[i]; a row without codes has no actions."""
        ok = torch.tensor([c.numel() > 0 for c in codes])
        gens = [torch.Generator().manual_seed(int(k) & (2**63 - 1)) for k in keys]
        k_sde = len(self.settings.sde_steps)
        n, width = len(codes), max(1, max(c.numel() for c in codes))
        run = [i for i in range(n) if bool(ok[i])]
        x_hist = x_next = t_rec = dt_rec = mel = None
        logp = torch.zeros(n, k_sde)
        fb = None
        if run:
            fb = self.flow_batch([voices[i] for i in run], [codes[i] for i in run])
            mel, hist = self._sample([gens[i] for i in run], fb)
            x_hist, x_next, t_rec, dt_rec, lp = hist
            logp[run] = lp.cpu()
        extras = self._extras(n, run, codes, width, fb, mel, x_hist, x_next, t_rec, dt_rec)
        mask = ok[:, None].expand(n, k_sde).clone()
        steps = torch.tensor(self.settings.sde_steps).repeat(n, 1).masked_fill(~mask, -1)
        return FlowActions(tokens=steps, mask=mask, logp=logp * mask, extras=extras)

    def _sample(self, gens: list[torch.Generator], fb: FlowBatch):
        """The upstream ODE with SDE steps: (mel [R, Tm, M], (x [R, K, Tm, M], x_next, t [R, K], dt [R, K],
        behaviour log-probs [R, K]))."""
        s, flow, dev = self.settings, self.flow, self.device
        r, t_max, m_dim = fb.cond.shape[0], fb.cond.shape[1], flow.mel_dim
        x = torch.zeros(r, t_max, m_dim, device=dev)
        for i, f in enumerate(fb.frames):  # drawn exactly as upstream's sample(): [frames, 80] per row
            x[i, :f] = torch.randn(f, m_dim, generator=gens[i]).to(dev)
        t_span = flow.t_span(s.n_timesteps, dev)
        t, dt = t_span[0], t_span[1] - t_span[0]
        xs, xn, ts, dts, lps = [], [], [], [], []
        est = self.model.estimator
        for step in range(1, s.n_timesteps + 1):
            v = guided_velocity(est, x, fb, t.expand(r), flow.inference_cfg_rate, flow.speech_token_cfg)
            if step - 1 in s.sde_steps:
                g = diffusion_coefficient(t.expand(r).cpu(), s.eta, GLMTTS_TIME, s.noise).to(dev)
                mean, std = sde_step_mean_std(x, v, t.expand(r), dt, g, GLMTTS_TIME)
                eps = torch.zeros(r, t_max, m_dim)
                for i, f in enumerate(fb.frames):  # each row's own frames only: its draws ignore the batch
                    eps[i, :f] = torch.randn(f, m_dim, generator=gens[i])
                eps = eps.to(dev)
                nxt = (mean + std * eps) * fb.mask[..., None]
                xs.append(x.float()), xn.append(nxt), ts.append(t.expand(r)), dts.append(dt.expand(r))
                lps.append(transition_logprob(nxt, mean, std, fb.mask, s.logprob) if s.eta > 0 else torch.zeros(r))
                x = nxt
            else:
                x = x + dt * v
            t = t + dt
            if step < s.n_timesteps:
                dt = t_span[step + 1] - t
        stack = lambda z: torch.stack(z, dim=1)  # noqa: E731  (sde_steps are sorted: action j = the j-th SDE step)
        return x, (stack(xs), stack(xn), stack(ts), stack(dts), stack(lps))

    def _extras(self, n, run, row_codes, width, fb, mel, x_hist, x_next, t_rec, dt_rec) -> dict[str, torch.Tensor]:
        """The rollout's per-row tensors: codes, the final mel, and every SDE transition with its conditions."""
        codes = torch.full((n, width), -1, dtype=torch.long)
        for i, c in enumerate(row_codes):
            codes[i, : c.numel()] = c.cpu()
        out = {"codes": codes}
        if not run:
            return out
        idx = torch.tensor(run)

        def full(x: torch.Tensor, fill=0.0) -> torch.Tensor:
            z = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype)
            z[idx] = x.detach().cpu()
            return z

        out.update(
            mel=full(mel.float()),
            frames=full(torch.tensor(fb.frames)),
            prompt_frames=full(fb.prompt_frames),
            cond=full(fb.cond.float()),
            aligned=full(fb.aligned),
            spk=full(fb.spk.float()),
            x=full(x_hist),
            x_next=full(x_next),
            t=full(t_rec.float()),
            dt=full(dt_rec.float()),
        )
        return out

    # --- teacher forcing --------------------------------------------------------------------------------------
    def _transitions(self, rollout: Rollout, rows: list[int]):
        """The recorded transitions of `rows`, flattened to R*K: (x, x_next, t, dt, FlowBatch) on the device."""
        dev, k = self.device, rollout.token_mask.shape[1]
        e = {name: rollout.extras[name][rows].to(dev) for name in ("x", "x_next", "t", "dt", "cond", "aligned")}
        frames = rollout.extras["frames"][rows]
        t_max, r = int(frames.max()), len(rows)
        mask = (torch.arange(t_max)[None] < frames[:, None]).to(dev)
        rep = lambda z: z[:, None].expand(r, k, *z.shape[1:]).reshape(r * k, *z.shape[1:])  # noqa: E731
        fb = FlowBatch(
            cond=rep(e["cond"][:, :t_max]),
            aligned=rep(e["aligned"][:, :t_max]),
            spk=rep(rollout.extras["spk"][rows].to(dev)),
            mask=rep(mask),
            prompt_frames=rep(rollout.extras["prompt_frames"][rows]),
        )
        x = e["x"][:, :, :t_max].reshape(r * k, t_max, -1)
        x_next = e["x_next"][:, :, :t_max].reshape(r * k, t_max, -1)
        return x, x_next, e["t"].reshape(-1), e["dt"].reshape(-1), fb

    def _means(self, x, t, dt, fb, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The transitions' Gaussian mean (under the DiT or its reference) and std."""
        with self._estimator_for(reference) as est:
            v = guided_velocity(est, x, fb, t, self.flow.inference_cfg_rate, self.flow.speech_token_cfg)
        g = diffusion_coefficient(t.cpu(), self.settings.eta, GLMTTS_TIME, self.settings.noise).to(x.device)
        return sde_step_mean_std(x, v, t, dt, g, GLMTTS_TIME)

    def _per_action(self, rollout: Rollout, fn) -> torch.Tensor:
        """[N, K] values fn(x, x_next, t, dt, fb) -> [R * K] of the rows with actions, 0 elsewhere."""
        n, k = rollout.token_mask.shape
        dev = self.device
        out = torch.zeros(n, k, device=dev)
        rows = [i for i in range(n) if bool(rollout.token_mask[i].any())]
        if rows:
            values = fn(*self._transitions(rollout, rows)).reshape(len(rows), k)
            out = out.index_put((torch.tensor(rows, device=dev),), values)
        return out * rollout.token_mask.to(dev)

    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [N, K] of the recorded transitions under the current DiT (with grad) or the reference, and
        NaN entropies (a Gaussian's entropy is fixed by the noise schedule: nothing to log)."""

        def logprob(x, x_next, t, dt, fb):
            mean, std = self._means(x, t, dt, fb, reference)
            return transition_logprob(x_next, mean, std, fb.mask, self.settings.logprob)

        return self._per_action(rollout, logprob), torch.full(
            rollout.token_mask.shape, float("nan"), device=self.device
        )

    def reference_kl(self, rollout: Rollout) -> torch.Tensor:
        """[N, K] closed-form KL(current || reference) of each transition (with grad): two Gaussians of the same
        std, ||mean - mean_ref||^2 / (2 std^2) over the row's valid elements, averaged or summed as the log-probs
        (policy.flow.logprob). The trainer uses it for loss.kl_coef instead of the k3 estimate."""

        def kl(x, x_next, t, dt, fb):
            mean, std = self._means(x, t, dt, fb, reference=False)
            with torch.no_grad():
                ref, _ = self._means(x, t, dt, fb, reference=True)
            m = fb.mask[..., None].to(torch.float32)
            per = ((mean.float() - ref.float()) ** 2 / (2.0 * std.float() ** 2) * m).flatten(1).sum(1)
            if self.settings.logprob == "mean":
                per = per / (m.flatten(1).sum(1) * x.shape[-1]).clamp(min=1.0)
            return per

        return self._per_action(rollout, kl)

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """flow/eta and flow/sde_steps (the sampler's settings), flow/logprob_mean (the behaviour log-prob of an
        action, mean over the step's actions; per element with logprob mean) and flow/frames (mel frames per row)."""
        m = rollout.token_mask
        lp = float(rollout.behaviour_logp[m].mean()) if bool(m.any()) else float("nan")
        frames = rollout.extras.get("frames")
        return {
            "flow/eta": self.settings.eta,
            "flow/sde_steps": float(len(self.settings.sde_steps)),
            "flow/logprob_mean": lp,
            "flow/frames": float(frames.float().mean()) if frames is not None else float("nan"),
        }

    def make_reference(self) -> None:
        """Freeze a copy of the DiT as the reference (LoRA: the base with adapters disabled)."""
        if self.lora:
            return
        self._reference = copy.deepcopy(self.model.estimator).requires_grad_(False).eval()

    @contextlib.contextmanager
    def _estimator_for(self, reference: bool) -> Iterator[torch.nn.Module]:
        if not reference:
            yield self.model
        elif self.lora:
            with self.model.estimator.disable_adapter():
                yield self.model.estimator
        else:
            if self._reference is None:
                raise RuntimeError("make_reference() was not called")
            yield self._reference

    # --- parameters and persistence ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[torch.nn.Module]:
        base = self.model.estimator.get_base_model() if self.lora else self.model.estimator
        return list(base.transformer_blocks)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The trainable tensors: the adapter with LoRA, else the DiT's weights."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.estimator.named_parameters() if v.requires_grad}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in self.model.estimator.named_parameters() if v.requires_grad}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"flow policy state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def merged_flow_state(self) -> dict[str, torch.Tensor]:
        """The flow's state dict in upstream's key layout with the trained DiT (LoRA merged)."""
        est = self.model.estimator
        merged = copy.deepcopy(est).merge_and_unload() if self.lora else est
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in self.flow.state_dict().items()
            if not k.startswith("estimator.")
        }
        for k, v in merged.state_dict().items():
            state[f"estimator.{k}"] = v.detach().cpu().contiguous()
        return state

    def export(self, out_dir: Path) -> None:
        """flow/flow.pt (the trained DiT, LoRA merged; upstream's keys) next to every other part of the loaded
        directory, copied as it was (llm/, the tokenizer, flow/config.yaml, hift/)."""
        out_dir, src = Path(out_dir), Path(self.ckpt_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(src.iterdir()):
            if entry.is_dir():
                shutil.copytree(entry, out_dir / entry.name, ignore=_skip_flow_pt if entry.name == "flow" else None)
            else:
                shutil.copy2(entry, out_dir / entry.name)
        torch.save(self.merged_flow_state(), out_dir / FLOW_FILE)


def _skip_flow_pt(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == FLOW_FILE.name]


class FlowMelDecoder:
    """HiFT over each row's sampled mel (its frames after the voice prompt), 24 kHz; vocoder noise from the seed."""

    def __init__(self, hift):
        self.hift = hift

    @torch.no_grad()
    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        from rollouts.hift import HOP_SAMPLES, SAMPLE_RATE

        n = rollout.num_rows
        audio: list[np.ndarray | None] = [None] * n
        reasons: list[str | None] = [None] * n
        if "mel" not in rollout.extras:
            return VocodeResult([None] * n, ["empty generation: no speech codes to vocode"] * n, SAMPLE_RATE)
        mel, frames, pf = rollout.extras["mel"], rollout.extras["frames"], rollout.extras["prompt_frames"]
        todo = []
        for i in range(n):
            if int(frames[i]) == 0:  # the flow did not run: the row has no codes
                reasons[i] = "empty generation: no speech codes to vocode"
            elif int(frames[i]) - int(pf[i]) <= 0:
                reasons[i] = f"voice prompt mel ({int(pf[i])} frames) covers the whole output"
            else:
                todo.append(i)
        dev = next(self.hift.parameters()).device
        step = batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            idx = todo[start : start + step]
            lens = [int(frames[i]) - int(pf[i]) for i in idx]
            batch = torch.zeros(len(idx), mel.shape[-1], max(lens), device=dev)
            for j, i in enumerate(idx):
                batch[j, :, : lens[j]] = mel[i, int(pf[i]) : int(frames[i])].T.to(dev)
            gens = [torch.Generator().manual_seed((int(seeds[i]) * 7919 + 1) % 2**63) for i in idx]
            wav = self.hift.inference(batch, lens, gens)
            for j, i in enumerate(idx):
                audio[i] = wav[j, : lens[j] * HOP_SAMPLES].float().cpu().numpy()
        return VocodeResult(audio=audio, reasons=reasons, sample_rate=SAMPLE_RATE)


def _apply_lora(estimator: torch.nn.Module, lora, targets: tuple[str, ...]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,  # a random adapter output would make the ratio noisy, as dropout would
        target_modules=list(targets),
        init_lora_weights="gaussian",
        bias="none",
    )
    return get_peft_model(estimator, cfg)


def settings_from_config(fc) -> FlowSettings:
    return FlowSettings(
        eta=float(fc.eta),
        sde_steps=tuple(sorted(int(k) for k in fc.sde_steps)),
        noise=str(fc.noise),
        n_timesteps=int(fc.n_timesteps),
        logprob=str(fc.logprob),
        lora_target_modules=tuple(fc.lora_target_modules),
        codes=str(fc.codes),
    )
