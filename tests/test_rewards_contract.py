"""The scorer contract, the registry, the duration reward and the runner's failure handling."""

import math

import numpy as np
import pytest

from rewards.base import Sample, ScorerConfigError, ScoreResult, build_scorer
from rewards.duration import DurationScorer, count_units
from rewards.runner import score


def sample(text="今天天气很好", n_codes=50, prompt_text="你好", prompt_codes=25, **kw):
    return Sample(
        uttid="u",
        group_id=0,
        target_text=text,
        prompt_text=prompt_text,
        codes=np.zeros(n_codes, dtype=np.int64),
        finished=True,
        prompt_codes=np.zeros(prompt_codes, dtype=np.int64),
        duration_s=n_codes / 25,
        prompt_duration_s=prompt_codes / 25,
        **kw,
    )


def test_duration_reward_hand_computed():
    s = DurationScorer(cps_zh=4.0, cps_en=10.0, tolerance=0.5)
    # 6 Han characters at 4/s = 1.5 s expected; 50 codes = 2.0 s; reward exp(-|ln(2/1.5)| / 0.5)
    res = s([sample(n_codes=50), sample(n_codes=0), sample(text="Hi 42!", n_codes=10), sample(text="……")])
    assert res.values[0] == pytest.approx(math.exp(-math.log(2.0 / 1.5) / 0.5))
    assert res.values[1] == 0.0 and res.valid[1]  # no speech at all: the worst pace, a real 0
    assert res.values[2] == pytest.approx(math.exp(-abs(math.log(0.4 / 0.4)) / 0.5))  # 4 latin units / 10 per s
    assert not res.valid[3] and math.isnan(res.values[3]) and "no Han or Latin" in res.reasons[3]
    assert res.sub_scores["seconds"][0] == pytest.approx(2.0)
    assert res.sub_scores["expected_seconds"][0] == pytest.approx(1.5)
    assert count_units("iPhone 15 很好") == (2, 8)


def test_duration_reward_symmetric_in_log_ratio():
    s = DurationScorer(cps_zh=4.0)
    fast, slow = s([sample(n_codes=19), sample(n_codes=75)]).values  # 0.76 s and 3.0 s vs 1.5 s expected
    assert fast == pytest.approx(math.exp(-abs(math.log(0.76 / 1.5)) / 0.5))
    assert s([sample(n_codes=75)]).values[0] == pytest.approx(math.exp(-math.log(2) / 0.5))


def test_duration_prompt_rate():
    # the prompt speaks 2 Han characters in 1 s (25 codes) where 4/s would take 0.5 s: this voice is 2x slower
    s = DurationScorer(cps_zh=4.0, rate_source="prompt")
    res = s([sample(n_codes=75)])  # 3.0 s for 6 characters = exactly the prompt's pace
    assert res.values[0] == pytest.approx(1.0)
    assert not s([sample(prompt_text="...")]).valid[0]


def test_registry_names_dotted_paths_and_kwargs_are_checked():
    assert isinstance(build_scorer("duration", {"tolerance": 0.3}, "rewards.d"), DurationScorer)
    assert isinstance(build_scorer("rewards.duration:DurationScorer", {}, "rewards.d"), DurationScorer)
    with pytest.raises(ScorerConfigError, match="unknown scorer 'durration'; built-in scorers: .*duration"):
        build_scorer("durration", {}, "rewards.d")
    with pytest.raises(ScorerConfigError, match="unknown argument 'tolerence' .*did you mean 'tolerance'"):
        build_scorer("duration", {"tolerence": 0.3}, "rewards.d")
    with pytest.raises(ScorerConfigError, match="cannot import 'no_such_module'"):
        build_scorer("no_such_module:X", {}, "rewards.d")


class Boom:
    def __call__(self, samples):
        raise RuntimeError("model server fell over")


class Short:
    def __call__(self, samples):
        return ScoreResult.build([1.0], [None])


class HalfInvalid:
    def __call__(self, samples):
        return ScoreResult.build([1.0, float("inf"), 0.5], [None, None, "no audio"])


def test_runner_turns_failures_into_invalid_not_zero(capsys):
    samples = [sample(), sample(), sample()]
    out = score({"ok": DurationScorer(), "boom": Boom(), "short": Short(), "half": HalfInvalid()}, samples)
    assert out.values["ok"].isfinite().all()
    assert out.values["boom"].isnan().all() and out.errors["boom"] == 1
    assert out.values["short"].isnan().all() and out.errors["short"] == 1
    assert out.values["half"][0] == 1.0 and out.values["half"][1:].isnan().all()
    assert "non-finite" in out.results["half"].reasons[1] and out.results["half"].reasons[2] == "no audio"
    assert "model server fell over" in capsys.readouterr().err


def test_score_result_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[N\]"):
        ScoreResult(np.zeros(3), np.zeros(2, dtype=bool))


def test_samples_marked_invalid_upstream_skip_every_scorer():
    seen = []

    class Spy:
        def __call__(self, samples):
            seen.append(len(samples))
            return ScoreResult.build([1.0] * len(samples), [None] * len(samples), {"x": [2.0] * len(samples)})

    out = score(
        {"a": Spy(), "b": DurationScorer()}, [sample(), sample(), sample()], invalid=[None, "empty generation", None]
    )
    assert seen == [2]
    for k in ("a", "b"):
        assert out.values[k][1].isnan() and out.results[k].reasons[1] == "empty generation"
        assert out.values[k][[0, 2]].isfinite().all()
    assert np.isnan(out.results["a"].sub_scores["x"][1]) and out.results["a"].sub_scores["x"][0] == 2.0
    out = score({"a": Spy()}, [sample()], invalid=["no audio"])
    assert seen == [2] and out.values["a"].isnan().all()


def test_the_readme_scorer_example_works_as_written(tmp_path, monkeypatch):
    import re
    import sys

    import yaml
    from conftest import REPO, audio_sample

    from rewards.base import check_scorer_kwargs, resolve_scorer_class

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(# my_rewards/loudness.py\n.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 24  # "a complete 20-line example"
    pkg = tmp_path / "my_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "loudness.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    block = re.search(r"```yaml\n(rewards:\n  loud:.*?)```", readme, re.S).group(1)
    entry = yaml.safe_load(block)["rewards"]["loud"]
    cls = resolve_scorer_class(entry["scorer"], "rewards.loud")
    check_scorer_kwargs(cls, entry["kwargs"], "rewards.loud")
    res = cls(**entry["kwargs"])([audio_sample(), audio_sample(audio=None)])
    assert res.valid.tolist() == [True, False] and 0 < res.values[0] <= 1 and "dbfs" in res.sub_scores
    sys.modules.pop("my_rewards.loudness", None)
    sys.modules.pop("my_rewards", None)
