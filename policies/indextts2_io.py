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

from policies.indextts2_model import SPK_FEATS, GPTConfig, IndexGPT, IndexTTS2ConfigError
from rollouts.token2wav import load_tensor_dict, load_weights_only, strict_load

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
    """The GPT of a released-layout directory (gpt.pth; the feature width from its w2v-BERT stats, 1024 when it
    has none), loaded strictly, in eval mode; and the whole config."""
    directory = Path(directory)
    data, cfg = read_config(directory)
    stats = directory / str(data.get("w2v_stat") or "wav2vec2bert_stats.pt")
    dim = feature_dim(stats) if stats.is_file() else SPK_FEATS
    return load_gpt_file(directory / GPT_FILE, cfg, feat_dim=dim, device=device), data


def feature_dim(stats: Path) -> int:
    """The w2v-BERT feature width, from the stats file's mean (1024 for the released model)."""
    obj = load_weights_only(stats, IndexTTS2ConfigError, "a weights-only torch file (config.yaml w2v_stat)")
    if not isinstance(obj, dict) or not isinstance(obj.get("mean"), torch.Tensor):
        raise IndexTTS2ConfigError(f"{stats}: expected a dict with tensors 'mean' and 'var'")
    return int(obj["mean"].numel())


def load_gpt_file(
    path: Path, cfg: GPTConfig, *, feat_dim: int = SPK_FEATS, device: str | torch.device = "cpu"
) -> IndexGPT:
    """A gpt.pth (weights_only; bare or under "model") loaded strictly into IndexGPT(cfg, feat_dim), eval mode."""
    state = load_tensor_dict(Path(path))
    model = IndexGPT(cfg, feat_dim)
    strict_load(model, state, str(path))
    return model.to(device).eval()


def save_gpt(model: IndexGPT, path: str | Path) -> None:
    """gpt.pth with the released keys (float32 tensors, written atomically)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    tmp.replace(path)


TINY_CONDITIONER = {  # the tiny speaker and emotion conditioners (a Conformer block, a Perceiver)
    "output_size": 32,
    "linear_units": 64,
    "attention_heads": 4,
    "num_blocks": 1,
    "input_layer": "conv2d2",
    "perceiver_mult": 2,
}
TINY_GPT = {
    "model_dim": 64,
    "max_mel_tokens": 400,
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
    "condition_module": dict(TINY_CONDITIONER),
    "emo_condition_module": dict(TINY_CONDITIONER),
}


def write_tiny_gpt(
    directory: str | Path, seed: int = 0, feat_dim: int = SPK_FEATS, stop_bias: float = 0.0, **gpt: Any
) -> Path:
    """A tiny random GPT in the released layout (config.yaml with a gpt section, gpt.pth): the real code and vocab
    sizes (8192 codes + start + stop), a tiny transformer and conditioners. `gpt` overrides TINY_GPT's keys;
    `stop_bias` raises the stop code's logit (a random head almost never stops within top-k 30 of 8194 codes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_dict = {**TINY_GPT, **gpt}
    cfg = GPTConfig.from_dict(cfg_dict, "tiny config")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = IndexGPT(cfg, feat_dim)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "norm.gamma")):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.dim() > 1 or "latents" in name:
                    p.normal_(0.0, 0.05)
            model.mel_head.bias[cfg.stop_mel_token] += stop_bias
    finally:
        torch.random.set_rng_state(state)
    (directory / CONFIG).write_text(yaml.safe_dump({"gpt": cfg_dict}, sort_keys=False), encoding="utf-8")
    save_gpt(model, directory / GPT_FILE)
    return directory


EMO_NUM = [3, 17, 2, 8, 4, 5, 10, 24]  # the released emo_num: examples per emotion in feat1.pt / feat2.pt
TINY_FEAT_DIM = 32  # the tiny w2v-BERT's width (the released one: 1024)
TINY_STOP_BIAS = 1.2  # the tiny GPT stops after about a second (the tiny texts want about three)


def write_tiny_indextts2(directory: str | Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny random IndexTTS2 directory in the released layout (policies/indextts2_frontend.py): every part, the
    auxiliary models under hf_cache/ included, each through its own tiny writer; a BPE model trained on `texts`."""
    from policies.indextts2_s2mel import TINY_S2MEL, write_tiny_s2mel
    from policies.indextts2_semantic import TINY_SEMANTIC_CODEC, write_tiny_semantic_codec, write_tiny_w2v_bert
    from policies.indextts2_vocoder import write_tiny_bigvgan, write_tiny_campplus
    from rollouts.indextts_text import write_tiny_bpe

    d = Path(directory)
    cache = d / "hf_cache"
    cache.mkdir(parents=True, exist_ok=True)
    gpt: dict[str, Any] = dict(TINY_GPT)
    write_tiny_gpt(d, seed, feat_dim=TINY_FEAT_DIM, stop_bias=TINY_STOP_BIAS, **gpt)
    write_tiny_bpe(d / "bpe.model", texts, vocab_size=int(gpt["number_text_tokens"]))
    write_tiny_w2v_bert(cache / "w2v-bert-2.0", d / "wav2vec2bert_stats.pt", hidden=TINY_FEAT_DIM, seed=seed)
    write_tiny_semantic_codec(cache / "semantic_codec_model.safetensors", TINY_SEMANTIC_CODEC, seed=seed)
    write_tiny_s2mel(d / "s2mel.pth", TINY_S2MEL, gpt_dim=int(gpt["model_dim"]), seed=seed)
    write_tiny_campplus(cache / "campplus_cn_common.bin", seed=seed)
    write_tiny_bigvgan(cache / "bigvgan", seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    rows = sum(EMO_NUM)
    torch.save(torch.randn(rows, 192, generator=g), d / "feat1.pt")
    torch.save(0.05 * torch.randn(rows, int(gpt["model_dim"]), generator=g), d / "feat2.pt")
    config = {
        "dataset": {"bpe_model": "bpe.model", "sample_rate": 24000},
        "gpt": gpt,
        "semantic_codec": TINY_SEMANTIC_CODEC,
        "s2mel": TINY_S2MEL,
        "gpt_checkpoint": GPT_FILE,
        "w2v_stat": "wav2vec2bert_stats.pt",
        "s2mel_checkpoint": "s2mel.pth",
        "emo_matrix": "feat2.pt",
        "spk_matrix": "feat1.pt",
        "emo_num": EMO_NUM,
        "vocoder": {"type": "bigvgan", "name": "nvidia/bigvgan_v2_22khz_80band_256x"},
        "version": 2.0,
    }
    tmp = d / (CONFIG + ".partial")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    tmp.replace(d / CONFIG)
    return d
