"""VoxCPM2 model code (our own implementation of the released architecture, same parameter names).

    text ids + prompt latent patches
        -> base LM "TSLM" (MiniCPM-4, causal, KV cache)  -> FSQ on audio positions -> lm_h
        -> residual LM "RALM" (MiniCPM-4 without embeddings) over fusion([lm_h, patch_embed]) -> res_h
        -> LocDiT (bidirectional MiniCPM-4 over [mu(2) | t | prev patch | x]) + CFM Euler sampler
           (10 steps, CFG 2.0 with CFG-Zero*, sway-shifted t schedule) -> next patch [P, D]
        -> LocEnc (CLS transformer over one patch) -> next LM input;     stop head on lm_h (2-way)
    generated patches -> AudioVAE V2 decoder -> 48 kHz waveform

Shapes: B rows, T sequence positions, P = patch_size (4) latent frames per patch, D = feat_dim (64),
H = LM hidden size, Hd = LocDiT hidden size. Patches are stored as [..., P, D]; the LocDiT works on [N, D, P].

The transformer here takes per-row positions and a key-validity mask, so rows with different prompt lengths
run in one batch (left padding), and keeps a batched KV cache; everything else follows the released maths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from policies.voxcpm_config import LMConfig, VoxCPMConfig, sub_lm_config
from policies.voxcpm_vae import AudioVAE

AUDIO_START, AUDIO_END, REF_AUDIO_START, REF_AUDIO_END = 101, 102, 103, 104
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


# ----------------------------------------------------------------------------------------------------------------
# MiniCPM-4 transformer
# ----------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class LongRoPE(nn.Module):
    """MiniCPM LongRoPE tables: cos/sin [max_pos, head_dim] (float32, scaled), non-persistent."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        dim, rs = cfg.head_dim, cfg.rope_scaling
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
        scale = cfg.max_position_embeddings / rs.original_max_position_embeddings
        factor = math.sqrt(1 + math.log(scale) / math.log(rs.original_max_position_embeddings))
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        ext = rs.long_factor if cfg.max_position_embeddings > rs.original_max_position_embeddings else rs.short_factor
        freqs = torch.outer(t, 1.0 / torch.tensor(ext, dtype=torch.float32)) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * factor, persistent=False)
        self.register_buffer("sin", emb.sin() * factor, persistent=False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, h, T, d], k [B, hk, T, d]; cos/sin [T, d] or [B, 1, T, d] (float32)."""
    dt = q.dtype
    q32, k32 = q.float(), k.float()
    return (q32 * cos + _rotate_half(q32) * sin).to(dt), (k32 * cos + _rotate_half(k32) * sin).to(dt)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.h, self.hk, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hk * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ):
        """x [B, T, C]; mask: bool [B, 1, T, S] or None; cache: (K, V, start) with K/V [B, hk, Tmax, d].

        Returns (out [B, T, C], k [B, hk, T, d], v [B, hk, T, d]).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.hk, self.d).transpose(1, 2)
        if rope is not None:
            q, k = _apply_rope(q, k, *rope)
        kk, vv = k, v
        if cache is not None:
            kc, vc, start = cache
            kc[:, :, start : start + t] = k
            vc[:, :, start : start + t] = v
            kk, vv = kc[:, :, : start + t], vc[:, :, : start + t]
        o = F.scaled_dot_product_attention(
            q.contiguous(),
            kk.contiguous(),
            vv.contiguous(),
            attn_mask=mask,
            is_causal=causal and mask is None and cache is None,
            enable_gqa=True,
        )
        o = o.transpose(1, 2).reshape(b, t, self.h * self.d)
        return self.o_proj(o), k, v


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.res_scale = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers) if cfg.use_mup else None

    def forward(self, x: torch.Tensor, rope, mask, causal: bool, cache=None):
        h, k, v = self.self_attn(self.input_layernorm(x), rope, mask, causal, cache)
        x = x + (h * self.res_scale if self.res_scale is not None else h)
        h = self.mlp(self.post_attention_layernorm(x))
        x = x + (h * self.res_scale if self.res_scale is not None else h)
        return x, k, v


@dataclass
class KVCache:
    """Batched static KV cache of one transformer: k/v [L, B, hk, Tmax, d]; valid [B, Tmax] key mask."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int = 0


class MiniCPM(nn.Module):
    """MiniCPM-4 decoder stack. `embed_tokens` exists only when vocab_size > 0; rope only when not no_rope."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.vocab_size > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = None if cfg.no_rope else LongRoPE(cfg)

    def _rope(self, pos: torch.Tensor | None, start: int, t: int) -> tuple | None:
        """cos/sin for positions start..start+t-1 ([T, d]) or for per-row positions pos [B, T] ([B, 1, T, d])."""
        if self.rope is None:
            return None
        if pos is None:
            return self.rope.cos[start : start + t], self.rope.sin[start : start + t]
        return self.rope.cos[pos].unsqueeze(1), self.rope.sin[pos].unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool,
        pos: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, T, C] -> hidden [B, T, C] (after the final norm).

        pos: [B, T] per-row positions (None: 0..T-1 for every row). valid: [B, T] bool key mask of these T
        positions (None: all valid). cache: written at [cache.length, cache.length + T) and advanced; attention
        then also covers the cached keys.
        """
        b, t, _ = x.shape
        mask = None
        start = cache.length if cache is not None else 0
        if cache is not None:
            cache.valid[:, start : start + t] = True if valid is None else valid
        if valid is not None or cache is not None:
            keys = cache.valid[:, : start + t] if cache is not None else valid
            qi = torch.arange(start, start + t, device=x.device).view(t, 1)
            ki = torch.arange(start + t, device=x.device).view(1, -1)
            allowed = keys.view(b, 1, 1, -1) & ((ki <= qi) if causal else torch.ones_like(ki <= qi))
            mask = allowed | (ki == qi)  # padded queries see themselves: finite, never read
        rope = self._rope(pos, start, t)
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.k[i], cache.v[i], start) if cache is not None else None
            x, _, _ = layer(x, rope, mask, causal, layer_cache)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)

    def new_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> KVCache:
        c = self.cfg
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )


# ----------------------------------------------------------------------------------------------------------------
# Local encoder, LocDiT, CFM sampler, FSQ
# ----------------------------------------------------------------------------------------------------------------
class LocEnc(nn.Module):
    """Patch encoder: [B, T, P, D] -> [B, T, He] (CLS output of a bidirectional transformer over [cls | patch])."""

    def __init__(self, cfg: LMConfig, input_dim: int) -> None:
        super().__init__()
        self.special_token = nn.Parameter(torch.randn(1, 1, 1, cfg.hidden_size))
        self.in_proj = nn.Linear(input_dim, cfg.hidden_size, bias=True)
        self.encoder = MiniCPM(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, _ = x.shape
        h = self.in_proj(x)
        h = torch.cat([self.special_token.expand(b, t, 1, -1), h], dim=2).reshape(b * t, p + 1, -1)
        return self.encoder(h, causal=False)[:, 0].reshape(b, t, -1)


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim] (sin half then cos half)."""
    if t.ndim < 1:
        t = t.unsqueeze(0)
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=t.dtype, device=t.device) * -(math.log(10000) / (half - 1)))
    arg = scale * t.unsqueeze(1) * freq.unsqueeze(0)
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class LocDiT(nn.Module):
    """Velocity estimator v(x, mu, t, cond): x [N, D, P], mu [N, 2 * Hd], t [N], cond [N, D, P'] -> [N, D, P]."""

    def __init__(self, cfg: LMConfig, in_channels: int) -> None:
        super().__init__()
        self.hidden = cfg.hidden_size
        self.in_proj = nn.Linear(in_channels, cfg.hidden_size)
        self.cond_proj = nn.Linear(in_channels, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, in_channels)
        self.time_mlp = TimestepMLP(cfg.hidden_size)
        self.delta_time_mlp = TimestepMLP(cfg.hidden_size)
        self.decoder = MiniCPM(cfg)

    def forward(
        self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, dt: torch.Tensor
    ) -> torch.Tensor:
        h = self.in_proj(x.transpose(1, 2))
        c = self.cond_proj(cond.transpose(1, 2))
        te = self.time_mlp(timestep_embedding(t, self.hidden).to(h.dtype))
        te = te + self.delta_time_mlp(timestep_embedding(dt, self.hidden).to(h.dtype))
        mu = mu.view(h.shape[0], -1, h.shape[-1])
        seq = torch.cat([mu, te.unsqueeze(1), c, h], dim=1)
        out = self.decoder(seq, causal=False)[:, mu.shape[1] + 1 + c.shape[1] :]
        return self.out_proj(out).transpose(1, 2)


class CFM(nn.Module):
    """Holds the LocDiT as `estimator` (the released module path feat_decoder.estimator.*)."""

    def __init__(self, estimator: LocDiT) -> None:
        super().__init__()
        self.estimator = estimator


def cfm_schedule(
    n_steps: int, sway: float = 1.0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The released Euler schedule: [(t_k, dt_k)] for k = 0..n-1, 0-dim tensors of `dtype`.

    t_span = linspace(1, 0, n + 1) + sway * (cos(pi/2 * t) - 1 + t); the step is x <- x - dt_k * v(x, t_k), with t
    accumulated as t <- t - dt and dt_k = t_k - t_span[k + 1], exactly as released (so rounding matches).
    """
    t_span = torch.linspace(1, 0, n_steps + 1, device=device, dtype=dtype)
    t_span = t_span + sway * (torch.cos(torch.pi / 2 * t_span) - 1 + t_span)
    t, dt = t_span[0], t_span[0] - t_span[1]
    out = []
    for step in range(1, n_steps + 1):
        out.append((t, dt))
        t = t - dt
        if step < n_steps:
            dt = t - t_span[step + 1]
    return out


def zero_init_steps(n_steps: int) -> int:
    """How many leading steps CFG-Zero* runs with zero velocity (1 for 10 steps)."""
    return max(1, int((n_steps + 1) * 0.04))


def guided_velocity(
    est: LocDiT,
    x: torch.Tensor,
    mu: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    cfg_value: float,
    zero_star: bool = True,
) -> torch.Tensor:
    """CFG velocity with the CFG-Zero* optimised scale. x [N, D, P], mu [N, 2Hd], t [N] or 0-dim, cond [N, D, P]."""
    n = x.shape[0]
    tt = t.expand(n) if t.ndim == 0 else t
    v = est(
        torch.cat([x, x]),
        torch.cat([mu, torch.zeros_like(mu)]),
        torch.cat([tt, tt]),
        torch.cat([cond, cond]),
        torch.zeros(2 * n, device=x.device, dtype=x.dtype),
    )
    pos, neg = v[:n], v[n:]
    if zero_star:
        dot = (pos.reshape(n, -1) * neg.reshape(n, -1)).sum(dim=1, keepdim=True)
        st = (dot / ((neg.reshape(n, -1) ** 2).sum(dim=1, keepdim=True) + 1e-8)).view(n, 1, 1)
    else:
        st = 1.0
    return neg * st + cfg_value * (pos - neg * st)


class FSQ(nn.Module):
    """Scalar quantisation bottleneck: Linear -> tanh -> round(h * scale) / scale -> Linear.

    Forward values are exactly the quantised ones; gradients pass straight through the rounding.
    """

    def __init__(self, dim: int, latent: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.in_proj = nn.Linear(dim, latent)
        self.out_proj = nn.Linear(latent, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.in_proj(x))
        q = torch.round(h * self.scale) / self.scale
        return self.out_proj(q.detach() + (h - h.detach()))


# ----------------------------------------------------------------------------------------------------------------
# VoxCPM2
# ----------------------------------------------------------------------------------------------------------------
class VoxCPM2(nn.Module):
    """The VoxCPM2 network. Parameter names equal the released checkpoint's (plus `audio_vae.*`)."""

    def __init__(self, cfg: VoxCPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        lm = cfg.lm_config
        self.patch_size, self.feat_dim = cfg.patch_size, cfg.feat_dim
        self.base_lm = MiniCPM(lm)
        self.residual_lm = MiniCPM(
            sub_lm_config(
                lm, num_hidden_layers=cfg.residual_lm_num_layers, vocab_size=0, no_rope=cfg.residual_lm_no_rope
            )
        )
        enc = cfg.encoder_config
        self.feat_encoder = LocEnc(
            sub_lm_config(
                lm,
                hidden_size=enc.hidden_dim,
                intermediate_size=enc.ffn_dim,
                num_attention_heads=enc.num_heads,
                num_hidden_layers=enc.num_layers,
                kv_channels=enc.kv_channels,
                vocab_size=0,
            ),
            cfg.feat_dim,
        )
        dit = cfg.dit_config
        self.feat_decoder = CFM(
            LocDiT(
                sub_lm_config(
                    lm,
                    hidden_size=dit.hidden_dim,
                    intermediate_size=dit.ffn_dim,
                    num_attention_heads=dit.num_heads,
                    num_hidden_layers=dit.num_layers,
                    kv_channels=dit.kv_channels,
                    vocab_size=0,
                ),
                cfg.feat_dim,
            )
        )
        h = lm.hidden_size
        self.fsq_layer = FSQ(h, cfg.scalar_quantization_latent_dim, cfg.scalar_quantization_scale)
        self.enc_to_lm_proj = nn.Linear(enc.hidden_dim, h)
        self.lm_to_dit_proj = nn.Linear(h, dit.hidden_dim)
        self.res_to_dit_proj = nn.Linear(h, dit.hidden_dim)
        self.fusion_concat_proj = nn.Linear(2 * h, h)
        self.stop_proj = nn.Linear(h, h)
        self.stop_head = nn.Linear(h, 2, bias=False)
        self.audio_vae = AudioVAE(cfg.vae())
        self.emb_scale = lm.scale_emb if lm.use_mup else 1.0

    # -- pieces used by rollouts and teacher forcing ---------------------------------------------------------------
    def lm_param_dtype(self) -> torch.dtype:
        return self.stop_head.weight.dtype

    def embed_inputs(
        self, tokens: torch.Tensor, text_mask: torch.Tensor, feats: torch.Tensor, feat_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens/text_mask/feat_mask [B, T], feats [B, T, P, D] -> (LM inputs [B, T, H], patch embeds [B, T, H])."""
        dt = self.lm_param_dtype()
        feat_embed = self.enc_to_lm_proj(self.feat_encoder(feats.to(dt)))
        text_embed = self.base_lm.embed_tokens(tokens) * self.emb_scale
        combined = text_mask.unsqueeze(-1).to(dt) * text_embed + feat_mask.unsqueeze(-1).to(dt) * feat_embed
        return combined, feat_embed

    def fsq_mix(self, enc: torch.Tensor, text_mask: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
        """FSQ on audio positions, identity on text positions, zero on padding. [B, T, H]."""
        dt = enc.dtype
        return self.fsq_layer(enc) * feat_mask.unsqueeze(-1).to(dt) + enc * text_mask.unsqueeze(-1).to(dt)

    def residual_inputs(self, lm_h: torch.Tensor, feat_embed: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
        return self.fusion_concat_proj(torch.cat((lm_h, feat_mask.unsqueeze(-1).to(lm_h.dtype) * feat_embed), -1))

    def dit_condition(self, lm_h: torch.Tensor, res_h: torch.Tensor) -> torch.Tensor:
        """[..., H] x2 -> mu [..., 2 * Hd]."""
        return torch.cat((self.lm_to_dit_proj(lm_h), self.res_to_dit_proj(res_h)), dim=-1)

    def stop_logits(self, lm_h: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., 2] (index 1 = stop)."""
        return self.stop_head(F.silu(self.stop_proj(lm_h)))

    def velocity(
        self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, cfg_value: float
    ) -> torch.Tensor:
        """Guided LocDiT velocity. x, cond [N, D, P]; mu [N, 2Hd]; t [N] or 0-dim -> [N, D, P]."""
        return guided_velocity(self.feat_decoder.estimator, x, mu, t, cond, cfg_value)

    def lm_hidden_states(
        self,
        tokens: torch.Tensor,
        text_mask: torch.Tensor,
        feats: torch.Tensor,
        feat_mask: torch.Tensor,
        valid: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal pass of both LMs. Returns (lm_h after FSQ mix [B, T, H], res_h [B, T, H]).

        Row t of each output is what conditions the patch that follows position t.
        """
        combined, feat_embed = self.embed_inputs(tokens, text_mask, feats, feat_mask)
        enc = self.base_lm(combined, causal=True, pos=pos, valid=valid)
        lm_h = self.fsq_mix(enc, text_mask, feat_mask)
        res = self.residual_lm(self.residual_inputs(lm_h, feat_embed, feat_mask), causal=True, pos=pos, valid=valid)
        return lm_h, res
