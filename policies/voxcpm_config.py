"""VoxCPM2 `config.json`, parsed by hand with explicit validation (unknown and missing fields named).

The schema is the released one (VoxCPM 2.x `VoxCPMConfig` and its nested sections). A few fields that released
checkpoints carry but the released model code never reads are accepted and ignored: they are listed in
`_TOLERATED`. Anything else unknown is an error, as is a missing required field or a wrongly typed value.

VoxCPM1.5 / VoxCPM-0.5B (`"architecture": "voxcpm"`) use a different LocDiT input layout and the V1 AudioVAE;
they are refused with a clear error rather than silently mis-built.
"""

from __future__ import annotations

import copy
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class VoxCPMConfigError(ValueError):
    """config.json does not describe a model this code builds."""


@dataclass
class RopeScaling:
    type: str
    long_factor: list[float]
    short_factor: list[float]
    original_max_position_embeddings: int


@dataclass
class LMConfig:
    """MiniCPM-4 transformer settings (the base LM; other stacks are copies with a few fields replaced)."""

    bos_token_id: int
    eos_token_id: int
    hidden_size: int
    intermediate_size: int
    max_position_embeddings: int
    num_attention_heads: int
    num_hidden_layers: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_scaling: RopeScaling
    vocab_size: int
    scale_emb: float
    dim_model_base: int
    scale_depth: float
    rope_theta: float
    use_mup: bool = True
    kv_channels: int | None = None
    no_rope: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels else self.hidden_size // self.num_attention_heads


@dataclass
class EncoderConfig:
    hidden_dim: int = 1024
    ffn_dim: int = 4096
    num_heads: int = 16
    num_layers: int = 4
    kv_channels: int | None = None


@dataclass
class CfmConfig:
    sigma_min: float = 1e-6
    solver: str = "euler"
    t_scheduler: str = "log-norm"
    training_cfg_rate: float = 0.1
    inference_cfg_rate: float = 1.0
    reg_loss_type: str = "l1"
    ratio_r_neq_t_range: list[float] = field(default_factory=lambda: [0.25, 0.75])
    noise_cond_prob_range: list[float] = field(default_factory=lambda: [0.0, 0.0])
    noise_cond_scale: float = 0.0


@dataclass
class DitConfig:
    cfm_config: CfmConfig
    hidden_dim: int = 1024
    ffn_dim: int = 4096
    num_heads: int = 16
    num_layers: int = 4
    kv_channels: int | None = None
    dit_mean_mode: bool = False


@dataclass
class AudioVAEConfig:
    """AudioVAE V2 (16 kHz in, 48 kHz out for VoxCPM2)."""

    encoder_dim: int = 128
    encoder_rates: list[int] = field(default_factory=lambda: [2, 5, 8, 8])
    latent_dim: int = 64
    decoder_dim: int = 2048
    decoder_rates: list[int] = field(default_factory=lambda: [8, 6, 5, 2, 2, 2])
    depthwise: bool = True
    sample_rate: int = 16000
    out_sample_rate: int = 48000
    use_noise_block: bool = False
    sr_bin_boundaries: list[int] | None = field(default_factory=lambda: [20000, 30000, 40000])
    cond_type: str = "scale_bias"
    cond_dim: int = 128
    cond_out_layer: bool = False


@dataclass
class VoxCPMConfig:
    lm_config: LMConfig
    encoder_config: EncoderConfig
    dit_config: DitConfig
    patch_size: int = 4
    feat_dim: int = 64
    residual_lm_num_layers: int = 8
    residual_lm_no_rope: bool = False
    scalar_quantization_latent_dim: int = 512
    scalar_quantization_scale: int = 9
    audio_vae_config: AudioVAEConfig | None = None
    max_length: int = 8192
    device: str = "cuda"
    dtype: str = "bfloat16"
    architecture: str = "voxcpm2"

    def vae(self) -> AudioVAEConfig:
        return self.audio_vae_config if self.audio_vae_config is not None else AudioVAEConfig()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Fields present in released config.json files that the released model code does not read.
_TOLERATED: dict[str, set[str]] = {
    "": {"sample_rate", "cfg_value", "inference_timesteps"},
    "dit_config": {"mean_mode"},
}
_NESTED = {
    "lm_config": LMConfig,
    "encoder_config": EncoderConfig,
    "dit_config": DitConfig,
    "audio_vae_config": AudioVAEConfig,
    "rope_scaling": RopeScaling,
    "cfm_config": CfmConfig,
}
_DTYPES = {"bfloat16", "bf16", "float16", "fp16", "float32", "fp32"}


def _check_type(value: Any, annotation: str, where: str) -> Any:
    base = annotation.replace(" | None", "")
    if value is None:
        if "None" in annotation:
            return None
        raise VoxCPMConfigError(f"{where}: must not be null")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list[float]": isinstance(value, list) and all(isinstance(v, (int, float)) for v in value),
        "list[int]": isinstance(value, list) and all(isinstance(v, int) for v in value),
    }.get(base)
    if ok is None:
        raise AssertionError(f"unhandled annotation {annotation}")
    if not ok:
        raise VoxCPMConfigError(f"{where}: expected {base}, got {value!r}")
    if base == "float":
        return float(value)
    if base == "list[float]":
        return [float(v) for v in value]
    return value


def _is_required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def parse_config(data: dict[str, Any], where: str = "config.json") -> VoxCPMConfig:
    """Validate a config.json dict and build a VoxCPMConfig; raises VoxCPMConfigError naming file and field."""
    if not isinstance(data, dict):
        raise VoxCPMConfigError(f"{where}: expected a JSON object")
    arch = str(data.get("architecture", "voxcpm")).lower()
    if arch != "voxcpm2":
        raise VoxCPMConfigError(
            f"{where}: architecture {arch!r} is not supported (only 'voxcpm2'; VoxCPM1.5 and "
            "VoxCPM-0.5B use the V1 LocDiT/AudioVAE layouts)"
        )
    data = copy.deepcopy(data)
    data["architecture"] = "voxcpm2"
    tops = {k: v for k, v in data.items() if k not in _TOLERATED[""]}
    cfg = _parse_section(VoxCPMConfig, tops, where)
    _validate(cfg, where)
    return cfg


def _parse_section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise VoxCPMConfigError(f"{where}: expected an object, got {type(data).__name__}")
    section = where.rsplit(" ", 1)[-1].rsplit(".", 1)[-1]
    tolerated = _TOLERATED.get(section, set())
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in tolerated)
    missing = [n for n, f in names.items() if _is_required(f) and n not in data]
    if unknown or missing:
        parts = ([f"unknown fields {unknown}"] if unknown else []) + ([f"missing fields {missing}"] if missing else [])
        raise VoxCPMConfigError(f"{where}: " + "; ".join(parts))
    kwargs: dict[str, Any] = {}
    for name, f in names.items():
        if name not in data:
            continue
        sub = f"{where}.{name}" if ": " in where else f"{where}: {name}"
        if name in _NESTED and data[name] is None and "None" in str(f.type):
            kwargs[name] = None
        elif name in _NESTED:
            kwargs[name] = _parse_section(_NESTED[name], data[name], sub)
        else:
            kwargs[name] = _check_type(data[name], str(f.type), sub)
    return cls(**kwargs)


def _validate(cfg: VoxCPMConfig, where: str) -> None:
    lm = cfg.lm_config
    if lm.num_attention_heads % lm.num_key_value_heads:
        raise VoxCPMConfigError(f"{where}: lm_config.num_attention_heads must be a multiple of num_key_value_heads")
    for name, heads in (("encoder_config", cfg.encoder_config.num_heads), ("dit_config", cfg.dit_config.num_heads)):
        if heads % lm.num_key_value_heads:
            raise VoxCPMConfigError(
                f"{where}: {name}.num_heads must be a multiple of lm_config.num_key_value_heads "
                "(the local stacks inherit the LM's key/value head count)"
            )
    if cfg.dtype not in _DTYPES:
        raise VoxCPMConfigError(f"{where}: dtype {cfg.dtype!r} not one of {sorted(_DTYPES)}")
    if cfg.dit_config.dit_mean_mode:
        raise VoxCPMConfigError(
            f"{where}: dit_config.dit_mean_mode=true is not supported (the released sampler only uses plain velocity)"
        )
    if cfg.dit_config.cfm_config.solver != "euler":
        raise VoxCPMConfigError(f"{where}: dit_config.cfm_config.solver must be 'euler'")
    vae = cfg.vae()
    if vae.latent_dim != cfg.feat_dim:
        raise VoxCPMConfigError(f"{where}: audio_vae_config.latent_dim {vae.latent_dim} != feat_dim {cfg.feat_dim}")
    if vae.decoder_dim < 2 ** len(vae.decoder_rates):
        raise VoxCPMConfigError(f"{where}: audio_vae_config.decoder_dim must be >= 2**len(decoder_rates)")
    rs = lm.rope_scaling
    enc, dit = cfg.encoder_config, cfg.dit_config
    dims = {
        "lm_config": lm.head_dim,
        "encoder_config": enc.kv_channels or enc.hidden_dim // enc.num_heads,
        "dit_config": dit.kv_channels or dit.hidden_dim // dit.num_heads,
    }
    if lm.no_rope:
        return
    for stack, head_dim in dims.items():
        for name in ("long_factor", "short_factor"):
            n = len(getattr(rs, name))
            if n not in (1, head_dim // 2):
                raise VoxCPMConfigError(
                    f"{where}: lm_config.rope_scaling.{name} has {n} entries; {stack} needs 1 or "
                    f"head_dim/2 = {head_dim // 2}"
                )


def load_config(path: str | Path) -> VoxCPMConfig:
    """Read and validate `<dir>/config.json` (or a config.json path)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise VoxCPMConfigError(f"{p}: file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise VoxCPMConfigError(f"{p}: not valid JSON: {e}") from None
    return parse_config(data, where=str(p))


def sub_lm_config(lm: LMConfig, **overrides: Any) -> LMConfig:
    """A deep copy of `lm` with fields replaced (how the residual LM, LocEnc and LocDiT configs are derived)."""
    out = copy.deepcopy(lm)
    for k, v in overrides.items():
        if not hasattr(out, k):
            raise AttributeError(k)
        setattr(out, k, v)
    return out
