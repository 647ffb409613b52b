"""AudioVAE V2 of VoxCPM2: a causal conv VAE, 16 kHz waveform -> 25 Hz latents -> 48 kHz waveform.

Our own implementation of the released architecture, with the same module tree and parameter names, so the
released `audiovae.safetensors` / `audiovae.pth` loads strictly. Weight-normed convolutions keep the legacy
`weight_g` / `weight_v` parameters of the released checkpoints (norm over every dim except dim 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from policies.voxcpm_config import AudioVAEConfig


class WNConv(nn.Module):
    """Weight-normed causal Conv1d / ConvTranspose1d (left padding, or right trimming for the transpose)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding: int = 0,
        output_padding: int = 0,
        bias: bool = True,
        transpose: bool = False,
    ) -> None:
        super().__init__()
        self.transpose, self.stride, self.dilation, self.groups = transpose, stride, dilation, groups
        self.causal = padding * 2 - output_padding
        shape = (cin, cout // groups, kernel_size) if transpose else (cout, cin // groups, kernel_size)
        v = torch.empty(shape)
        nn.init.trunc_normal_(v, std=0.02)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).view(-1, 1, 1).clone())
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.flatten(1).norm(dim=1).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C', T']
        if self.transpose:
            y = F.conv_transpose1d(
                x, self.weight(), self.bias, stride=self.stride, groups=self.groups, dilation=self.dilation
            )
            return y[..., : y.shape[-1] - self.causal] if self.causal > 0 else y
        x = F.pad(x, (self.causal, 0))
        return F.conv1d(x, self.weight(), self.bias, stride=self.stride, dilation=self.dilation, groups=self.groups)


class Snake1d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1)
        x = x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)
        return x.reshape(shape)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int, groups: int = 1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv(dim, dim, 7, dilation=dilation, padding=3 * dilation, groups=groups),
            Snake1d(dim),
            WNConv(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1, groups),
            ResidualUnit(half, 3, groups),
            ResidualUnit(half, 9, groups),
            Snake1d(half),
            WNConv(half, dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2), output_padding=stride % 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, d_model: int, latent_dim: int, strides: list[int], depthwise: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [WNConv(1, d_model, 7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride, groups=d_model // 2 if depthwise else 1))
        self.block = nn.Sequential(*layers)
        self.fc_mu = WNConv(d_model, latent_dim, 3, padding=1)
        self.fc_logvar = WNConv(d_model, latent_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, S] -> mu [B, D, S / hop]
        return self.fc_mu(self.block(x))


class NoiseBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = WNConv(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn((x.shape[0], 1, x.shape[2]), device=x.device, dtype=x.dtype)
        return x + noise * self.linear(x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, use_noise_block: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Snake1d(cin),
            WNConv(
                cin,
                cout,
                2 * stride,
                stride=stride,
                padding=math.ceil(stride / 2),
                output_padding=stride % 2,
                transpose=True,
            ),
        ]
        if use_noise_block:
            layers.append(NoiseBlock(cout))
        layers += [ResidualUnit(cout, 1, groups), ResidualUnit(cout, 3, groups), ResidualUnit(cout, 9, groups)]
        self.block = nn.Sequential(*layers)
        self.input_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class SampleRateCondition(nn.Module):
    def __init__(self, dim: int, buckets: int, cond_type: str, cond_dim: int, out_layer: bool) -> None:
        super().__init__()
        self.cond_type, in_dim = cond_type, dim
        if cond_type in ("scale_bias", "scale_bias_init"):
            self.scale_embed = nn.Embedding(buckets, dim)
            self.bias_embed = nn.Embedding(buckets, dim)
            nn.init.ones_(self.scale_embed.weight)
            nn.init.zeros_(self.bias_embed.weight)
        elif cond_type == "add":
            self.cond_embed = nn.Embedding(buckets, dim)
        elif cond_type == "concat":
            if not out_layer:
                raise ValueError("audio_vae_config: cond_type 'concat' needs cond_out_layer=true")
            self.cond_embed = nn.Embedding(buckets, cond_dim)
            in_dim = dim + cond_dim
        else:
            raise ValueError(f"audio_vae_config: unknown cond_type {cond_type!r}")
        self.out_layer = nn.Sequential(Snake1d(in_dim), WNConv(in_dim, dim, 1)) if out_layer else nn.Identity()

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # x [B, C, T], idx [B] or [1]
        if self.cond_type in ("scale_bias", "scale_bias_init"):
            x = x * self.scale_embed(idx).unsqueeze(-1) + self.bias_embed(idx).unsqueeze(-1)
        elif self.cond_type == "add":
            x = x + self.cond_embed(idx).unsqueeze(-1)
        else:
            x = torch.cat([x, self.cond_embed(idx).unsqueeze(-1).expand(-1, -1, x.shape[-1])], dim=1)
        return self.out_layer(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AudioVAEConfig) -> None:
        super().__init__()
        cin, ch = cfg.latent_dim, cfg.decoder_dim
        if cfg.depthwise:
            layers: list[nn.Module] = [WNConv(cin, cin, 7, padding=3, groups=cin), WNConv(cin, ch, 1)]
        else:
            layers = [WNConv(cin, ch, 7, padding=3)]
        out = ch
        for i, stride in enumerate(cfg.decoder_rates):
            inp, out = ch // 2**i, ch // 2 ** (i + 1)
            layers.append(DecoderBlock(inp, out, stride, out if cfg.depthwise else 1, cfg.use_noise_block))
        layers += [Snake1d(out), WNConv(out, 1, 7, padding=3), nn.Tanh()]
        if cfg.sr_bin_boundaries is None:
            self.model = nn.Sequential(*layers)
            self.sr_cond_model = None
        else:
            self.model = nn.ModuleList(layers)
            self.register_buffer("sr_bin_boundaries", torch.tensor(cfg.sr_bin_boundaries, dtype=torch.int32))
            buckets = len(cfg.sr_bin_boundaries) + 1
            self.sr_cond_model = nn.ModuleList(
                [
                    SampleRateCondition(m.input_channels, buckets, cfg.cond_type, cfg.cond_dim, cfg.cond_out_layer)
                    if isinstance(m, DecoderBlock)
                    else None
                    for m in layers
                ]
            )

    def forward(self, z: torch.Tensor, sr: torch.Tensor | None) -> torch.Tensor:  # [B, D, T] -> [B, 1, T * up]
        if self.sr_cond_model is None:
            return self.model(z)
        idx = torch.bucketize(sr, self.sr_bin_boundaries)
        x = z
        for layer, cond in zip(self.model, self.sr_cond_model):
            if cond is not None:
                x = cond(x, idx)
            x = layer(x)
        return x


class AudioVAE(nn.Module):
    """encode(wav [B, S] or [B, 1, S] at `sample_rate`) -> [B, D, S / hop]; decode(z [B, D, T]) -> [B, 1, T * up]."""

    def __init__(self, cfg: AudioVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_dim = cfg.latent_dim
        self.sample_rate = cfg.sample_rate
        self.out_sample_rate = cfg.out_sample_rate
        self.chunk_size = math.prod(cfg.encoder_rates)
        self.decode_chunk_size = math.prod(cfg.decoder_rates)
        self.encoder = Encoder(cfg.encoder_dim, cfg.latent_dim, cfg.encoder_rates, cfg.depthwise)
        self.decoder = Decoder(cfg)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.ndim == 2:
            wav = wav.unsqueeze(1)
        pad = (-wav.shape[-1]) % self.chunk_size
        return self.encoder(F.pad(wav, (0, pad)))

    def decode(self, z: torch.Tensor, sr: int | None = None) -> torch.Tensor:
        srt = torch.tensor([sr or self.out_sample_rate], device=z.device, dtype=torch.int32)
        return self.decoder(z, srt)
