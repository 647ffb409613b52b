"""Token-level rewards: ASR timings -> wrong spans -> frames -> per-token advantages -> the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_config

from rewards.asr import Timed, _paraformer_timed
from rewards.base import ScoreResult
from rewards.cer import CERScorer, error_spans
from rewards.wire import WireError, decode_result, encode_result
from rl.advantages import span_frames, token_level_advantages
from rl.config import DEFAULT_CONFIG, ConfigError, load_config
from rl.losses import policy_loss
from rl.trainer import train

# ---- spans -> frames (hand-computed, 25 frames per second: frame t covers [0.04 t, 0.04 (t + 1)) ----------------


def test_span_frames_by_hand():
    spans = [((0.1, 0.3),), ((0.08, 0.32),), ((0.2, 0.2),), ((0.3, 9.0),), None, ()]
    lengths = torch.tensor([10, 10, 10, 10, 10, 10])
    covered, has = span_frames(spans, lengths, 25.0, 12)
    assert covered[0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]  # 2.5 .. 7.5 frames
    assert covered[1].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]  # edges on 2 and 8 exactly: 8 is out
    assert covered[2].nonzero().flatten().tolist() == [5]  # zero width: the frame that holds it
    assert covered[3].nonzero().flatten().tolist() == [7, 8, 9]  # cut at the row's length (stop never blamed)
    assert not covered[4].any() and not covered[5].any()
    assert has.tolist() == [True, True, True, True, False, True]


def test_token_level_advantages_by_hand():
    adv = torch.tensor([1.0, -1.0])
    e = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = token_level_advantages(adv, {"cer": e}, {"cer": 2.0}, 0.5)  # A - 0.5 * 2 * e
    assert out.tolist() == [[1.0, 0.0, 0.0], [-2.0, -1.0, -1.0]]
    with pytest.raises(ValueError):
        token_level_advantages(adv, {"cer": e[:1]}, {"cer": 1.0}, 0.5)


def test_loss_takes_per_token_advantages():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    seq = policy_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), mask, eps_low=0.2, eps_high=0.3)
    same = policy_loss(logp, logp.detach(), torch.tensor([[1.0] * 3, [-2.0] * 3]), mask, eps_low=0.2, eps_high=0.3)
    assert float(seq.loss.detach()) == pytest.approx(float(same.loss.detach()))
    per_tok = torch.tensor([[1.0, 0.0, 0.0], [-2.0, -1.0, 99.0]])  # the masked 99 does not count
    out = policy_loss(logp, logp.detach(), per_tok, mask, eps_low=0.2, eps_high=0.3)
    assert float(out.loss.detach()) == pytest.approx(-(1 + 0 + 0 - 2 - 1) / 5)  # ratio 1: -mean of A over valid tokens
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2, 0.0, 0.0], [0.4, 0.2, 0.0]]))  # -A / 5


# ---- the CER side: alignment -> spans ---------------------------------------------------------------------------


def test_error_spans_substitution_deletion_insertion():
    said = Timed("The quack brown", ((" The", 0.0, 0.2), (" quack", 0.2, 0.5), (" brown,", 0.5, 0.8)))
    assert error_spans("the quick brown fox", said, "en", 1.2) == ((0.2, 0.5), (0.8, 1.2))
    extra = Timed("a big cat", (("a", 0.0, 0.1), (" big", 0.1, 0.4), (" cat", 0.5, 0.9)))
    assert error_spans("a cat", extra, "en", 1.0) == ((0.1, 0.4),)
    assert error_spans("a cat", Timed("A cat.", (("A", 0.0, 0.1), (" cat.", 0.2, 0.6))), "en", 1.0) == ()
    assert error_spans("a cat", Timed("", ()), "en", 1.5) == ((0.0, 1.5),)  # nothing recognised: all of it
    late = Timed("a dog", (("a", 0.0, 0.1), (" dog", 0.8, 1.3)))  # the ASR's last time is past the clip's end
    assert error_spans("a cat", late, "en", 1.0) == ((0.8, 1.0),)


def test_error_spans_chinese_pieces_split_evenly():
    said = Timed("今天天汽", (("今天", 0.0, 0.4), ("天汽", 0.4, 0.8)))  # 气 -> 汽 at 0.6..0.8
    (span,) = error_spans("今天天气", said, "zh", 1.0)
    assert span == pytest.approx((0.6, 0.8))


def test_paraformer_timestamps_pair_with_tokens():
    t = _paraformer_timed({"text": "今天 hello 世", "timestamp": [[0, 100], [100, 200], [200, 500], [500, 600]]})
    assert t.pieces == (("今", 0.0, 0.1), ("天", 0.1, 0.2), ("hello", 0.2, 0.5), ("世", 0.5, 0.6))
    assert _paraformer_timed({"text": "今天", "timestamp": [[0, 100]]}) is None  # does not pair: no spans
    assert _paraformer_timed({"text": "", "timestamp": []}).pieces == ()


def test_token_level_needs_timestamps_from_the_english_backend():
    with pytest.raises(ValueError, match="faster-whisper"):
        CERScorer.check_kwargs(whisper_dir="/x", token_level=True)
    CERScorer.check_kwargs(whisper_dir="/x", token_level=True, asr_backend="faster-whisper")
    CERScorer.check_kwargs(paraformer_dir="/x", token_level=True)


def test_token_level_paraformer_scores_with_spans(reward_models):
    from conftest import audio_sample

    sc = CERScorer(paraformer_dir=str(reward_models["paraformer_dir"]), token_level=True)
    res = sc([audio_sample(seed=s) for s in range(3)] + [audio_sample(seconds=0.0)])
    assert res.valid.tolist() == [True, True, True, False]
    assert len(res.spans) == 4 and res.spans[3] is None
    for sp, err in zip(res.spans[:3], res.sub_scores["error_s"][:3]):
        if sp is not None:  # a random model's timestamps may not pair with its tokens
            assert all(0 <= a <= b <= 1.0 + 1e-6 for a, b in sp) and err == pytest.approx(sum(b - a for a, b in sp))


# ---- spans travel: the wire and the result checks ---------------------------------------------------------------


def test_spans_on_the_wire_round_trip_and_are_checked():
    res = ScoreResult.build([0.5, 0.1], [None, None], {}, [((0.1, 0.2),), None])
    back = decode_result(json.loads(json.dumps(encode_result(res))), 2)
    assert back.spans == [((0.1, 0.2),), None]
    body = encode_result(res)
    for bad in ([[[0.3, 0.1]], None], [[[0.1]], None], [[["a", 1]], None], [None]):
        with pytest.raises(WireError, match="spans"):
            decode_result({**body, "spans": bad}, 2)
    with pytest.raises(ValueError, match="spans"):
        ScoreResult(np.zeros(1), np.ones(1, dtype=bool), {}, [None], [((-1.0, 0.0),)])
    assert ScoreResult.build([1.0, np.nan], [None, None], {}, [(), ((0.0, 1.0),)]).spans == [(), None]


# ---- the trainer --------------------------------------------------------------------------------------------------


def _bad_code_frac(run) -> list[float]:
    return [1 - r["reward/tok/mean"] for r in (json.loads(x) for x in (run / "metrics.jsonl").open())]


@pytest.mark.slow
def test_token_level_reward_trains_the_wrong_frames_down(tmp_path, tiny_ckpt):
    common = (
        "rewards.duration.weight=0",
        "rewards.tok.scorer=scorers_for_tests:BadCodeSpans",
        "rewards.tok.weight=1.0",
        "rewards.tok.kwargs.modulo=2",
        "dynamic_sampling.mode=off",
        "vocoder.enabled=false",  # the reward reads codes only
        "train.steps=5",
        "train.save_every=0",
        "optim.lr=3e-4",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "tok", tiny_ckpt, *common, "advantage.token_coef=2"))
    train(cfg, d, progress=False)
    log = [json.loads(x) for x in (tmp_path / "tok" / "run" / "metrics.jsonl").open()]
    assert all(0 < r["adv/token_penalized_frac"] < 1 for r in log)
    bad = _bad_code_frac(tmp_path / "tok" / "run")
    assert bad[-1] < bad[0] - 0.15 and sum(bad[-2:]) < sum(bad[:2]) - 0.2, bad  # the penalised codes become rarer

    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "seq", tiny_ckpt, *common, "advantage.token_coef=0"))
    train(cfg, d, progress=False)
    log0 = [json.loads(x) for x in (tmp_path / "seq" / "run" / "metrics.jsonl").open()]
    assert log0[0]["adv/token_penalized_frac"] == log[0]["adv/token_penalized_frac"]  # same first rollout
    assert sum(_bad_code_frac(tmp_path / "seq" / "run")[-3:]) > sum(bad[-3:])  # the token term learns faster


def test_token_coef_must_be_non_negative(tmp_path, tiny_ckpt):
    with pytest.raises(ConfigError, match="token_coef"):
        load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, "advantage.token_coef=-1"))
