"""The quality reward with real weights on real speech: DistillMOS's released model (from the distillmos package)
on a real English recording (shipped in the moonshine-voice package); both are installed by `make test`.
The utmos backend on random weights written in the released file's layout (the real file is not downloadable
here): batching, strict loading, and equality with utmos-pytorch's public UTMOSModel."""

import re
import sys

import numpy as np
import pytest
import torch
from test_silence import recording, sample

from rewards.asr import ModelDirError
from rewards.base import ScorerConfigError, build_scorer, check_scorer_kwargs, resolve_scorer_class
from rewards.quality import UTMOS_FILE, QualityScorer, UTMOS22Strong, check_state, load_utmos
from rollouts.audio import resample


@pytest.fixture(scope="module")
def scorer():
    import importlib.util

    if importlib.util.find_spec("distillmos") is None:
        pytest.skip("distillmos (its released MOS weights; `make test` installs it) is not installed")
    sc = build_scorer("quality", {"batch_size": 4}, "rewards.quality")
    assert "torchaudio" not in sys.modules  # the stand-in used for the package's import is gone
    return sc


def test_clean_speech_scores_above_noisy_and_clipped_speech(scorer):
    wav, rate = recording()
    clean = wav[: 7 * rate]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(len(clean)).astype(np.float32)
    noisy = clean + noise * np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (5 / 10))  # 5 dB SNR
    peak = float(np.abs(clean).max())
    clipped = np.clip(clean * 8, -peak, peak)
    res = scorer([sample(x, rate) for x in (clean, noisy, clipped)] + [sample(None, rate)])
    mos = res.sub_scores["mos"]
    assert mos[0] > 3.0, mos  # a clean read recording
    assert mos[0] > mos[1] + 0.8 and mos[0] > mos[2] + 0.8, mos
    assert res.values[:3] == pytest.approx((mos[:3] - 1) / 4)
    assert not res.valid[3] and "not vocoded" in res.reasons[3]


def test_batching_resampling_and_long_clips_score_alike(scorer):
    wav, rate = recording()
    clip = wav[: 5 * rate]
    alone = scorer.mos([clip])[0]
    batched = scorer.mos([clip, wav[rate : 4 * rate]])[0]  # padded to the window with another clip
    assert batched == pytest.approx(alone, abs=1e-4)
    at24k = scorer([sample(resample(clip, rate, 24000), 24000)]).sub_scores["mos"][0]
    assert at24k == pytest.approx(alone, abs=0.15)  # resampled to 16 kHz and back: close, not bit-equal
    whole = scorer.mos([wav])[0]  # 10 s: longer than one window, scored over hopped windows
    assert 1.0 <= whole <= 5.0
    silent = scorer([sample(np.zeros(rate, np.float32), rate)])
    assert not silent.valid[0] and "silent" in silent.reasons[0]


def test_bad_kwargs_are_refused_naming_the_key():
    cls = resolve_scorer_class("quality", "rewards.quality")
    bad = (
        ({"backend": "utmos"}, "model_dir"),  # utmos needs its directory
        ({"backend": "utmos", "model_dir": ""}, "model_dir"),
        ({"model_dir": "/models/utmos"}, "model_dir"),  # distillmos (the default) takes none
        ({"backend": "distillmos", "model_dir": "/models/utmos"}, "model_dir"),
        ({"backend": "nisqa"}, "backend"),
        ({"backend": "utmos", "model_dir": "/models/utmos", "batch_size": 0}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
    )
    for kwargs, key in bad:
        with pytest.raises(ScorerConfigError, match=rf"kwargs\.{key}: "):
            check_scorer_kwargs(cls, kwargs, "rewards.quality")
    check_scorer_kwargs(cls, {"backend": "utmos", "model_dir": "/models/utmos"}, "rewards.quality")  # no load


def random_utmos_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released file's layout, scaled so that the output depends on the input."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in UTMOS22Strong().state_dict().items():
        x = torch.randn(p.shape, generator=g)
        if name.endswith("_emb"):
            pass
        elif p.dim() >= 2:
            x /= p[0].numel() ** 0.5  # fan-in scaled: activations stay O(1) through the 12 layers
        elif name.endswith("weight"):
            x = 1 + 0.1 * x  # norm scales
        else:
            x *= 0.1  # biases
        state[name] = x
    return state


@pytest.fixture(scope="module")
def utmos_state(tmp_path_factory):
    d = tmp_path_factory.mktemp("utmos")
    state = random_utmos_state(0)
    torch.save(state, d / UTMOS_FILE)
    return d, state


@pytest.fixture(scope="module")
def utmos(utmos_state):
    sc = build_scorer("quality", {"backend": "utmos", "model_dir": str(utmos_state[0]), "batch_size": 4}, "q")
    assert isinstance(sc, QualityScorer) and sc.backend == "utmos" and not sc.model.training
    return sc


def waves(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.mark.slow
def test_utmos_batches_score_as_one_by_one_and_short_clips_are_invalid(utmos):
    clips = waves(4000, 4000, 5371, 3200, 399)  # 12, 12, 16 frames (one batch of two, one alone); too short
    res = utmos([sample(x, 16000) for x in clips[:3]] + [sample(resample(clips[3], 16000, 24000), 24000)])
    mos = res.sub_scores["mos"]  # the last one resampled to 16 kHz, 9 frames: padded to 10 in the transformer
    assert np.isfinite(mos).all() and res.valid.all() and set(res.sub_scores) == {"mos"}, mos
    alone = np.array([utmos.mos([x])[0] for x in clips[:3]])
    assert mos[:3] == pytest.approx(alone, abs=1e-5)
    assert abs(mos[0] - mos[1]) > 1e-6  # the scores depend on the audio: a batch is not one clip repeated
    assert res.values == pytest.approx(np.clip((mos - 1) / 4, 0, 1))
    short = utmos([sample(clips[4], 16000)])
    assert not short.valid[0] and np.isnan(short.sub_scores["mos"][0]) and "399 samples" in short.reasons[0]


def test_utmos_reward_is_clipped_to_0_1(utmos):
    bias = utmos.model.projection[2].bias
    kept = bias.detach().clone()
    clip = waves(3200)[0]
    try:
        for shift, reward in ((10.0, 1.0), (-10.0, 0.0)):  # MOS about 2.5 + 2 * shift: outside [1, 5]
            with torch.no_grad():
                bias.copy_(kept + shift)
            res = utmos([sample(clip, 16000)])
            mos = res.sub_scores["mos"][0]
            assert (mos > 5 if shift > 0 else mos < 1) and res.values[0] == reward and res.valid[0], mos
    finally:
        with torch.no_grad():
            bias.copy_(kept)


def test_utmos_loading_is_strict_and_names_the_file(utmos, utmos_state, tmp_path):
    _, state = utmos_state
    path = tmp_path / UTMOS_FILE
    missing, shaped = "blstm.bias_hh_l0_reverse", "wav2vec2.encoder.layers.3.fc1.weight"
    one = (  # each fault alone: one error naming the key
        ({k: v for k, v in state.items() if k != missing}, "missing (1): " + missing),
        ({**state, "classifier.weight": torch.zeros(2)}, "unexpected (1): classifier.weight"),
        ({**state, shaped: torch.zeros(3)}, f"mis-shaped (1): {shaped} (3,) (expected (3072, 768))"),
    )
    for bad, what in one:
        with pytest.raises(ValueError, match=re.escape(what)):
            check_state(utmos.model, bad, path)
    bad = {k: v for k, v in state.items() if k != missing} | {
        "classifier.weight": torch.zeros(2),
        shaped: torch.zeros(3),
    }
    torch.save(bad, path)
    with pytest.raises(ValueError) as e:  # all three in one error, through the loader, naming the file
        load_utmos(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and missing in msg and "classifier.weight" in msg and shaped in msg, msg
    torch.save([state["domain_emb"]], path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a state dict")):
        load_utmos(tmp_path)


def test_utmos_missing_directory_or_file_names_the_path(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(ModelDirError, match=re.escape(str(absent))):
        QualityScorer(backend="utmos", model_dir=str(absent))
    with pytest.raises(ModelDirError, match=re.escape(f"{tmp_path} lacks {UTMOS_FILE}")):
        QualityScorer(backend="utmos", model_dir=str(tmp_path))
    (tmp_path / UTMOS_FILE).mkdir()
    with pytest.raises(ModelDirError, match=re.escape(f"{tmp_path / UTMOS_FILE} is not a file")):
        load_utmos(tmp_path)


@pytest.mark.slow
def test_utmos_equals_utmos_pytorch_utmos_model(utmos, utmos_state):
    """Our head (domain row 0, judge row 288, 2 * mean + 3) against utmos-pytorch's UTMOSModel, whose embedding
    tables hold all rows: the two fixed rows of ours are written into tables of random other rows."""
    from utmos_pytorch.utmos_torch import UTMOSModel

    _, state = utmos_state
    ref = UTMOSModel().eval()
    prefixes = {
        "wav2vec2.": "feature_extractors.0.ssl_model.",
        "blstm.": "output_layers.0.decoder_rnn.",
        "projection.0.": "output_layers.1.net.0.",
        "projection.2.": "output_layers.1.net.3.",
    }
    mapped = {prefixes[p] + k[len(p) :]: v for k, v in state.items() for p in prefixes if k.startswith(p)}
    del mapped["feature_extractors.0.ssl_model.mask_emb"]  # the pretraining remnant, not in UTMOSModel
    g = torch.Generator().manual_seed(1)
    domains, judges = torch.randn(3, 128, generator=g), torch.randn(3000, 128, generator=g)
    domains[0], judges[288] = state["domain_emb"][0], state["judge_emb"][0]
    mapped |= {"feature_extractors.1.embedding.weight": domains, "output_layers.0.judge_embedding.weight": judges}
    ref.load_state_dict(mapped, strict=True)
    clips = waves(8320, 8320, seed=1)  # 25 frames: padded to 26 in the transformer, with a key padding mask
    x = torch.from_numpy(np.stack(clips))

    def theirs(judge: int) -> np.ndarray:
        with torch.no_grad():
            out = ref(x, domains=torch.zeros(2, dtype=torch.long), judge_id=torch.full((2,), judge))
        return (out.mean(dim=1).squeeze(1) * 2 + 3).numpy()

    ours = utmos.mos(clips)
    assert ours == pytest.approx(theirs(288), abs=1e-5)
    assert np.abs(ours - theirs(287)).max() > 1e-3  # another listener's row: the comparison can tell them apart
