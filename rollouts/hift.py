"""The CosyVoice2 NSF-HiFT vocoder (24 kHz) as GLM-TTS builds it, written so that the upstream `hift/hift.pt` state
dict loads strictly (weight-normed convs use torch's parametrizations, which also accept legacy weight_g/weight_v).

mel [B, 80, T] (natural-log, 50 Hz) -> waveform [B, 480 T] at 24 kHz:
    F0 predictor      5 x (weight-normed conv k3 + ELU), linear, |.|                    -> f0 [B, T] in Hz
    harmonic source   9 harmonics of f0, phase summed at frame rate and linearly upsampled x480, sin * 0.1,
                      zeroed where f0 <= 10 Hz, plus noise (std 0.003 voiced, 0.1/3 unvoiced), linear + tanh
    decoder           conv_pre; 3 x (leaky ReLU 0.1, transposed conv x8/x5/x3, + downsampled source STFT through
                      a ResBlock, mean of 3 Snake ResBlocks); leaky ReLU 0.01; conv_post -> 9 log-magnitudes and
                      9 phases (sin) of a 16-point iSTFT with hop 4; clamp to +-0.99

Unlike upstream (one utterance per call), `inference` runs a padded batch exactly: every convolution sees zeros
beyond each row's length (as a lone row would), the source phase stops at the row's last frame, the STFT/iSTFT
reflect and normalise at each row's own ends, and each row draws its noise from its own generator.

Only the channel widths (base_channels, and cond_channels of the F0 predictor) may differ from upstream; they are
read from the checkpoint's shapes, so the same loader takes the real vocoder and a tiny random one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

SAMPLE_RATE = 24000
UPSAMPLE_RATES = (8, 5, 3)
UPSAMPLE_KERNELS = (16, 11, 7)
RESBLOCK_KERNELS = (3, 7, 11)
SOURCE_RESBLOCK_KERNELS = (7, 7, 11)
DILATIONS = (1, 3, 5)
N_FFT, HOP = 16, 4
HARMONICS = 8
HOP_SAMPLES = math.prod(UPSAMPLE_RATES) * HOP  # 480 samples per mel frame


def _padding(k: int, d: int) -> int:
    return (k * d - d) // 2


class Snake(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        a = self.alpha[None, :, None]
        return x + (1.0 / (a + 1e-9)) * torch.sin(x * a) ** 2


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.convs1 = nn.ModuleList(
            [
                weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)))
                for d in DILATIONS
            ]
        )
        self.convs2 = nn.ModuleList(
            [weight_norm(nn.Conv1d(channels, channels, kernel, padding=_padding(kernel, 1))) for _ in DILATIONS]
        )
        self.activations1 = nn.ModuleList([Snake(channels) for _ in DILATIONS])
        self.activations2 = nn.ModuleList([Snake(channels) for _ in DILATIONS])

    def forward(self, x, mask):  # [B, C, L], [B, 1, L]
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            xt = c2(a2(c1(a1(x) * mask)) * mask)
            x = xt + x
        return x


class F0Predictor(nn.Module):
    def __init__(self, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        layers = []
        for i in range(5):
            conv = nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1)
            layers += [weight_norm(conv), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel, mask):  # [B, 80, T], [B, 1, T] -> [B, T]
        h = mel
        for i in range(0, 10, 2):
            h = self.condnet[i + 1](self.condnet[i](h * mask))
        return torch.abs(self.classifier(h.transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """Holds the harmonic merge layer (`m_source.l_linear`); the sine generator has no parameters."""

    def __init__(self):
        super().__init__()
        self.l_linear = nn.Linear(HARMONICS + 1, 1)
        self.l_tanh = nn.Tanh()


def _hann(device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[16] periodic Hann window, computed in float64 and given in the working dtype."""
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=device).to(dtype)


class HiFTGenerator(nn.Module):
    def __init__(self, base_channels: int = 512, cond_channels: int = 512, in_channels: int = 80):
        super().__init__()
        self.m_source = SourceModule()
        self.f0_upsamp = nn.Upsample(scale_factor=HOP_SAMPLES, mode="nearest")
        self.conv_pre = weight_norm(nn.Conv1d(in_channels, base_channels, 7, padding=3))
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(UPSAMPLE_RATES, UPSAMPLE_KERNELS)):
            c_in, c_out = base_channels // 2**i, base_channels // 2 ** (i + 1)
            self.ups.append(weight_norm(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2)))
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        down = [1] + list(reversed(UPSAMPLE_RATES))[:-1]  # [1, 3, 5]
        cum = list(reversed(np.cumprod(down).tolist()))  # [15, 3, 1]
        for i, (u, k) in enumerate(zip(cum, SOURCE_RESBLOCK_KERNELS)):
            ch = base_channels // 2 ** (i + 1)
            conv = nn.Conv1d(N_FFT + 2, ch, 1, 1) if u == 1 else nn.Conv1d(N_FFT + 2, ch, u * 2, u, padding=u // 2)
            self.source_downs.append(conv)
            self.source_resblocks.append(ResBlock(ch, k))
        self.resblocks = nn.ModuleList(
            [ResBlock(base_channels // 2 ** (i + 1), k) for i in range(len(UPSAMPLE_RATES)) for k in RESBLOCK_KERNELS]
        )
        self.conv_post = weight_norm(nn.Conv1d(base_channels // 2 ** len(UPSAMPLE_RATES), N_FFT + 2, 7, padding=3))
        self.reflection_pad = nn.ReflectionPad1d((1, 0))
        self.f0_predictor = F0Predictor(in_channels, cond_channels)

    # --- source -----------------------------------------------------------------------------------------------
    def source(
        self, f0: torch.Tensor, frames: list[int], generators: list[torch.Generator], noise=None
    ) -> torch.Tensor:
        """f0 [B, T] -> merged harmonic source [B, 1, 480 T]. noise: optional [B, 480 T, 9] to use instead of
        drawing (tests)."""
        b, t = f0.shape
        harmonics = torch.arange(1, HARMONICS + 2, dtype=torch.float32, device=f0.device)
        rad = (f0[:, :, None] * harmonics / SAMPLE_RATE) % 1  # [B, T, 9], frame-constant as upstream's samples
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        for i, n in enumerate(frames):  # past a row's end, hold its last phase (a lone row's interpolation clamps)
            if n < t:
                phase[i, n:] = phase[i, n - 1]
        phase = F.interpolate(phase.transpose(1, 2) * HOP_SAMPLES, scale_factor=HOP_SAMPLES, mode="linear")
        sines = torch.sin(phase).transpose(1, 2) * 0.1  # [B, L, 9]
        f0u = self.f0_upsamp(f0[:, None]).transpose(1, 2)  # [B, L, 1]
        uv = (f0u > 10).float()
        if noise is None:
            noise = torch.zeros_like(sines)
            for i, n in enumerate(frames):
                g = generators[i]
                noise[i, : n * HOP_SAMPLES] = torch.randn(
                    n * HOP_SAMPLES, HARMONICS + 1, generator=g, device=g.device
                ).to(f0.device)
        noise_amp = uv * 0.003 + (1 - uv) * 0.1 / 3
        waves = sines * uv + noise_amp * noise
        return self.m_source.l_tanh(self.m_source.l_linear(waves)).transpose(1, 2)

    # --- per-row STFT / iSTFT (center=True semantics at each row's own ends) ----------------------------------
    @staticmethod
    def stft(s: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """s [B, L] -> [B, 18, L/4 + 1]: 9 real then 9 imaginary channels of a 16-point STFT, hop 4."""
        b, l_max = s.shape
        half = N_FFT // 2
        padded = torch.zeros(b, l_max + N_FFT, device=s.device, dtype=s.dtype)
        for i, n in enumerate(lengths):
            padded[i, : n + N_FFT] = F.pad(s[i : i + 1, :n][None], (half, half), mode="reflect")[0, 0]
        frames = padded.unfold(1, N_FFT, HOP) * _hann(s.device, s.dtype)  # [B, F, 16]
        spec = torch.fft.rfft(frames, dim=-1)  # [B, F, 9]
        return torch.cat([spec.real, spec.imag], dim=-1).transpose(1, 2)

    @staticmethod
    def istft(magnitude: torch.Tensor, phase: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """[B, 9, F] magnitude and phase -> [B, 4 (F - 1)] waveform, each row normalised over its own frames."""
        b, _, f = magnitude.shape
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        win = _hann(magnitude.device, magnitude.dtype)
        valid = torch.zeros(b, f, 1, device=magnitude.device, dtype=magnitude.dtype)
        for i, n in enumerate(frames):
            valid[i, :n] = 1.0
        chunks = torch.fft.irfft(spec.transpose(1, 2), n=N_FFT, dim=-1) * win * valid  # [B, F, 16]
        out_len = HOP * (f - 1) + N_FFT
        fold = dict(output_size=(1, out_len), kernel_size=(1, N_FFT), stride=(1, HOP))
        y = F.fold(chunks.transpose(1, 2), **fold).reshape(b, out_len)
        env = F.fold((win * win * valid).transpose(1, 2), **fold).reshape(b, out_len)
        y = torch.where(env > 1e-11, y / env.clamp(min=1e-11), y)
        return y[:, N_FFT // 2 : N_FFT // 2 + HOP * (f - 1)]

    # --- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(
        self, mel: torch.Tensor, frames: list[int], generators: list[torch.Generator], noise=None
    ) -> torch.Tensor:
        """mel [B, 80, T_max] (rows valid for frames[i] frames) -> [B, 480 T_max] (row i valid for 480 frames[i])."""
        b, _, t_max = mel.shape
        dev = mel.device

        def mask(scale: int, extra: int = 0) -> torch.Tensor:
            m = torch.zeros(b, 1, t_max * scale + extra, device=dev)
            for i, n in enumerate(frames):
                m[i, :, : n * scale + extra] = 1.0
            return m

        m_t = mask(1)
        f0 = self.f0_predictor(mel, m_t)
        s = self.source(f0, frames, generators, noise)  # [B, 1, L]
        lengths = [n * HOP_SAMPLES for n in frames]
        s_stft = self.stft(s[:, 0], lengths)  # [B, 18, 120 T + 1]
        m_src = mask(HOP_SAMPLES // HOP, 1)
        x = self.conv_pre(mel * m_t)
        stage_masks = [mask(8), mask(40), mask(120, 1)]
        in_mask = m_t
        for i in range(len(UPSAMPLE_RATES)):
            x = self.ups[i](F.leaky_relu(x, 0.1) * in_mask)
            if i == len(UPSAMPLE_RATES) - 1:
                x = self.reflection_pad(x)
            m = stage_masks[i]
            si = self.source_resblocks[i](self.source_downs[i](s_stft * m_src), m)
            x = x + si
            k = len(RESBLOCK_KERNELS)
            xs = self.resblocks[i * k](x, m)
            for j in range(1, k):
                xs = xs + self.resblocks[i * k + j](x, m)
            x = xs / k
            in_mask = m
        x = self.conv_post(F.leaky_relu(x) * in_mask)
        magnitude = torch.exp(x[:, : N_FFT // 2 + 1])
        phase = torch.sin(x[:, N_FFT // 2 + 1 :])
        wav = self.istft(magnitude, phase, [120 * n + 1 for n in frames])
        return torch.clamp(wav, -0.99, 0.99)


def hift_sizes_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The channel widths a HiFT checkpoint was built with, read from its shapes."""

    def shape(prefix: str) -> torch.Size:
        for suffix in (".parametrizations.weight.original1", ".weight_v", ".weight"):
            if prefix + suffix in state:
                return state[prefix + suffix].shape
        raise KeyError(prefix)

    return {"base_channels": int(shape("conv_pre")[0]), "cond_channels": int(shape("f0_predictor.condnet.0")[0])}
