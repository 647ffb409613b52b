"""Speaker similarity, emotion and laughter rewards on tiny models in their real formats."""

import numpy as np
import pytest
import torch
from conftest import audio_sample

from rewards.asr import ModelDirError
from rewards.emotion import LABELS, EmotionScorer
from rewards.laughter import LaughterScorer, asks_for_laughter, laughter_tokens
from rewards.sim import SimScorer

# --- speaker similarity --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(reward_models):
    return SimScorer(reward_models["sv_checkpoint"], wavlm_cfg=reward_models["wavlm_cfg"])


def test_sim_reward_is_half_one_plus_cosine_against_the_prompt(sim):
    samples = [audio_sample(seed=i, seconds=1.0 + 0.3 * i, uttid=f"u{i % 2}") for i in range(4)]
    res = sim(samples)
    assert res.valid.all()
    assert np.allclose(res.values, (1 + res.sub_scores["cos"]) / 2)
    gen = sim.model.embed(
        [np.interp(np.arange(0, len(s.audio), 1.5), np.arange(len(s.audio)), s.audio) for s in samples[:1]]
    )
    assert gen.shape[1] == 16


def test_sim_batches_equal_one_by_one(sim):
    wavs = [
        np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1
        for i, n in enumerate([16000, 9000, 23000, 401])
    ]
    batched = sim.model.embed(wavs)
    alone = torch.cat([sim.model.embed([w]) for w in wavs])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_sim_a_voice_prompt_is_needed(sim):
    res = sim([audio_sample(prompt_audio=None), audio_sample(prompt_audio=np.zeros(0, np.float32))])
    assert not res.valid.any()
    assert res.reasons[0].startswith("voice prompt: no audio") and "empty audio" in res.reasons[1]


def test_sim_loading_is_strict_and_lists_mismatches(reward_models, tmp_path):
    ckpt = torch.load(reward_models["sv_checkpoint"], weights_only=True)
    state = dict(ckpt["model"])
    assert "loss_calculator.projection.weight" in state  # a training-only key: ignored on purpose
    del state["layer2.SE_Connect.linear1.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["feature_extract.model.encoder.layer_norm.weight"] = torch.zeros(5)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(ValueError) as e:
        SimScorer(str(bad), wavlm_cfg=reward_models["wavlm_cfg"])
    msg = str(e.value)
    assert "missing (1): layer2.SE_Connect.linear1.bias" in msg and "unexpected (1): extra.weight" in msg
    assert "mis-shaped (1): feature_extract.model.encoder.layer_norm.weight" in msg
    with pytest.raises(ModelDirError, match="checkpoint not found"):
        SimScorer(str(tmp_path / "none.pth"))


def test_wavlm_large_is_the_default_architecture(reward_models):
    # the tiny checkpoint does not fit WavLM-Large: every WavLM tensor is reported, none silently skipped
    with pytest.raises(ValueError, match=r"feature_extract\.model\."):
        SimScorer(reward_models["sv_checkpoint"])


# --- emotion --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emotion(reward_models):
    return EmotionScorer(reward_models["emotion_dir"])


def test_emotion_reward_is_target_probability_or_not_neutral(emotion):
    samples = [
        audio_sample(seed=1, emotion=3),
        audio_sample(seed=2),
        audio_sample(seed=3, emotion=6),
        audio_sample(seed=4, emotion=3),
    ]
    res = emotion(samples)
    probs = emotion.probabilities(
        [
            np.asarray(__import__("rollouts.audio", fromlist=["resample"]).resample(s.audio, 24000, 16000))
            for s in samples
        ]
    )
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert res.values[0] == pytest.approx(probs[0, 3]) and res.values[1] == pytest.approx(1 - probs[1, 4])
    assert res.values[2] == pytest.approx(probs[2, 6])
    assert np.isnan(res.sub_scores["emo_happy"][[1, 2]]).all() and res.sub_scores["emo_sad"][2] == res.values[2]
    assert res.sub_scores["hit"][0] == float(np.argmax(probs[0]) == 3) and np.isnan(res.sub_scores["hit"][1])
    assert LABELS[4] == "neutral"


def test_emotion_bad_target_and_missing_dir(emotion, tmp_path):
    res = emotion([audio_sample(emotion=12), audio_sample(audio=None)])
    assert not res.valid.any() and "not a label index" in res.reasons[0]
    with pytest.raises(ModelDirError, match="emotion: model directory not found"):
        EmotionScorer(str(tmp_path / "x"))


# --- laughter ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, asks",
    [
        ("哈哈哈，太好笑了", True),
        ("他笑了：哈。", False),
        ("嘿嘿，你猜", True),
        ("哈，哈！", True),
        ("Haha, that was fun.", True),
        ("ha ha", True),
        ("hey hey, over here", True),
        ("He said hi.", False),
        ("Hah!", False),
        ("The hat", False),
    ],
)
def test_which_texts_ask_for_laughter(text, asks):
    assert asks_for_laughter(text) is asks


def test_laughter_tokens_are_the_cer_reference_tokens():
    assert laughter_tokens("哈哈哈，太好笑了", "zh") == (list("哈哈哈太好笑了"), [True] * 3 + [False] * 4)
    assert laughter_tokens("Ha-ha! Nice.", "en") == (["haha", "nice"], [True, False])


class FixedDetector:
    """A segmenter returning fixed segments (a stand-in for any frame-level laughter model)."""

    def __init__(self, segments):
        self.fixed = [[tuple(s) for s in segs] for segs in segments]

    def segments(self, wavs):
        return self.fixed[: len(wavs)]


def test_the_report_rule_deletion_vs_transcription(reward_models, monkeypatch):
    import tests_laughter_detector as det

    det.SEGMENTS = [[(0.1, 0.6)], [(0.1, 0.6)], [], [(0.2, 0.5)], [(0.0, 0.3)]]
    s = LaughterScorer(
        detector="tests_laughter_detector:Detector",
        paraformer_dir=reward_models["paraformer_dir"],
        whisper_dir=reward_models["whisper_dir"],
    )
    hyps = ["太好笑了", "哈哈哈太好笑了", "太好笑了", "that was fun", None]
    monkeypatch.setattr(
        s.asr, "transcribe", lambda samples: (hyps[: len(samples)], ["zh"] * len(samples), [None] * len(samples))
    )
    samples = [audio_sample("哈哈哈，太好笑了", seed=i) for i in range(3)] + [audio_sample("Haha, that was fun.")]
    samples.append(audio_sample("今天天气很好"))
    res = s(samples)
    # laughed (detected, span deleted) -> 1; read the words -> 0; nothing detected -> 0; english deletion -> 1
    assert res.values[:4].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert res.sub_scores["detected"][:4].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert res.sub_scores["deleted"][1] == 0.0 and res.sub_scores["laughter_s"][0] == pytest.approx(0.5)
    assert not res.valid[4] and np.isnan(res.values[4]) and "does not ask for laughter" in res.reasons[4]


def test_tiny_ast_detector_runs_end_to_end(reward_models):
    s = LaughterScorer(ast_dir=reward_models["ast_dir"], paraformer_dir=reward_models["paraformer_dir"])
    res = s([audio_sample("哈哈哈，太好笑了", seconds=3.0), audio_sample("你好")])
    assert res.valid[0] and res.values[0] in (0.0, 1.0) and not res.valid[1]
    with pytest.raises(ValueError, match="needs ast_dir"):
        LaughterScorer(paraformer_dir=reward_models["paraformer_dir"])


def test_laughter_detector_errors_name_the_directory_and_the_label(reward_models, tmp_path):
    from rewards.laughter import ASTLaughterDetector

    with pytest.raises(ModelDirError, match="laughter: model directory not found"):
        ASTLaughterDetector(str(tmp_path / "no-ast"))
    with pytest.raises(ValueError, match="has no class named 'Giggle'"):
        ASTLaughterDetector(reward_models["ast_dir"], label="Giggle")
