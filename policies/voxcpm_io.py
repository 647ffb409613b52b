"""VoxCPM2 checkpoints in the released directory layout: strict loading, export, and a tiny random writer.

    <dir>/config.json                       the released schema (see policies/voxcpm_config.py)
    <dir>/model.safetensors | pytorch_model.bin     every VoxCPM2 parameter except audio_vae.*
    <dir>/audiovae.safetensors | audiovae.pth       the AudioVAE V2 state dict (pth: raw or under "state_dict")
    <dir>/tokenizer.json, tokenizer_config.json, ...   a Llama fast tokenizer
    <dir>/lora_config.json + lora_weights.safetensors  (optional, written by `save_voxcpm(..., lora=...)`)

Loading is strict: one error lists missing, unexpected and mis-shaped keys. `.bin` / `.pth` files are read with
torch.load(weights_only=True). The tokenizer is transformers' LlamaTokenizerFast from the directory, local files
only, with the released text preprocessing (multi-character Chinese tokens split into characters).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from policies.voxcpm_config import VoxCPMConfig, load_config, parse_config
from policies.voxcpm_model import (
    AUDIO_END,
    AUDIO_START,
    DTYPES,
    REF_AUDIO_END,
    REF_AUDIO_START,
    VoxCPM2,
)
from rollouts.token2wav import strict_load


class VoxCPMCheckpointError(ValueError):
    """A checkpoint directory is incomplete or unreadable."""


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------
class VoxCPMTokenizer:
    """Text -> ids as the released model does: tokenize, split multi-character CJK tokens, convert to ids."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.multichar = {t for t in tok.get_vocab() if len(t) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in t)}

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        pieces: list[str] = []
        for token in self.tok.tokenize(text):
            clean = token.replace("\u2581", "")
            pieces.extend(list(clean) if clean in self.multichar else [token])
        return list(self.tok.convert_tokens_to_ids(pieces))

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> VoxCPMTokenizer:
    from transformers import LlamaTokenizerFast

    try:
        tok = LlamaTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise VoxCPMCheckpointError(f"{directory}: cannot load the tokenizer: {e}") from None
    return VoxCPMTokenizer(tok)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _read_state(directory: Path, names: tuple[str, str]) -> tuple[dict[str, torch.Tensor], Path]:
    st, pt = directory / names[0], directory / names[1]
    if st.is_file():
        try:
            return load_file(str(st), device="cpu"), st
        except Exception as e:  # noqa: BLE001
            raise VoxCPMCheckpointError(f"{st}: cannot read safetensors: {e}") from None
    if pt.is_file():
        try:
            obj = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise VoxCPMCheckpointError(f"{pt}: cannot read as a weights-only torch checkpoint: {e}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise VoxCPMCheckpointError(f"{pt}: expected a state dict of tensors (raw or under 'state_dict')")
        return dict(obj), pt
    raise VoxCPMCheckpointError(f"{directory}: neither {names[0]} nor {names[1]} found")


def load_voxcpm(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[VoxCPM2, VoxCPMTokenizer]:
    """Build VoxCPM2 from a released-layout directory, loaded strictly. Returns (model in eval mode, tokenizer).

    dtype: the LM/LocDiT dtype (None: config.json "dtype"); the AudioVAE always stays float32, as released.
    """
    directory = Path(directory)
    cfg = load_config(directory)
    model_sd, model_path = _read_state(directory, ("model.safetensors", "pytorch_model.bin"))
    vae_sd, vae_path = _read_state(directory, ("audiovae.safetensors", "audiovae.pth"))
    clash = [k for k in model_sd if k.startswith("audio_vae.")]
    if clash:
        raise VoxCPMCheckpointError(f"{model_path}: holds AudioVAE keys ({clash[:3]} ...); they belong in {vae_path}")
    model = VoxCPM2(cfg)
    merged = dict(model_sd)
    merged.update({f"audio_vae.{k}": v for k, v in vae_sd.items()})
    strict_load(model, merged, f"{model_path} (+ {vae_path.name} as audio_vae.*)")
    resolved = DTYPES[cfg.dtype] if dtype is None else (DTYPES[dtype] if isinstance(dtype, str) else dtype)
    model.to(device)
    for name, module in model.named_children():
        if name != "audio_vae":
            module.to(resolved)
    return model.eval(), load_tokenizer(directory)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------
def save_voxcpm(
    model: VoxCPM2,
    tokenizer: VoxCPMTokenizer,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    lora: dict[str, Any] | None = None,
    merge: Callable[[VoxCPM2], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `model` in the released layout (merged weights) so the released loader reads it.

    dtype: storage dtype of model.safetensors (None: the parameters' own); the AudioVAE is stored in float32.
    merge: returns the merged plain-weight state dict when the model carries adapters (None: model.state_dict()).
    lora: optional {"config": {LoRAConfig fields}, "weights": {"<module path>.lora_A" / ".lora_B": tensor},
    "base_model": the un-merged base checkpoint the adapters apply to}, written in the released LoRA format,
    lora_config.json ({"base_model": ..., "lora_config": {...}}) + lora_weights.safetensors, next to the merged
    weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = merge(model) if merge is not None else model.state_dict()
    main = {
        k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items() if not k.startswith("audio_vae.")
    }
    vae = {
        k[len("audio_vae.") :]: v.detach().to("cpu").contiguous() for k, v in sd.items() if k.startswith("audio_vae.")
    }
    vae = {k: (v.float() if v.is_floating_point() else v) for k, v in vae.items()}
    cfg = model.cfg.to_dict()
    if dtype is not None:
        cfg["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    save_file(main, str(directory / "model.safetensors"))
    save_file(vae, str(directory / "audiovae.safetensors"))
    tokenizer.save(directory)
    if lora is not None:
        if not lora.get("base_model"):
            raise ValueError("save_voxcpm: lora needs 'base_model' (the checkpoint the adapters apply to)")
        info = {"base_model": str(lora["base_model"]), "lora_config": lora["config"]}
        (directory / "lora_config.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in lora["weights"].items()},
            str(directory / "lora_weights.safetensors"),
        )
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Tiny random checkpoint
# ----------------------------------------------------------------------------------------------------------------
def _write_tokenizer(directory: Path, texts: list[str]) -> int:
    """A character-level Llama fast tokenizer; ids 101..104 are the audio markers. Returns the vocab size."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, AUDIO_START):
        vocab[f"<reserved_{i}>"] = i
    for i, name in zip(
        (AUDIO_START, AUDIO_END, REF_AUDIO_START, REF_AUDIO_END),
        ("<|audio_start|>", "<|audio_end|>", "<|ref_audio_start|>", "<|ref_audio_end|>"),
    ):
        vocab[name] = i
    for ch in ["\u2581"] + sorted({c for t in texts for c in t}):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return len(vocab)


def tiny_config(
    vocab_size: int,
    use_mup: bool = False,
    hidden: int = 64,
    layers: int = 2,
    local_hidden: int = 32,
    feat_dim: int = 16,
    max_length: int = 4096,
    local_layers: int = 2,
    residual_layers: int = 2,
    head_dim: int = 16,
    dtype: str = "float32",
) -> dict[str, Any]:
    """A small config.json dict in the released schema (one head_dim on every stack, as the release's 128)."""
    lm = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 8192,
        "num_attention_heads": hidden // head_dim,
        "num_hidden_layers": layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "short_factor": [1.0] * (head_dim // 2),
            "original_max_position_embeddings": 4096,
        },
        "vocab_size": vocab_size,
        "use_mup": use_mup,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
        "rope_theta": 10000,
        "kv_channels": head_dim,
    }
    local = {
        "hidden_dim": local_hidden,
        "ffn_dim": 2 * local_hidden,
        "num_heads": local_hidden // head_dim,
        "num_layers": local_layers,
        "kv_channels": head_dim,
    }
    return {
        "architecture": "voxcpm2",
        "lm_config": lm,
        "patch_size": 4,
        "feat_dim": feat_dim,
        "residual_lm_num_layers": residual_layers,
        "residual_lm_no_rope": True,
        "scalar_quantization_latent_dim": 32,
        "scalar_quantization_scale": 9,
        "encoder_config": dict(local),
        "dit_config": {
            **local,
            "cfm_config": {"sigma_min": 1e-6, "solver": "euler", "t_scheduler": "log-norm", "inference_cfg_rate": 2.0},
        },
        "audio_vae_config": {
            "encoder_dim": 4,
            "encoder_rates": [2, 5, 8, 8],
            "latent_dim": feat_dim,
            "decoder_dim": 64,
            "decoder_rates": [8, 6, 5, 2, 2, 2],
            "depthwise": True,
            "sample_rate": 16000,
            "out_sample_rate": 48000,
            "sr_bin_boundaries": [20000, 30000, 40000],
        },
        "max_length": max_length,
        "device": "cpu",
        "dtype": dtype,
    }


def _randomise(model: VoxCPM2, gen: torch.Generator) -> None:
    """Non-trivial random values everywhere (norm gains, VAE conditioning) so equality tests see every parameter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".alpha")) or "scale_embed" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "bias_embed" in name or name.endswith("weight_g"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            elif name == "stop_head.weight":
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _audible(model: VoxCPM2, gen: torch.Generator, rms: float = 0.1) -> None:
    """Scale the AudioVAE decoder's last convolution so that random latents decode to speech-level audio (RMS about
    0.1) instead of the 1e-6 a random decoder gives, which 16-bit wav files and level-based rewards would read as
    silence."""
    from policies.voxcpm_vae import WNConv

    dec = model.audio_vae.decoder
    last = [m for m in dec.modules() if isinstance(m, WNConv)][-1]
    with torch.no_grad():
        z = torch.randn(2, model.feat_dim, 16, generator=gen)
        level = float(model.audio_vae.decode(z).std())
        if level > 0:
            last.weight_g.mul_(rms / level)
            if last.bias is not None:
                last.bias.mul_(rms / level)


def write_tiny_voxcpm(directory: str | Path, texts: list[str] = (), seed: int = 0, **config: Any) -> Path:
    """Write a tiny random VoxCPM2 checkpoint in exactly the released layout; returns the directory.

    texts: strings whose characters get tokens. config: overrides for `tiny_config` (use_mup, hidden, layers, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(directory, list(texts))
    cfg_dict = tiny_config(vocab, **config)
    cfg: VoxCPMConfig = parse_config(cfg_dict, where="tiny config")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = VoxCPM2(cfg)
    finally:
        torch.random.set_rng_state(state)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    _audible(model, torch.Generator().manual_seed(seed + 2))
    (directory / "config.json").write_text(json.dumps(cfg_dict, indent=2), encoding="utf-8")
    sd = model.state_dict()
    save_file(
        {k: v.contiguous() for k, v in sd.items() if not k.startswith("audio_vae.")},
        str(directory / "model.safetensors"),
    )
    save_file(
        {k[len("audio_vae.") :]: v.contiguous() for k, v in sd.items() if k.startswith("audio_vae.")},
        str(directory / "audiovae.safetensors"),
    )
    return directory
