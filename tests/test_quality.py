"""The quality reward with real weights on real speech: DistillMOS's released model (from the distillmos package)
on a real English recording (shipped in the moonshine-voice package); both are installed by `make test`."""

import sys

import numpy as np
import pytest
from test_silence import recording, sample

from rewards.base import ScorerConfigError, build_scorer, check_scorer_kwargs, resolve_scorer_class
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
    for kwargs, key in (({"backend": "utmos"}, "backend"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ScorerConfigError, match=key):
            check_scorer_kwargs(cls, kwargs, "rewards.quality")
