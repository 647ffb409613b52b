"""The silence reward with real weights on real speech: silero VAD's released model (from the silero-vad package)
on a real English recording (shipped in the moonshine-voice package); both are installed by `make test`."""

import numpy as np
import pytest
from conftest import real_recording

from rewards.base import Sample, ScorerConfigError, build_scorer
from rollouts.audio import resample


def recording() -> tuple[np.ndarray, int]:
    return real_recording()


def sample(wav, rate) -> Sample:
    return Sample(
        uttid="u",
        group_id=0,
        target_text="Ever tried. Ever failed.",
        prompt_text="",
        codes=np.zeros(0, np.int64),
        finished=True,
        prompt_codes=np.zeros(0, np.int64),
        audio=None if wav is None else np.asarray(wav, np.float32),
        sample_rate=rate,
    )


@pytest.fixture(scope="module")
def scorer():
    import importlib.util

    import torch

    if importlib.util.find_spec("silero_vad") is None:  # not imported here: importing it sets torch's threads to 1
        pytest.skip("silero-vad (its released VAD weights; `make test` installs it) is not installed")
    threads = torch.get_num_threads()
    sc = build_scorer("silence", {}, "rewards.silence")
    assert torch.get_num_threads() == threads  # the scorer put torch's thread count back
    return sc


def test_the_vad_finds_the_speech_span_to_50_ms(scorer):
    wav, rate = recording()
    segs = scorer.segments(wav, rate)
    assert segs and segs[0][0] < 1.0 and segs[-1][1] > len(wav) / rate - 1.5  # speech from start to end
    padded = np.concatenate([np.zeros(rate, np.float32), wav, np.zeros(rate // 2, np.float32)])
    moved = scorer.segments(padded, rate)
    assert abs(moved[0][0] - (segs[0][0] + 1.0)) < 0.05 and abs(moved[-1][1] - (segs[-1][1] + 1.0)) < 0.05
    at24k = scorer.segments(resample(wav, rate, 24000), 24000)  # any rate: resampled to the VAD's 16 kHz
    assert abs(at24k[0][0] - segs[0][0]) < 0.05 and abs(at24k[-1][1] - segs[-1][1]) < 0.05


def test_the_reward_drops_when_silence_is_added(scorer):
    wav, rate = recording()
    segs = scorer.segments(wav, rate)
    mid = int(rate * (segs[len(segs) // 2][0] + segs[len(segs) // 2][1]) / 2)
    two_s = np.zeros(2 * rate, np.float32)
    variants = [
        wav,
        np.concatenate([wav, two_s]),  # trailing silence
        np.concatenate([two_s, wav]),  # leading silence
        np.concatenate([wav[:mid], two_s, wav[mid:]]),  # a 2 s pause inside
        np.zeros(3 * rate, np.float32),  # no speech at all
        None,  # not vocoded
    ]
    res = scorer([sample(v, rate) for v in variants])
    clean, trail, lead, pause, empty = res.values[:5]
    assert clean > 0.2, res.sub_scores  # a read recording: about 1 s of silence at its end, long pauses inside
    # 2 s more silence at an edge that is already over its allowance: 2 s more excess, the reward times exp(-2)
    assert trail == pytest.approx(clean * np.exp(-2.0), rel=0.1), res.values
    assert lead < clean * np.exp(-1.5), res.values
    assert pause < clean * np.exp(-1.0), res.values
    assert res.sub_scores["trail_s"][1] > 1.9 and res.sub_scores["lead_s"][2] > 1.9
    assert res.sub_scores["longest_pause_s"][3] > 1.9
    assert res.sub_scores["speech_frac"][1] < res.sub_scores["speech_frac"][0]
    assert empty == 0.0 and res.sub_scores["speech_frac"][4] == 0.0 and res.valid[4]
    assert not res.valid[5] and np.isnan(res.values[5]) and "not vocoded" in res.reasons[5]


@pytest.mark.parametrize(
    "kwargs, key",
    [({"tolerance_s": 0}, "tolerance_s"), ({"threshold": 1.5}, "threshold"), ({"max_edge_s": -1}, "max_edge_s")],
)
def test_bad_kwargs_are_refused_naming_the_key(kwargs, key):
    from rewards.base import check_scorer_kwargs, resolve_scorer_class

    with pytest.raises(ScorerConfigError, match=key):
        check_scorer_kwargs(resolve_scorer_class("silence", "rewards.silence"), kwargs, "rewards.silence")


def test_duration_on_the_vad_basis_is_not_gamed_by_silence(scorer):
    from rewards.duration import DurationScorer

    wav, rate = recording()
    padded = np.concatenate([np.zeros(rate, np.float32), wav, np.zeros(2 * rate, np.float32)])
    frames, vad = DurationScorer(), DurationScorer(basis="vad")
    plain, pad = sample(wav, rate), sample(padded, rate)
    plain = type(plain)(**{**plain.__dict__, "duration_s": len(wav) / rate})
    pad = type(pad)(**{**pad.__dict__, "duration_s": len(padded) / rate})
    f, v = frames([plain, pad]), vad([plain, pad])
    assert f.sub_scores["seconds"][1] - f.sub_scores["seconds"][0] == pytest.approx(3.0)  # frames count the padding
    assert abs(v.sub_scores["seconds"][1] - v.sub_scores["seconds"][0]) < 0.1  # speech seconds do not
    assert v.sub_scores["seconds"][0] < len(wav) / rate - 1.0  # the recording's own pauses are not speech either
    bad = vad([sample(None, rate)])
    assert not bad.valid[0] and "not vocoded" in bad.reasons[0]
