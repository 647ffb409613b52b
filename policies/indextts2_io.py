"""IndexTTS2's GPT in its released checkpoint layout: strict loading, export, and a tiny random writer.

    <dir>/config.yaml   the released config (OmegaConf-style YAML, read with yaml.safe_load); its `gpt` section
                        builds the model (policies/indextts2_model.py GPTConfig, unknown keys refused)
    <dir>/gpt.pth       the GPT's state dict, bare or under "model" (as the released load_checkpoint accepts),
                        read with torch.load(weights_only=True); loaded strictly: one error lists every missing,
                        unexpected and mis-shaped key (the released loader uses strict=False and only prints them)

`save_gpt` writes a gpt.pth with exactly the released keys, which the released inference code loads unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from policies.indextts2_model import GPTConfig, IndexGPT, IndexTTS2ConfigError
from rollouts.token2wav import load_tensor_dict, strict_load

CONFIG = "config.yaml"
GPT_FILE = "gpt.pth"


def read_config(directory: str | Path) -> tuple[dict[str, Any], GPTConfig]:
    """(the whole config.yaml, its gpt section parsed). IndexTTS2ConfigError naming the file and key."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise IndexTTS2ConfigError(f"{path}: not found (an IndexTTS2 checkpoint directory has config.yaml, gpt.pth)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise IndexTTS2ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "gpt" not in data:
        raise IndexTTS2ConfigError(f"{path}: no gpt section")
    return data, GPTConfig.from_dict(data["gpt"], str(path))


def load_gpt(directory: str | Path, device: str | torch.device = "cpu") -> tuple[IndexGPT, dict[str, Any]]:
    """The GPT of a released-layout directory, loaded strictly, in eval mode; and the whole config."""
    directory = Path(directory)
    data, cfg = read_config(directory)
    path = directory / GPT_FILE
    state = load_tensor_dict(path)  # weights_only; bare or under "model"
    model = IndexGPT(cfg)
    strict_load(model, state, str(path))
    return model.to(device).eval(), data


def save_gpt(model: IndexGPT, path: str | Path) -> None:
    """gpt.pth with the released keys (float32 tensors, written atomically)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


TINY_GPT = {
    "model_dim": 64,
    "max_mel_tokens": 200,
    "max_text_tokens": 120,
    "heads": 4,
    "layers": 2,
    "number_text_tokens": 256,
    "number_mel_codes": 8194,
    "start_mel_token": 8192,
    "stop_mel_token": 8193,
    "start_text_token": 0,
    "stop_text_token": 1,
    "use_mel_codes_as_input": True,
    "mel_length_compression": 1024,
    "train_solo_embeddings": False,
    "condition_type": "conformer_perceiver",
    "condition_module": {
        "output_size": 32,
        "linear_units": 64,
        "attention_heads": 4,
        "num_blocks": 1,
        "input_layer": "conv2d2",
        "perceiver_mult": 2,
    },
    "emo_condition_module": {
        "output_size": 32,
        "linear_units": 64,
        "attention_heads": 4,
        "num_blocks": 1,
        "input_layer": "conv2d2",
        "perceiver_mult": 2,
    },
}


def write_tiny_gpt(directory: str | Path, seed: int = 0, **gpt: Any) -> Path:
    """A tiny random GPT in the released layout (config.yaml with a gpt section, gpt.pth): the real code and vocab
    sizes (8192 codes + start + stop), a tiny transformer and conditioners. `gpt` overrides TINY_GPT's keys."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_dict = {**TINY_GPT, **gpt}
    cfg = GPTConfig.from_dict(cfg_dict, "tiny config")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = IndexGPT(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "norm.gamma")):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.dim() > 1 or "latents" in name:
                    p.normal_(0.0, 0.05)
    finally:
        torch.random.set_rng_state(state)
    (directory / CONFIG).write_text(yaml.safe_dump({"gpt": cfg_dict}, sort_keys=False), encoding="utf-8")
    save_gpt(model, directory / GPT_FILE)
    return directory
