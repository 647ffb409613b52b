"""Batched VoxCPM2 group rollouts with SDE denoising and a sampled stop, and teacher-forced log-probs.

Actions per generated patch i of a row:
  - one Gaussian transition per SDE step k in `sde_steps` (x_t -> x_next of the LocDiT sampler, [D, P] each),
  - one Bernoulli stop decision (allowed once i > min_len, as released).
All other denoising steps are the released Euler ODE; step 0 (zero velocity under CFG-Zero*) is never an SDE step.
Evaluation mode (`stochastic=False`) is the released sampler: ODE everywhere and argmax stop.

Row layout: rows are prompt-major, row r = g * group_size + j for prompt (group) g and member j. Row r draws all of
its randomness from its own generator seeded from (seed_g, group_id_g, j), in a fixed order and chunking, so its
sample does not depend on anything else in the batch. Prompts of different lengths are left-padded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.flow_sde import (
    FlowTime,
    diffusion_coefficient,
    gaussian_kl_same_std,
    gaussian_logprob,
    sde_step,
    sde_step_mean_std,
)
from policies.voxcpm_model import (
    AUDIO_START,
    REF_AUDIO_END,
    REF_AUDIO_START,
    VoxCPM2,
    cfm_schedule,
    zero_init_steps,
)

VOXCPM_TIME = FlowTime(data_at=0.0, sigma_min=0.0)
NOISE_CHUNK = 16  # patches of noise drawn per generator call (fixed: part of the per-row stream definition)


@dataclass
class VoxPrompt:
    """One conditioning sequence. tokens/text_mask/feat_mask [T]; feats [T, P, D] (float32);
    context [C, P, D]: trailing prompt patches the released decoder prepends (continuation modes)."""

    tokens: torch.Tensor
    text_mask: torch.Tensor
    feats: torch.Tensor
    feat_mask: torch.Tensor
    context: torch.Tensor


def build_prompt(
    text_ids,
    text: str,
    patch_size: int,
    feat_dim: int,
    prompt_text: str = "",
    prompt_feats: torch.Tensor | None = None,
    ref_feats: torch.Tensor | None = None,
    context_len: int = 3,
) -> VoxPrompt:
    """The released prompt layouts: zero-shot, continuation (prompt_text + prompt_feats), reference (ref_feats,
    VoxCPM2's isolated reference) or both. text_ids: str -> list[int]. *_feats: [T, P, D] VAE latent patches."""
    cont = prompt_feats is not None and prompt_feats.shape[0] > 0
    ids = torch.tensor(list(text_ids((prompt_text if cont else "") + text)) + [AUDIO_START], dtype=torch.long)
    n = ids.shape[0]
    tokens, tmask, amask = [ids], [torch.ones(n, dtype=torch.long)], [torch.zeros(n, dtype=torch.long)]
    feats = [torch.zeros(n, patch_size, feat_dim)]
    if ref_feats is not None and ref_feats.shape[0] > 0:
        r = ref_feats.shape[0]
        z1 = torch.zeros(1, patch_size, feat_dim)
        tokens.insert(0, torch.tensor([REF_AUDIO_START] + [0] * r + [REF_AUDIO_END]))
        tmask.insert(0, torch.tensor([1] + [0] * r + [1]))
        amask.insert(0, torch.tensor([0] + [1] * r + [0]))
        feats.insert(0, torch.cat([z1, ref_feats.float(), z1]))
    context = torch.zeros(0, patch_size, feat_dim)
    if cont:
        p = prompt_feats.shape[0]
        tokens.append(torch.zeros(p, dtype=torch.long))
        tmask.append(torch.zeros(p, dtype=torch.long))
        amask.append(torch.ones(p, dtype=torch.long))
        feats.append(prompt_feats.float())
        context = prompt_feats[p - min(context_len, p) :].float()
    return VoxPrompt(torch.cat(tokens), torch.cat(tmask), torch.cat(feats), torch.cat(amask), context)


@torch.no_grad()
def encode_patches(model: VoxCPM2, wav: torch.Tensor, padding: str = "right") -> torch.Tensor:
    """A mono waveform [S] at the VAE's input rate -> latent patches [T, P, D] (float32), as the released
    prompt encoder: zero-padded to a whole number of patches, on the left for continuation prompts
    (padding="left") and on the right for references."""
    vae, p = model.audio_vae, model.patch_size
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    hop = p * vae.chunk_size
    pad = (-wav.shape[-1]) % hop
    wav = F.pad(wav.float().view(1, -1), (pad, 0) if padding == "left" else (0, pad))
    feat = vae.encode(wav.to(next(vae.parameters()).device))[0]  # [D, T * P]
    return feat.view(vae.latent_dim, -1, p).permute(1, 2, 0).float()


@dataclass
class PromptBatch:
    """Left-padded prompts. tokens/text_mask/feat_mask/valid/pos [B, T]; feats [B, T, P, D]; lengths [B]."""

    tokens: torch.Tensor
    text_mask: torch.Tensor
    feats: torch.Tensor
    feat_mask: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    lengths: torch.Tensor


def pad_prompts(prompts: Sequence[VoxPrompt], device) -> PromptBatch:
    """Left-pad prompts into one batch; positions restart at 0 on each row's first real token."""
    t = max(p.tokens.shape[0] for p in prompts)
    b = len(prompts)
    ref = prompts[0].feats
    out = PromptBatch(
        torch.zeros(b, t, dtype=torch.long),
        torch.zeros(b, t, dtype=torch.long),
        torch.zeros(b, t, *ref.shape[1:]),
        torch.zeros(b, t, dtype=torch.long),
        torch.zeros(b, t, dtype=torch.bool),
        torch.zeros(b, t, dtype=torch.long),
        torch.tensor([p.tokens.shape[0] for p in prompts]),
    )
    for i, p in enumerate(prompts):
        n = p.tokens.shape[0]
        out.tokens[i, t - n :], out.text_mask[i, t - n :], out.feat_mask[i, t - n :] = (
            p.tokens,
            p.text_mask,
            p.feat_mask,
        )
        out.feats[i, t - n :] = p.feats
        out.valid[i, t - n :] = True
        out.pos[i, t - n :] = torch.arange(n)
    return PromptBatch(
        *(x.to(device) for x in (out.tokens, out.text_mask, out.feats, out.feat_mask, out.valid, out.pos, out.lengths))
    )


def row_seed(seed: int, group_id: int, member: int) -> int:
    """The generator seed of member j of group g (63-bit, stable across processes and platforms)."""
    h = hashlib.sha256(f"voxcpm-row:{int(seed)}:{int(group_id)}:{int(member)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class RowNoise:
    """Per-row standard-normal streams: patch i of row r gets `width` draws from row r's own generator."""

    def __init__(self, seeds: Sequence[int], width: int, device) -> None:
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.width, self.device = width, device
        self.buf: torch.Tensor | None = None
        self.start = -NOISE_CHUNK

    def get(self, i: int) -> torch.Tensor:  # [B, width] float32
        if i >= self.start + NOISE_CHUNK:
            self.start = i - i % NOISE_CHUNK
            self.buf = torch.stack(
                [torch.randn(NOISE_CHUNK, self.width, generator=g, device=self.device) for g in self.gens]
            )
        return self.buf[:, i - self.start]


@dataclass
class SamplingSpec:
    """The behaviour distribution of a rollout (needed again for teacher forcing)."""

    n_steps: int = 10
    cfg_value: float = 2.0
    sway: float = 1.0
    sde_steps: tuple[int, ...] = ()
    eta: float = 0.7
    noise_schedule: str = "flow_grpo"
    stop_temperature: float = 1.0
    min_len: int = 2
    stochastic: bool = True


@dataclass
class GroupRollout:
    """Batched rollouts. N rows, L = longest generated length, K = len(spec.sde_steps), patch [P, D].

    patches [N, L, P, D] (zero past lengths); lengths [N]; finished [N] (stopped, not truncated);
    group_ids / members / prompt_index / row_seeds [N];
    x_t, x_next, mean [N, L, K, D, P] and std [N, L, K] of every SDE transition, sde_logp [N, L, K] (float32),
    sde_mask [N, L, K]; stop_action [N, L] (True = stop), stop_logp [N, L], stop_mask [N, L].
    """

    spec: SamplingSpec
    prompts: list[VoxPrompt]
    prompt_index: torch.Tensor
    group_ids: torch.Tensor
    members: torch.Tensor
    row_seeds: torch.Tensor
    patches: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    x_t: torch.Tensor
    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    sde_logp: torch.Tensor
    sde_mask: torch.Tensor
    stop_action: torch.Tensor
    stop_logp: torch.Tensor
    stop_mask: torch.Tensor


def _check_spec(spec: SamplingSpec) -> None:
    z = zero_init_steps(spec.n_steps)
    bad = [k for k in spec.sde_steps if not z <= k < spec.n_steps]
    if bad or len(set(spec.sde_steps)) != len(spec.sde_steps):
        raise ValueError(
            f"sde_steps {spec.sde_steps}: each must be unique and in [{z}, {spec.n_steps}) (steps "
            f"below {z} have zero velocity under CFG-Zero*)"
        )
    if spec.stochastic and spec.sde_steps and spec.eta <= 0:
        raise ValueError("eta must be > 0 when sde_steps are given (eta = 0 is the ODE)")
    if spec.stop_temperature <= 0:
        raise ValueError("stop_temperature must be > 0")


def _prefill(model: VoxCPM2, pb: PromptBatch, cache_len: int, repeat: int):
    """Both LMs over the padded prompts (one row per prompt), then every row repeated `repeat` times.

    Returns (lm_h [B * repeat, H], res_h [B * repeat, H], (base cache, residual cache) with B * repeat rows).
    """
    dt = model.lm_param_dtype()
    b, t0 = pb.tokens.shape
    caches = []
    combined, feat_embed = model.embed_inputs(pb.tokens, pb.text_mask, pb.feats, pb.feat_mask)
    base = model.base_lm.new_cache(b, t0, pb.tokens.device, dt)
    enc = model.base_lm(combined, causal=True, pos=pb.pos, valid=pb.valid, cache=base)
    lm_h = model.fsq_mix(enc, pb.text_mask, pb.feat_mask)
    res = model.residual_lm.new_cache(b, t0, pb.tokens.device, dt)
    r = model.residual_lm(
        model.residual_inputs(lm_h, feat_embed, pb.feat_mask), causal=True, pos=pb.pos, valid=pb.valid, cache=res
    )
    for lm, small in ((model.base_lm, base), (model.residual_lm, res)):
        full = lm.new_cache(b * repeat, cache_len, pb.tokens.device, dt)
        full.k[:, :, :, :t0] = small.k.repeat_interleave(repeat, dim=1)
        full.v[:, :, :, :t0] = small.v.repeat_interleave(repeat, dim=1)
        full.valid[:, :t0] = small.valid.repeat_interleave(repeat, dim=0)
        full.length = t0
        caches.append(full)
    return lm_h[:, -1].repeat_interleave(repeat, 0), r[:, -1].repeat_interleave(repeat, 0), tuple(caches)


def _denoise_patch(
    model: VoxCPM2,
    spec: SamplingSpec,
    mu: torch.Tensor,
    cond: torch.Tensor,
    z: torch.Tensor,
    sde_noise: torch.Tensor | None,
    sched,
    gs: list[torch.Tensor],
):
    """One patch of the LocDiT sampler. mu [B, 2Hd]; cond, z [B, D, P]; sde_noise [B, K, D, P].

    Returns (x0 [B, D, P], records: list of (x_t, x_next, mean, std) per SDE step, float32).
    """
    x = z.to(mu.dtype)
    zsteps = zero_init_steps(spec.n_steps)
    slot = {k: n for n, k in enumerate(spec.sde_steps)} if spec.stochastic else {}
    recs = []
    for k, (t, dt) in enumerate(sched):
        v = torch.zeros_like(x) if k < zsteps else model.velocity(x, mu, t, cond, spec.cfg_value)
        if k in slot:
            n = slot[k]
            x_next, mean, std = sde_step(x, v, t, -dt, gs[n], VOXCPM_TIME, sde_noise[:, n])
            recs.append((x.float(), x_next, mean, std.flatten()))
            x = x_next.to(mu.dtype)
        else:
            x = x - dt * v
    return x, recs


@torch.no_grad()
def sample_groups(
    model: VoxCPM2,
    prompts: Sequence[VoxPrompt],
    group_size: int,
    seeds: int | Sequence[int],
    sde_steps: Sequence[int] | None = None,
    eta: float = 0.7,
    stop_temperature: float = 1.0,
    min_len: int = 2,
    max_len: int = 200,
    n_steps: int = 10,
    cfg_value: float = 2.0,
    noise_schedule: str = "flow_grpo",
    stochastic: bool = True,
    group_ids: Sequence[int] | None = None,
    initial_noise: torch.Tensor | None = None,
    prompt_max_len: Sequence[int] | None = None,
) -> GroupRollout:
    """Sample `group_size` rows per prompt in one batch. seeds: one base seed, or one per prompt.

    prompt_max_len: per prompt, the patches its rows may generate (each <= max_len; the released cap is
    int(target text tokens x 6 + 10)); a row that reaches it is truncated there (not finished).

    sde_steps: 0-based denoising steps run as SDE (None: every step after the CFG-Zero* zero step).
    stochastic=False: the released evaluation sampler (ODE, argmax stop); no actions are recorded as valid.
    initial_noise: [N, max_len, D, P] replaces each patch's starting noise (for equality tests).
    """
    device = next(model.parameters()).device
    if sde_steps is None:
        sde_steps = tuple(range(zero_init_steps(n_steps), n_steps))
    spec = SamplingSpec(
        n_steps,
        cfg_value,
        1.0,
        tuple(int(k) for k in sde_steps) if stochastic else (),
        eta,
        noise_schedule,
        stop_temperature,
        min_len,
        stochastic,
    )
    _check_spec(spec)
    g_count = len(prompts)
    gids = list(range(g_count)) if group_ids is None else [int(g) for g in group_ids]
    bases = [int(seeds)] * g_count if isinstance(seeds, int) else [int(s) for s in seeds]
    if len(bases) != g_count or len(gids) != g_count:
        raise ValueError("seeds and group_ids need one entry per prompt")
    rows = [(g, j) for g in range(g_count) for j in range(group_size)]
    rseeds = [row_seed(bases[g], gids[g], j) for g, j in rows]
    pb1 = pad_prompts(list(prompts), device)
    pb = PromptBatch(
        *(
            x.repeat_interleave(group_size, 0)
            for x in (pb1.tokens, pb1.text_mask, pb1.feats, pb1.feat_mask, pb1.valid, pb1.pos, pb1.lengths)
        )
    )
    n, t0 = pb.tokens.shape
    p, d, k_sde = model.patch_size, model.feat_dim, len(spec.sde_steps)
    noise = RowNoise(rseeds, (1 + k_sde) * d * p + 1, device)
    sched = cfm_schedule(n_steps, 1.0, model.lm_param_dtype(), device)
    gs = [diffusion_coefficient(sched[k][0].float(), eta, VOXCPM_TIME, noise_schedule) for k in spec.sde_steps]

    lm_h, res_h, (base_c, res_c) = _prefill(model, pb1, t0 + max_len, group_size)
    prefix = pb.feats[:, -1].to(lm_h.dtype)  # [N, P, D]
    caps = torch.full((n,), max_len, dtype=torch.long, device=device)
    if prompt_max_len is not None:
        if len(prompt_max_len) != g_count or any(not 1 <= int(c) <= max_len for c in prompt_max_len):
            raise ValueError(f"prompt_max_len needs one value in [1, {max_len}] per prompt")
        caps = torch.tensor([int(c) for c in prompt_max_len], device=device).repeat_interleave(group_size)
    rec = _Recorder(n, max_len, k_sde, d, p, device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(max_len):
        draw = noise.get(i)
        z = draw[:, : d * p].view(n, d, p) if initial_noise is None else initial_noise[:, i].to(device)
        sde_noise = draw[:, d * p : (1 + k_sde) * d * p].view(n, k_sde, d, p)
        mu = model.dit_condition(lm_h, res_h)
        x0, recs = _denoise_patch(model, spec, mu, prefix.transpose(1, 2), z, sde_noise, sched, gs)
        patch = x0.transpose(1, 2)  # [N, P, D]
        curr = model.enc_to_lm_proj(model.feat_encoder(patch.unsqueeze(1)))[:, 0]
        prefix = patch
        logits = model.stop_logits(lm_h).float()
        if stochastic:
            logq = F.log_softmax(logits / stop_temperature, dim=-1)
            u = torch.special.ndtr(draw[:, -1])
            stop = u < logq[:, 1].exp()
            stop_lp = torch.where(stop, logq[:, 1], logq[:, 0])
        else:
            stop, stop_lp = logits.argmax(-1) == 1, torch.zeros(n, device=device)
        allowed = active & (i > min_len)
        rec.store(i, active, patch, recs, stop & allowed, stop_lp, allowed & stochastic)
        done = allowed & stop
        lengths += active.long()
        finished |= done
        active &= ~done & (lengths < caps)
        if not bool(active.any()) or i == max_len - 1:
            break
        step_pos = (pb.lengths + i).view(n, 1)
        h = model.base_lm(curr.unsqueeze(1), causal=True, pos=step_pos, cache=base_c)[:, 0]
        lm_h = model.fsq_layer(h)
        res_h = model.residual_lm(
            model.fusion_concat_proj(torch.cat((lm_h, curr), -1)).unsqueeze(1), causal=True, pos=step_pos, cache=res_c
        )[:, 0]
    length_max = int(lengths.max())
    return rec.finish(spec, list(prompts), rows, gids, rseeds, lengths, finished, length_max)


class _Recorder:
    """Per-patch action buffers of `sample_groups`."""

    def __init__(self, n: int, max_len: int, k: int, d: int, p: int, device) -> None:
        f32 = {"device": device, "dtype": torch.float32}
        self.patches = torch.zeros(n, max_len, p, d, **f32)
        self.x_t = torch.zeros(n, max_len, k, d, p, **f32)
        self.x_next = torch.zeros_like(self.x_t)
        self.mean = torch.zeros_like(self.x_t)
        self.std = torch.zeros(n, max_len, k, **f32)
        self.sde_logp = torch.zeros(n, max_len, k, **f32)
        self.sde_mask = torch.zeros(n, max_len, k, dtype=torch.bool, device=device)
        self.stop_action = torch.zeros(n, max_len, dtype=torch.bool, device=device)
        self.stop_logp = torch.zeros(n, max_len, **f32)
        self.stop_mask = torch.zeros(n, max_len, dtype=torch.bool, device=device)

    def store(self, i: int, active, patch, recs, stop, stop_lp, stop_valid) -> None:
        a = active.view(-1, 1, 1)
        self.patches[:, i] = torch.where(a, patch.float(), 0.0)
        for n, (x, xn, m, s) in enumerate(recs):
            self.x_t[:, i, n], self.x_next[:, i, n], self.mean[:, i, n] = x, xn, m
            self.std[:, i, n] = s
            self.sde_logp[:, i, n] = gaussian_logprob(xn, m, s.view(-1, 1, 1))
            self.sde_mask[:, i, n] = active
        self.stop_action[:, i] = stop
        self.stop_logp[:, i] = torch.where(stop_valid, stop_lp, 0.0)
        self.stop_mask[:, i] = stop_valid

    def finish(self, spec, prompts, rows, gids, rseeds, lengths, finished, length_max: int) -> GroupRollout:
        cut = slice(0, max(length_max, 1))
        dev = lengths.device
        return GroupRollout(
            spec,
            prompts,
            torch.tensor([g for g, _ in rows], device=dev),
            torch.tensor([gids[g] for g, _ in rows], device=dev),
            torch.tensor([j for _, j in rows], device=dev),
            torch.tensor(rseeds, dtype=torch.long, device=dev),
            self.patches[:, cut],
            lengths,
            finished,
            self.x_t[:, cut],
            self.x_next[:, cut],
            self.mean[:, cut],
            self.std[:, cut],
            self.sde_logp[:, cut],
            self.sde_mask[:, cut],
            self.stop_action[:, cut],
            self.stop_logp[:, cut],
            self.stop_mask[:, cut],
        )


# ----------------------------------------------------------------------------------------------------------------
# Teacher forcing
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TeacherForced:
    """Per-action log-probs under the current weights. sde_logp [N, L, K], sde_mean [N, L, K, D, P] (float32),
    stop_logp [N, L]; masks as in the rollout. Zero where masked."""

    sde_logp: torch.Tensor
    sde_mean: torch.Tensor
    sde_mask: torch.Tensor
    stop_logp: torch.Tensor
    stop_mask: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [N, L*K + L], mask [N, L*K + L]): every SDE action, then every stop decision."""
        n = self.sde_logp.shape[0]
        return (
            torch.cat([self.sde_logp.reshape(n, -1), self.stop_logp], 1),
            torch.cat([self.sde_mask.reshape(n, -1), self.stop_mask], 1),
        )


def _teacher_lm(model: VoxCPM2, ro: GroupRollout):
    """One causal pass of both LMs over [prompt | generated patches]. Returns lm_h, res_h [N, L, H], cond0 [N, P, D]."""
    device = ro.patches.device
    pb = pad_prompts([ro.prompts[int(g)] for g in ro.prompt_index.tolist()], device)
    n, t0 = pb.tokens.shape
    length = ro.patches.shape[1]
    gen = torch.arange(length, device=device).view(1, -1) < ro.lengths.view(-1, 1)
    zeros = torch.zeros(n, length, dtype=torch.long, device=device)
    tokens = torch.cat([pb.tokens, zeros], 1)
    text_mask = torch.cat([pb.text_mask, zeros], 1)
    feat_mask = torch.cat([pb.feat_mask, gen.long()], 1)
    feats = torch.cat([pb.feats, ro.patches], 1)
    valid = torch.cat([pb.valid, torch.ones(n, length, dtype=torch.bool, device=device)], 1)
    pos = torch.cat([pb.pos, pb.lengths.view(-1, 1) + torch.arange(length, device=device).view(1, -1)], 1)
    lm_h, res_h = model.lm_hidden_states(tokens, text_mask, feats, feat_mask, valid=valid, pos=pos)
    return lm_h[:, t0 - 1 : t0 - 1 + length], res_h[:, t0 - 1 : t0 - 1 + length], pb.feats[:, -1]


def teacher_forced_logprobs(model: VoxCPM2, ro: GroupRollout, dit_chunk: int = 4096) -> TeacherForced:
    """Log-probs of the rollout's recorded actions under `model`'s current weights (with grad where enabled)."""
    spec = ro.spec
    lm_h, res_h, cond0 = _teacher_lm(model, ro)
    n, length, _ = lm_h.shape
    logq = F.log_softmax(model.stop_logits(lm_h).float() / spec.stop_temperature, dim=-1)
    stop_lp = torch.where(ro.stop_action, logq[..., 1], logq[..., 0])
    stop_lp = torch.where(ro.stop_mask, stop_lp, torch.zeros_like(stop_lp))
    k = len(spec.sde_steps)
    sde_lp = torch.zeros(n, length, k, device=lm_h.device)
    sde_mean = torch.zeros(n, length, k, *ro.x_t.shape[-2:], device=lm_h.device)
    if k and bool(ro.sde_mask.any()):
        mu = model.dit_condition(lm_h, res_h)  # [N, L, 2Hd]
        cond = torch.cat([cond0.unsqueeze(1), ro.patches[:, :-1]], 1).to(mu.dtype)  # [N, L, P, D]
        sched = cfm_schedule(spec.n_steps, spec.sway, mu.dtype, mu.device)
        ts = torch.stack([sched[s][0] for s in spec.sde_steps])
        dts = torch.stack([sched[s][1] for s in spec.sde_steps])
        gs = torch.stack(
            [
                diffusion_coefficient(sched[s][0].float(), spec.eta, VOXCPM_TIME, spec.noise_schedule)
                for s in spec.sde_steps
            ]
        )
        idx = ro.sde_mask.nonzero(as_tuple=False)  # [A, 3] (row, patch, slot)
        lps, means = [], []
        for c in range(0, idx.shape[0], dit_chunk):
            r, i, s = idx[c : c + dit_chunk].unbind(1)
            x = ro.x_t[r, i, s]
            v = model.velocity(x.to(mu.dtype), mu[r, i], ts[s], cond[r, i].transpose(1, 2), spec.cfg_value)
            mean, std = sde_step_mean_std(x, v, ts[s].float(), -dts[s].float(), gs[s], VOXCPM_TIME)
            lps.append(gaussian_logprob(ro.x_next[r, i, s], mean, std))
            means.append(mean)
        r, i, s = idx.unbind(1)
        sde_lp = sde_lp.index_put((r, i, s), torch.cat(lps))
        sde_mean = sde_mean.index_put((r, i, s), torch.cat(means))
    return TeacherForced(sde_lp, sde_mean, ro.sde_mask, stop_lp, ro.stop_mask)


def gaussian_kl_to_reference(policy: TeacherForced, reference: TeacherForced, ro: GroupRollout) -> torch.Tensor:
    """Closed-form KL(pi || ref) per SDE action [N, L, K] (same std for both; zero where masked)."""
    n, length, k = ro.std.shape
    std = ro.std.clamp_min(1e-12).reshape(-1, 1, 1)
    kl = gaussian_kl_same_std(
        policy.sde_mean.reshape(n * length * k, *policy.sde_mean.shape[-2:]),
        reference.sde_mean.reshape(n * length * k, *policy.sde_mean.shape[-2:]),
        std,
    )
    return torch.where(ro.sde_mask, kl.view(n, length, k), torch.zeros_like(ro.std))


@torch.no_grad()
def decode_rollout(model: VoxCPM2, ro: GroupRollout) -> list[torch.Tensor]:
    """Waveforms [S_r] at the VAE's output rate, one per row (continuation context decoded then cut, as released).

    The decoder is causal, so rows of one prompt are right-padded into one batch and each output is cut to its
    own length."""
    vae = model.audio_vae
    up = model.patch_size * vae.decode_chunk_size
    out: list[torch.Tensor] = []
    for g in sorted(set(ro.prompt_index.tolist())):
        rows = (ro.prompt_index == g).nonzero().flatten()
        ctx = ro.prompts[g].context.to(ro.patches.device)
        lat = torch.cat([ctx.unsqueeze(0).expand(len(rows), -1, -1, -1), ro.patches[rows]], 1)  # [R, C+L, P, D]
        wav = vae.decode(lat.flatten(1, 2).transpose(1, 2).float())[:, 0]  # [R, S]
        for n_, r in enumerate(rows.tolist()):
            out.append((r, wav[n_, ctx.shape[0] * up : (ctx.shape[0] + int(ro.lengths[r])) * up]))
    return [w for _, w in sorted(out, key=lambda x: x[0])]
