"""IndexTTS2's frozen audio pieces around its s2mel stage: the BigVGAN vocoder, the CAMPPlus speaker style and the
prompt mel, each read from its released file and loaded strictly (one error lists every missing, unexpected and
mis-shaped key and names the file).

Released layouts (IndexTTS2 keeps them under `<model_dir>/hf_cache/`):

    bigvgan/config.json           nvidia/bigvgan_v2_22khz_80band_256x hyperparameters (JSON): 22050 Hz, 80 mels,
                                  upsample_rates [4,4,2,2,2,2] (256x), 1536 initial channels, AMP blocks "1" with
                                  kernels [3,7,11], snakebeta (log-scale), no tanh and no bias at the end, plus
                                  training-only fields (ignored)
    bigvgan/bigvgan_generator.pt  {"generator": state dict} with weight-normed convolutions (`*.weight_g`,
                                  `*.weight_v`) and the anti-aliasing filters as buffers; read with
                                  torch.load(weights_only=True). A state dict saved after weight-norm removal
                                  (plain `*.weight`) is accepted too, as the released loader does.
    campplus_cn_common.bin        funasr/campplus: the bare state dict of CAMPPlus(feat_dim=80, embedding_size=192)
                                  (~6.9M values, BatchNorm statistics included)

The generator is the `bigvgan` package's `BigVGAN` (the NVIDIA code that index-tts vendors under
`indextts/s2mel/modules/bigvgan/`), built from config.json with the torch anti-aliasing activations (no CUDA
kernel), loaded strictly, then weight norm removed and put in eval mode, as IndexTTS2 uses it:

    mel [B, 80, T] (natural-log magnitude mel, the s2mel output) -> bigvgan(mel) -> wav [B, 1, T * 256] in [-1, 1]
    at 22050 Hz (IndexTTS2 then squeezes and writes clamp(32767 * wav)).

CAMPPlus is funasr's implementation (the same module tree, keys and outputs as index-tts'
`indextts/s2mel/modules/campplus/DTDNN.py`). Its input is the 80-bin Kaldi fbank of the 16 kHz prompt (25 ms / 10 ms,
dither 0, per-utterance mean over time removed; `rollouts.speaker_embedding.campplus_features`), [1, T, 80];
its output is the [1, 192] style vector s2mel is conditioned on.

The prompt mel is index-tts' `mel_spectrogram` (`indextts/s2mel/modules/audio.py`) with config.yaml's
`s2mel.preprocess_params` ({"sr": 22050, "spect_params": {n_fft 1024, win_length 1024, hop_length 256, n_mels 80,
fmin 0, fmax "None"}}): reflect-pad (n_fft - hop) / 2 on both sides, STFT without centering (periodic Hann),
magnitude sqrt(re^2 + im^2 + 1e-9), librosa's Slaney mel filter, ln(max(., 1e-5)); [1, 80, N // 256] for N samples at
22.05 kHz. `fmax` is "None" (no upper limit) or 8000, the only two values the released inference code reads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policies.indextts2_model import IndexTTS2ConfigError
from rollouts.speaker_embedding import MIN_SAMPLES, campplus_features
from rollouts.token2wav import VocoderCheckpointError, load_weights_only, strict_load

__all__ = [
    "BIGVGAN_RATE",
    "BIGVGAN_HOP",
    "STYLE_DIM",
    "RELEASED_PREPROCESS_PARAMS",
    "VocoderCheckpointError",
    "load_bigvgan",
    "read_bigvgan_config",
    "save_bigvgan",
    "write_tiny_bigvgan",
    "load_campplus",
    "write_tiny_campplus",
    "speaker_style",
    "prompt_mel",
]

BIGVGAN_RATE = 22050
BIGVGAN_HOP = 256
NUM_MELS = 80
STYLE_DIM = 192
BIGVGAN_CONFIG = "config.json"
BIGVGAN_FILE = "bigvgan_generator.pt"

RELEASED_PREPROCESS_PARAMS: dict[str, Any] = {
    "sr": 22050,
    "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80, "fmin": 0, "fmax": "None"},
}

RELEASED_BIGVGAN_CONFIG: dict[str, Any] = {  # the generator's fields of nvidia/bigvgan_v2_22khz_80band_256x
    "resblock": "1",
    "upsample_rates": [4, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 1536,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "use_tanh_at_final": False,
    "use_bias_at_final": False,
    "activation": "snakebeta",
    "snake_logscale": True,
    "num_mels": 80,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "sampling_rate": 22050,
    "fmin": 0,
    "fmax": None,
}
TINY_BIGVGAN_CONFIG: dict[str, Any] = {**RELEASED_BIGVGAN_CONFIG, "upsample_initial_channel": 128}


# --------------------------------------------------------------------------------------------------------------------
# BigVGAN


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _config_problems(cfg: dict[str, Any]) -> list[str]:
    """What keeps `cfg` from describing a 22.05 kHz, 80-band, 256x BigVGAN generator (empty when it does)."""
    problems = []
    required = (
        "resblock upsample_rates upsample_kernel_sizes upsample_initial_channel resblock_kernel_sizes "
        "resblock_dilation_sizes activation snake_logscale num_mels sampling_rate"
    ).split()
    missing = [k for k in required if k not in cfg]
    if missing:
        return [f"missing {', '.join(missing)}"]
    if cfg["resblock"] not in ("1", "2"):
        problems.append(f'resblock must be "1" or "2", not {cfg["resblock"]!r}')
    rates, kernels = cfg["upsample_rates"], cfg["upsample_kernel_sizes"]
    if not (_int_list(rates) and _int_list(kernels) and len(rates) == len(kernels)):
        problems.append("upsample_rates and upsample_kernel_sizes must be integer lists of one length")
    elif math.prod(rates) != BIGVGAN_HOP or cfg.get("hop_size", BIGVGAN_HOP) != BIGVGAN_HOP:
        problems.append(f"upsampling {math.prod(rates)}x (hop_size {cfg.get('hop_size')}) != {BIGVGAN_HOP}x")
    ch = cfg["upsample_initial_channel"]
    if not (isinstance(ch, int) and _int_list(rates) and ch >= 2 ** len(rates) and ch % 2 ** len(rates) == 0):
        problems.append(f"upsample_initial_channel {ch!r} must be a positive multiple of 2**len(upsample_rates)")
    rk, rd = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
    if not (_int_list(rk) and isinstance(rd, list) and len(rd) == len(rk) and all(_int_list(d) for d in rd)):
        problems.append("resblock_kernel_sizes / resblock_dilation_sizes must be integer lists of one length")
    if cfg["activation"] not in ("snake", "snakebeta"):
        problems.append(f"activation must be snake or snakebeta, not {cfg['activation']!r}")
    for key in ("snake_logscale", "use_tanh_at_final", "use_bias_at_final"):
        if key in cfg and not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false")
    if cfg["num_mels"] != NUM_MELS:
        problems.append(f"num_mels {cfg['num_mels']!r} != {NUM_MELS}")
    if cfg["sampling_rate"] != BIGVGAN_RATE:
        problems.append(f"sampling_rate {cfg['sampling_rate']!r} != {BIGVGAN_RATE}")
    return problems


def read_bigvgan_config(directory: str | Path) -> dict[str, Any]:
    """`<directory>/config.json`, checked to describe a 22.05 kHz / 80-band / 256x generator (all of it is kept: the
    generator reads only its own fields)."""
    path = Path(directory) / BIGVGAN_CONFIG
    if not path.is_file():
        raise VocoderCheckpointError(f"{path}: not found (a BigVGAN directory has {BIGVGAN_CONFIG}, {BIGVGAN_FILE})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise VocoderCheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise VocoderCheckpointError(f"{path}: expected a JSON object")
    problems = _config_problems(cfg)
    if problems:
        raise VocoderCheckpointError(f"{path}: not a 22.05 kHz 80-band 256x BigVGAN config: " + "; ".join(problems))
    return cfg


def _build_bigvgan(cfg: dict[str, Any]) -> nn.Module:
    """The generator `cfg` describes, weight-normed, with the torch anti-aliasing activations."""
    from bigvgan.bigvgan import BigVGAN
    from bigvgan.env import AttrDict

    with warnings.catch_warnings():  # the package's weight norm is torch's deprecated (hook-based) one
        warnings.simplefilter("ignore", FutureWarning)
        return BigVGAN(AttrDict(dict(cfg)), use_cuda_kernel=False)


def _remove_weight_norm(model: nn.Module) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # the package announces the removal on stdout
        model.remove_weight_norm()  # type: ignore[operator]


def _read_generator(path: Path) -> dict[str, torch.Tensor]:
    obj = load_weights_only(path)
    if not isinstance(obj, dict) or set(obj) != {"generator"}:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise VocoderCheckpointError(f'{path}: expected {{"generator": state dict}}, found {found}')
    state = obj["generator"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VocoderCheckpointError(f'{path}: "generator" is not a state dict of tensors')
    return dict(state)


def load_bigvgan(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The released-layout BigVGAN in `directory`, loaded strictly, weight norm removed, in eval mode:
    mel [B, 80, T] -> wav [B, 1, T * 256] at 22050 Hz."""
    directory = Path(directory)
    cfg = read_bigvgan_config(directory)
    path = directory / BIGVGAN_FILE
    state = _read_generator(path)
    model = _build_bigvgan(cfg)
    if any(k.endswith(".weight_g") for k in state):
        strict_load(model, state, str(path))
        _remove_weight_norm(model)
    else:  # saved after weight-norm removal
        _remove_weight_norm(model)
        strict_load(model, state, str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def save_bigvgan(model: nn.Module, cfg: dict[str, Any], directory: str | Path) -> None:
    """Write `model` (a BigVGAN) in the released layout: config.json and bigvgan_generator.pt holding
    {"generator": state dict} (float32 tensors, written atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BIGVGAN_CONFIG).write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (BIGVGAN_FILE + ".partial")
    torch.save({"generator": state}, tmp)
    tmp.replace(directory / BIGVGAN_FILE)


def write_tiny_bigvgan(directory: str | Path, seed: int = 0) -> None:
    """A tiny random BigVGAN in the released layout: the released hyperparameters (22050 Hz, 80 mels, 256x, AMP
    kernels [3, 7, 11], snakebeta) with 128 initial channels, weight-normed. Every weight direction is random with unit
    norm per output channel; the last convolution is scaled so that a log-mel of typical level (mean -5, std 2) gives
    output RMS 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_bigvgan(TINY_BIGVGAN_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight_v") or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if name.endswith(".weight_v") else 0.05))
            elif name.endswith(".weight_g"):
                p.fill_(1.0)
            elif name.endswith(".alpha") or name.endswith(".beta"):  # log-scale snake parameters
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        mel = torch.randn(1, NUM_MELS, 24, generator=gen) * 2.0 - 5.0
        seen: list[torch.Tensor] = []  # conv_post's output, before the final clamp (linear in its weight)
        post = model.get_submodule("conv_post")
        hook = post.register_forward_hook(lambda m, i, o: seen.append(o))
        model(mel)
        hook.remove()
        post.get_parameter("weight_g").mul_(0.1 / seen[0].pow(2).mean().sqrt().clamp_min(1e-8))
    save_bigvgan(model, TINY_BIGVGAN_CONFIG, directory)


# --------------------------------------------------------------------------------------------------------------------
# CAMPPlus


def _build_campplus() -> nn.Module:
    from funasr.models.campplus.model import CAMPPlus

    return CAMPPlus(feat_dim=NUM_MELS, embedding_size=STYLE_DIM)


def _read_bare_state(path: Path) -> dict[str, torch.Tensor]:
    obj = load_weights_only(path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VocoderCheckpointError(f"{path}: expected a bare state dict of tensors")
    return dict(obj)


def load_campplus(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """campplus_cn_common.bin loaded strictly into CAMPPlus(feat_dim=80, embedding_size=192), in eval mode. Only
    BatchNorm's `num_batches_tracked` counters (unused in eval) may be absent: they are set to 0, as torch does for
    checkpoints written before the counter existed."""
    path = Path(path)
    state = _read_bare_state(path)
    model = _build_campplus()
    own = model.state_dict()
    counters = [k for k in own if k.endswith(".num_batches_tracked")]
    if not any(k in state for k in counters):
        state.update({k: torch.zeros_like(own[k]) for k in counters})
    strict_load(model, state, str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def write_tiny_campplus(path: str | Path, seed: int = 0) -> None:
    """The released format with random weights: the full CAMPPlus architecture (6.9M values, ~28 MB; the loader
    builds that architecture only), its BatchNorm statistics and affines perturbed so that no layer is an identity."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_campplus()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(".running_var"):
            v = 0.5 + torch.rand(v.shape, generator=gen)
        elif k.endswith(".running_mean") or (k.endswith(".bias") and v.is_floating_point()):
            v = v + 0.1 * torch.randn(v.shape, generator=gen)
        elif v.is_floating_point() and v.ndim == 1:  # BatchNorm / PReLU weights
            v = v + 0.1 * torch.randn(v.shape, generator=gen)
        state[k] = v.detach().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


def speaker_style(campplus: nn.Module, wav16: np.ndarray) -> torch.Tensor:
    """[N] (or [1, N]) float waveform at 16 kHz, N >= 400 -> [1, 192] style (on the model's device, no grad)."""
    wav = np.asarray(wav16, dtype=np.float32)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1 or wav.shape[0] < MIN_SAMPLES:
        raise ValueError(f"speaker_style: expected [N >= {MIN_SAMPLES}] samples at 16 kHz, got shape {wav.shape}")
    feat = torch.from_numpy(campplus_features(wav))
    device = next(campplus.parameters()).device
    with torch.no_grad():
        return campplus(feat.unsqueeze(0).to(device))


# --------------------------------------------------------------------------------------------------------------------
# prompt mel


def _mel_args(params: dict[str, Any]) -> tuple[int, int, int, int, int, float, float | None]:
    """(sr, n_fft, win, hop, n_mels, fmin, fmax) from config.yaml's s2mel.preprocess_params (unknown keys refused)."""
    where = "s2mel.preprocess_params"
    if not isinstance(params, dict) or "sr" not in params or not isinstance(params.get("spect_params"), dict):
        raise IndexTTS2ConfigError(f"{where}: expected {{sr: ..., spect_params: {{...}}}}")
    extra = sorted(set(params) - {"sr", "spect_params"})
    sp = params["spect_params"]
    known = {"n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax"}
    extra += [f"spect_params.{k}" for k in sorted(set(sp) - known)]
    if extra:
        raise IndexTTS2ConfigError(f"{where}: unknown key(s) {', '.join(extra)}")
    ints = {"sr": params["sr"], **{k: sp.get(k) for k in ("n_fft", "win_length", "hop_length", "n_mels")}}
    for k, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise IndexTTS2ConfigError(f"{where}: {k} must be a positive integer, not {v!r}")
    fmin = sp.get("fmin", 0)
    if not isinstance(fmin, int | float) or isinstance(fmin, bool) or fmin < 0:
        raise IndexTTS2ConfigError(f"{where}: spect_params.fmin must be a number >= 0, not {fmin!r}")
    raw = sp.get("fmax", "None")
    if raw not in ("None", 8000, "8000"):
        raise IndexTTS2ConfigError(f'{where}: spect_params.fmax must be "None" or 8000, not {raw!r}')
    fmax = None if raw == "None" else 8000.0
    if ints["win_length"] > ints["n_fft"] or ints["hop_length"] > ints["n_fft"]:
        raise IndexTTS2ConfigError(f"{where}: win_length and hop_length must not exceed n_fft")
    return ints["sr"], ints["n_fft"], ints["win_length"], ints["hop_length"], ints["n_mels"], float(fmin), fmax


@functools.lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)


def prompt_mel(wav22: np.ndarray | torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """[N] (or [1, N]) float waveform at params["sr"] (22050 Hz) -> [1, n_mels, T] float32 log mel,
    T = 1 + (N + 2 * pad - n_fft) // hop with pad = (n_fft - hop) // 2 (N // 256 for the released parameters); on the
    input tensor's device (CPU for arrays)."""
    sr, n_fft, win, hop, n_mels, fmin, fmax = _mel_args(params)
    y = torch.as_tensor(wav22).float()
    if y.ndim == 2 and y.shape[0] == 1:
        y = y[0]
    pad = (n_fft - hop) // 2
    if y.ndim != 1 or y.shape[0] <= pad or y.shape[0] + 2 * pad < n_fft:
        raise ValueError(f"prompt_mel: expected [N > {max(pad, n_fft - 2 * pad - 1)}] samples, got {tuple(y.shape)}")
    y = torch.nn.functional.pad(y[None, None], (pad, pad), mode="reflect")[0]
    window = torch.hann_window(win, device=y.device)
    spec = torch.stft(
        y,
        n_fft,
        hop_length=hop,
        win_length=win,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    basis = torch.from_numpy(_mel_basis(sr, n_fft, n_mels, fmin, fmax)).to(y.device)
    return torch.log(torch.clamp(torch.matmul(basis, mag), min=1e-5))
