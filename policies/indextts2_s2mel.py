"""IndexTTS2's "s2mel" stage: codec embeddings -> 80-bin mel frames, this project's own code.

It is the part of the released `MyModel(cfg.s2mel, use_gpt_latent=True)` (index-tts `indextts/s2mel/modules/`)
that inference runs: `cfm` (a conditional flow-matching sampler whose estimator is a DiT: a gpt-fast style
transformer with adaptive RMSNorm, RoPE and U-ViT skips, then a WaveNet tail), `length_regulator` (nearest-neighbour
resampling of the codec embeddings to the mel frame count, then convolutions) and `gpt_layer` (three linears mapping
the GPT's last hidden states onto the codec-embedding width). Module and parameter names reproduce the released
`s2mel.pth` keys, so its tensors load strictly.

Released file (`s2mel.pth`, read by `load_checkpoint2`):

    {"net": {"cfm": {"estimator.transformer.layers.0.attention.wqkv.weight": ..., "estimator.input_pos": ..., ...},
             "length_regulator": {"content_in_proj.weight": ..., "model.0.weight": ..., ...},
             "gpt_layer": {"0.weight": ..., "0.bias": ..., "2.bias": ...},
             ...},            # other modules under "net" are not read by the released inference loader
     ...}                     # optimizer / epoch entries, likewise not read when loading parameters only

Weight-normed layers keep the released `torch.nn.utils.weight_norm` parameters `weight_g` / `weight_v`; the buffers
`cfm.estimator.input_pos` ([16384] positions) and `cfm.estimator.t_embedder{,2}.freqs` ([128]) are in the file and
are what forward uses. Some tensors are in the file but unused by inference (`x_embedder`, `cond_embedder`,
`content_mask_embedder`, the regulator's `embedding` / `mask_token`); they are kept so the file loads strictly.

Inference, as the released `infer_v2` decodes one segment (batch 1):

    latent [1, N, gpt_dim]  --gpt_layer-->  [1, N, in_channels]          (added to the codec embeddings S)
    S [1, N, in_channels], frames [1]  --regulate-->  cond [1, frames, channels]
    prompt_cond [1, Tp, channels] (the prompt's codec embeddings regulated to its Tp mel frames)
    cfm_inference([prompt_cond | cond], prompt_mel [1, 80, Tp], style [1, 192], noise [1, 80, Tp + T])
        -> mel [1, 80, T]   (25 Euler steps, classifier-free guidance 0.7, prompt frames dropped)

The config is config.yaml's `s2mel` section (`s2mel_config`, strict). Only the inference switches the released model
uses are implemented; the config refuses the others with a line naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rollouts.token2wav import VocoderCheckpointError, load_weights_only, strict_load

MODULES = ("cfm", "length_regulator", "gpt_layer")  # the released MyModel(use_gpt_latent=True).models keys
MAX_FRAMES = 16384  # the DiT's position table (block_size, hard-coded in the released DiT)
TIME_FREQS = 256  # the timestep embedder's sinusoid width (released default)
ROPE_BASE = 10000


class S2MelConfigError(ValueError):
    """config.yaml's s2mel section is incomplete or wrong (one line naming the file and the key)."""


# --------------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class MelSpec:
    """s2mel.preprocess_params: the prompt mel's analysis (released `mel_fn`, center=False)."""

    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float | None  # None: up to Nyquist


@dataclass(frozen=True)
class RegulatorConfig:
    """s2mel.length_regulator (continuous input, no vector quantizer)."""

    channels: int
    in_channels: int
    codebook_size: int  # content_codebook_size: the (unused) discrete embedding table's rows
    sampling_ratios: tuple[int, ...]  # one Conv1d/GroupNorm/Mish block per entry (the values themselves are unused)
    n_codebooks: int
    f0_condition: bool
    n_f0_bins: int


@dataclass(frozen=True)
class DiTConfig:
    """s2mel.DiT."""

    hidden_dim: int
    num_heads: int
    depth: int
    in_channels: int  # mel bins
    content_dim: int
    content_codebook_size: int
    style_condition: bool
    final_layer_type: str  # "wavenet" or "mlp"
    long_skip_connection: bool
    uvit_skip_connection: bool


@dataclass(frozen=True)
class WaveNetConfig:
    """s2mel.wavenet (the DiT's tail when final_layer_type is "wavenet")."""

    hidden_dim: int
    num_layers: int
    kernel_size: int
    dilation_rate: int


@dataclass(frozen=True)
class S2MelConfig:
    style_dim: int  # style_encoder.dim
    regulator: RegulatorConfig
    dit: DiTConfig
    wavenet: WaveNetConfig | None  # None when the section is absent (allowed only for final_layer_type "mlp")
    mel: MelSpec | None  # None when preprocess_params is absent


_REQUIRED = object()


class _Section:
    """One mapping of the s2mel section: unknown keys refused, typed reads naming `where` and the dotted key."""

    def __init__(self, data: Any, where: str, path: str, known: set[str], ignored: frozenset[str] = frozenset()):
        if not isinstance(data, dict):
            raise S2MelConfigError(f"{where}: {path} must be a mapping")
        for key in data:
            if key not in known and key not in ignored:
                raise S2MelConfigError(f"{where}: unknown key {path}.{key}")
        self.data, self.where, self.path = data, where, path

    def get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise S2MelConfigError(f"{self.where}: missing key {self.path}.{key}")
        return default

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise S2MelConfigError(f"{self.where}: {self.path}.{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def flag(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise S2MelConfigError(f"{self.where}: {self.path}.{key} must be true or false, got {value!r}")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise S2MelConfigError(f"{self.where}: {self.path}.{key} must be a number, got {value!r}")
        return float(value)

    def choice(self, key: str, choices: tuple[Any, ...], default: Any = _REQUIRED, why: str = "") -> Any:
        value = self.get(key, default)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            options = " or ".join(repr(c) for c in choices)
            raise S2MelConfigError(f"{self.where}: {self.path}.{key} must be {options}{why}, got {value!r}")
        return value


# keys of the released config.yaml that the released inference does not read (training-only, or never read)
IGNORED_KEYS = {
    "s2mel": frozenset({"reg_loss_type"}),  # the training loss
    "s2mel.length_regulator": frozenset({"quantizer_dropout"}),  # training only
    "s2mel.DiT": frozenset(
        {
            "class_dropout_prob",  # training only
            "block_size",  # the released DiT hard-codes 16384
            "target",
            "content_type",  # the released DiT always uses cond_projection (continuous content)
            "f0_condition",
            "n_f0_bins",
            "content_codebooks",
            "add_resblock_in_transformer",
        }
    ),
    "s2mel.wavenet": frozenset({"p_dropout"}),  # dropout, inactive in inference
}
_FIXED = " (the only value implemented, as released)"


def _mel_spec(data: Any, where: str) -> MelSpec:
    pre = _Section(data, where, "s2mel.preprocess_params", {"sr", "spect_params"})
    spect = _Section(
        pre.get("spect_params", _REQUIRED),
        where,
        "s2mel.preprocess_params.spect_params",
        {"n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax"},
    )
    # the released mel_fn reads fmax as: "None" -> Nyquist, anything else -> 8000
    fmax = spect.choice("fmax", ("None", 8000, 8000.0), default="None", why=" (the released mel_fn's two cases)")
    return MelSpec(
        sample_rate=pre.integer("sr"),
        n_fft=spect.integer("n_fft"),
        win_length=spect.integer("win_length"),
        hop_length=spect.integer("hop_length"),
        n_mels=spect.integer("n_mels"),
        fmin=spect.number("fmin", default=0),
        fmax=None if fmax == "None" else 8000.0,
    )


def _regulator(data: Any, where: str) -> RegulatorConfig:
    known = {"channels", "is_discrete", "in_channels", "content_codebook_size", "sampling_ratios", "vector_quantize"}
    known |= {"n_codebooks", "f0_condition", "n_f0_bins"}
    s = _Section(data, where, "s2mel.length_regulator", known, IGNORED_KEYS["s2mel.length_regulator"])
    s.choice("is_discrete", (False,), default=False, why=_FIXED)
    s.choice("vector_quantize", (False,), default=False, why=_FIXED)
    ratios = s.get("sampling_ratios", _REQUIRED)
    if not isinstance(ratios, list | tuple) or not ratios or not all(type(r) is int for r in ratios):
        raise S2MelConfigError(f"{where}: s2mel.length_regulator.sampling_ratios must be a non-empty list of integers")
    return RegulatorConfig(
        channels=s.integer("channels"),
        in_channels=s.integer("in_channels"),
        codebook_size=s.integer("content_codebook_size"),
        sampling_ratios=tuple(ratios),
        n_codebooks=s.integer("n_codebooks", default=1),
        f0_condition=s.flag("f0_condition", default=False),
        n_f0_bins=s.integer("n_f0_bins", default=512),
    )


def _dit(data: Any, where: str) -> DiTConfig:
    known = {"hidden_dim", "num_heads", "depth", "in_channels", "content_dim", "content_codebook_size"}
    known |= {"style_condition", "final_layer_type", "long_skip_connection", "uvit_skip_connection", "is_causal"}
    known |= {"time_as_token", "style_as_token", "zero_prompt_speech_token"}
    s = _Section(data, where, "s2mel.DiT", known, IGNORED_KEYS["s2mel.DiT"])
    for key in ("is_causal", "time_as_token", "style_as_token", "zero_prompt_speech_token"):
        s.choice(key, (False,), default=False, why=_FIXED)
    cfg = DiTConfig(
        hidden_dim=s.integer("hidden_dim"),
        num_heads=s.integer("num_heads"),
        depth=s.integer("depth"),
        in_channels=s.integer("in_channels"),
        content_dim=s.integer("content_dim"),
        content_codebook_size=s.integer("content_codebook_size"),
        style_condition=s.flag("style_condition"),
        final_layer_type=s.choice("final_layer_type", ("wavenet", "mlp")),
        long_skip_connection=s.flag("long_skip_connection"),
        uvit_skip_connection=s.flag("uvit_skip_connection", default=False),
    )
    head_dim = cfg.hidden_dim // cfg.num_heads
    if cfg.hidden_dim % cfg.num_heads or head_dim % 2:
        raise S2MelConfigError(f"{where}: s2mel.DiT.hidden_dim must be num_heads times an even head size")
    return cfg


def s2mel_config(section: Any, where: str) -> S2MelConfig:
    """config.yaml's `s2mel` section, strictly: unknown keys, missing keys, wrong types, and values of switches this
    implementation does not have are S2MelConfigError naming `where` and the key. Keys of the released file that its
    inference does not read are accepted and ignored (IGNORED_KEYS)."""
    known = {"preprocess_params", "dit_type", "style_encoder", "length_regulator", "DiT", "wavenet"}
    top = _Section(section, where, "s2mel", known, IGNORED_KEYS["s2mel"])
    top.choice("dit_type", ("DiT",), default="DiT", why=_FIXED)
    style = _Section(top.get("style_encoder", _REQUIRED), where, "s2mel.style_encoder", {"dim"})
    regulator = _regulator(top.get("length_regulator", _REQUIRED), where)
    dit = _dit(top.get("DiT", _REQUIRED), where)
    wavenet = None
    if "wavenet" in section or dit.final_layer_type == "wavenet":
        w = _Section(
            top.get("wavenet", _REQUIRED),
            where,
            "s2mel.wavenet",
            {"hidden_dim", "num_layers", "kernel_size", "dilation_rate", "style_condition"},
            IGNORED_KEYS["s2mel.wavenet"],
        )
        wavenet = WaveNetConfig(
            w.integer("hidden_dim"), w.integer("num_layers"), w.integer("kernel_size"), w.integer("dilation_rate")
        )
        if wavenet.kernel_size % 2 == 0:
            raise S2MelConfigError(f"{where}: s2mel.wavenet.kernel_size must be odd")
        style_condition = w.flag("style_condition")
        if dit.final_layer_type == "wavenet" and style_condition != dit.style_condition:
            raise S2MelConfigError(f"{where}: s2mel.wavenet.style_condition must equal s2mel.DiT.style_condition")
    mel = _mel_spec(section["preprocess_params"], where) if "preprocess_params" in section else None
    if mel is not None and mel.n_mels != dit.in_channels:
        raise S2MelConfigError(f"{where}: s2mel.preprocess_params.spect_params.n_mels must equal s2mel.DiT.in_channels")
    if regulator.channels != dit.content_dim:
        raise S2MelConfigError(f"{where}: s2mel.length_regulator.channels must equal s2mel.DiT.content_dim")
    return S2MelConfig(style.integer("dim"), regulator, dit, wavenet, mel)


# --------------------------------------------------------------------------------------------------------------------
# weight-normed layers (the released torch.nn.utils.weight_norm parameters: weight = g * v / |v| per output row)


class _WNLinear(nn.Module):
    """A Linear with weight_g [out, 1], weight_v [out, in], bias [out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        v = torch.empty(n_out, n_in)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias)


class _WNConv1d(nn.Module):
    """A stride-1 Conv1d without padding, with weight_g [out, 1, 1], weight_v [out, in, k], bias [out]."""

    def __init__(self, n_in: int, n_out: int, kernel: int, dilation: int):
        super().__init__()
        v = torch.empty(n_out, n_in, kernel)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(v.norm(dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(v)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.dilation = dilation

    def forward(self, x: Tensor) -> Tensor:  # [B, in, T + (k - 1) * dilation] -> [B, out, T]
        weight = torch._weight_norm(self.weight_v, self.weight_g, 0)
        return F.conv1d(x, weight, self.bias, dilation=self.dilation)


class _NormConv1d(nn.Module):
    """Holds the conv as `.conv` (the released NormConv1d; its norm is the identity for weight_norm)."""

    def __init__(self, n_in: int, n_out: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = _WNConv1d(n_in, n_out, kernel, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _reflect_pad(x: Tensor, left: int, right: int) -> Tensor:
    """[B, C, T] -> [B, C, left + T + right], reflect padding; inputs too short to reflect get zeros appended first
    and cut again afterwards (the released pad1d)."""
    extra = max(left, right) - x.shape[-1] + 1 if x.shape[-1] <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode="reflect")
    return padded[..., : padded.shape[-1] - extra]


class _SameConv1d(nn.Module):
    """The released SConv1d as WaveNet uses it (stride 1, not causal): reflect padding to keep the length, the
    extra sample on the left for even total padding, then the weight-normed conv under `.conv.conv`."""

    def __init__(self, n_in: int, n_out: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.conv = _NormConv1d(n_in, n_out, kernel, dilation)
        self.total_pad = (kernel - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:  # [B, in, T] -> [B, out, T]
        right = self.total_pad // 2
        return self.conv(_reflect_pad(x, self.total_pad - right, right))


class WaveNet(nn.Module):
    """The released WN (gated dilated convolutions, global conditioning g; dropout inactive in inference)."""

    def __init__(self, cfg: WaveNetConfig):
        super().__init__()
        h, n = cfg.hidden_dim, cfg.num_layers
        self.hidden, self.n_layers = h, n
        self.cond_layer = _SameConv1d(h, 2 * h * n, 1)
        self.in_layers = nn.ModuleList(_SameConv1d(h, 2 * h, cfg.kernel_size, cfg.dilation_rate**i) for i in range(n))
        self.res_skip_layers = nn.ModuleList(_SameConv1d(h, 2 * h if i < n - 1 else h, 1) for i in range(n))

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor) -> Tensor:
        # x [B, H, T], x_mask [B|1, 1, T] bool, g [B, H, 1] -> [B, H, T]
        h = self.hidden
        out = torch.zeros_like(x)
        g = self.cond_layer(g)
        for i in range(self.n_layers):
            act = self.in_layers[i](x) + g[:, 2 * h * i : 2 * h * (i + 1), :]
            tanh_part, sigmoid_part = torch.split(act, h, dim=1)
            res_skip = self.res_skip_layers[i](torch.tanh(tanh_part) * torch.sigmoid(sigmoid_part))
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :h, :]) * x_mask
                out = out + res_skip[:, h:, :]
            else:
                out = out + res_skip
        return out * x_mask


# --------------------------------------------------------------------------------------------------------------------
# the DiT's transformer (gpt-fast style: adaptive RMSNorm, RoPE, SwiGLU, U-ViT skips; full attention)


def _rope_table(head_dim: int, length: int = MAX_FRAMES) -> Tensor:
    """[length, head_dim // 2, 2] (cos, sin) of position * base^(-2i/head_dim), computed over the whole table as the
    released setup_caches does (so every row has the same bits)."""
    inv = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length), inv)
    rot = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([rot.real, rot.imag], dim=-1)


def _rotate(x: Tensor, rope: Tensor) -> Tensor:
    """x [B, T, H, D], rope [T, D // 2, 2] -> [B, T, H, D]: each (even, odd) pair rotated by its position's angle."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    r = rope.view(1, pairs.size(1), 1, pairs.size(3), 2)
    out = torch.stack(
        [
            pairs[..., 0] * r[..., 0] - pairs[..., 1] * r[..., 1],
            pairs[..., 1] * r[..., 0] + pairs[..., 0] * r[..., 1],
        ],
        -1,
    )
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., D] -> [..., D]
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose scale and shift come from the timestep embedding (released AdaptiveLayerNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = RMSNorm(dim)
        self.dim = dim

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, T, D], c [B, 1, D] -> [B, T, D]
        scale, shift = torch.split(self.project_layer(c), self.dim, dim=-1)
        return scale * self.norm(x) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.n_heads, self.head_dim = n_heads, dim // n_heads

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor) -> Tensor:
        # x [B, T, D], rope [T, Dh / 2, 2], mask [B|1, 1, T, T] bool (True = attend) -> [B, T, D]
        b, t, d = x.shape
        q, k, v = self.wqkv(x).split([d, d, d], dim=-1)
        q = _rotate(q.view(b, t, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = _rotate(k.view(b, t, self.n_heads, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        # as released: k and v go through repeat_interleave(1) (grouped-query expansion with one group), i.e. a copy
        k, v = k.repeat_interleave(1, dim=1), v.repeat_interleave(1, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(b, t, d))


def _ffn_width(dim: int) -> int:
    """The released gpt-fast intermediate size: 2/3 of 4 * dim, rounded up to a multiple of 256."""
    n = int(2 * 4 * dim / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        width = _ffn_width(dim)
        self.w1 = nn.Linear(dim, width, bias=False)
        self.w3 = nn.Linear(dim, width, bias=False)
        self.w2 = nn.Linear(width, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, T, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, uvit_skip: bool):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim)
        self.ffn_norm = AdaptiveRMSNorm(dim)
        self.attention_norm = AdaptiveRMSNorm(dim)
        if uvit_skip:
            self.skip_in_linear = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor, c: Tensor, rope: Tensor, mask: Tensor, skip: Tensor | None) -> Tensor:
        # x [B, T, D], c [B, 1, D], skip [B, T, D] or None -> [B, T, D]
        if skip is not None:
            x = self.skip_in_linear(torch.cat([x, skip], dim=-1))
        h = x + self.attention(self.attention_norm(x, c), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h, c))


class Transformer(nn.Module):
    """U-ViT skips (when enabled): block i < depth // 2 emits its output; block i > depth // 2 takes the most recent
    unused emission (last in, first out)."""

    rope: Tensor  # [MAX_FRAMES, head_dim / 2, 2], not in the file (the released setup_caches table)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.layers = nn.ModuleList(
            TransformerBlock(d, cfg.num_heads, cfg.uvit_skip_connection) for _ in range(cfg.depth)
        )
        self.norm = AdaptiveRMSNorm(d)
        self.uvit_skip = cfg.uvit_skip_connection
        self.register_buffer("rope", _rope_table(d // cfg.num_heads), persistent=False)

    def forward(self, x: Tensor, c: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        # x [B, T, D], c [B, 1, D], positions [T], mask [B|1, 1, T, T] -> [B, T, D]
        rope = self.rope[positions]
        half = len(self.layers) // 2
        skips: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            skip = skips.pop() if self.uvit_skip and i > half else None
            x = layer(x, c, rope, mask, skip)
            if self.uvit_skip and i < half:
                skips.append(x)
        return self.norm(x, c)


# --------------------------------------------------------------------------------------------------------------------
# the DiT estimator and the flow-matching sampler


class TimestepEmbedder(nn.Module):
    """t [B] in [0, 1] -> [B, D]: sinusoids of 1000 t (the `freqs` buffer, in the file), then an MLP."""

    freqs: Tensor  # [TIME_FREQS / 2]

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQS, dim), nn.SiLU(), nn.Linear(dim, dim))
        half = TIME_FREQS // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half))

    def forward(self, t: Tensor) -> Tensor:
        args = 1000 * t[:, None].float() * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by the timestep embedding, then a weight-normed linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = _WNLinear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, T, D], c [B, D] -> [B, T, out]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


class DiT(nn.Module):
    """The flow's velocity estimator: [noisy mel | prompt mel | content | style] per frame -> velocity per frame."""

    input_pos: Tensor  # [MAX_FRAMES] int64 positions (in the file)

    def __init__(self, cfg: S2MelConfig):
        super().__init__()
        d, mel = cfg.dit.hidden_dim, cfg.dit.in_channels
        self.transformer = Transformer(cfg.dit)
        self.x_embedder = _WNLinear(mel, d)  # in the file, unused by forward (as released)
        self.cond_embedder = nn.Embedding(cfg.dit.content_codebook_size, d)  # likewise (discrete content)
        self.cond_projection = nn.Linear(cfg.dit.content_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.register_buffer("input_pos", torch.arange(MAX_FRAMES))
        self.wavenet_tail = cfg.dit.final_layer_type == "wavenet"
        if self.wavenet_tail:
            assert cfg.wavenet is not None  # s2mel_config requires the section for this tail
            w = cfg.wavenet.hidden_dim
            self.t_embedder2 = TimestepEmbedder(w)
            self.conv1 = nn.Linear(d, w)
            self.conv2 = nn.Conv1d(w, mel, 1)
            self.wavenet = WaveNet(cfg.wavenet)
            self.final_layer = FinalLayer(w, w)
            self.res_projection = nn.Linear(d, w)
        else:
            self.final_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, mel))
        self.content_mask_embedder = nn.Embedding(1, d)  # in the file, training only
        self.skip_linear = nn.Linear(d + mel, d)
        self.style_condition, self.long_skip = cfg.dit.style_condition, cfg.dit.long_skip_connection
        self.cond_x_merge_linear = nn.Linear(d + 2 * mel + cfg.style_dim * self.style_condition, d)

    def forward(self, x: Tensor, prompt_x: Tensor, x_lens: Tensor, t: Tensor, style: Tensor, cond: Tensor) -> Tensor:
        # x, prompt_x [B, mel, T]; x_lens [B|1] valid frames; t [B]; style [B, S]; cond [B, T, content] -> [B, mel, T]
        frames = x.shape[2]
        t1 = self.t_embedder(t)  # [B, D]
        x = x.transpose(1, 2)  # [B, T, mel]
        parts = [x, prompt_x.transpose(1, 2), self.cond_projection(cond)]
        if self.style_condition:
            parts.append(style[:, None, :].repeat(1, frames, 1))
        h = self.cond_x_merge_linear(torch.cat(parts, dim=-1))  # [B, T, D]
        positions = torch.arange(frames, dtype=x_lens.dtype, device=x_lens.device)
        x_mask = (positions[None, :] < x_lens[:, None]).unsqueeze(1)  # [B|1, 1, T]
        attn_mask = x_mask[:, None, :].repeat(1, 1, frames, 1)  # [B|1, 1, T, T]
        h = self.transformer(h, t1.unsqueeze(1), self.input_pos[:frames], attn_mask)
        if self.long_skip:
            h = self.skip_linear(torch.cat([h, x], dim=-1))
        if not self.wavenet_tail:
            return self.final_mlp(h).transpose(1, 2)
        y = self.conv1(h).transpose(1, 2)  # [B, W, T]
        y = self.wavenet(y, x_mask, self.t_embedder2(t).unsqueeze(2)).transpose(1, 2) + self.res_projection(h)
        return self.conv2(self.final_layer(y, t1).transpose(1, 2))


class FlowMatching(nn.Module):
    """The released CFM at inference: fixed-step Euler from noise (t = 0) to mel (t = 1), the prompt's frames given
    as condition and held at zero in the state, classifier-free guidance against an all-zero condition."""

    def __init__(self, cfg: S2MelConfig):
        super().__init__()
        self.estimator = DiT(cfg)

    def solve(self, z: Tensor, mu: Tensor, prompt: Tensor, style: Tensor, n_timesteps: int, cfg_rate: float) -> Tensor:
        # z [B, mel, T] noise; mu [B, T, C]; prompt [B, mel, Tp]; style [B, S] -> [B, mel, T] (first Tp frames zero)
        frames, p = z.shape[2], prompt.shape[-1]
        x_lens = torch.tensor([frames], dtype=torch.long, device=z.device)
        t_span = torch.linspace(0, 1, n_timesteps + 1, device=z.device)
        prompt_x = torch.zeros_like(z)
        prompt_x[..., :p] = prompt
        x = z.clone()
        x[..., :p] = 0
        guided = cfg_rate > 0
        if guided:  # the conditioned and the unconditioned (all-zero) rows run as one batch, as released
            prompt_in = torch.cat([prompt_x, torch.zeros_like(prompt_x)])
            style_in, mu_in = torch.cat([style, torch.zeros_like(style)]), torch.cat([mu, torch.zeros_like(mu)])
        else:
            prompt_in, style_in, mu_in = prompt_x, style, mu
        t = t_span[0]
        for step in range(1, n_timesteps + 1):
            dt = t_span[step] - t_span[step - 1]
            x_in = torch.cat([x, x]) if guided else x
            velocity = self.estimator(x_in, prompt_in, x_lens, t.reshape(1).repeat(x_in.shape[0]), style_in, mu_in)
            if guided:
                conditioned, free = velocity.chunk(2, dim=0)
                velocity = (1.0 + cfg_rate) * conditioned - cfg_rate * free
            x = x + dt * velocity
            t = t + dt  # accumulated, as released (not t_span[step])
            x[:, :, :p] = 0
        return x


# --------------------------------------------------------------------------------------------------------------------
# the length regulator and the whole stage


class LengthRegulator(nn.Module):
    """The released InterpolateRegulator for continuous input: content_in_proj, nearest-neighbour resampling to the
    target frame count, [Conv1d(k=3), GroupNorm(1), Mish] per sampling ratio, a 1x1 Conv1d, frames past each row's
    length zeroed. The discrete tables (embedding, extra codebooks, mask tokens) are in the file but unused."""

    def __init__(self, cfg: RegulatorConfig):
        super().__init__()
        c = cfg.channels
        blocks: list[nn.Module] = []
        for _ in cfg.sampling_ratios:
            blocks += [nn.Conv1d(c, c, 3, 1, 1), nn.GroupNorm(1, c), nn.Mish()]
        self.model = nn.Sequential(*blocks, nn.Conv1d(c, c, 1, 1))
        self.embedding = nn.Embedding(cfg.codebook_size, c)
        self.mask_token = nn.Parameter(torch.zeros(1, c))
        if cfg.n_codebooks > 1:
            self.extra_codebooks = nn.ModuleList(nn.Embedding(cfg.codebook_size, c) for _ in range(cfg.n_codebooks - 1))
            self.extra_codebook_mask_tokens = nn.ParameterList(
                nn.Parameter(torch.zeros(1, c)) for _ in range(cfg.n_codebooks - 1)
            )
        self.f0_condition = cfg.f0_condition
        if cfg.f0_condition:
            self.f0_embedding = nn.Embedding(cfg.n_f0_bins, c)
            self.f0_mask = nn.Parameter(torch.zeros(1, c))
        self.content_in_proj = nn.Linear(cfg.in_channels, c)

    def forward(self, x: Tensor, ylens: Tensor) -> Tensor:  # x [B, T, in], ylens [B] -> [B, max(ylens), C]
        frames = int(ylens.max())
        x = F.interpolate(self.content_in_proj(x).transpose(1, 2).contiguous(), size=frames, mode="nearest")
        if self.f0_condition:  # no f0 given: the "unknown f0" vector on every frame
            x = x + self.f0_mask.unsqueeze(-1)
        mask = (torch.arange(frames, dtype=ylens.dtype, device=ylens.device)[None, :] < ylens[:, None]).unsqueeze(-1)
        return self.model(x).transpose(1, 2).contiguous() * mask


class S2Mel(nn.Module):
    """The released s2mel modules used by inference: `cfm`, `length_regulator`, `gpt_layer` (state-dict prefixes
    as in s2mel.pth's "net"). `gpt_layer` maps gpt_dim -> 256 -> 128 -> length_regulator.in_channels (released:
    1280 -> 256 -> 128 -> 1024, hard-coded there)."""

    def __init__(self, cfg: S2MelConfig, gpt_dim: int = 1280):
        super().__init__()
        self.cfg, self.gpt_dim = cfg, gpt_dim
        self.cfm = FlowMatching(cfg)
        self.length_regulator = LengthRegulator(cfg.regulator)
        self.gpt_layer = nn.Sequential(
            nn.Linear(gpt_dim, 256), nn.Linear(256, 128), nn.Linear(128, cfg.regulator.in_channels)
        )

    def regulate(self, x: Tensor, ylens: Tensor) -> Tensor:
        """x [B, T, in_channels] codec embeddings (+ gpt_layer latents), ylens [B] target mel frames
        -> [B, max(ylens), channels], rows zero past their length (released length_regulator(x, ylens,
        n_quantizers=3, f0=None)[0] in eval mode)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.regulator.in_channels:
            raise ValueError(f"regulate: x must be [B, T, {self.cfg.regulator.in_channels}], got {tuple(x.shape)}")
        if ylens.shape != (x.shape[0],) or int(ylens.min()) < 1:
            raise ValueError(f"regulate: ylens must be [B] positive frame counts, got {ylens.tolist()}")
        return self.length_regulator(x, ylens)

    def cfm_inference(
        self, cond: Tensor, prompt_mel: Tensor, style: Tensor, *, n_timesteps: int, cfg_rate: float, noise: Tensor
    ) -> Tensor:
        """cond [B, Tp + T, channels] = [prompt condition | target condition]; prompt_mel [B, mel, Tp];
        style [B, style_dim]; noise [B, mel, Tp + T] the initial state (not modified) -> [B, mel, T], the target
        frames (the released cfm.inference(cond, [Tp + T], prompt_mel, style, None, n_timesteps,
        inference_cfg_rate=cfg_rate) with z = noise, then [..., Tp:]). The released code runs batch 1; rows of a
        batch here share Tp and T. Gradients follow the caller's grad mode."""
        mel, frames = self.cfg.dit.in_channels, cond.shape[1]
        b = cond.shape[0]
        want = {
            "cond": (cond, (b, frames, self.cfg.regulator.channels)),
            "prompt_mel": (prompt_mel, (b, mel, prompt_mel.shape[-1])),
            "style": (style, (b, self.cfg.style_dim)),
            "noise": (noise, (b, mel, frames)),
        }
        for name, (tensor, shape) in want.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"cfm_inference: {name} must be {list(shape)}, got {list(tensor.shape)}")
        if not prompt_mel.shape[-1] < frames <= MAX_FRAMES:
            raise ValueError(
                f"cfm_inference: need Tp < Tp + T <= {MAX_FRAMES}, got Tp {prompt_mel.shape[-1]}, {frames}"
            )
        if n_timesteps < 1:
            raise ValueError(f"cfm_inference: n_timesteps must be >= 1, got {n_timesteps}")
        out = self.cfm.solve(noise, cond, prompt_mel, style, n_timesteps, cfg_rate)
        return out[:, :, prompt_mel.shape[-1] :]


# --------------------------------------------------------------------------------------------------------------------
# the file


def load_s2mel(path: str | Path, cfg: S2MelConfig, gpt_dim: int = 1280, device: str | torch.device = "cpu") -> S2Mel:
    """S2Mel from a released-layout s2mel.pth, in eval mode on `device`. Strict: the file must hold net.cfm,
    net.length_regulator and net.gpt_layer (the released loader would leave a missing one at random init), and one
    VocoderCheckpointError names the file and every missing, unexpected or mis-shaped key. As the released loader
    does, a leading "module." (DDP) is dropped from keys, and other entries (other modules under "net", optimizer
    state) are not read."""
    path = Path(path)
    obj = load_weights_only(path)
    net = obj.get("net") if isinstance(obj, dict) else None
    if not isinstance(net, dict):
        raise VocoderCheckpointError(f'{path}: expected the released layout {{"net": {{"cfm": ..., ...}}}}')
    absent = [m for m in MODULES if m not in net]
    if absent:
        raise VocoderCheckpointError(f"{path}: net has no {', '.join(absent)} (it has {', '.join(map(str, net))})")
    state: dict[str, Tensor] = {}
    for name in MODULES:
        sub = net[name]
        if not isinstance(sub, dict) or not all(isinstance(v, Tensor) for v in sub.values()):
            raise VocoderCheckpointError(f"{path}: net.{name} must be a state dict of tensors")
        state.update({f"{name}.{k.removeprefix('module.')}": v for k, v in sub.items()})
    model = S2Mel(cfg, gpt_dim)
    strict_load(model, state, str(path))
    return model.to(device).eval()


def save_s2mel(model: S2Mel, path: str | Path) -> None:
    """s2mel.pth in the released layout {"net": {"cfm", "length_regulator", "gpt_layer"}} (written atomically)."""
    path = Path(path)
    net = {
        name: {k: v.detach().cpu().contiguous() for k, v in getattr(model, name).state_dict().items()}
        for name in MODULES
    }
    tmp = path.with_name(path.name + ".partial")
    torch.save({"net": net}, tmp)
    tmp.replace(path)


TINY_S2MEL: dict[str, Any] = {  # the released section's keys and switches at tiny widths, 80 mels, 192 style
    "preprocess_params": {
        "sr": 22050,
        "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80, "fmin": 0, "fmax": "None"},
    },
    "dit_type": "DiT",
    "reg_loss_type": "l1",
    "style_encoder": {"dim": 192},
    "length_regulator": {
        "channels": 32,
        "is_discrete": False,
        "in_channels": 32,  # the codec embeddings' width: semantic_codec.hidden_size (released 1024; tiny codec 32)
        "content_codebook_size": 16,
        "sampling_ratios": [1, 1],
        "vector_quantize": False,
        "n_codebooks": 1,
        "quantizer_dropout": 0.0,
        "f0_condition": False,
        "n_f0_bins": 16,
    },
    "DiT": {
        "hidden_dim": 32,
        "num_heads": 2,
        "depth": 3,
        "class_dropout_prob": 0.1,
        "block_size": 8192,
        "in_channels": 80,
        "style_condition": True,
        "final_layer_type": "wavenet",
        "target": "mel",
        "content_dim": 32,
        "content_codebook_size": 16,
        "content_type": "discrete",
        "f0_condition": False,
        "n_f0_bins": 16,
        "content_codebooks": 1,
        "is_causal": False,
        "long_skip_connection": True,
        "zero_prompt_speech_token": False,
        "time_as_token": False,
        "style_as_token": False,
        "uvit_skip_connection": True,
        "add_resblock_in_transformer": False,
    },
    "wavenet": {
        "hidden_dim": 32,
        "num_layers": 2,
        "kernel_size": 5,
        "dilation_rate": 1,
        "p_dropout": 0.2,
        "style_condition": True,
    },
}


def randomize_(model: nn.Module, seed: int) -> None:
    """Every parameter drawn at a scale that keeps activations O(1) (norm scales and weight-norm gains near 1,
    matrices ~ N(0, 1 / fan_in), vectors ~ N(0, 0.1^2)); the global RNG is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight_g") or (p.dim() == 1 and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * noise)


def write_tiny_s2mel(path: str | Path, section: dict[str, Any] = TINY_S2MEL, gpt_dim: int = 64, seed: int = 0) -> None:
    """A random S2Mel for `section` (a config.yaml s2mel section) written to `path` in the released layout."""
    model = S2Mel(s2mel_config(section, "tiny s2mel section"), gpt_dim)
    randomize_(model, seed)
    save_s2mel(model, path)
