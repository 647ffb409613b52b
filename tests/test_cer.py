"""CER/WER: seed-tts-eval's text path, exactly (eval-protocol section 1.2), and the CER scorer."""

import math

import numpy as np
import pytest
from conftest import audio_sample

from rewards.asr import ModelDirError
from rewards.cer import CERScorer, error_rate, normalize


@pytest.mark.parametrize(
    "ref, hyp, lang, expected",
    [
        ("今天天气很好", "今天天汽很好", "zh", 1 / 6),  # one substitution over 6 characters
        ("你好，世界！", "你好世界", "zh", 0.0),  # punctuation is deleted
        ("语音合成", "語音合成", "zh", 0.0),  # the hypothesis is converted to simplified Chinese
        ("iPhone很好", "iphone很好", "zh", 1 / 8),  # zh: characters, case-sensitive
        ("2024年", "二零二四年", "zh", 4 / 5),  # no number normalisation
        ("你 好", "你好", "zh", 0.0),  # spaces never count in zh
        ("Hello, world!", "hello world", "en", 0.0),  # en: lowercased words, punctuation deleted
        ("well-known", "well known", "en", 2.0),  # deleted, not replaced: 1 substitution + 1 insertion over 1 word
        ("I’m here", "I'm here", "en", 0.5),  # curly quote deleted (im), ASCII apostrophe kept (i'm)
        ("It's $5.", "its 5", "en", 0.5),  # it's != its; $ and . deleted
        ("a", "a b c", "en", 2.0),  # insertions: the rate can exceed 1
        ("今天天气很好", "", "zh", 1.0),  # empty hypothesis: all deletions
        ("the cat", "  the   cat  ", "en", 0.0),  # whitespace runs collapse
        ("hello\tworld", "hello world", "en", 2.0),  # jiwer splits on " " only: one reference word, 1 sub + 1 ins
        ("a\u00a0b c", "a b c", "en", 1.0),  # a no-break space joins words too: 2 reference words, 1 sub + 1 ins
    ],
)
def test_error_rate_matches_seed_tts_eval(ref, hyp, lang, expected):
    assert error_rate(ref, hyp, lang) == pytest.approx(expected)


def test_empty_reference_after_normalisation_raises():
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rate("！？……", "啊", "zh")
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rate("...", "hi", "en")


def test_normalise_keeps_the_exact_token_rules():
    assert normalize("你好，Hi!", "zh") == "你 好 H i"
    assert normalize("Don't STOP,now", "en") == "don't stopnow"


def test_scorer_with_tiny_paraformer_and_whisper(reward_models):
    s = CERScorer(paraformer_dir=reward_models["paraformer_dir"], whisper_dir=reward_models["whisper_dir"])
    samples = [
        audio_sample("今天天气很好", seed=1),
        audio_sample("The quick brown fox", seed=2),
        audio_sample("哈哈哈", seed=3),
    ]
    res = s(samples)
    assert res.valid.all()
    assert np.allclose(res.values, np.exp(-2.5 * res.sub_scores["cer"]))
    hyps, langs, _ = s.transcribe(samples)
    assert langs == ["zh", "en", "zh"]
    for sample, hyp, lang, cer in zip(samples, hyps, langs, res.sub_scores["cer"]):
        assert cer == pytest.approx(error_rate(sample.target_text, hyp, lang))
    again = s(samples)  # dither is off: the same audio gets the same transcript and reward
    assert np.array_equal(again.values, res.values)


def test_invalid_samples_have_reasons_not_zeros(reward_models):
    s = CERScorer(paraformer_dir=reward_models["paraformer_dir"])
    bad = np.array([0.1, np.nan] * 4000, dtype=np.float32)
    res = s(
        [
            audio_sample(audio=None),
            audio_sample(audio=bad),
            audio_sample(audio=np.zeros(0, np.float32)),
            audio_sample(sample_rate=None),
            audio_sample("Hello there"),
        ]
    )
    assert not res.valid.any() and np.isnan(res.values).all()
    assert [r.split(" (")[0].split(":")[0] for r in res.reasons] == [
        "no audio",
        "audio contains NaN or inf",
        "empty audio",
        "no valid sample rate",
        "no ASR model for en",
    ]
    zh = CERScorer(paraformer_dir=reward_models["paraformer_dir"], lang="zh")
    res = zh([audio_sample("！！！")])
    assert not res.valid[0] and "the reference is empty after normalisation" in res.reasons[0]


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelDirError, match="paraformer: model directory not found"):
        CERScorer(paraformer_dir=str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("model: Paraformer\n")
    with pytest.raises(ModelDirError, match="lacks model.pt"):
        CERScorer(paraformer_dir=str(tmp_path / "half"))
    with pytest.raises(ValueError, match="needs paraformer_dir"):
        CERScorer()
    with pytest.raises(ModelDirError, match="whisper: model directory not found"):
        CERScorer(whisper_dir=str(tmp_path / "no-whisper"), lang="en")


def test_other_sample_rates_are_resampled(reward_models):
    s = CERScorer(paraformer_dir=reward_models["paraformer_dir"])
    res = s([audio_sample(rate=16000), audio_sample(rate=44100), audio_sample(rate=8000)])
    assert res.valid.all() and not math.isnan(res.values.sum())
