"""IndexTTS2's semantic front end: w2v-BERT 2.0 features and the MaskGCT semantic codec, loaded strictly.

Released layout of an IndexTTS2 model directory (the parts read here):

    <model_dir>/config.yaml                 `w2v_stat: wav2vec2bert_stats.pt` and the `semantic_codec` section
                                            {codebook_size: 8192, hidden_size: 1024, codebook_dim: 8, vocos_dim: 384,
                                             vocos_intermediate_dim: 2048, vocos_num_layers: 12}
    <model_dir>/wav2vec2bert_stats.pt       {"mean": [D], "var": [D]} (torch.load, weights only), D = 1024
    <model_dir>/hf_cache/w2v-bert-2.0/      facebook/w2v-bert-2.0 in transformers' layout: config.json (24 conformer
                                            layers, hidden 1024), model.safetensors, preprocessor_config.json
                                            (SeamlessM4TFeatureExtractor: 16 kHz, 80 mel bins, stride 2)
    <model_dir>/hf_cache/semantic_codec_model.safetensors   amphion/MaskGCT `semantic_codec/model.safetensors`

Features (`W2VBertFeatures`): a 16 kHz mono waveform of N samples gives F = 1 + (N - 400) // 160 fbank frames
(10 ms hop), stacked in pairs into T = ceil(F / 2) inputs of 160 values (50 Hz; an odd frame is padded and masked);
the output is `hidden_states[17]` of Wav2Vec2BertModel (the input projection is index 0, so: after 17 of the
conformer layers), normalised as `(h - mean) / sqrt(var)`: [1, T, D].

Codec (`SemanticCodec`, a RepCodec): encoder = Vocos ConvNeXt backbone + linear, then one factorized vector quantizer
(project D -> codebook_dim with a weight-normalised 1x1 conv, nearest codebook entry by cosine similarity, project
back to D). Its parameter names are the released file's:

    encoder.0.embed.{weight [V, D, 7], bias}       encoder.0.norm.{weight, bias} [V]
    encoder.0.convnext.<i>.dwconv.{weight [V, 1, 7], bias}   .norm.{weight, bias}   .gamma [V]
    encoder.0.convnext.<i>.pwconv1.{weight [I, V], bias}     .pwconv2.{weight [V, I], bias}
    encoder.0.final_layer_norm.{weight, bias}      encoder.1.{weight [D, V], bias [D]}
    decoder.*                                      the same as encoder.* (stored, unused by IndexTTS2)
    quantizer.quantizers.0.in_project.{weight_g [C, 1, 1], weight_v [C, D, 1], bias [C]}
    quantizer.quantizers.0.out_project.{weight_g [D, 1, 1], weight_v [D, C, 1], bias [D]}
    quantizer.quantizers.0.codebook.weight [K, C]
    down.*, up.* [D, D, 3]                         only with downsample_scale 2 (not in the released config)

with V = vocos_dim, I = vocos_intermediate_dim, D = hidden_size, C = codebook_dim, K = codebook_size.

    quantize(feats [B, T, D]) -> (codes [B, T] int64, quantized [B, T, D])   the released `(_, S_ref)`
    vq2emb(codes [B, T])      -> [B, T, D]                                   per row
    quantizer.vq2emb(codes [1, B, T]) -> [B, D, T]                           the released call's form

The released inference code calls `quantizer.vq2emb(codes.unsqueeze(1))` on a [1, T] batch, i.e. [N=1, B=1, T];
`SemanticCodec.vq2emb` is that call transposed to [B, T, D], and correct for any batch size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rollouts.token2wav import load_weights_only

W2V_BERT_DIR = "hf_cache/w2v-bert-2.0"
W2V_STATS = "wav2vec2bert_stats.pt"  # config.yaml `w2v_stat`
SEMANTIC_CODEC_FILE = "hf_cache/semantic_codec_model.safetensors"
FEATURE_LAYER = 17  # hidden_states index used by IndexTTS2
SAMPLE_RATE = 16000


class SemanticConfigError(ValueError):
    """A semantic front-end file or config section is missing or wrong (the message names the file and key)."""


def _listing(where: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    lines = [f"{where}: the checkpoint does not match the model"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = " ..." if len(items) > 20 else ""
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]) + more)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- w2v-BERT


def _read_stats(path: Path, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], var [D]) from the stats file; shapes broadcasting as [D] are accepted ([D], [1, D], [1, 1, D])."""
    obj = load_weights_only(path, SemanticConfigError, "a weights-only torch file (w2v-BERT stats)")
    if not isinstance(obj, dict) or set(obj) != {"mean", "var"}:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise SemanticConfigError(f"{path}: expected a dict with exactly the keys 'mean' and 'var', got {keys}")
    out = []
    for key in ("mean", "var"):
        t = obj[key]
        if not isinstance(t, torch.Tensor) or t.shape[-1:] != (dim,) or t.numel() != dim:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise SemanticConfigError(
                f"{path}: {key} must be a tensor of {dim} values (the model's width), got {shape}"
            )
        t = t.reshape(dim).float()
        if not torch.isfinite(t).all():
            raise SemanticConfigError(f"{path}: {key} has non-finite values")
        out.append(t)
    if (out[1] <= 0).any():
        raise SemanticConfigError(f"{path}: var must be positive")
    return out[0], out[1]


def _read_w2v_config(w2v_dir: Path) -> dict[str, Any]:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (w2v_dir / name).is_file():
            raise SemanticConfigError(f"{w2v_dir}: {name} not found (a w2v-bert-2.0 directory in transformers' layout)")
    try:
        config = json.loads((w2v_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SemanticConfigError(f"{w2v_dir / 'config.json'}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("model_type") != "wav2vec2-bert":
        got = config.get("model_type") if isinstance(config, dict) else None
        raise SemanticConfigError(f"{w2v_dir / 'config.json'}: model_type must be 'wav2vec2-bert', got {got!r}")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < FEATURE_LAYER:
        raise SemanticConfigError(
            f"{w2v_dir / 'config.json'}: num_hidden_layers {layers!r}: IndexTTS2 reads hidden_states[{FEATURE_LAYER}]"
            f", which needs at least {FEATURE_LAYER} layers"
        )
    return config


class W2VBertFeatures:
    """IndexTTS2's speaker/emotion features: SeamlessM4TFeatureExtractor + Wav2Vec2BertModel hidden_states[17],
    normalised by the released mean/var. Holds `extractor`, `model` (eval, frozen), `mean`, `std` and `dim`."""

    def __init__(self, extractor: Any, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.extractor = extractor
        self.model = model
        self.mean = mean
        self.std = std
        self.dim = int(mean.numel())

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @classmethod
    def from_dirs(cls, w2v_dir: Path, stats_path: Path, device: str | torch.device = "cpu") -> W2VBertFeatures:
        """Load `w2v_dir` (config.json, model.safetensors, preprocessor_config.json) with transformers, local files
        only, every weight required: one SemanticConfigError lists missing, unexpected and mis-shaped keys."""
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

        w2v_dir, stats_path = Path(w2v_dir), Path(stats_path)
        config = _read_w2v_config(w2v_dir)
        dim = config.get("hidden_size")
        if not isinstance(dim, int) or dim <= 0:
            raise SemanticConfigError(f"{w2v_dir / 'config.json'}: hidden_size {dim!r} must be a positive integer")
        mean, var = _read_stats(stats_path, dim)
        try:
            extractor = SeamlessM4TFeatureExtractor.from_pretrained(w2v_dir, local_files_only=True)
            loaded = Wav2Vec2BertModel.from_pretrained(
                w2v_dir,
                local_files_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # report mis-shaped keys below instead of raising on the first one
                dtype=torch.float32,
            )
        except (OSError, RuntimeError, ValueError) as e:
            raise SemanticConfigError(f"{w2v_dir}: cannot load w2v-BERT: {e}") from e
        model, info = cast(tuple[Any, dict[str, Any]], loaded)
        shapes = [f"{k}: checkpoint {tuple(a)} != model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])]
        if info["missing_keys"] or info["unexpected_keys"] or shapes or info["error_msgs"]:
            msg = _listing(str(w2v_dir), sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), shapes)
            if info["error_msgs"]:
                msg += "\n  errors: " + "; ".join(info["error_msgs"])
            raise SemanticConfigError(msg)
        if extractor.sampling_rate != SAMPLE_RATE:
            raise SemanticConfigError(f"{w2v_dir}: preprocessor sampling_rate {extractor.sampling_rate} != 16000")
        if extractor.num_mel_bins * extractor.stride != model.config.feature_projection_input_dim:
            raise SemanticConfigError(
                f"{w2v_dir}: preprocessor num_mel_bins * stride ({extractor.num_mel_bins} * {extractor.stride}) != "
                f"config feature_projection_input_dim {model.config.feature_projection_input_dim}"
            )
        model.requires_grad_(False)
        model = model.to(device).eval()
        return cls(extractor, model, mean.to(device), torch.sqrt(var).to(device))

    @torch.no_grad()
    def __call__(self, wav16: np.ndarray) -> torch.Tensor:
        """16 kHz float mono waveform [N] -> normalised layer-17 features [1, T, D] (T = ceil(fbank frames / 2))."""
        wav = np.asarray(wav16, dtype=np.float32)
        if wav.ndim != 1 or wav.size < 400:
            raise ValueError(f"expected a mono 16 kHz waveform of at least 400 samples, got shape {wav.shape}")
        if not np.isfinite(wav).all():
            raise ValueError("waveform has non-finite samples")
        inputs = self.extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        out = self.model(
            input_features=inputs["input_features"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        return (out.hidden_states[FEATURE_LAYER] - self.mean) / self.std


def write_tiny_w2v_bert(w2v_dir: Path, stats_path: Path, *, hidden: int = 32, seed: int = 0, layers: int = 18) -> None:
    """A tiny random w2v-BERT 2.0 in the released layout (transformers' config.json + model.safetensors, the released
    preprocessor_config.json values) with `layers` conformer layers of width `hidden`, and stats with non-trivial
    mean/var. 18 layers by default, so that hidden_states[17] is not the last hidden state."""
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

    if layers < FEATURE_LAYER or hidden % 4:
        raise ValueError(f"a tiny w2v-BERT needs >= {FEATURE_LAYER} layers and a width divisible by 4")
    w2v_dir, stats_path = Path(w2v_dir), Path(stats_path)
    w2v_dir.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        output_hidden_size=hidden,
        feature_projection_input_dim=160,
        architectures=["Wav2Vec2BertModel"],
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2BertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(max(p[0].numel(), 1)))
    model.save_pretrained(w2v_dir)
    preprocessor = {
        "feature_extractor_type": "SeamlessM4TFeatureExtractor",
        "feature_size": 80,
        "num_mel_bins": 80,
        "padding_side": "right",
        "padding_value": 1,
        "processor_class": "Wav2Vec2BertProcessor",
        "return_attention_mask": True,
        "sampling_rate": SAMPLE_RATE,
        "stride": 2,
    }
    (w2v_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    stats = {
        "mean": 0.1 * torch.randn(hidden, generator=gen),
        "var": 0.25 + 2.0 * torch.rand(hidden, generator=gen),
    }
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stats, stats_path)


# ----------------------------------------------------------------------------------------------------- the codec


@dataclass(frozen=True)
class SemanticCodecConfig:
    """config.yaml's `semantic_codec` section (RepCodec's keys; absent keys take RepCodec's defaults)."""

    codebook_size: int = 8192
    hidden_size: int = 1024
    codebook_dim: int = 8
    vocos_dim: int = 384
    vocos_intermediate_dim: int = 2048
    vocos_num_layers: int = 12
    num_quantizers: int = 1
    downsample_scale: int = 1


def semantic_codec_config(section: Any, where: str) -> SemanticCodecConfig:
    """Strict: an unknown key, a non-integer or non-positive value is a SemanticConfigError naming `where` and the
    key. RepCodec reads vocos_intermediate_dim and vocos_num_layers only when vocos_dim is given, so giving them
    without vocos_dim is refused; downsample_scale (None, 1 or 2: RepCodec halves the frame rate for any value > 1)
    and num_quantizers (1: IndexTTS2's codes are one stream) are limited to what the released code means."""
    if not isinstance(section, dict):
        raise SemanticConfigError(f"{where}: semantic_codec must be a mapping")
    known = [f.name for f in fields(SemanticCodecConfig)]
    values: dict[str, int] = {}
    for key, value in section.items():
        if key not in known:
            raise SemanticConfigError(f"{where}: unknown key semantic_codec.{key} (known: {', '.join(known)})")
        if key == "downsample_scale" and value is None:
            value = 1
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SemanticConfigError(f"{where}: semantic_codec.{key} must be a positive integer, got {value!r}")
        values[key] = value
    if "vocos_dim" not in values and {"vocos_intermediate_dim", "vocos_num_layers"} & set(values):
        raise SemanticConfigError(
            f"{where}: semantic_codec.vocos_intermediate_dim / vocos_num_layers are ignored by RepCodec without "
            "semantic_codec.vocos_dim; give vocos_dim too"
        )
    cfg = SemanticCodecConfig(**values)
    if cfg.num_quantizers != 1:
        raise SemanticConfigError(f"{where}: semantic_codec.num_quantizers {cfg.num_quantizers}: only 1 is supported")
    if cfg.downsample_scale not in (1, 2):
        raise SemanticConfigError(f"{where}: semantic_codec.downsample_scale {cfg.downsample_scale}: use 1 or 2")
    return cfg


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (7) -> LayerNorm -> Linear -> GELU -> Linear, scaled by gamma, residual. [B, V, T]."""

    def __init__(self, dim: int, intermediate_dim: int, num_layers: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 / num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """[B, D, T] -> conv (7) -> LayerNorm -> ConvNeXt blocks -> LayerNorm -> [B, T, V]."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, num_layers) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class WeightNormConv1d(nn.Module):
    """A 1x1 Conv1d under torch.nn.utils.weight_norm's (legacy) parameters: weight = g * v / ||v|| per output."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, 1).normal_(0.0, 0.02))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, torch._weight_norm(self.weight_v, self.weight_g, 0), self.bias)


class FactorizedQuantizer(nn.Module):
    """Project [B, D, T] to the codebook space, pick the nearest entry by cosine similarity, project back."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_project: nn.Module
        self.out_project: nn.Module
        if input_dim != codebook_dim:
            self.in_project = WeightNormConv1d(input_dim, codebook_dim)
            self.out_project = WeightNormConv1d(codebook_dim, input_dim)
        else:
            self.in_project = self.out_project = nn.Identity()
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (quantized [B, D, T], codes [B, T])."""
        z_e = self.in_project(z)
        b, c, t = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(b * t, c))
        book = F.normalize(self.codebook.weight)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1)[1].reshape(b, t)
        z_q = F.embedding(codes, self.codebook.weight).transpose(1, 2)
        z_q = z_e + (z_q - z_e).detach()  # the straight-through sum, kept for bitwise agreement
        return self.out_project(z_q), codes

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, D, T]."""
        return self.out_project(F.embedding(codes, self.codebook.weight).transpose(1, 2))


class ResidualQuantizer(nn.Module):
    """The released `quantizer`: a list of factorized quantizers (one in IndexTTS2)."""

    def __init__(self, input_dim: int, num_quantizers: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(
            FactorizedQuantizer(input_dim, codebook_size, codebook_dim) for _ in range(num_quantizers)
        )

    def level(self, i: int) -> FactorizedQuantizer:
        return cast(FactorizedQuantizer, self.quantizers[i])

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """The released form: codes [N, B, T] -> the sum of the N quantizers' embeddings [B, D, T]."""
        out = self.level(0).vq2emb(codes[0])
        for i in range(1, len(self.quantizers)):
            out = out + self.level(i).vq2emb(codes[i])
        return out


class SemanticCodec(nn.Module):
    """MaskGCT's semantic codec (RepCodec) as IndexTTS2 uses it: w2v-BERT features -> codes and their embedding."""

    def __init__(self, cfg: SemanticCodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, v = cfg.hidden_size, cfg.vocos_dim
        if cfg.downsample_scale > 1:
            self.down = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
            self.up = nn.Conv1d(d, d, kernel_size=3, stride=1, padding=1)
        inter, layers = cfg.vocos_intermediate_dim, cfg.vocos_num_layers
        self.encoder = nn.Sequential(VocosBackbone(d, v, inter, layers), nn.Linear(v, d))
        self.decoder = nn.Sequential(VocosBackbone(d, v, inter, layers), nn.Linear(v, d))  # stored, unused here
        self.quantizer = ResidualQuantizer(d, cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim)

    def quantize(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, D] (normalised w2v-BERT features) -> (codes [B, T'] int64, quantized [B, T', D]), T' = T
        (ceil(T / 2) with downsample_scale 2): the released `semantic_codec.quantize` (codes, S_ref)."""
        if feats.dim() != 3 or feats.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"expected features [B, T, {self.cfg.hidden_size}], got {tuple(feats.shape)}")
        x = feats
        if self.cfg.downsample_scale > 1:
            x = F.gelu(self.down(x.transpose(1, 2))).transpose(1, 2)
        z = self.encoder(x.transpose(1, 2)).transpose(1, 2)
        quantized, codes = self.quantizer.level(0)(z)
        return codes, quantized.transpose(1, 2)

    def vq2emb(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, T, D]: the released `quantizer.vq2emb(codes.unsqueeze(1))` ([B, D, T] for B = 1),
        transposed, for each row of a batch."""
        if codes.dim() != 2:
            raise ValueError(f"expected codes [B, T], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cfg.codebook_size})")
        return self.quantizer.level(0).vq2emb(codes.long()).transpose(1, 2)


def load_semantic_codec(path: Path, cfg: SemanticCodecConfig, device: str | torch.device = "cpu") -> SemanticCodec:
    """The codec from a safetensors file with the released keys, in eval mode, parameters frozen. Strict: one
    SemanticConfigError naming the file lists every missing, unexpected and mis-shaped key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SemanticConfigError(f"{path}: semantic codec file not found")
    try:
        state = load_file(path, device="cpu")
    except (OSError, SafetensorError) as e:
        raise SemanticConfigError(f"{path}: cannot read as safetensors: {e}") from None
    model = SemanticCodec(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise SemanticConfigError(_listing(str(path), missing, unexpected, shapes))
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def save_semantic_codec(model: SemanticCodec, path: Path) -> None:
    """A safetensors file with the released keys (float32), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def write_tiny_semantic_codec(path: Path, section: dict, seed: int = 0) -> Path:
    """A random codec for the config `section` (e.g. TINY_SEMANTIC_CODEC) in the released safetensors layout, with
    non-trivial norms, gains and layer scales."""
    cfg = semantic_codec_config(section, "tiny semantic codec")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SemanticCodec(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight_g"):
                p.copy_(0.5 + noise.abs())
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.3 + 0.1 * noise)
            elif name.endswith("codebook.weight"):
                p.copy_(noise)
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / math.sqrt(max(p[0].numel(), 1)))
    save_semantic_codec(model, Path(path))
    return Path(path)


TINY_SEMANTIC_CODEC: dict[str, int] = {
    # the real code vocabulary (8192: the GPT's codes are its indices) and codebook width, a tiny backbone whose input
    # width is the tiny w2v-BERT's (write_tiny_w2v_bert hidden=32)
    "codebook_size": 8192,
    "hidden_size": 32,
    "codebook_dim": 8,
    "vocos_dim": 16,
    "vocos_intermediate_dim": 32,
    "vocos_num_layers": 2,
}

RELEASED_SEMANTIC_CODEC: dict[str, int] = {  # IndexTTS-2's config.yaml `semantic_codec` section
    "codebook_size": 8192,
    "hidden_size": 1024,
    "codebook_dim": 8,
    "vocos_dim": 384,
    "vocos_intermediate_dim": 2048,
    "vocos_num_layers": 12,
}
