"""Audio helpers: the GLM-TTS 24 kHz log-mel front end, wav I/O and resampling (no torchaudio).

mel_spectrogram matches the upstream prompt-feature extractor (`prompt_speech_feat`): reflect-pad (n_fft - hop)/2
on both sides, STFT with a periodic Hann window and center=False, magnitude sqrt(re^2 + im^2 + 1e-9), a Slaney
mel filterbank (librosa's default: Slaney scale, Slaney area norm), natural log of max(mel, 1e-5).
A waveform of L samples gives floor(L / hop) frames.
"""

from __future__ import annotations

import functools
import math
import wave
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 24000
HOP = 480  # 50 mel frames per second, 2 per speech token
N_FFT = 1920
N_MELS = 80


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """[n_mels, 1 + n_fft // 2] float32 triangular filters on the Slaney mel scale, Slaney-normalised."""
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def mel_spectrogram(
    wav: torch.Tensor,  # [B, L] float waveform at `sr`
    *,
    sr: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    hop: int = HOP,
    n_mels: int = N_MELS,
    fmin: float = 0.0,
    fmax: float = 8000.0,
) -> torch.Tensor:
    """[B, n_mels, floor(L / hop)] natural-log mel."""
    if wav.dim() != 2:
        raise ValueError(f"wav must be [B, L], got {tuple(wav.shape)}")
    pad = (n_fft - hop) // 2
    y = F.pad(wav.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        y,
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=torch.hann_window(n_fft, device=wav.device),
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    basis = torch.from_numpy(mel_filterbank(sr, n_fft, n_mels, fmin, fmax)).to(mag.device)
    return torch.log(torch.clamp(basis @ mag, min=1e-5))


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling (polyphase FIR, Kaiser window) of a 1-D float waveform."""
    if orig_sr == target_sr:
        return wav.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, target_sr)
    return resample_poly(wav.astype(np.float64), target_sr // g, orig_sr // g).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate. Multi-channel audio is averaged."""
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(sr)
    except ImportError:
        with wave.open(str(path), "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
        if width != 2:
            raise ValueError(f"{path}: only 16-bit PCM wav can be read without soundfile") from None
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(-1, ch) / 32768.0
        return data.mean(axis=1), sr


def write_wav(path: str | Path, wav: np.ndarray, sr: int) -> None:
    """16-bit PCM mono wav (values clipped to [-1, 1])."""
    pcm = (np.clip(np.asarray(wav, dtype=np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
