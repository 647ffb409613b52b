"""IndexTTS2's frozen audio pieces (policies/indextts2_vocoder.py): the tiny writers' files load back strictly, shapes
and rates, a non-silent tiny vocoder, the prompt mel against a direct NumPy/librosa computation; and, on random
weights and audio, equality with the public index-tts code (its vendored BigVGAN, its CAMPPlus, its
`mel_spectrogram`), read from a git mirror of index-tts/index-tts (skipped without it)."""

from __future__ import annotations

import importlib
import json
import math
import types

import numpy as np
import pytest
import torch

from policies.indextts2_model import IndexTTS2ConfigError
from policies.indextts2_vocoder import (
    BIGVGAN_HOP,
    BIGVGAN_RATE,
    RELEASED_PREPROCESS_PARAMS,
    STYLE_DIM,
    VocoderCheckpointError,
    load_bigvgan,
    load_campplus,
    prompt_mel,
    save_bigvgan,
    speaker_style,
    write_tiny_bigvgan,
    write_tiny_campplus,
)
from rollouts.speaker_embedding import campplus_features

PUBLIC_DIRS = ["indextts/s2mel/modules/bigvgan", "indextts/s2mel/modules/campplus"]
PUBLIC_FILES = ["indextts/s2mel/modules/audio.py"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public index-tts modules (vendored BigVGAN, CAMPPlus DTDNN, s2mel audio), imported from the mirror's
    files; everything they import is installed here."""
    from conftest import INDEXTTS_MIRROR, indextts_mirror_files, indextts_sources

    if not (INDEXTTS_MIRROR / "HEAD").exists() and not (INDEXTTS_MIRROR / ".git").exists():
        pytest.skip(f"no index-tts git mirror at {INDEXTTS_MIRROR}")
    files = [f for f in indextts_mirror_files(PUBLIC_DIRS) if f.endswith((".py", ".json"))] + PUBLIC_FILES
    root = tmp_path_factory.mktemp("indextts_public")
    with indextts_sources(root, files, ("indextts", "indextts/s2mel", "indextts/s2mel/modules")):
        yield types.SimpleNamespace(
            bigvgan=importlib.import_module("indextts.s2mel.modules.bigvgan.bigvgan"),
            campplus=importlib.import_module("indextts.s2mel.modules.campplus.DTDNN"),
            audio=importlib.import_module("indextts.s2mel.modules.audio"),
        )


@pytest.fixture(scope="module")
def tiny_bigvgan(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigvgan")
    write_tiny_bigvgan(d, seed=0)
    return d


@pytest.fixture(scope="module")
def tiny_campplus(tmp_path_factory):
    path = tmp_path_factory.mktemp("campplus") / "campplus_cn_common.bin"
    write_tiny_campplus(path, seed=0)
    return path


def _mel(frames=40, batch=1, seed=3):
    """A random log mel at the level s2mel produces (ln magnitudes, mostly -10..0)."""
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(seed)) * 2.0 - 5.0


def _speech_like(seconds, rate, seed=0):
    """Noise through a few decaying harmonics: non-stationary, speech-level (RMS ~0.1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 1.5 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(7 * t))
    return (0.08 * x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def _tamper(state, drop, add, reshape):
    state = dict(state)
    del state[drop]
    state[add] = torch.zeros(3)
    state[reshape] = torch.zeros(*state[reshape].shape[:-1], state[reshape].shape[-1] + 1)
    return state


# --------------------------------------------------------------------------------------------------------------------
# BigVGAN


def test_tiny_bigvgan_is_in_the_released_layout_and_loads_back(tiny_bigvgan):
    cfg = json.loads((tiny_bigvgan / "config.json").read_text())
    assert cfg["sampling_rate"] == BIGVGAN_RATE == 22050 and cfg["num_mels"] == 80
    assert math.prod(cfg["upsample_rates"]) == BIGVGAN_HOP == 256 and cfg["activation"] == "snakebeta"
    ckpt = torch.load(tiny_bigvgan / "bigvgan_generator.pt", weights_only=True)
    assert set(ckpt) == {"generator"}
    assert "conv_pre.weight_g" in ckpt["generator"] and "conv_post.weight_v" in ckpt["generator"]
    assert "conv_post.bias" not in ckpt["generator"]  # use_bias_at_final false, as released
    model = load_bigvgan(tiny_bigvgan)
    names = set(model.state_dict())
    assert not model.training and "conv_pre.weight" in names and not any(k.endswith("weight_g") for k in names)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        wav = model(_mel(frames=37, batch=2))
    assert wav.shape == (2, 1, 37 * 256) and torch.isfinite(wav).all() and wav.abs().max() <= 1.0
    for row in wav:  # audible, not clipping: the released output range after clamp(32767 * wav)
        assert 0.05 < float(row.pow(2).mean().sqrt()) < 0.3
    again = tiny_bigvgan.parent / "again"
    write_tiny_bigvgan(again, seed=0)
    same = torch.load(again / "bigvgan_generator.pt", weights_only=True)["generator"]
    assert all(torch.equal(same[k], v) for k, v in ckpt["generator"].items())


def test_bigvgan_loading_is_strict(tiny_bigvgan, tmp_path):
    ckpt = torch.load(tiny_bigvgan / "bigvgan_generator.pt", weights_only=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_bigvgan / "config.json").read_text())
    state = _tamper(ckpt["generator"], "conv_pre.bias", "conv_pre.extra", "conv_post.weight_v")
    torch.save({"generator": state}, bad / "bigvgan_generator.pt")
    with pytest.raises(VocoderCheckpointError) as e:
        load_bigvgan(bad)
    msg = str(e.value)
    assert str(bad / "bigvgan_generator.pt") in msg
    assert "missing keys (1): conv_pre.bias" in msg and "unexpected keys (1): conv_pre.extra" in msg
    assert "conv_post.weight_v: checkpoint (1, 2, 8) != model (1, 2, 7)" in msg
    torch.save({"generator": ckpt["generator"], "optim": {}}, bad / "bigvgan_generator.pt")
    with pytest.raises(VocoderCheckpointError, match=r'expected \{"generator": state dict\}'):
        load_bigvgan(bad)
    cfg = json.loads((tiny_bigvgan / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "sampling_rate": 24000, "upsample_rates": [4, 4, 2, 2, 2, 3]}))
    with pytest.raises(VocoderCheckpointError, match=r"config\.json: .*upsampling 384x.*sampling_rate 24000"):
        load_bigvgan(bad)
    with pytest.raises(VocoderCheckpointError, match="not found"):
        load_bigvgan(tmp_path / "nowhere")


def test_a_bigvgan_saved_without_weight_norm_loads_to_the_same_model(tiny_bigvgan, tmp_path):
    model = load_bigvgan(tiny_bigvgan)
    save_bigvgan(model, json.loads((tiny_bigvgan / "config.json").read_text()), tmp_path / "fused")
    again = load_bigvgan(tmp_path / "fused")
    mel = _mel(frames=12)
    with torch.no_grad():
        assert torch.equal(model(mel), again(mel))


def test_bigvgan_equals_the_public_vendored_generator(public, tiny_bigvgan):
    """The public loader's path (BigVGAN(h) + load_state_dict of "generator", then remove_weight_norm, eval) on the
    tiny file vs ours: the same state dict and the same waveform."""
    h = public.bigvgan.load_hparams_from_json(str(tiny_bigvgan / "config.json"))
    theirs = public.bigvgan.BigVGAN(h, use_cuda_kernel=False)
    theirs.load_state_dict(torch.load(tiny_bigvgan / "bigvgan_generator.pt", weights_only=True)["generator"])
    theirs.remove_weight_norm()
    theirs.eval()
    ours = load_bigvgan(tiny_bigvgan)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    mel = _mel(frames=30, batch=2, seed=11)
    with torch.no_grad():
        want, got = theirs(mel), ours(mel)
    diff = float((want - got).abs().max())
    print(f"BigVGAN max abs diff vs public: {diff:.3g}")
    assert got.shape == want.shape and diff <= 1e-6


# --------------------------------------------------------------------------------------------------------------------
# CAMPPlus


def test_tiny_campplus_loads_back_and_gives_a_style(tiny_campplus):
    state = torch.load(tiny_campplus, weights_only=True)
    model = load_campplus(tiny_campplus)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert 6_000_000 < sum(v.numel() for v in state.values()) < 8_000_000  # the full released architecture
    wav = _speech_like(1.5, 16000)
    style = speaker_style(model, wav)
    assert style.shape == (1, STYLE_DIM) and style.dtype == torch.float32 and not style.requires_grad
    assert torch.isfinite(style).all() and float(style.std()) > 0
    with torch.no_grad():  # the released recipe: fbank with the mean over time removed, [1, T, 80]
        want = model(torch.from_numpy(campplus_features(wav))[None])
    torch.testing.assert_close(style, want, rtol=0, atol=0)
    torch.testing.assert_close(speaker_style(model, wav[None]), style, rtol=0, atol=0)
    other = speaker_style(model, _speech_like(1.5, 16000, seed=1) * 0.3 + _speech_like(1.5, 16000, seed=2)[::-1])
    assert float((other - style).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="400"):
        speaker_style(model, wav[:399])


def test_campplus_loading_is_strict(tiny_campplus, tmp_path):
    state = torch.load(tiny_campplus, weights_only=True)
    bad = tmp_path / "campplus_cn_common.bin"
    torch.save(_tamper(state, "head.conv1.weight", "head.extra", "xvector.dense.linear.weight"), bad)
    with pytest.raises(VocoderCheckpointError) as e:
        load_campplus(bad)
    msg = str(e.value)
    assert str(bad) in msg and "missing keys (1): head.conv1.weight" in msg and "unexpected keys (1): head.extra" in msg
    assert "xvector.dense.linear.weight: checkpoint (192, 1024, 2) != model (192, 1024, 1)" in msg
    torch.save({"model": state}, bad)
    with pytest.raises(VocoderCheckpointError, match="expected a bare state dict"):
        load_campplus(bad)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    torch.save({k: v for k, v in state.items() if k not in counters}, bad)  # counters absent altogether: accepted
    load_campplus(bad)
    torch.save({k: v for k, v in state.items() if k != counters[0]}, bad)  # one absent: refused
    with pytest.raises(VocoderCheckpointError, match=f"missing keys \\(1\\): {counters[0]}"):
        load_campplus(bad)


def test_campplus_equals_the_public_dtdnn(public, tiny_campplus):
    """The public CAMPPlus (strict load_state_dict of the tiny file, as infer_v2) and ours on the same features."""
    theirs = public.campplus.CAMPPlus(feat_dim=80, embedding_size=192)
    theirs.load_state_dict(torch.load(tiny_campplus, weights_only=True))
    theirs.eval()
    ours = load_campplus(tiny_campplus)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    wav = _speech_like(2.0, 16000, seed=4)
    feat = torch.from_numpy(campplus_features(wav))[None]
    with torch.no_grad():
        want = theirs(feat)
    got = speaker_style(ours, wav)
    diff = float((want - got).abs().max())
    print(f"CAMPPlus max abs diff vs public: {diff:.3g} (|style| max {float(want.abs().max()):.3g})")
    assert want.shape == got.shape == (1, 192) and diff <= 1e-5


# --------------------------------------------------------------------------------------------------------------------
# prompt mel


def _numpy_mel(y, sr=22050, n_fft=1024, hop=256, n_mels=80, fmax=None):
    """The prompt mel computed directly: reflect pad, frames, periodic Hann, |rfft|, mel filter, ln, in float64."""
    import librosa

    pad = (n_fft - hop) // 2
    y = np.pad(np.asarray(y, np.float64), pad, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(y, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    spec = np.fft.rfft(frames * window, axis=-1)
    mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9).T
    basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0, fmax=fmax, dtype=np.float64)
    return np.log(np.maximum(basis @ mag, 1e-5))[None]


def test_prompt_mel_is_the_direct_computation():
    wav = _speech_like(1.3, 22050, seed=5)
    mel = prompt_mel(wav, RELEASED_PREPROCESS_PARAMS)
    assert mel.shape == (1, 80, len(wav) // 256) and mel.dtype == torch.float32
    np.testing.assert_allclose(mel.numpy(), _numpy_mel(wav), rtol=0, atol=2e-4)
    torch.testing.assert_close(prompt_mel(torch.from_numpy(wav)[None], RELEASED_PREPROCESS_PARAMS), mel)
    low = prompt_mel(
        wav,
        {**RELEASED_PREPROCESS_PARAMS, "spect_params": {**RELEASED_PREPROCESS_PARAMS["spect_params"], "fmax": 8000}},
    )
    np.testing.assert_allclose(low.numpy(), _numpy_mel(wav, fmax=8000), rtol=0, atol=2e-4)
    assert float((low - mel).abs().max()) > 0.1


def test_prompt_mel_parameters_are_read_strictly():
    sp = RELEASED_PREPROCESS_PARAMS["spect_params"]
    wav = np.zeros(4096, np.float32)
    cases = [
        ({**RELEASED_PREPROCESS_PARAMS, "extra": 1}, "unknown key.*extra"),
        ({"sr": 22050, "spect_params": {**sp, "window": "hann"}}, "unknown key.*spect_params.window"),
        ({"sr": 22050, "spect_params": {**sp, "fmax": 11025}}, 'fmax must be "None" or 8000'),
        ({"sr": 22050, "spect_params": {**sp, "n_fft": "1024"}}, "n_fft must be a positive integer"),
        ({"sr": 22050}, "expected"),
    ]
    for params, match in cases:
        with pytest.raises(IndexTTS2ConfigError, match=match):
            prompt_mel(wav, params)
    with pytest.raises(ValueError, match="samples"):
        prompt_mel(wav[:300], RELEASED_PREPROCESS_PARAMS)


def test_prompt_mel_equals_the_public_mel_spectrogram(public):
    """infer_v2's mel_fn: mel_spectrogram(audio_22k [1, N], n_fft, num_mels, sampling_rate, hop_size, win_size, fmin,
    fmax None for "None" else 8000, center=False)."""
    rng = np.random.default_rng(7)
    for fmax_raw, fmax in (("None", None), (8000, 8000)):
        params = {"sr": 22050, "spect_params": {**RELEASED_PREPROCESS_PARAMS["spect_params"], "fmax": fmax_raw}}
        for wav in (0.3 * rng.standard_normal(22050 + 77).astype(np.float32), _speech_like(0.9, 22050, seed=8)):
            want = public.audio.mel_spectrogram(
                torch.from_numpy(wav)[None], 1024, 80, 22050, 256, 1024, 0, fmax, center=False
            )
            got = prompt_mel(wav, params)
            diff = float((want - got).abs().max())
            print(f"prompt mel (fmax {fmax_raw}) max abs diff vs public: {diff:.3g}")
            assert got.shape == want.shape and diff <= 1e-5
        public.audio.mel_basis.clear()  # its cache is keyed by rate, fmax and device only
        public.audio.hann_window.clear()
