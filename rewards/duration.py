"""Duration (speaking-rate) reward: a guard against the speed hacking that CER rewards invite.

generated duration    d = the sample's duration_s (the policy's: its generated frames / its frame rate), or with
                      basis="vad" the seconds of speech a voice-activity detector finds in the audio
                      (rewards/silence.py), so that silence padding cannot game it
expected duration     e = n_han / cps_zh + n_latin / cps_en          (Han characters; Latin letters and digits)
                      rate_source="prompt": e is rescaled by the voice prompt's own pace,
                      e *= prompt_duration_s / expected(prompt text)
reward                exp(-|ln(d / e)| / tolerance)                   1 at the expected pace; with the
                                                                      default tolerance 0.5, 0.25 at 2x or 0.5x

The reward is symmetric in the log-ratio: speaking twice too fast costs as much as twice too slow. A sample with
no speech tokens gets reward 0 (its duration is 0 s, the farthest from any pace). A text with no Han or Latin
characters has no expected duration, and a sample whose duration is unknown (NaN) has none to compare: both are
invalid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rewards.base import Sample, ScoreResult, require


def count_units(text: str) -> tuple[int, int]:
    """(Han characters, Latin letters + digits)"""
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    latin = sum(1 for c in text if c.isascii() and c.isalnum())
    return han, latin


class DurationScorer:
    def __init__(
        self,
        cps_zh: float = 4.5,
        cps_en: float = 12.0,
        tolerance: float = 0.5,
        rate_source: Literal["lang", "prompt"] = "lang",
        basis: Literal["frames", "vad"] = "frames",
    ):
        """cps_zh: Han characters per second; cps_en: Latin letters/digits per second; tolerance: the log-ratio
        at which the reward falls to 1/e; rate_source: fixed per-language rates, or the voice prompt's pace;
        basis: the generated duration from the policy's frames, or the speech the VAD finds in the audio."""
        self.check_kwargs(cps_zh=cps_zh, cps_en=cps_en, tolerance=tolerance, rate_source=rate_source, basis=basis)
        self.cps_zh, self.cps_en, self.tolerance, self.rate_source = cps_zh, cps_en, tolerance, rate_source
        self.basis = basis
        self.vad = None
        if basis == "vad":
            from rewards.silence import SilenceScorer

            self.vad = SilenceScorer()

    @classmethod
    def check_kwargs(
        cls,
        cps_zh: float = 4.5,
        cps_en: float = 12.0,
        tolerance: float = 0.5,
        rate_source: str = "lang",
        basis: str = "frames",
        **_: object,
    ) -> None:
        """Range checks of the constructor's arguments (config check calls this without building the scorer)."""
        for key, value in (("cps_zh", cps_zh), ("cps_en", cps_en), ("tolerance", tolerance)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            require(ok, key, f"must be a finite number > 0, got {value!r}")
        require(rate_source in ("lang", "prompt"), "rate_source", f"must be 'lang' or 'prompt', got {rate_source!r}")
        require(basis in ("frames", "vad"), "basis", f"must be 'frames' or 'vad', got {basis!r}")

    def expected_seconds(self, text: str) -> float:
        han, latin = count_units(text)
        return han / self.cps_zh + latin / self.cps_en

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        values = np.zeros(n)
        reasons: list[str | None] = [None] * n
        ratio = np.full(n, np.nan)
        gen_s = np.array([s.duration_s for s in samples], dtype=np.float64)
        if self.vad is not None:  # basis vad: the seconds of speech in the audio
            speech = self.vad(samples)
            gen_s = speech.sub_scores["speech_frac"] * np.array([_seconds(s) for s in samples])
            for i in np.flatnonzero(~speech.valid):
                reasons[i] = speech.reasons[i]
        exp_s = np.full(n, np.nan)
        for i, s in enumerate(samples):
            if reasons[i] is not None:
                continue
            if not math.isfinite(gen_s[i]) or gen_s[i] < 0:
                reasons[i] = "the sample's duration is unknown"
                continue
            e = self.expected_seconds(s.target_text)
            if e <= 0:
                reasons[i] = "target text has no Han or Latin characters: no expected duration"
                continue
            if self.rate_source == "prompt":
                pe = self.expected_seconds(s.prompt_text)
                pd = s.prompt_duration_s
                if pe <= 0 or not math.isfinite(pd) or pd <= 0:
                    reasons[i] = "voice prompt has no text or no known duration: its pace is unknown"
                    continue
                e *= pd / pe
            exp_s[i] = e
            if gen_s[i] == 0:
                values[i] = 0.0
                continue
            ratio[i] = gen_s[i] / e
            values[i] = math.exp(-abs(math.log(ratio[i])) / self.tolerance)
        return ScoreResult.build(values, reasons, {"seconds": gen_s, "expected_seconds": exp_s, "ratio": ratio})


def _seconds(s: Sample) -> float:
    return len(s.audio) / s.sample_rate if s.audio is not None and s.sample_rate else math.nan
