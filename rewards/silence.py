"""Silence reward: a guard against the long leading / trailing silences and pauses that CER and duration rewards
invite (silence is never mis-recognised, and it pads a duration).

A voice-activity detector (silero VAD, its released weights shipped in the `silero-vad` package, torch path) finds
the speech segments of each 16 kHz waveform; then, in seconds,
    lead   = start of the first segment                 trail = end of the audio - end of the last segment
    pauses = gaps between consecutive segments
    excess = max(0, lead - max_edge_s) + max(0, trail - max_edge_s) + sum(max(0, p - max_pause_s) for p in pauses)
    reward = exp(-excess / tolerance_s)                  1 for clean speech; 1/e at `tolerance_s` of excess silence
Audio without any speech gets reward 0 (it is all silence, the farthest from clean speech). Logged per step:
lead_s, trail_s, longest_pause_s, speech_frac (speech seconds / audio seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from rewards.base import Sample, ScoreResult, audio_problem, require
from rollouts.audio import resample

VAD_RATE = 16000


def load_vad():
    """silero VAD's torch model from the installed package (no download). Importing the package sets torch's
    thread count to 1 for the whole process; it is put back."""
    threads = torch.get_num_threads()
    try:
        import silero_vad
    except ImportError as e:
        raise ImportError(
            "the silence reward needs the silero-vad package (installed by `make run` / `make test`)"
        ) from e
    finally:
        torch.set_num_threads(threads)
    return silero_vad.load_silero_vad(onnx=False), silero_vad.get_speech_timestamps


def speech_segments(
    wav16k: np.ndarray, model, get_speech_timestamps, *, threshold: float, min_silence_ms: int
) -> list[tuple[float, float]]:
    """(start, end) seconds of each speech segment of a 16 kHz mono waveform."""
    with torch.no_grad():
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32)),
            model,
            threshold=threshold,
            sampling_rate=VAD_RATE,
            min_silence_duration_ms=min_silence_ms,
            return_seconds=False,
        )
    model.reset_states()
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


class SilenceScorer:
    """kwargs: max_edge_s (silence allowed before and after the speech), max_pause_s (longest pause allowed inside),
    tolerance_s (excess silence at which the reward is 1/e), threshold / min_silence_ms (the VAD's)."""

    def __init__(
        self,
        max_edge_s: float = 0.5,
        max_pause_s: float = 1.0,
        tolerance_s: float = 1.0,
        threshold: float = 0.5,
        min_silence_ms: int = 100,
    ):
        self.check_kwargs(max_edge_s, max_pause_s, tolerance_s, threshold, min_silence_ms)
        self.max_edge_s, self.max_pause_s, self.tolerance_s = max_edge_s, max_pause_s, tolerance_s
        self.threshold, self.min_silence_ms = threshold, int(min_silence_ms)
        self.model, self._timestamps = load_vad()

    @classmethod
    def check_kwargs(
        cls,
        max_edge_s: float = 0.5,
        max_pause_s: float = 1.0,
        tolerance_s: float = 1.0,
        threshold: float = 0.5,
        min_silence_ms: int = 100,
        **_: object,
    ) -> None:
        """Range checks of the constructor's arguments (config check calls this without building the scorer)."""

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for key, value in (("max_edge_s", max_edge_s), ("max_pause_s", max_pause_s)):
            require(number(value) and value >= 0, key, f"must be a finite number >= 0, got {value!r}")
        require(number(tolerance_s) and tolerance_s > 0, "tolerance_s", f"must be a number > 0, got {tolerance_s!r}")
        require(number(threshold) and 0 < threshold < 1, "threshold", f"must be in (0, 1), got {threshold!r}")
        ok = isinstance(min_silence_ms, int) and not isinstance(min_silence_ms, bool) and min_silence_ms >= 0
        require(ok, "min_silence_ms", f"must be an integer >= 0, got {min_silence_ms!r}")

    def segments(self, wav: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
        wav16k = resample(wav, sample_rate, VAD_RATE) if sample_rate != VAD_RATE else wav
        return speech_segments(
            wav16k, self.model, self._timestamps, threshold=self.threshold, min_silence_ms=self.min_silence_ms
        )

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        values = np.full(n, np.nan)
        reasons: list[str | None] = [None] * n
        subs = {k: np.full(n, np.nan) for k in ("lead_s", "trail_s", "longest_pause_s", "speech_frac")}
        for i, s in enumerate(samples):
            problem = audio_problem(s.audio, s.sample_rate)
            if problem is not None:
                reasons[i] = problem
                continue
            assert s.audio is not None and s.sample_rate is not None
            total = len(s.audio) / s.sample_rate
            segs = self.segments(s.audio, s.sample_rate)
            if not segs:
                values[i], subs["speech_frac"][i] = 0.0, 0.0
                continue
            lead, trail = segs[0][0], max(0.0, total - segs[-1][1])
            pauses = [b[0] - a[1] for a, b in zip(segs, segs[1:])]
            excess = max(0.0, lead - self.max_edge_s) + max(0.0, trail - self.max_edge_s)
            excess += sum(max(0.0, p - self.max_pause_s) for p in pauses)
            values[i] = math.exp(-excess / self.tolerance_s)
            subs["lead_s"][i], subs["trail_s"][i] = lead, trail
            subs["longest_pause_s"][i] = max(pauses, default=0.0)
            subs["speech_frac"][i] = sum(e - b for b, e in segs) / total
        return ScoreResult.build(values, reasons, subs)
