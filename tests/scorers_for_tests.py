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


class NeedsPromptAudio(Longer):
    """Like Longer, but declares that it compares against the voice prompt's audio (as the sim reward does)."""

    needs_prompt_audio = True


class InvalidOddGroups:
    """Valid length reward for even group ids; invalid (with a reason) for odd ones."""

    def __call__(self, samples):
        reasons = [None if s.group_id % 2 == 0 else "odd group" for s in samples]
        return ScoreResult.build([len(s.codes) / 100 for s in samples], reasons)


class AlwaysInvalid:
    def __call__(self, samples):
        return ScoreResult(
            np.full(len(samples), np.nan), np.zeros(len(samples), dtype=bool), {}, ["unavailable"] * len(samples)
        )


class AudioSeconds:
    """Reward = audio duration in seconds; checks that audio and the voice prompt's audio arrive."""

    def __call__(self, samples):
        reasons, values = [], []
        for s in samples:
            ok = s.audio is not None and s.sample_rate == 24000 and s.prompt_audio is not None
            reasons.append(None if ok else "no audio")
            values.append(len(s.audio) / s.sample_rate if ok else 0.0)
        return ScoreResult.build(values, reasons)


class Slow:
    """Sleeps, then scores like Longer: a service that is too slow for its client's timeout."""

    def __init__(self, seconds: float = 1.0):
        self.seconds = seconds

    def __call__(self, samples):
        import time

        time.sleep(self.seconds)
        return Longer()(samples)


class Broken:
    def __call__(self, samples):
        raise RuntimeError("model server lost its GPU")


class BadCodeSpans:
    """A token-level reward: the frames whose code is one of the `bad` codes are wrong spans (1 / rate s each, at
    `rate` frames per second); value = the fraction of good frames. Like `cer` with `token_level`."""

    def __init__(self, rate: float = 25.0, modulo: int = 3):
        self.rate, self.modulo = rate, modulo

    def __call__(self, samples):
        values, spans = [], []
        for s in samples:
            bad = [t for t, c in enumerate(s.codes.tolist()) if c % self.modulo == 0]
            values.append(1.0 - len(bad) / max(len(s.codes), 1))
            spans.append(tuple((t / self.rate, (t + 1) / self.rate) for t in bad))
        return ScoreResult.build(values, [None] * len(samples), {}, spans)
