"""IndexTTS2's semantic front end (policies/indextts2_semantic.py): w2v-BERT 2.0 features against a direct
transformers call on a tiny random model, strict loading of both released formats, and the semantic codec against
the public MaskGCT RepCodec on random weights.

The public code is read from a git mirror of index-tts/index-tts (not installable from a package index); without
the mirror (or einops) the comparisons skip, and the self-contained checks still run."""

from __future__ import annotations

import importlib
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.indextts2_semantic import (
    RELEASED_SEMANTIC_CODEC,
    SEMANTIC_CODEC_FILE,
    TINY_SEMANTIC_CODEC,
    W2V_BERT_DIR,
    W2V_STATS,
    SemanticCodec,
    SemanticConfigError,
    W2VBertFeatures,
    load_semantic_codec,
    semantic_codec_config,
    write_tiny_semantic_codec,
    write_tiny_w2v_bert,
)

CODEC_DIR = "indextts/utils/maskgct/models/codec"
PUBLIC_FILES = [
    f"{CODEC_DIR}/kmeans/repcodec_model.py",
    f"{CODEC_DIR}/kmeans/vocos.py",
    f"{CODEC_DIR}/amphion_codec/quantize/__init__.py",
    f"{CODEC_DIR}/amphion_codec/quantize/factorized_vector_quantize.py",
    f"{CODEC_DIR}/amphion_codec/quantize/vector_quantize.py",
    f"{CODEC_DIR}/amphion_codec/quantize/lookup_free_quantize.py",
    f"{CODEC_DIR}/amphion_codec/quantize/residual_vq.py",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory in the released layout: hf_cache/w2v-bert-2.0, wav2vec2bert_stats.pt, the codec."""
    root = tmp_path_factory.mktemp("indextts2_semantic")
    write_tiny_w2v_bert(root / W2V_BERT_DIR, root / W2V_STATS, hidden=32, seed=0)
    write_tiny_semantic_codec(root / SEMANTIC_CODEC_FILE, TINY_SEMANTIC_CODEC, seed=0)
    return root


@pytest.fixture(scope="module")
def features(model_dir):
    return W2VBertFeatures.from_dirs(model_dir / W2V_BERT_DIR, model_dir / W2V_STATS)


@pytest.fixture(scope="module")
def codec(model_dir):
    return load_semantic_codec(model_dir / SEMANTIC_CODEC_FILE, semantic_codec_config(TINY_SEMANTIC_CODEC, "tiny"))


def _wav(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _expected_frames(n: int) -> int:
    return math.ceil((1 + (n - 400) // 160) / 2)  # fbank frames (25 ms window, 10 ms hop), stacked in pairs


# ------------------------------------------------------------------------------------------------------ features


def test_features_shape_and_rate(features):
    assert features.dim == 32
    for n in (16000, 16160, 24000):  # 98, 99 (odd: padded and masked), 148 fbank frames
        out = features(_wav(n))
        assert out.shape == (1, _expected_frames(n), 32)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert abs(features(_wav(32000)).shape[1] / 2.0 - 50) <= 1  # 50 Hz


def test_features_equal_a_direct_transformers_call(features, model_dir):
    """infer_v2's own sequence: the extractor on a [1, N] tensor, hidden_states[17], (h - mean) / sqrt(var)."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

    w2v = model_dir / W2V_BERT_DIR
    extractor = SeamlessM4TFeatureExtractor.from_pretrained(w2v, local_files_only=True)
    model = Wav2Vec2BertModel.from_pretrained(w2v, local_files_only=True).eval()
    stats = torch.load(model_dir / W2V_STATS, weights_only=True)
    wav = _wav(16160, seed=3)
    inputs = extractor(torch.from_numpy(wav).unsqueeze(0), sampling_rate=16000, return_tensors="pt")
    assert inputs["attention_mask"][0, -1] == 0  # the odd frame is padded (padding_value 1) and masked
    with torch.no_grad():
        hidden = model(
            input_features=inputs["input_features"],
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    ref = (hidden[17] - stats["mean"]) / torch.sqrt(stats["var"])
    ours = features(wav)
    assert ours.shape == ref.shape == (1, 50, 32)
    assert (ours - ref).abs().max().item() == 0.0
    assert len(hidden) == 19 and not torch.allclose(hidden[17], hidden[18])  # layer 17 of 18, not the last
    assert (ours - hidden[17]).abs().max() > 0.1  # the stats are not an identity


def test_w2v_strict_loading(model_dir, tmp_path):
    w2v = tmp_path / "w2v-bert-2.0"
    shutil.copytree(model_dir / W2V_BERT_DIR, w2v)
    state = load_file(w2v / "model.safetensors")
    del state["encoder.layers.3.ffn1.intermediate_dense.bias"]
    state["encoder.extra.weight"] = torch.zeros(2)
    state["feature_projection.projection.weight"] = torch.zeros(32, 80)
    save_file(state, w2v / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SemanticConfigError) as err:
        W2VBertFeatures.from_dirs(w2v, model_dir / W2V_STATS)
    msg = str(err.value)
    assert str(w2v) in msg
    assert "missing keys (1): encoder.layers.3.ffn1.intermediate_dense.bias" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "feature_projection.projection.weight: checkpoint (32, 80) != model (32, 160)" in msg


def test_w2v_layout_and_stats_errors(model_dir, tmp_path):
    w2v = model_dir / W2V_BERT_DIR
    few = tmp_path / "few"
    write_tiny_w2v_bert(few / "w2v", few / "stats.pt", layers=17)  # the minimum loads
    assert W2VBertFeatures.from_dirs(few / "w2v", few / "stats.pt").dim == 32
    cfg = (few / "w2v" / "config.json").read_text().replace('"num_hidden_layers": 17', '"num_hidden_layers": 16')
    (few / "w2v" / "config.json").write_text(cfg)
    with pytest.raises(SemanticConfigError, match=r"num_hidden_layers 16: .*hidden_states\[17\]"):
        W2VBertFeatures.from_dirs(few / "w2v", few / "stats.pt")
    bad = tmp_path / "stats.pt"
    torch.save({"mean": torch.zeros(32), "var": torch.ones(16)}, bad)
    with pytest.raises(SemanticConfigError, match=r"stats\.pt: var must be a tensor of 32 values"):
        W2VBertFeatures.from_dirs(w2v, bad)
    torch.save({"mean": torch.zeros(32)}, bad)
    with pytest.raises(SemanticConfigError, match="exactly the keys 'mean' and 'var'"):
        W2VBertFeatures.from_dirs(w2v, bad)
    with pytest.raises(SemanticConfigError, match="config.json not found"):
        W2VBertFeatures.from_dirs(tmp_path / "nowhere", model_dir / W2V_STATS)


# --------------------------------------------------------------------------------------------------------- codec


def test_codec_config_is_strict():
    released = semantic_codec_config(RELEASED_SEMANTIC_CODEC, "config.yaml")
    assert (released.codebook_size, released.hidden_size, released.codebook_dim) == (8192, 1024, 8)
    assert (released.num_quantizers, released.downsample_scale) == (1, 1)
    with pytest.raises(SemanticConfigError, match=r"x\.yaml: unknown key semantic_codec\.vocos_depth"):
        semantic_codec_config({**TINY_SEMANTIC_CODEC, "vocos_depth": 3}, "x.yaml")
    with pytest.raises(SemanticConfigError, match=r"semantic_codec\.codebook_dim must be a positive integer"):
        semantic_codec_config({**TINY_SEMANTIC_CODEC, "codebook_dim": True}, "x.yaml")
    with pytest.raises(SemanticConfigError, match="without semantic_codec.vocos_dim"):
        semantic_codec_config({"vocos_num_layers": 2}, "x.yaml")
    with pytest.raises(SemanticConfigError, match="num_quantizers 2"):
        semantic_codec_config({**TINY_SEMANTIC_CODEC, "num_quantizers": 2}, "x.yaml")
    with pytest.raises(SemanticConfigError, match="must be a mapping"):
        semantic_codec_config([1], "x.yaml")


def test_codec_shapes_and_vq2emb(codec, features):
    feats = torch.cat([features(_wav(16000, seed=s)) for s in (1, 2)])  # [2, 49, 32]
    with torch.no_grad():
        codes, quantized = codec.quantize(feats)
        emb = codec.vq2emb(codes)
        released_form = codec.quantizer.vq2emb(codes[:1].unsqueeze(1))  # [B=1, 1, T] -> [1, C, T]
        row = codec.quantize(feats[1:])
    assert codes.shape == (2, 49) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 8192 and codes.unique().numel() > 5
    assert quantized.shape == emb.shape == (2, 49, 32)
    assert (emb - quantized).abs().max().item() < 1e-5  # the straight-through sum z_e + (z_q - z_e) rounds
    assert torch.equal(released_form.transpose(1, 2), emb[:1])
    assert torch.equal(row[0], codes[1:]) and (row[1] - quantized[1:]).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="codes must lie in"):
        codec.vq2emb(torch.tensor([[8192]]))


def test_codec_strict_loading(model_dir, tmp_path):
    cfg = semantic_codec_config(TINY_SEMANTIC_CODEC, "tiny")
    path = tmp_path / "semantic_codec_model.safetensors"
    state = load_file(model_dir / SEMANTIC_CODEC_FILE)
    del state["decoder.0.convnext.1.gamma"]
    state["quantizer.quantizers.1.codebook.weight"] = torch.zeros(4, 8)
    state["quantizer.quantizers.0.codebook.weight"] = torch.zeros(4096, 8)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(SemanticConfigError) as err:
        load_semantic_codec(path, cfg)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): decoder.0.convnext.1.gamma" in msg
    assert "unexpected keys (1): quantizer.quantizers.1.codebook.weight" in msg
    assert "quantizer.quantizers.0.codebook.weight: checkpoint (4096, 8) != model (8192, 8)" in msg
    with pytest.raises(SemanticConfigError, match="not found"):
        load_semantic_codec(tmp_path / "absent.safetensors", cfg)


def test_released_keys_and_shapes():
    """The released codec's parameters (the public RepCodec's state dict, checked against it below when the
    mirror is present): 2 x (embed, norm, 12 ConvNeXt blocks, final norm, linear) and one quantizer."""
    with torch.device("meta"):
        model = SemanticCodec(semantic_codec_config(RELEASED_SEMANTIC_CODEC, "config.yaml"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 2 * (2 + 2 + 12 * 9 + 2 + 2) + 7
    assert shapes["encoder.0.embed.weight"] == (384, 1024, 7)
    assert shapes["encoder.0.convnext.11.pwconv1.weight"] == (2048, 384)
    assert shapes["encoder.1.weight"] == (1024, 384)
    assert shapes["quantizer.quantizers.0.in_project.weight_v"] == (8, 1024, 1)
    assert shapes["quantizer.quantizers.0.out_project.weight_g"] == (1024, 1, 1)
    assert shapes["quantizer.quantizers.0.codebook.weight"] == (8192, 8)


# ------------------------------------------------------------------------------------------------ public RepCodec


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public `RepCodec` (indextts/utils/maskgct/.../kmeans/repcodec_model.py) imported from the mirror's files,
    with a stand-in for torchaudio (vocos.py imports two mel helpers that the codec never calls)."""
    from conftest import indextts_sources

    pytest.importorskip("einops")
    packages = ["indextts", "indextts/utils", "indextts/utils/maskgct", "indextts/utils/maskgct/models"]
    packages += [CODEC_DIR, f"{CODEC_DIR}/kmeans", f"{CODEC_DIR}/amphion_codec"]
    stubs = {name: types.ModuleType(name) for name in ("torchaudio", "torchaudio.functional")}
    stubs["torchaudio.functional.functional"] = types.ModuleType("torchaudio.functional.functional")
    stubs["torchaudio.functional.functional"]._hz_to_mel = lambda *a, **k: None
    stubs["torchaudio.functional.functional"]._mel_to_hz = lambda *a, **k: None
    root = tmp_path_factory.mktemp("indextts_public_codec")
    with indextts_sources(root, PUBLIC_FILES, packages, stubs):
        yield importlib.import_module("indextts.utils.maskgct.models.codec.kmeans.repcodec_model")


def _public_codec(public, section: dict, path: Path):
    from safetensors.torch import load_model

    theirs = public.RepCodec(cfg=types.SimpleNamespace(**section)).eval()
    load_model(theirs, str(path))  # strict, as the released loader
    return theirs


def test_released_keys_equal_public(public):
    with torch.device("meta"):
        theirs = public.RepCodec(cfg=types.SimpleNamespace(**RELEASED_SEMANTIC_CODEC))
        ours = SemanticCodec(semantic_codec_config(RELEASED_SEMANTIC_CODEC, "config.yaml"))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("downsample", [1, 2])
def test_codec_equals_public(public, features, tmp_path, downsample):
    section = {**TINY_SEMANTIC_CODEC, "downsample_scale": downsample}
    path = write_tiny_semantic_codec(tmp_path / "codec.safetensors", section, seed=5)
    theirs = _public_codec(public, section, path)
    ours = load_semantic_codec(path, semantic_codec_config(section, "tiny"))
    feats = features(_wav(24000, seed=7))  # [1, 74, 32], as IndexTTS2 feeds it
    batch = torch.cat([feats, torch.randn(1, 74, 32, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        for x in (feats, batch):
            codes_t, s_ref_t = theirs.quantize(x)
            codes_o, s_ref_o = ours.quantize(x)
            assert torch.equal(codes_o, codes_t)
            assert s_ref_o.shape == s_ref_t.shape == (x.shape[0], 74 // downsample, 32)
            assert (s_ref_o - s_ref_t).abs().max().item() == 0.0
        codes = codes_t[:1]
        emb_t = theirs.quantizer.vq2emb(codes.unsqueeze(1))  # the released call: [1, 1, T] -> [1, C, T]
        emb_o = ours.vq2emb(codes)
    assert emb_t.shape == (1, 32, codes.shape[1])
    assert (emb_o - emb_t.transpose(1, 2)).abs().max().item() == 0.0
    assert (emb_o - s_ref_o[:1]).abs().max().item() < 1e-5
