"""The loudness reward, by hand."""

import numpy as np
import pytest
from conftest import audio_sample

from rewards.base import ScorerConfigError, build_scorer


def test_level_and_reward_by_hand():
    sc = build_scorer("loudness", {"target_dbfs": -20.0, "width_db": 6.0}, "rewards.loud")
    t = np.arange(24000) / 24000
    sine = (0.1 * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # RMS 0.1: -20 dBFS
    half = sine / 2  # RMS 0.05: -26.02 dBFS, one width below the target
    res = sc([audio_sample(audio=sine), audio_sample(audio=half), audio_sample(audio=None)])
    assert res.sub_scores["dbfs"][:2] == pytest.approx([-20.0, -26.0206], abs=1e-3)
    assert res.values[:2] == pytest.approx([1.0, np.exp(-((6.0206 / 6.0) ** 2))], abs=1e-4)
    assert res.valid.tolist() == [True, True, False] and np.isnan(res.sub_scores["dbfs"][2])


def test_kwargs_are_checked():
    with pytest.raises(ScorerConfigError, match="kwargs.width_db"):
        build_scorer("loudness", {"width_db": 0}, "rewards.loud")
    with pytest.raises(ScorerConfigError, match="kwargs.target_dbfs"):
        build_scorer("loudness", {"target_dbfs": 3}, "rewards.loud")
