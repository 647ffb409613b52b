"""The GLM-TTS speech tokenizer: a WhisperVQ encoder that turns 16 kHz speech into codes 0..V-1 (25 per second).

A re-implementation of upstream `SpeechTokenizer.extract_speech_token` with the quantize-only WhisperVQ encoder,
read from a local directory in the upstream layout (`ckpt/speech_tokenizer`):

    config.json                 WhisperVQConfig fields (d_model, quantize_position, pooling_*, quantize_* ...)
    preprocessor_config.json    WhisperFeatureExtractor fields (feature_size, hop_length, n_fft, sampling_rate ...)
    model*.safetensors          the full Whisper checkpoint; only `model.encoder.*` is used

Loading keeps the keys under `model.encoder.`, drops the final `layer_norm` and the layers at or past
`quantize_position`, and loads the rest strictly (missing / unexpected keys and shape mismatches are errors).

Tokenizing an utterance:
  1. resample to 16 kHz with `rollouts.audio.resample` (scipy polyphase). Upstream uses torchaudio's sinc-Hann
     resampler, so on input that is not already 16 kHz the tokens can differ from upstream's; 16 kHz input is exact;
  2. take channel 0 of [C, N] input (as upstream does);
  3. cut into 30 s chunks without overlap; chunks of all utterances of one call go through the encoder in batches
     of 128, each batch right-padded with zeros to a multiple of 640 samples (the token stride). The last token or
     two of a chunk depend on that padding, so the batch layout is part of the result, as upstream;
  4. Whisper log-mel features (float32, as transformers' WhisperFeatureExtractor torch path): STFT (periodic Hann,
     n_fft 400, hop 160, centered, reflect pad), drop the last frame, power, Slaney mel filterbank, log10 of
     max(., 1e-10), max(., per-chunk max - 8), (x + 4) / 4;
  5. the encoder: conv stem (stride 2), learned positions, pre-LN Transformer layers with a block-causal mask
     (each 50 Hz frame sees every frame up to the end of its 200-frame block; padded keys are masked), average
     pooling by 2, then nearest codebook row by squared L2 distance;
  6. keep the tokens whose first sample is real audio: a chunk of n samples gives ceil(n / 640) tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rollouts.audio import mel_filterbank, resample

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # upstream cuts 30 s chunks regardless of the feature extractor's chunk_length
BATCH_CHUNKS = 128
PREFIX = "model.encoder."


class SpeechTokenizerError(ValueError):
    """A bad tokenizer directory or input; the message names the file or item and the field."""


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SpeechTokenizerError(f"speech tokenizer: {path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpeechTokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SpeechTokenizerError(f"{path}: expected a JSON object")
    return obj


def _typed(cls, obj: dict, path: Path):
    """Build dataclass `cls` from the JSON object's fields of the same names (absent fields keep the defaults)."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in obj:
            continue
        v, kind = obj[f.name], str(f.type)
        ok = (
            (v is None and "None" in kind)
            or (isinstance(v, bool) and kind.startswith("bool"))
            or (isinstance(v, int) and not isinstance(v, bool) and ("int" in kind or "float" in kind))
            or (isinstance(v, float) and "float" in kind)
            or (isinstance(v, str) and kind.startswith("str"))
        )
        if not ok:
            raise SpeechTokenizerError(f"{path}: field '{f.name}' must be {kind}, got {v!r}")
        kwargs[f.name] = v
    return cls(**kwargs)


@dataclass(frozen=True)
class WhisperVQConfig:
    """The config.json fields the quantizing encoder uses; defaults are WhisperConfig's / upstream WhisperVQConfig's."""

    d_model: int = 384
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    quantize_position: int = 16  # layers built; tokens are read after this layer
    quantize_vocab_size: int | None = None
    quantize_ema_decay: float | None = None  # not None: the checkpoint holds ema_count / ema_weight buffers
    quantize_causal_block_size: int | None = None  # None: plain padding mask
    quantize_causal_encoder: bool = False
    pooling_kernel_size: int | None = None
    pooling_type: str = "max"
    pooling_position: int = 0  # pool after this layer (1-based)
    encoder_causal_attention: bool = False
    encoder_causal_convolution: bool = False

    @classmethod
    def from_json(cls, path: str | Path) -> WhisperVQConfig:
        path = Path(path)
        cfg = _typed(cls, _read_json(path), path)
        cfg.validate(path)
        return cfg

    def validate(self, where: str | Path = "config") -> None:
        def bad(name: str, why: str) -> SpeechTokenizerError:
            return SpeechTokenizerError(f"{where}: field '{name}' {why}, got {getattr(self, name)!r}")

        for name in (
            "d_model",
            "encoder_attention_heads",
            "encoder_ffn_dim",
            "num_mel_bins",
            "max_source_positions",
            "quantize_position",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be positive")
        if self.d_model % self.encoder_attention_heads:
            raise bad("encoder_attention_heads", f"must divide d_model ({self.d_model})")
        if self.quantize_vocab_size is None or self.quantize_vocab_size < 1:
            raise bad("quantize_vocab_size", "must be a positive codebook size (the model has no quantizer)")
        if self.activation_function not in _ACTIVATIONS:
            raise bad("activation_function", f"must be one of {sorted(_ACTIVATIONS)}")
        if self.quantize_causal_block_size is not None and self.quantize_causal_block_size < 1:
            raise bad("quantize_causal_block_size", "must be positive or null")
        if self.pooling_kernel_size is not None:
            if self.pooling_kernel_size < 1:
                raise bad("pooling_kernel_size", "must be positive or null")
            if self.pooling_type not in ("avg", "max"):
                raise bad("pooling_type", "must be 'avg' or 'max'")
            if not 1 <= self.pooling_position <= self.quantize_position:
                raise bad("pooling_position", f"must be in 1..quantize_position ({self.quantize_position})")

    @property
    def pool(self) -> int:
        return self.pooling_kernel_size or 1


@dataclass(frozen=True)
class WhisperFeatureConfig:
    """preprocessor_config.json (WhisperFeatureExtractor): the fields that affect the features."""

    feature_size: int = 80
    sampling_rate: int = SAMPLE_RATE
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    padding_value: float = 0.0
    dither: float = 0.0

    @classmethod
    def from_json(cls, path: str | Path) -> WhisperFeatureConfig:
        path = Path(path)
        cfg = _typed(cls, _read_json(path), path)
        if cfg.sampling_rate != SAMPLE_RATE:
            raise SpeechTokenizerError(f"{path}: field 'sampling_rate' must be {SAMPLE_RATE}, got {cfg.sampling_rate}")
        if cfg.dither != 0.0:
            raise SpeechTokenizerError(
                f"{path}: field 'dither' must be 0 (dither makes tokens random), got {cfg.dither}"
            )
        if cfg.chunk_length * cfg.sampling_rate < CHUNK_SAMPLES:
            raise SpeechTokenizerError(
                f"{path}: field 'chunk_length' must be at least 30 (it would truncate the 30 s chunks), "
                f"got {cfg.chunk_length}"
            )
        for name in ("feature_size", "hop_length", "n_fft"):
            if getattr(cfg, name) < 1:
                raise SpeechTokenizerError(f"{path}: field '{name}' must be positive, got {getattr(cfg, name)}")
        return cfg


def whisper_log_mel(
    wav: torch.Tensor,  # [B, L] float32, already padded
    cfg: WhisperFeatureConfig,
) -> torch.Tensor:
    """[B, feature_size, L // hop] Whisper log-mel, op for op as transformers' torch path (float32)."""
    window = torch.hann_window(cfg.n_fft, device=wav.device)
    stft = torch.stft(wav.float(), cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # [B, n_fft // 2 + 1, frames]
    fb = mel_filterbank(cfg.sampling_rate, cfg.n_fft, cfg.feature_size, 0.0, 8000.0)  # [mels, freqs] float32
    filters = torch.from_numpy(np.ascontiguousarray(fb.T)).to(wav.device)  # [freqs, mels], as transformers holds it
    log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()
    peak = log_spec.amax(dim=2, keepdim=True).amax(dim=1, keepdim=True)  # per utterance
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_batch(chunks: Sequence[np.ndarray], multiple: int, value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ceil(longest / multiple) * multiple samples: ([B, L] float32 wav, [B, L] bool real-sample mask)."""
    longest = max(len(c) for c in chunks)
    length = math.ceil(longest / multiple) * multiple
    wav = torch.full((len(chunks), length), float(value), dtype=torch.float32)
    mask = torch.zeros((len(chunks), length), dtype=torch.bool)
    for i, c in enumerate(chunks):
        wav[i, : len(c)] = torch.from_numpy(np.asarray(c, dtype=np.float32))
        mask[i, : len(c)] = True
    return wav, mask


def attention_bias(valid: torch.Tensor, block: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """valid [B, T] bool key mask -> additive bias [B, 1, T, T] (block-causal) or [B, 1, 1, T] (padding only).

    Block-causal: query i sees key j iff (j <= i or j and i share a `block`-frame block) and key j is real.
    """
    if block is None:
        allowed = valid[:, None, None, :]
    else:
        t = torch.arange(valid.shape[1], device=valid.device)
        allowed = (t[None, :] <= t[:, None]) | (t[None, :] // block == t[:, None] // block)  # [T(query), T(key)]
        allowed = (allowed[None] & valid[:, None, :])[:, None]
    return (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min


class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> torch.Tensor:  # x [B, T, d]
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, H, T, d / H]
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2).contiguous()

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if causal:  # upstream drops the mask for causal layers
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: WhisperVQConfig, causal: bool):
        super().__init__()
        d = cfg.d_model
        self.causal = causal
        self.act = _ACTIVATIONS[cfg.activation_function]
        self.self_attn = _SelfAttention(d, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        h = h + self.self_attn(self.self_attn_layer_norm(h), bias, self.causal)
        return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))


class WhisperVQEncoder(nn.Module):
    """The quantize-only WhisperVQ encoder: parameter names are the checkpoint's, minus `model.encoder.`."""

    def __init__(self, cfg: WhisperVQConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, V = cfg.d_model, cfg.quantize_vocab_size
        if cfg.quantize_ema_decay is not None:  # training buffers, part of the strict state dict
            self.register_buffer("ema_count", torch.ones(V))
            self.register_buffer("ema_weight", torch.zeros(V, d))
        pad = 0 if cfg.encoder_causal_convolution else 1
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=pad)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=pad)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        causal = cfg.encoder_causal_attention or cfg.quantize_causal_encoder
        self.layers = nn.ModuleList([_EncoderLayer(cfg, causal) for _ in range(cfg.quantize_position)])
        self.codebook = nn.Embedding(V, d)
        self.embed_positions2 = nn.Embedding(math.ceil(cfg.max_source_positions / cfg.pool), d)  # unused for ids

    @property
    def frame_stride(self) -> int:
        """Feature frames per token."""
        return self.conv1.stride[0] * self.conv2.stride[0] * self.cfg.pool

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoder_causal_convolution:  # left pad dilation * (kernel - 1)
            x = F.pad(x, (conv.dilation[0] * (conv.kernel_size[0] - 1), 0))
        return F.gelu(conv(x))

    def encode(
        self,
        features: torch.Tensor,  # [B, num_mel_bins, Tf] log-mel, Tf a multiple of frame_stride
        frame_mask: torch.Tensor,  # [B, Tf] bool, True on frames of real audio
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The states the quantizer sees, [B, Tf / frame_stride, d], and their validity mask [B, Tf / frame_stride].

        With the quantize-only encoder the quantizer runs after the last layer (pooling_position <= quantize_position),
        on the raw residual stream (no final LayerNorm).
        """
        cfg = self.cfg
        conv_stride = self.conv1.stride[0] * self.conv2.stride[0]
        t = features.shape[-1] // conv_stride
        if t > cfg.max_source_positions:
            raise SpeechTokenizerError(f"{t} encoder frames exceed max_source_positions ({cfg.max_source_positions})")
        h = self._conv(self.conv2, self._conv(self.conv1, features)).transpose(1, 2)  # [B, T, d]
        if h.shape[1] != t or features.shape[-1] % conv_stride:
            raise SpeechTokenizerError(f"feature frames ({features.shape[-1]}) must be a multiple of {conv_stride}")
        h = h + self.embed_positions.weight[:t]
        valid = frame_mask[:, ::conv_stride]
        bias = attention_bias(valid, cfg.quantize_causal_block_size)
        for idx, layer in enumerate(self.layers, 1):
            h = layer(h, bias)
            if idx == cfg.pooling_position and cfg.pooling_kernel_size is not None:
                k = cfg.pooling_kernel_size
                x = h.transpose(1, 2)
                if x.shape[-1] % k:
                    x = F.pad(x, (0, k - x.shape[-1] % k))  # zeros, as upstream
                x = F.avg_pool1d(x, k) if cfg.pooling_type == "avg" else F.max_pool1d(x, k)
                h = x.transpose(1, 2)
                valid = valid[:, ::k]
                block = cfg.quantize_causal_block_size
                bias = attention_bias(valid, None if block is None else block // k)
        return h, valid

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, Tf / frame_stride] int64 and their validity mask (same shape, bool); arguments as encode."""
        h, valid = self.encode(features, frame_mask)
        return self.quantize(h), valid

    def quantize(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, T] index of the nearest codebook row (squared L2, first index on ties)."""
        code = self.codebook.weight
        x = h.reshape(-1, h.shape[-1])
        dist = torch.addmm(
            torch.sum(code**2, dim=1) + torch.sum(x**2, dim=1, keepdim=True), x, code.t(), alpha=-2.0, beta=1.0
        )
        return dist.argmin(dim=1).reshape(h.shape[0], h.shape[1])


def load_encoder_state(directory: Path, cfg: WhisperVQConfig) -> dict[str, torch.Tensor]:
    """The encoder's tensors from `model*.safetensors`: `model.encoder.*` minus the final layer_norm and the
    layers at or past quantize_position, with the prefix stripped."""
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise SpeechTokenizerError(f"speech tokenizer: {directory} has no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if not key.startswith(PREFIX):
                        continue
                    name = key[len(PREFIX) :]
                    if name.startswith("layer_norm"):
                        continue
                    if name.startswith("layers.") and int(name.split(".")[1]) >= cfg.quantize_position:
                        continue
                    if name in state:
                        raise SpeechTokenizerError(f"{path}: tensor '{key}' also in {origin[name]}")
                    state[name], origin[name] = f.get_tensor(key), path
        except (SafetensorError, OSError) as e:
            raise SpeechTokenizerError(f"{path}: cannot read safetensors: {e}") from None
    return state


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True), with every missing / unexpected key and shape mismatch in one error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(PREFIX + i for i in items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise SpeechTokenizerError(f"{where}: checkpoint does not match config.json; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _as_mono16k(wav: np.ndarray, sr: int, where: str) -> np.ndarray:
    """[N] or [C, N] (channel 0 is used, as upstream) at `sr` -> [N16] float32 at 16 kHz."""
    a = np.asarray(wav)
    if a.ndim == 2:
        a = a[0]
    if a.ndim != 1:
        raise SpeechTokenizerError(f"{where}: expected a waveform [N] or [channels, N], got shape {np.shape(wav)}")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise SpeechTokenizerError(f"{where}: sample rate must be a positive integer, got {sr!r}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise SpeechTokenizerError(f"{where}: waveform contains NaN or inf")
    return resample(a, int(sr), SAMPLE_RATE)


class SpeechTokenizer:
    """Waveforms -> GLM-TTS speech tokens. Construct with `from_pretrained(dir)`."""

    def __init__(
        self,
        encoder: WhisperVQEncoder,
        features: WhisperFeatureConfig,
        device: str | torch.device = "cpu",
        batch_size: int = BATCH_CHUNKS,
    ):
        if features.feature_size != encoder.cfg.num_mel_bins:
            raise SpeechTokenizerError(
                f"preprocessor_config.json feature_size {features.feature_size} != config.json num_mel_bins "
                f"{encoder.cfg.num_mel_bins}"
            )
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.features = features
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> SpeechTokenizer:
        d = Path(directory)
        if not d.is_dir():
            raise SpeechTokenizerError(f"speech tokenizer: directory not found: {d}")
        cfg = WhisperVQConfig.from_json(d / "config.json")
        features = WhisperFeatureConfig.from_json(d / "preprocessor_config.json")
        encoder = WhisperVQEncoder(cfg)
        strict_load(encoder, load_encoder_state(d, cfg), str(d))
        return cls(encoder, features, device)

    @property
    def vocab_size(self) -> int:
        return self.encoder.cfg.quantize_vocab_size

    @property
    def stride(self) -> int:
        """16 kHz samples per token (640 for GLM-TTS)."""
        return self.encoder.frame_stride * self.features.hop_length

    def num_tokens(self, num_samples_16k: int) -> int:
        """Tokens for an utterance of this many 16 kHz samples: ceil(n / stride) per 30 s chunk."""
        full, rest = divmod(num_samples_16k, CHUNK_SAMPLES)
        return full * math.ceil(CHUNK_SAMPLES / self.stride) + math.ceil(rest / self.stride)

    @torch.inference_mode()
    def __call__(self, utts: Sequence[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """utts: (waveform [N] or [C, N] float in [-1, 1], sample rate) each -> one int64 [num_tokens] per utt.

        The batch layout (which chunks share a padded batch) follows upstream, so tokenizing prompts one per call,
        as upstream's front end does, reproduces its output.
        """
        chunks, owner = [], []
        for i, utt in enumerate(utts):
            if not isinstance(utt, tuple) or len(utt) != 2:
                raise SpeechTokenizerError(f"item {i}: expected a (waveform, sample_rate) tuple")
            audio = _as_mono16k(utt[0], utt[1], f"item {i}")
            for start in range(0, len(audio), CHUNK_SAMPLES):
                chunks.append(audio[start : start + CHUNK_SAMPLES])
                owner.append(i)
        tokens: list[list[np.ndarray]] = [[] for _ in utts]
        for s in range(0, len(chunks), self.batch_size):
            batch = chunks[s : s + self.batch_size]
            wav, sample_mask = pad_batch(batch, self.stride, self.features.padding_value)
            feats = whisper_log_mel(wav.to(self.device), self.features)
            frame_mask = sample_mask[:, :: self.features.hop_length].to(self.device)
            ids, valid = self.encoder(feats, frame_mask)
            ids, valid = ids.cpu(), valid.cpu()
            for j in range(len(batch)):
                tokens[owner[s + j]].append(ids[j][valid[j]].numpy())
        return [np.concatenate(t).astype(np.int64) if t else np.zeros(0, dtype=np.int64) for t in tokens]
