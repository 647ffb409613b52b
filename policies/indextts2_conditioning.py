"""The speech-conditioning modules of IndexTTS2's GPT (`UnifiedVoice`): a WeNet-style conformer and a perceiver.

Our own implementation of the released architecture (index-tts `indextts/gpt/conformer_encoder.py`,
`indextts/gpt/conformer/*.py`, `indextts/gpt/perceiver.py`), inference only (no dropout, no streaming caches, full
attention). The module trees and parameter names equal the released `gpt.pth`'s sub-keys, so its tensors under
`conditioning_encoder.*` / `emo_conditioning_encoder.*` load strictly into `ConformerEncoder`, and those under
`perceiver_encoder.*` / `emo_perceiver_encoder.*` into `PerceiverResampler`.

`UnifiedVoice` uses them as

    feats [B, 1024, T] -> ConformerEncoder(feats.transpose(1, 2), lengths) -> (h [B, T', D], mask [B, 1, T'])
    -> PerceiverResampler(h, F.pad(mask.squeeze(1), (num_latents, 0), value=True)) -> [B, num_latents, dim]

Mask convention everywhere here: True = a valid (attended) position.

Two details of the release that a "clean" rewrite would get wrong, both kept on purpose:
- the "rel_pos" attention has no `rel_shift`: its position term is `(q + pos_bias_v) @ linear_pos(pe[:T])^T`,
  i.e. absolute sinusoid positions (the shift is commented out upstream);
- `embed.pos_enc.pe` is a persistent buffer ([1, 5000, D] in gpt.pth; third-party notes report the released table
  is the sinusoid rounded through bfloat16), so the loaded buffer, not a recomputed table, is what forward uses.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool, True for positions < length (upstream `~make_pad_mask(lengths, max_len)`)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------------------------------------------------
# conformer: positional encoding and input subsampling


class SinusoidalPositionalEncoding(nn.Module):
    """WeNet's `PositionalEncoding` ("abs_pos") / `RelPositionalEncoding` ("rel_pos") without dropout.

    x [B, T, D] -> (x * sqrt(D) (+ pe[:T] for abs_pos), pos_emb [1, T, D]).
    """

    pe: torch.Tensor

    def __init__(self, d_model: int, relative: bool, max_len: int = 5000) -> None:
        super().__init__()
        self.relative = relative
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len
        position = torch.arange(0, max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * -(math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))  # [1, max_len, D], persistent: it is in the released gpt.pth

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.size(1)
        if size >= self.max_len:
            raise ValueError(f"sequence of {size} frames does not fit the positional table of {self.max_len}")
        pos_emb = self.pe[:, :size].to(x.device)
        if self.relative:
            return x * self.xscale, pos_emb
        return x * self.xscale + pos_emb, pos_emb


class Subsampling(nn.Module):
    """WeNet's `LinearNoSubsampling` ("linear"), `Conv2dSubsampling2` ("conv2d2") and `Conv2dSubsampling4` ("conv2d").

    (x [B, T, idim], mask [B, 1, T]) -> (x [B, T', odim], pos_emb [1, T', odim], mask [B, 1, T']) with
    T' = T, (T - 1) // 2 and ((T - 1) // 2 - 1) // 2 respectively. Parameter names: `conv.{0,2}` (Conv2d),
    `out.0` (Linear), `out.1` (LayerNorm, "linear" only), `pos_enc.pe`.
    """

    def __init__(self, kind: str, idim: int, odim: int, pos_enc: SinusoidalPositionalEncoding) -> None:
        super().__init__()
        self.kind = kind
        self.conv: nn.Sequential | None
        if kind == "linear":
            self.conv = None
            self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        elif kind == "conv2d2":
            self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU())
            self.out = nn.Sequential(nn.Linear(odim * ((idim - 1) // 2), odim))
        elif kind == "conv2d":
            self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU(), nn.Conv2d(odim, odim, 3, 2), nn.ReLU())
            self.out = nn.Sequential(nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim))
        else:
            raise ValueError(f"unsupported input_layer {kind!r} (expected linear, conv2d2 or conv2d)")
        self.pos_enc = pos_enc

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.conv is not None:
            x = self.conv(x.unsqueeze(1))  # [B, C, T', F']
            b, c, t, f = x.shape
            x = x.transpose(1, 2).contiguous().view(b, t, c * f)
            # every stride-2 kernel-3 conv keeps the mask of frames 2, 4, 6, ... (upstream's `mask[:, :, 2::2]`)
            mask = mask[:, :, 2::2] if self.kind == "conv2d2" else mask[:, :, 2::2][:, :, 2::2]
        x, pos_emb = self.pos_enc(self.out(x))
        return x, pos_emb, mask


# --------------------------------------------------------------------------------------------------------------------
# conformer: the block's sub-modules


class MultiHeadedAttention(nn.Module):
    """WeNet self-attention; with `relative=True` its `RelPositionMultiHeadedAttention` (no rel_shift, as released).

    (x [B, T, D], mask [B, 1, T] key mask, pos_emb [1, T, D]) -> [B, T, D]. Fully masked rows give 0, not NaN.
    """

    def __init__(self, n_head: int, n_feat: int, relative: bool) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention dim {n_feat} is not divisible by {n_head} heads")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.relative = relative
        if relative:
            self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))  # [H, d_k]
            self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, d_k]
        return x.view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.linear_q(x)), self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        if self.relative:
            p = self._heads(self.linear_pos(pos_emb))  # [1, H, T, d_k]
            matrix_ac = torch.matmul(q + self.pos_bias_u[:, None, :], k.transpose(-2, -1))
            matrix_bd = torch.matmul(q + self.pos_bias_v[:, None, :], p.transpose(-2, -1))
            scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)  # [B, H, T, T]
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        padded = ~mask.unsqueeze(1)  # [B, 1, 1, T]
        scores = scores.masked_fill(padded, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(padded, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).contiguous().view(x.size(0), -1, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    """w_2(SiLU(w_1(x))): [B, T, D] -> [B, T, D]."""

    def __init__(self, idim: int, hidden_units: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Conformer conv module: pointwise conv -> GLU -> depthwise conv -> LayerNorm -> SiLU -> pointwise conv.

    (x [B, T, C], mask_pad [B, 1, T]) -> [B, T, C]; padded frames are zeroed before and after.
    """

    def __init__(self, channels: int, kernel_size: int = 15) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, kernel_size=1)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels
        )
        self.norm = nn.LayerNorm(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, mask_pad: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).masked_fill(~mask_pad, 0.0)  # [B, C, T]
        x = F.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(x)
        x = F.silu(self.norm(x.transpose(1, 2))).transpose(1, 2)
        x = self.pointwise_conv2(x).masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2)


class ConformerEncoderLayer(nn.Module):
    """One pre-norm conformer block (normalize_before=True, concat_after=False).

    (x [B, T, D], mask [B, 1, T], pos_emb [1, T, D]) -> [B, T, D].
    """

    def __init__(
        self, size: int, heads: int, linear_units: int, relative: bool, macaron: bool, cnn_kernel: int | None
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadedAttention(heads, size, relative)
        self.feed_forward = PositionwiseFeedForward(size, linear_units)
        self.feed_forward_macaron = PositionwiseFeedForward(size, linear_units) if macaron else None
        self.conv_module = ConvolutionModule(size, cnn_kernel) if cnn_kernel is not None else None
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        if macaron:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-5)
        if cnn_kernel is not None:
            self.norm_conv = nn.LayerNorm(size, eps=1e-5)
            self.norm_final = nn.LayerNorm(size, eps=1e-5)
        self.ff_scale = 0.5 if macaron else 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.feed_forward_macaron(self.norm_ff_macaron(x))
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        if self.conv_module is not None:
            x = x + self.conv_module(self.norm_conv(x), mask)
        x = x + self.ff_scale * self.feed_forward(self.norm_ff(x))
        if self.conv_module is not None:
            x = self.norm_final(x)
        return x


# --------------------------------------------------------------------------------------------------------------------
# conformer encoder


class ConformerEncoder(nn.Module):
    """IndexTTS2's `ConformerEncoder` (WeNet `BaseEncoder` + conformer blocks, SiLU, pre-norm, full attention).

    forward(xs [B, T, input_size], xs_lens [B]) -> (out [B, T', output_size], masks [B, 1, T'] bool, True = valid),
    T' set by `input_layer` (see `Subsampling`). Lengths are used as given (may exceed T: then all frames are valid).
    Defaults are the public constructor's; `UnifiedVoice` passes input_size=1024, output_size, linear_units,
    attention_heads, num_blocks and input_layer from its config and leaves the rest at their defaults.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        macaron_style: bool = False,
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
    ) -> None:
        super().__init__()
        if pos_enc_layer_type not in ("rel_pos", "abs_pos"):
            raise ValueError(f"unsupported pos_enc_layer_type {pos_enc_layer_type!r} (expected rel_pos or abs_pos)")
        relative = pos_enc_layer_type == "rel_pos"
        self._output_size = output_size
        pos_enc = SinusoidalPositionalEncoding(output_size, relative)
        self.embed = Subsampling(input_layer, input_size, output_size, pos_enc)
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)
        kernel = cnn_module_kernel if use_cnn_module else None
        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(output_size, attention_heads, linear_units, relative, macaron_style, kernel)
            for _ in range(num_blocks)
        )

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = valid_mask(xs_lens, xs.size(1)).unsqueeze(1)  # [B, 1, T]
        xs, pos_emb, masks = self.embed(xs, masks)  # [B, T', D], [1, T', D], [B, 1, T']
        for layer in self.encoders:
            xs = layer(xs, masks, pos_emb)
        return self.after_norm(xs), masks


# --------------------------------------------------------------------------------------------------------------------
# perceiver resampler (lucidrains' naturalspeech2 version, as vendored by index-tts)


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma over the last dim (F.normalize, eps 1e-12)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class GEGLU(nn.Module):
    """[..., 2n] -> [..., n]: gelu(second half) * first half (exact GELU; note the gate is the SECOND half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def perceiver_feed_forward(dim: int, mult: float) -> nn.Sequential:
    """Linear(dim, 2 * inner) -> GEGLU -> Linear(inner, dim), inner = int(dim * mult * 2 / 3) (keys `0.*`, `2.*`)."""
    dim_inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.Linear(dim, dim_inner * 2), GEGLU(), nn.Linear(dim_inner, dim))


class PerceiverAttention(nn.Module):
    """Latents attend to [latents | context] (`cross_attn_include_queries=True`), no biases, softmax scale d^-0.5.

    (latents [B, N, dim], context [B, M, dim], mask [B, N + M] bool or None, True = attend) -> [B, N, dim].
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        dim_inner = dim_head * heads
        self.to_q = nn.Linear(dim, dim_inner, bias=False)
        self.to_kv = nn.Linear(dim, dim_inner * 2, bias=False)
        self.to_out = nn.Linear(dim_inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, H * d] -> [B, H, N, d]
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        kv_input = torch.cat((latents, context), dim=-2)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q, k, v = self._heads(self.to_q(latents)), self._heads(k), self._heads(v)
        sim = torch.matmul(q, k.transpose(-2, -1)) * q.size(-1) ** -0.5  # [B, H, N, N + M]
        if mask is not None:
            # a large finite fill (not -inf): the latents are always attendable, so no row is fully masked
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = torch.matmul(sim.softmax(dim=-1), v)  # [B, H, N, d]
        out = out.transpose(1, 2).reshape(out.size(0), out.size(2), -1)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    """index-tts `PerceiverResampler`: `num_latents` learned queries resample a variable-length context.

    forward(x [B, M, dim_context], mask [B, num_latents + M] bool or None) -> [B, num_latents, dim]. The mask covers
    [latents | context] (UnifiedVoice: `F.pad(conformer_mask.squeeze(1), (num_latents, 0), value=True)`).
    Keys: `proj_context.*` (only when dim_context != dim), `latents`, `layers.{i}.0.{to_q,to_kv,to_out}.weight`,
    `layers.{i}.1.{0,2}.{weight,bias}`, `norm.gamma`. Defaults are the public constructor's (use_flash_attn=False).
    """

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        dim_context: int | None = None,
        num_latents: int = 32,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
    ) -> None:
        super().__init__()
        dim_context = dim if dim_context is None else dim_context
        self.proj_context: nn.Module = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        nn.init.normal_(self.latents, std=0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), perceiver_feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = self.proj_context(x)
        latents = self.latents.unsqueeze(0).expand(x.size(0), -1, -1)
        for block in self.layers:  # each: ModuleList([PerceiverAttention, feed-forward])
            attn, ff = cast(nn.ModuleList, block)
            latents = attn(latents, context, mask) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
