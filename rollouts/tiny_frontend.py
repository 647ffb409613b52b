"""A tiny random GLM-TTS prompt front end, in exactly the upstream layout, for tests (read by the real loaders).

    <dir>/speech_tokenizer/config.json              WhisperVQ config (model_type "whisper", all WhisperConfig fields)
    <dir>/speech_tokenizer/preprocessor_config.json WhisperFeatureExtractor config, 128 mel bins
    <dir>/speech_tokenizer/model.safetensors        a whole checkpoint: the encoder's tensors under model.encoder.,
                                                    plus the extra tensors the loader must drop (layers at or past
                                                    quantize_position, the final layer_norm, decoder weights)
    <dir>/frontend/campplus.onnx                    input "input" [batch, T, 80] -> output "output" [batch, 192]

The weights are random: the models run and give deterministic outputs, not meaningful ones. The codebook rows
are encoder outputs on random probe audio plus noise (as a trained VQ codebook sits on the data), so real audio
maps to many different codes and nearest-code near-ties are unlikely. Writing the ONNX file needs `onnx`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rollouts.prepare import CAMPPLUS_PATH, TOKENIZER_DIR
from rollouts.speaker_embedding import EMBEDDING_DIM, NUM_BINS
from rollouts.speech_tokenizer import (
    PREFIX,
    WhisperFeatureConfig,
    WhisperVQConfig,
    WhisperVQEncoder,
    strict_load,
    whisper_log_mel,
)


def tiny_whisper_vq_config(
    d_model: int = 64,
    heads: int = 4,
    ffn: int = 128,
    layers: int = 4,
    quantize_position: int = 2,
    vocab: int = 64,
    **overrides,
) -> dict:
    """config.json contents: every WhisperConfig field plus the WhisperVQ ones (the real file's layout)."""
    from transformers import WhisperConfig

    cfg = WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=ffn,
        num_mel_bins=128,
        max_source_positions=1500,
        activation_function="gelu",
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    ).to_dict()
    cfg.update(
        model_type="whisper",
        architectures=["WhisperVQForConditionalGeneration"],
        pooling_kernel_size=2,
        pooling_type="avg",
        pooling_position=quantize_position,
        quantize_position=quantize_position,
        quantize_vocab_size=vocab,
        quantize_causal_block_size=200,
        quantize_ema_decay=0.99,
        quantize_encoder_only=False,
        quantize_causal_encoder=False,
        quantize_commit_coefficient=0.25,
        quantize_loss_scale=10.0,
        quantize_restart_interval=100,
        encoder_causal_attention=False,
        encoder_causal_convolution=False,
        skip_language_detection=True,
        pitch_control=None,
    )
    cfg.update(overrides)
    return cfg


def tiny_checkpoint(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-checkpoint tensors (with the `model.encoder.` prefix) for config `cfg`, including dropped extras."""
    g = torch.Generator().manual_seed(seed)
    d, ffn, vocab = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["quantize_vocab_size"]

    def r(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {
        "conv1.weight": r(d, cfg["num_mel_bins"], 3),
        "conv1.bias": r(d),
        "conv2.weight": r(d, d, 3, std=0.1),
        "conv2.bias": r(d),
        "embed_positions.weight": r(cfg["max_source_positions"], d),
        "layer_norm.weight": torch.ones(d),
        "layer_norm.bias": torch.zeros(d),  # final LN: dropped by the loader
        "codebook.weight": torch.zeros(vocab, d),  # replaced below
        "embed_positions2.weight": r(math.ceil(cfg["max_source_positions"] / cfg["pooling_kernel_size"]), d),
    }
    for i in range(cfg["encoder_layers"]):  # layers >= quantize_position are dropped by the loader
        p = f"layers.{i}."
        for name in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{name}_proj.weight"] = r(d, d)
            if name != "k":
                sd[p + f"self_attn.{name}_proj.bias"] = r(d)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(d), r(d)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(ffn, d), r(ffn)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(d, ffn), r(d)
    sd["codebook.weight"] = _data_codebook(cfg, sd, seed)
    if cfg.get("quantize_ema_decay") is not None:
        sd["ema_count"] = torch.ones(vocab)
        sd["ema_weight"] = sd["codebook.weight"].clone()
    out = {PREFIX + k: v.contiguous() for k, v in sd.items()}
    out["model.decoder.embed_tokens.weight"] = r(16, d)  # outside the encoder: ignored
    out["proj_out.weight"] = r(16, d)
    return out


def speechlike_wave(num_samples: int, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """[num_samples] float32 test signal: 80 ms segments of a random tone (80 Hz..4 kHz) with noise, random level
    (some silent), so front-end features vary over time like speech."""
    rng = np.random.default_rng(seed)
    seg = max(1, int(0.08 * sr))
    t = np.arange(seg) / sr
    out = np.zeros(num_samples, dtype=np.float32)
    for start in range(0, num_samples, seg):
        f0, amp, noise = rng.uniform(80.0, 4000.0), rng.choice([0.0, 0.02, 0.1, 0.4]), rng.uniform(0.0, 0.2)
        x = amp * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi)) + noise * amp * rng.standard_normal(seg)
        out[start : start + seg] = x[: num_samples - start]
    return out


def _data_codebook(cfg: dict, sd: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """[vocab, d] codebook: encoder states of 4 x 10 s of speech-like probe audio, plus noise."""
    vq = WhisperVQConfig(**{f: cfg[f] for f in WhisperVQConfig.__dataclass_fields__ if f in cfg})
    enc = WhisperVQEncoder(vq).eval()
    keep = {k: v for k, v in sd.items() if k in enc.state_dict()}
    keep.update({k: v for k, v in enc.state_dict().items() if k in ("codebook.weight", "ema_count", "ema_weight")})
    strict_load(enc, keep, "tiny speech tokenizer")
    wav = torch.from_numpy(np.stack([speechlike_wave(10 * 16000, 1000 + seed * 10 + i) for i in range(4)]))
    feats = whisper_log_mel(wav, WhisperFeatureConfig(feature_size=cfg["num_mel_bins"]))
    with torch.no_grad():
        states, _ = enc.encode(feats, torch.ones(feats.shape[0], feats.shape[-1], dtype=torch.bool))
    states = states.reshape(-1, states.shape[-1])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(states.shape[0], generator=g)[: cfg["quantize_vocab_size"]]
    spread = states.std(dim=0).mean()
    return states[pick] + 0.1 * spread * torch.randn(len(pick), states.shape[-1], generator=g)


def write_tiny_speech_tokenizer(directory: str | Path, seed: int = 0, **config) -> Path:
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = tiny_whisper_vq_config(**config)
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    fe = WhisperFeatureExtractor(feature_size=cfg["num_mel_bins"]).to_dict()
    fe["processor_class"] = "WhisperProcessor"
    (d / "preprocessor_config.json").write_text(json.dumps(fe, indent=2, sort_keys=True) + "\n")
    save_file(tiny_checkpoint(cfg, seed), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


class TinyCAMPPlus(nn.Module):
    """[B, T, 80] -> [B, 192]: per-frame MLP, mean and mean-square pooling over time, projection."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.frame = nn.Linear(NUM_BINS, hidden)
        self.proj = nn.Linear(2 * hidden, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.frame(x))
        return self.proj(torch.cat([h.mean(dim=1), (h * h).mean(dim=1)], dim=-1))


def write_tiny_campplus(path: str | Path, seed: int = 0) -> Path:
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
    except ImportError:
        raise RuntimeError("writing the tiny campplus.onnx needs the `onnx` package: pip install onnx") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinyCAMPPlus().eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 50, NUM_BINS),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch", 1: "T"}, "output": {0: "batch"}},
    )
    return path


def write_tiny_frontend(directory: str | Path, seed: int = 0, **config) -> Path:
    """Both models under `directory` (created); `config` overrides tiny_whisper_vq_config's arguments or fields."""
    d = Path(directory)
    write_tiny_speech_tokenizer(d / TOKENIZER_DIR, seed=seed, **config)
    write_tiny_campplus(d / CAMPPLUS_PATH, seed=seed)
    return d
