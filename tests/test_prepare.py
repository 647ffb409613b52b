"""The prompt front end behind `ttsrl prepare`: speech tokenizer, CAMPPlus embedding, prompt mel, manifest."""

import argparse
import importlib
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from rollouts.manifest import read_manifest
from rollouts.prepare import (
    EMOTIONS,
    EMOTIONS_ZH,
    PrepareError,
    PromptFrontend,
    add_prepare_parser,
    cmd_prepare,
    prepare,
    prompt_mel,
    read_items,
)
from rollouts.speaker_embedding import SpeakerEmbedder, SpeakerEmbeddingError, campplus_features, kaldi_fbank
from rollouts.speech_tokenizer import (
    SpeechTokenizer,
    SpeechTokenizerError,
    WhisperFeatureConfig,
    pad_batch,
    whisper_log_mel,
)
from rollouts.tiny_frontend import speechlike_wave, tiny_checkpoint, tiny_whisper_vq_config, write_tiny_frontend

UPSTREAM_MIRROR = "/work/.mirror/zai-org+GLM-TTS/repo"
LENGTHS = [16000, 16001, 641, 87507, 31 * 16000 + 5]  # the last one spans two 30 s chunks


@pytest.fixture(scope="module")
def frontend_dir(tmp_path_factory):
    return write_tiny_frontend(tmp_path_factory.mktemp("frontend"))


@pytest.fixture(scope="module")
def tokenizer(frontend_dir):
    return SpeechTokenizer.from_pretrained(frontend_dir / "speech_tokenizer")


@pytest.fixture(scope="module")
def frontend(frontend_dir):
    return PromptFrontend.from_dir(frontend_dir)


@pytest.fixture(scope="module")
def audios():
    return [speechlike_wave(n, seed=i) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def batched_tokens(tokenizer, audios):
    """All LENGTHS in one call: every chunk shares one batch, padded to 30 s."""
    return tokenizer([(a, 16000) for a in audios])


def upstream_chunks(audios):
    """Upstream's 30 s chunking: (chunk, owner) pairs."""
    return [(a[t : t + 480000], i) for i, a in enumerate(audios) for t in range(0, len(a), 480000)]


def transformers_features(chunks):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    return fe(
        chunks,
        sampling_rate=16000,
        return_attention_mask=True,
        return_tensors="pt",
        padding="longest",
        pad_to_multiple_of=640,
    )


# ---------------------------------------------------------------------------------------------- speech tokenizer


def test_log_mel_matches_transformers_whisper_feature_extractor(audios):
    from transformers import WhisperFeatureExtractor

    from rollouts.audio import mel_filterbank

    fb = mel_filterbank(16000, 400, 128, 0.0, 8000.0)
    assert np.abs(fb.T - WhisperFeatureExtractor(feature_size=128).mel_filters).max() < 1e-6
    chunks = [audios[0], audios[2], audios[3]]
    ref = transformers_features(chunks)
    wav, mask = pad_batch(chunks, 640)
    mine = whisper_log_mel(wav, WhisperFeatureConfig(feature_size=128))
    assert mine.shape == ref.input_features.shape == (3, 128, math.ceil(87507 / 640) * 4)
    assert (mine - ref.input_features).abs().max() <= 1e-5
    assert torch.equal(mask[:, ::160], ref.attention_mask.bool())


def _reference_tokens(sd: dict, cfg: dict, feats: torch.Tensor, fmask: torch.Tensor):
    """Straightforward float64 forward of the quantize-only WhisperVQ encoder for ONE row, from the spec:
    -> (ids [T'], valid [T'], margin [T']: distance gap between the best and the second-best code)."""
    W = {k: v.double() for k, v in sd.items()}
    H, d, Q, blk = cfg["encoder_attention_heads"], cfg["d_model"], cfg["quantize_position"], 200
    g = torch.nn.functional.gelu
    x = feats[None].double()
    h = g(torch.nn.functional.conv1d(x, W["conv1.weight"], W["conv1.bias"], padding=1))
    h = g(torch.nn.functional.conv1d(h, W["conv2.weight"], W["conv2.bias"], stride=2, padding=1))[0].T  # [T, d]
    T = h.shape[0]
    h = h + W["embed_positions.weight"][:T]
    key_ok = fmask[::2]
    i = torch.arange(T)
    allowed = (i[None, :] < (i[:, None] // blk + 1) * blk) & key_ok[None, :]  # query row, key column
    for layer in range(Q):
        p = f"layers.{layer}."

        def ln(y, name, p=p):  # bind this layer's prefix
            return torch.nn.functional.layer_norm(y, (d,), W[p + name + ".weight"], W[p + name + ".bias"], 1e-5)

        y = ln(h, "self_attn_layer_norm")
        q = (y @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]).view(T, H, -1).transpose(0, 1)
        k = (y @ W[p + "self_attn.k_proj.weight"].T).view(T, H, -1).transpose(0, 1)
        v = (y @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]).view(T, H, -1).transpose(0, 1)
        s = (q @ k.transpose(1, 2)) / math.sqrt(d // H)
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v
        a = a.transpose(0, 1).reshape(T, d)
        h = h + a @ W[p + "self_attn.out_proj.weight"].T + W[p + "self_attn.out_proj.bias"]
        y = ln(h, "final_layer_norm")
        h = h + g(y @ W[p + "fc1.weight"].T + W[p + "fc1.bias"]) @ W[p + "fc2.weight"].T + W[p + "fc2.bias"]
    h = h.view(T // 2, 2, d).mean(1)  # average pool by 2
    dist = ((h[:, None, :] - W["codebook.weight"][None]) ** 2).sum(-1)
    top2 = dist.topk(2, largest=False)
    return top2.indices[:, 0], key_ok[::2], top2.values[:, 1] - top2.values[:, 0]


def test_tokens_match_an_independent_reference_forward(tokenizer, audios):
    audios = audios[:4]  # (the > 30 s layout is covered by the upstream comparison)
    cfg = tiny_whisper_vq_config()
    sd = {k[len("model.encoder.") :]: v for k, v in tiny_checkpoint(cfg).items() if k.startswith("model.encoder.")}
    chunks = upstream_chunks(audios)
    feats = transformers_features([c for c, _ in chunks])  # one batch: every chunk padded to 480000 samples
    expected = [[] for _ in audios]
    margins = []
    for row, (_, owner) in enumerate(chunks):
        ids, valid, margin = _reference_tokens(sd, cfg, feats.input_features[row], feats.attention_mask[row].bool())
        expected[owner] += ids[valid].tolist()
        margins += margin[valid].tolist()
    got = tokenizer([(a, 16000) for a in audios])
    margins = np.array(margins)
    agree = np.concatenate([np.array(e) == g for e, g in zip(expected, got)])
    assert agree[margins > 1e-2].all()  # any disagreement is a float near-tie
    assert agree.mean() > 0.99
    assert len(set(np.concatenate(got).tolist())) > 15  # the tiny codebook is really exercised


def _load_upstream_encoder(tmp_path, speech_tokenizer_dir):
    """The upstream WhisperVQ modeling code, read from the GLM-TTS mirror, loaded as upstream's yaml_util does."""
    if shutil.which("git") is None:
        pytest.skip("git not available")
    pkg = tmp_path / "glmtts_upstream_whisper"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("configuration_whisper.py", "modeling_whisper.py"):
        r = subprocess.run(
            ["git", f"--git-dir={UPSTREAM_MIRROR}", "show", f"HEAD:utils/whisper_models/{name}"], capture_output=True
        )
        if r.returncode:
            pytest.skip("the GLM-TTS mirror is not available")
        (pkg / name).write_bytes(r.stdout)
    sys.path.insert(0, str(tmp_path))
    try:
        cfg_mod = importlib.import_module("glmtts_upstream_whisper.configuration_whisper")
        model_mod = importlib.import_module("glmtts_upstream_whisper.modeling_whisper")
    except Exception as e:  # noqa: BLE001 - an incompatible transformers: nothing to compare with
        pytest.skip(f"upstream modeling code does not import here: {e}")
    finally:
        sys.path.remove(str(tmp_path))
    from safetensors.torch import load_file

    config = cfg_mod.WhisperVQConfig.from_pretrained(str(speech_tokenizer_dir))
    config.quantize_encoder_only = True
    model = model_mod.WhisperVQEncoder(config)
    sd = {}
    for k, v in load_file(str(speech_tokenizer_dir / "model.safetensors")).items():
        name = k[len("model.encoder.") :]
        if not k.startswith("model.encoder.") or name.startswith("layer_norm"):
            continue
        if name.startswith("layers") and int(name.split(".")[1]) >= config.quantize_position:
            continue
        sd[name] = v
    model.load_state_dict(sd)
    return model.eval()


def test_tokens_match_the_upstream_modeling_code_exactly(tmp_path, frontend_dir, batched_tokens, audios):
    model = _load_upstream_encoder(tmp_path, frontend_dir / "speech_tokenizer")
    chunks = upstream_chunks(audios)
    expected = [[] for _ in audios]
    with torch.no_grad():
        feats = transformers_features([c for c, _ in chunks])
        ids = model(**feats).quantized_token_ids
        mask = feats.attention_mask[:, ::2][:, ::2].bool()
    for row, (_, owner) in enumerate(chunks):
        expected[owner] += ids[row][mask[row]].tolist()
    assert [g.tolist() for g in batched_tokens] == expected


def test_token_counts_channels_and_resampling(tokenizer, audios, batched_tokens):
    got = batched_tokens + tokenizer([(np.zeros(0, np.float32), 16000)])
    assert [len(t) for t in got] == [25, 26, 2, 137, 750 + 26, 0]
    assert [tokenizer.num_tokens(n) for n in LENGTHS] == [25, 26, 2, 137, 776]
    assert all(t.dtype == np.int64 for t in got) and max(t.max() for t in got[:5]) < tokenizer.vocab_size
    # [C, N]: channel 0, as upstream
    stereo = np.stack([audios[0], audios[1][:16000]])
    assert np.array_equal(tokenizer([(stereo, 16000)])[0], tokenizer([(audios[0], 16000)])[0])
    # 24 kHz input: resampled to ceil(n * 2 / 3) samples first
    wav24 = speechlike_wave(24000 * 2 + 7, seed=5, sr=24000)
    assert len(tokenizer([(wav24, 24000)])[0]) == math.ceil(math.ceil((24000 * 2 + 7) * 2 / 3) / 640)


def test_sharded_checkpoint_gives_the_same_tokens(tmp_path, frontend_dir, tokenizer, audios):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "sharded"
    shutil.copytree(frontend_dir / "speech_tokenizer", d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(d / "model-00002-of-00002.safetensors"))
    assert np.array_equal(
        SpeechTokenizer.from_pretrained(d)([(audios[3], 16000)])[0], tokenizer([(audios[3], 16000)])[0]
    )


def _edit_checkpoint(d, edit):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"missing keys: model\.encoder\.layers\.1\.fc1\.weight"),
        ("unexpected", r"unexpected keys: model\.encoder\.pitch_proj\.weight"),
        ("shape", r"shape mismatches: model\.encoder\.codebook\.weight: checkpoint \(32, 64\) vs model \(64, 64\)"),
        ("no_weights", r"has no model\*\.safetensors"),
        ("config_type", r"config\.json: field 'd_model' must be int, got '64'"),
        ("feature_size", r"feature_size 80 != config\.json num_mel_bins 128"),
        ("dither", r"preprocessor_config\.json: field 'dither' must be 0"),
    ],
)
def test_strict_load_errors_name_the_problem(tmp_path, frontend_dir, case, message):
    d = tmp_path / "tok"
    shutil.copytree(frontend_dir / "speech_tokenizer", d)
    if case == "missing":
        _edit_checkpoint(d, lambda sd: sd.pop("model.encoder.layers.1.fc1.weight"))
    elif case == "unexpected":
        _edit_checkpoint(d, lambda sd: sd.update({"model.encoder.pitch_proj.weight": torch.zeros(2, 2)}))
    elif case == "shape":
        _edit_checkpoint(d, lambda sd: sd.update({"model.encoder.codebook.weight": torch.zeros(32, 64)}))
    elif case == "no_weights":
        (d / "model.safetensors").unlink()
    else:
        name = "config.json" if case == "config_type" else "preprocessor_config.json"
        cfg = json.loads((d / name).read_text())
        cfg.update(
            {"config_type": {"d_model": "64"}, "feature_size": {"feature_size": 80}, "dither": {"dither": 1e-4}}[case]
        )
        (d / name).write_text(json.dumps(cfg))
    with pytest.raises(SpeechTokenizerError, match=message):
        SpeechTokenizer.from_pretrained(d)


# ---------------------------------------------------------------------------------------------- speaker embedding


def _reference_fbank(x):
    """torchaudio.compliance.kaldi.fbank(x, num_mel_bins=80, dither=0) in float64 numpy, from its definition."""
    x = np.asarray(x, dtype=np.float64)
    frames = x[np.arange(1 + (len(x) - 400) // 160)[:, None] * 160 + np.arange(400)[None]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=512, axis=1)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, step = mel(20.0), (mel(8000.0) - mel(20.0)) / 81
    m = mel(31.25 * np.arange(256))
    banks = np.zeros((80, 257))
    for b in range(80):
        left, center, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        banks[b, :256] = np.maximum(0.0, np.minimum((m - left) / (center - left), (right - m) / (right - center)))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_kaldi_fbank_matches_the_torchaudio_definition():
    x = speechlike_wave(16000 * 2 + 123, seed=3) + 1e-3 * np.random.default_rng(0).standard_normal(32123)
    got = kaldi_fbank(x.astype(np.float32))
    assert got.shape == (1 + (32123 - 400) // 160, 80) and got.dtype == np.float32
    assert np.abs(got - _reference_fbank(x.astype(np.float32))).max() < 1e-3
    feat = campplus_features(x)
    assert np.abs(feat.mean(axis=0)).max() < 1e-4 and np.allclose(feat, got - got.mean(axis=0), atol=1e-5)


class FakeSession:
    def __init__(self, dim=192):
        self.dim, self.fed = dim, None

    def get_inputs(self):
        return [argparse.Namespace(name="feats")]

    def run(self, outputs, feeds):
        self.fed = feeds
        x = next(iter(feeds.values()))
        return [np.tile(x.mean(axis=1), (1, 3))[:, : self.dim]]


def test_embedder_feeds_mean_subtracted_fbank_to_the_first_input():
    fake = FakeSession()
    x = speechlike_wave(8000, seed=1)
    out = SpeakerEmbedder(fake)(x, 16000)
    fed = fake.fed["feats"]
    assert fed.shape == (1, 1 + (8000 - 400) // 160, 80) and fed.dtype == np.float32
    assert np.abs(fed[0].mean(axis=0)).max() < 1e-4
    assert out.shape == (192,) and out.dtype == np.float32
    with pytest.raises(SpeakerEmbeddingError, match="expected a 192-dim embedding, got 100 values"):
        SpeakerEmbedder(FakeSession(dim=100))(x, 16000)
    with pytest.raises(SpeakerEmbeddingError, match="audio too short: 399 samples"):
        SpeakerEmbedder(fake)(x[:399], 16000)


def test_campplus_onnx_embedding(frontend_dir):
    emb = SpeakerEmbedder.from_onnx(frontend_dir / "frontend" / "campplus.onnx")
    assert emb.input_name == "input"
    x = speechlike_wave(16000 * 2, seed=2) + 0.02 * np.random.default_rng(1).standard_normal(32000).astype(np.float32)
    e = emb(x, 16000)
    assert e.shape == (192,) and e.dtype == np.float32 and np.isfinite(e).all()
    assert np.array_equal(e, emb(x, 16000))  # deterministic
    # a gain change shifts every log-fbank value by the same constant: the mean subtraction removes it
    assert np.allclose(emb(0.5 * x, 16000), e, atol=1e-3)
    assert not np.allclose(emb(speechlike_wave(32000, seed=9), 16000), e, atol=1e-2)
    assert np.allclose(emb(np.stack([x, x]), 16000), e, atol=1e-6)  # channels are averaged
    with pytest.raises(SpeakerEmbeddingError, match="model not found"):
        SpeakerEmbedder.from_onnx(frontend_dir / "nope.onnx")


def test_tiny_builder_needs_onnx(tmp_path, monkeypatch):
    from rollouts.tiny_frontend import write_tiny_campplus

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(RuntimeError, match="needs the `onnx` package"):
        write_tiny_campplus(tmp_path / "c.onnx")


# ---------------------------------------------------------------------------------------------- prepare


@pytest.fixture
def prompts(tmp_path):
    d = tmp_path / "data"
    (d / "wavs").mkdir(parents=True)
    a = speechlike_wave(16000 * 3 // 2, seed=11)  # 1.5 s mono 16 kHz
    b = np.stack([speechlike_wave(28800, seed=12, sr=24000), speechlike_wave(28800, seed=13, sr=24000)])  # 1.2 s
    sf.write(d / "wavs" / "spk_a.wav", a, 16000, subtype="FLOAT")
    sf.write(d / "wavs" / "spk_b.wav", b.T, 24000, subtype="FLOAT")
    return d


def test_prepare_end_to_end_loads_with_the_manifest_reader(prompts, frontend_dir, tokenizer, tmp_path):
    items = prompts / "items.jsonl"
    items.write_text(
        "\n".join(
            json.dumps(o, ensure_ascii=False)
            for o in [
                {
                    "prompt_wav": "wavs/spk_a.wav",
                    "prompt_text": "你好。",
                    "target_text": "今天天气很好。",
                    "emotion": "happy",
                },
                {"prompt_speech": "wavs/spk_b.wav", "prompt_text": "hello", "syn_text": "good morning", "id": "x7"},
                {"prompt_wav": "wavs/spk_a.wav", "prompt_text": "你好。", "target_text": "再见。", "emotion": 6},
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    res = prepare(items, frontend_dir, out)
    assert (res.items, res.prompts) == (3, 2)
    recs = read_manifest(res.manifest)
    assert [r.uttid for r in recs] == ["spk_a--1", "spk_b--x7", "spk_a--3"]
    assert [r.emotion for r in recs] == [3, None, 6] and recs[1].target_text == "good morning"
    assert recs[0].prompt_wav and sf.info(recs[0].prompt_wav).samplerate == 16000
    for kind in ("prompt_speech_token", "embedding", "prompt_speech_feat"):
        assert sorted(p.name for p in (out / kind).iterdir()) == ["spk_a.npy", "spk_b.npy"]

    a, _ = sf.read(prompts / "wavs" / "spk_a.wav", dtype="float32")
    b, _ = sf.read(prompts / "wavs" / "spk_b.wav", dtype="float32", always_2d=True)
    assert np.array_equal(recs[0].prompt_speech_tokens, tokenizer([(a, 16000)])[0])
    assert len(recs[0].prompt_speech_tokens) == 38  # ceil(24000 / 640)
    assert np.array_equal(recs[1].prompt_speech_tokens, tokenizer([(b[:, 0], 24000)])[0])  # channel 0
    assert recs[0].prompt_feat.shape == (int(1.5 * 24000) // 480, 80)
    assert recs[1].prompt_feat.shape == (28800 // 480, 80)
    assert np.allclose(recs[1].prompt_feat, prompt_mel(b.mean(axis=1), 24000))  # channel mean
    emb = SpeakerEmbedder.from_onnx(frontend_dir / "frontend" / "campplus.onnx")
    assert np.allclose(recs[1].embedding, emb(b.mean(axis=1), 24000))
    assert recs[0].embedding.shape == (192,)
    assert np.array_equal(np.load(out / "prompt_speech_token" / "spk_a.npy"), recs[0].prompt_speech_tokens)
    assert np.load(out / "prompt_speech_token" / "spk_a.npy").dtype == np.int64

    with pytest.raises(PrepareError, match="already exists"):
        prepare(items, frontend_dir, out)


def test_target_recordings_become_fixed_codes_for_the_flow(prompts, frontend_dir, tokenizer, tmp_path):
    # target_wav: a recording of the target text; its tokens are the line's syn_speech_token (policy.flow.codes)
    items = prompts / "items.jsonl"
    (prompts / "wavs" / "b.wav").write_bytes((prompts / "wavs" / "spk_b.wav").read_bytes())  # a target recording
    lines = [
        {"prompt_wav": "wavs/spk_a.wav", "prompt_text": "你好。", "target_text": "早安", "target_wav": "wavs/b.wav"},
        {"prompt_wav": "wavs/spk_b.wav", "prompt_text": "hello", "target_text": "good"},
    ]
    items.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in lines), encoding="utf-8")
    recs = read_manifest(prepare(items, frontend_dir, tmp_path / "out").manifest)
    b, _ = sf.read(prompts / "wavs" / "spk_b.wav", dtype="float32", always_2d=True)
    assert np.array_equal(recs[0].target_speech_tokens, tokenizer([(b[:, 0], 24000)])[0])
    assert recs[0].target_speech_tokens.dtype == np.int64 and recs[1].target_speech_tokens is None
    lines[1]["target_wav"] = "wavs/missing.wav"
    items.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in lines), encoding="utf-8")
    with pytest.raises(PrepareError, match=r"items\.jsonl:2: field 'target_wav': file not found"):
        prepare(items, frontend_dir, tmp_path / "out2")


def test_pipe_list_cli_and_each_prompt_once(prompts, frontend_dir, frontend, tmp_path, capsys):
    items = prompts / "items.txt"
    items.write_text(
        "# prompt|text|target|emotion\n"
        "wavs/spk_a.wav|你好。|今天天气很好。|开心\n"
        "wavs/spk_b.wav|hello|good morning\n"
        "wavs/spk_a.wav|你好。|再见。|sad\n",
        encoding="utf-8",
    )
    calls = []

    class Counting:
        def __call__(self, wav):
            calls.append(wav)
            return frontend(wav)

    res = prepare(items, None, tmp_path / "o1", frontend=Counting())
    assert len(calls) == 2 and res.items == 3
    recs = read_manifest(res.manifest)
    assert [r.uttid for r in recs] == ["spk_a--2", "spk_b--3", "spk_a--4"] and recs[0].emotion == 3

    parser = argparse.ArgumentParser()
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "prepare",
            str(items),
            "--frontend",
            str(frontend_dir),
            "--out",
            str(tmp_path / "o2"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0 and "3 items, 2 prompts" in capsys.readouterr().out
    assert np.array_equal(
        read_manifest(tmp_path / "o2" / "manifest.jsonl")[2].prompt_speech_tokens, recs[2].prompt_speech_tokens
    )
    args = parser.parse_args(["prepare", str(items), "--frontend", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert cmd_prepare(args) == 2 and "directory not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [
        ("wavs/nope.wav|t|u", r"items\.txt:2: field 'prompt_wav': file not found"),
        ("wavs/garbage.wav|t|u", r"items\.txt:2: field 'prompt_wav': cannot read .*garbage\.wav as audio"),
        ("wavs/short.wav|t|u", r"items\.txt:2: field 'prompt_wav': audio too short"),
        ("wavs/spk_a.wav| |u", r"items\.txt:2: field 'prompt_text' is empty"),
        ("wavs/spk_a.wav|t|", r"items\.txt:2: field 'target_text' is empty"),
        ("wavs/spk_a.wav|t|u|furious", r"items\.txt:2: field 'emotion': unknown label 'furious'"),
        ("wavs/spk_a.wav|t|u|12", r"items\.txt:2: field 'emotion': index 12 is not in -1\.\.8"),
        ("wavs/spk_a.wav|t", r"items\.txt:2: expected 3 or 4 '\|'-separated fields"),
        ("other/spk_a.wav|t|u", r"items\.txt:2: field 'prompt_wav': .* same file stem 'spk_a' as .*items\.txt:1\)"),
    ],
)
def test_bad_items_name_the_line_and_field(prompts, frontend, tmp_path, line, message):
    (prompts / "wavs" / "garbage.wav").write_bytes(b"RIFF not really a wav")
    sf.write(prompts / "wavs" / "short.wav", np.zeros(300, np.float32), 16000)
    (prompts / "other").mkdir()
    shutil.copy(prompts / "wavs" / "spk_a.wav", prompts / "other" / "spk_a.wav")
    items = prompts / "items.txt"
    items.write_text("wavs/spk_a.wav|t|u\n" + line + "\n", encoding="utf-8")
    with pytest.raises(PrepareError, match=message):
        prepare(items, None, tmp_path / "out", frontend=frontend)


@pytest.mark.parametrize(
    "obj, message",
    [
        ("{bad", r"items\.jsonl:2: not valid JSON"),
        ('{"prompt_wav": "wavs/spk_a.wav", "prompt_text": "t"}', r"items\.jsonl:2: field 'target_text' is missing"),
        (
            '{"prompt_wav": "wavs/spk_a.wav", "prompt_text": 5, "target_text": "u"}',
            r"items\.jsonl:2: field 'prompt_text' must be a string",
        ),
        (
            '{"prompt_wav": "wavs/spk_a.wav", "prompt_text": "t", "target_text": "u", "id": 1}',
            r"items\.jsonl:2: field 'id': uttid 'spk_a--1' already used at .*items\.jsonl:1",
        ),
        (
            '{"prompt_wav": "wavs/spk_a.wav", "prompt_text": "t", "target_text": "u", "emotion": true}',
            r"items\.jsonl:2: field 'emotion' must be a label index or name",
        ),
    ],
)
def test_bad_jsonl_items(prompts, tmp_path, obj, message):
    items = prompts / "items.jsonl"
    items.write_text('{"prompt_wav": "wavs/spk_a.wav", "prompt_text": "t", "target_text": "u"}\n' + obj + "\n")
    with pytest.raises(PrepareError, match=message):
        prepare(items, None, tmp_path / "out", frontend=object())


def test_emotion_labels_agree_with_the_emotion_reward(tmp_path):
    from rewards.emotion import LABELS
    from rewards.tiny import EMOTION_LABELS

    assert EMOTIONS == LABELS
    assert [lab.split("/")[0] for lab in EMOTION_LABELS[:-1]] == EMOTIONS_ZH[:-1]
    (tmp_path / "x.wav").write_bytes(b"")
    (tmp_path / "l.txt").write_text("x.wav|t|u|开心/happy\nx.wav|t|u|-1\nx.wav|t|u|NEUTRAL\nx.wav|t|u\n", "utf-8")
    assert [it.emotion for it in read_items(tmp_path / "l.txt")] == [3, -1, 4, -1]
