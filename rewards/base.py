"""The scorer contract: one batched call over samples, returning values plus a validity mask.

A scorer is a small class:

    class MyScorer:
        def __init__(self, some_option: float = 1.0): ...          # kwargs come from the YAML config
        def __call__(self, samples: Sequence[Sample]) -> ScoreResult: ...

Config picks a scorer by name (`SCORERS` below) or by dotted path (`my_pkg.my_module:MyScorer`); its kwargs are
checked against the constructor's signature at start-up, and by the scorer's own `check_kwargs(**kwargs)`
classmethod when it has one (range checks that load no model; raise `KwargError(key, message)` to name the
kwarg). A sample the scorer cannot score (no audio, NaN audio,
a failed model call) is marked invalid with a reason: it becomes NaN, is left out of the group statistics and is
counted in the logs. A missing reward is never a 0.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One generated utterance, as scorers see it."""

    uttid: str  # the prompt's id
    group_id: int
    target_text: str  # the text that was synthesised
    prompt_text: str  # transcript of the voice prompt
    codes: np.ndarray  # [L] int64 the policy's generated discrete codes, stop excluded ([0] for continuous ones)
    finished: bool  # ended with the stop action (False: truncated at the length limit)
    prompt_codes: np.ndarray  # [Tp] int64 speech tokens of the voice prompt (the manifest's)
    emotion: int | None = None  # target emotion label index (emotion2vec order); None = not given
    duration_s: float = math.nan  # seconds of generated speech (the policy's own measure; NaN = unknown)
    prompt_duration_s: float = math.nan  # seconds of the voice prompt (NaN = unknown)
    audio: np.ndarray | None = None  # [S] float32 mono waveform at `sample_rate` (None: not vocoded)
    sample_rate: int | None = None
    prompt_audio: np.ndarray | None = None  # [S'] float32 mono voice prompt at `prompt_sample_rate`
    prompt_sample_rate: int | None = None


@dataclass(frozen=True)
class ScoreResult:
    values: np.ndarray  # [N] float64; NaN where invalid
    valid: np.ndarray  # [N] bool
    sub_scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N] float64, logged per reward
    reasons: list[str | None] = field(default_factory=list)  # [N] why a sample is invalid (None if valid)
    # token-level scorers (e.g. cer with token_level): per sample the (start_s, end_s) stretches of its audio that
    # were found wrong, None where unknown; [] = the scorer gives no spans. The trainer maps them to frames.
    spans: list[tuple[tuple[float, float], ...] | None] = field(default_factory=list)

    def __post_init__(self):
        n = self.values.shape[0]
        if self.values.shape != (n,) or self.valid.shape != (n,):
            raise ValueError(f"values and valid must both be [N]; got {self.values.shape}, {self.valid.shape}")
        for k, v in self.sub_scores.items():
            if v.shape != (n,):
                raise ValueError(f"sub-score '{k}' has shape {v.shape}, expected ({n},)")
        if self.reasons and len(self.reasons) != n:
            raise ValueError(f"reasons has {len(self.reasons)} entries, expected {n}")
        if self.spans:
            if len(self.spans) != n:
                raise ValueError(f"spans has {len(self.spans)} entries, expected {n}")
            for sp in self.spans:
                if sp is not None and not all(
                    len(x) == 2 and math.isfinite(x[0]) and math.isfinite(x[1]) and 0 <= x[0] <= x[1] for x in sp
                ):
                    raise ValueError(f"spans must be (start_s, end_s) pairs with 0 <= start <= end, got {sp!r}")

    @staticmethod
    def build(values, reasons: list[str | None], sub_scores: dict | None = None, spans=None) -> ScoreResult:
        """values: [N] floats (ignored where reasons[i] is set). Invalid entries become NaN (and lose their spans)."""
        v = np.asarray(values, dtype=np.float64).copy()
        valid = np.array([r is None for r in reasons], dtype=bool)
        bad = valid & ~np.isfinite(v)
        for i in np.flatnonzero(bad):
            reasons[i] = f"scorer returned a non-finite value ({v[i]})"
        valid &= ~bad
        v[~valid] = np.nan
        subs = {k: np.asarray(s, dtype=np.float64) for k, s in (sub_scores or {}).items()}
        kept = [tuple(sp) if ok and sp is not None else None for sp, ok in zip(spans, valid)] if spans else []
        return ScoreResult(values=v, valid=valid, sub_scores=subs, reasons=list(reasons), spans=kept)


def audio_problem(audio: np.ndarray | None, sample_rate: int | None) -> str | None:
    """Why a waveform cannot be scored (None if it can): the standard checks every audio scorer makes."""
    if audio is None:
        return "no audio (the sample was not vocoded)"
    if not sample_rate or sample_rate <= 0:
        return f"no valid sample rate ({sample_rate!r})"
    if audio.ndim != 1:
        return f"audio must be mono [samples], got shape {audio.shape}"
    if audio.size == 0:
        return "empty audio"
    if not np.isfinite(audio).all():
        return "audio contains NaN or inf"
    return None


class Scorer(Protocol):
    def __call__(self, samples: Sequence[Sample]) -> ScoreResult: ...


# Short names for the built-in scorers (dotted paths; importing happens only when one is used).
SCORERS: dict[str, str] = {
    "duration": "rewards.duration:DurationScorer",
    "cer": "rewards.cer:CERScorer",
    "sim": "rewards.sim:SimScorer",
    "emotion": "rewards.emotion:EmotionScorer",
    "laughter": "rewards.laughter:LaughterScorer",
    "silence": "rewards.silence:SilenceScorer",
    "quality": "rewards.quality:QualityScorer",
    "loudness": "rewards.loudness:LoudnessScorer",
    "remote": "rewards.remote:RemoteScorer",
}


class ScorerConfigError(ValueError):
    """A reward entry names an unknown scorer or passes kwargs its constructor does not take."""


class KwargError(ValueError):
    """A scorer kwarg is out of range; `key` names it (raised by a scorer's `check_kwargs`)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def require(ok: bool, key: str, message: str) -> None:
    """For a scorer's `check_kwargs`: raise KwargError(key, message) unless ok."""
    if not ok:
        raise KwargError(key, message)


def resolve_scorer_class(spec: str, where: str) -> type:
    path = SCORERS.get(spec, spec)
    if ":" in path:
        module_name, _, attr = path.partition(":")
    elif "." in path:
        module_name, _, attr = path.rpartition(".")
    else:
        raise ScorerConfigError(
            f"{where}: unknown scorer '{spec}'; built-in scorers: {', '.join(sorted(SCORERS))}, "
            f"or give a dotted path such as my_pkg.my_module:MyScorer"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScorerConfigError(f"{where}: cannot import '{module_name}' for scorer '{spec}': {e}") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        raise ScorerConfigError(f"{where}: '{module_name}' has no scorer class '{attr}'")
    return cls


def check_scorer_kwargs(cls: type, kwargs: dict, where: str) -> None:
    """Bind kwargs to the constructor without building anything: unknown or missing arguments are errors."""
    import difflib

    sig = inspect.signature(cls)
    params = [p for p in sig.parameters if p not in ("self",)]
    for key in kwargs:
        if key not in sig.parameters and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            close = difflib.get_close_matches(key, params, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ScorerConfigError(
                f"{where}.kwargs: unknown argument '{key}' for {cls.__name__}{hint} "
                f"(it takes: {', '.join(params) or 'nothing'})"
            )
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ScorerConfigError(
            f"{where}.kwargs: {e} ({cls.__name__} takes: {', '.join(params) or 'nothing'})"
        ) from None
    check = getattr(cls, "check_kwargs", None)  # the scorer's own range checks, which load no model
    if callable(check):
        try:
            check(**kwargs)
        except KwargError as e:
            raise ScorerConfigError(f"{where}.kwargs.{e.key}: {e.message}") from None
        except (ValueError, TypeError) as e:
            raise ScorerConfigError(f"{where}.kwargs: {e}") from None


def build_scorer(spec: str, kwargs: dict, where: str) -> Scorer:
    cls = resolve_scorer_class(spec, where)
    check_scorer_kwargs(cls, kwargs, where)
    return cls(**kwargs)
