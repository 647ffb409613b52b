"""Loudness reward: the waveform's RMS level in dBFS against a target, a guard against a policy that games
another reward by getting louder or quieter (and, for a flow policy, a level it can be trained to).

    level   = 20 log10(RMS) dBFS over the whole clip (RMS floored at 1e-9)
    reward  = exp(-((level - target_dbfs) / width_db)^2)     1 at the target; exp(-1) at width_db away
Sub-score `dbfs` (the level). Missing, empty or non-finite audio is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rewards.base import Sample, ScoreResult, audio_problem, require


class LoudnessScorer:
    """kwargs: target_dbfs (the level that scores 1), width_db (dB away from it that score exp(-1))."""

    def __init__(self, target_dbfs: float = -20.0, width_db: float = 6.0):
        self.check_kwargs(target_dbfs=target_dbfs, width_db=width_db)
        self.target, self.width = float(target_dbfs), float(width_db)

    @classmethod
    def check_kwargs(cls, target_dbfs: float = -20.0, width_db: float = 6.0, **_: object) -> None:
        require(isinstance(target_dbfs, (int, float)) and target_dbfs <= 0, "target_dbfs", "must be a level <= 0 dBFS")
        require(isinstance(width_db, (int, float)) and width_db > 0, "width_db", "must be > 0 dB")

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        values, reasons, levels = [], [], []
        for s in samples:
            problem = audio_problem(s.audio, s.sample_rate)  # None, or why it cannot be scored
            rms = float(np.sqrt(np.mean(np.asarray(s.audio, np.float64) ** 2))) if problem is None else 0.0
            level = 20.0 * np.log10(max(rms, 1e-9))
            reasons.append(problem)
            values.append(float(np.exp(-(((level - self.target) / self.width) ** 2))))
            levels.append(level if problem is None else np.nan)
        return ScoreResult.build(values, reasons, {"dbfs": levels})
