"""Scorers used by the trainer tests (importable by dotted path, as user scorers are)."""

from __future__ import annotations

import numpy as np

from rewards.base import ScoreResult


class Constant:
    """The same value for every sample: every group is uninformative."""

    def __init__(self, value: float = 0.5):
        self.value = value

    def __call__(self, samples):
        return ScoreResult.build([self.value] * len(samples), [None] * len(samples))


class Longer:
    """Reward = number of generated codes / 100 (so groups always vary)."""

    def __call__(self, samples):
        return ScoreResult.build([len(s.codes) / 100 for s in samples], [None] * len(samples))


class InvalidOddGroups:
    """Valid length reward for even group ids; invalid (with a reason) for odd ones."""

    def __call__(self, samples):
        reasons = [None if s.group_id % 2 == 0 else "odd group" for s in samples]
        return ScoreResult.build([len(s.codes) / 100 for s in samples], reasons)


class AlwaysInvalid:
    def __call__(self, samples):
        return ScoreResult(np.full(len(samples), np.nan), np.zeros(len(samples), dtype=bool), {},
                           ["unavailable"] * len(samples))
