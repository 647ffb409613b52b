"""CER / WER reward: ASR transcript vs the target text, scored exactly as seed-tts-eval's run_wer.py.

Text path (`error_rate`), after the ASR:
    zh: the hypothesis is converted to simplified Chinese (zhconv, 'zh-cn')
    every character of zhon's Chinese punctuation + ASCII punctuation, except the ASCII apostrophe, is deleted
    (not replaced by a space) from both texts; double spaces become single (one pass)
    zh: every remaining character is a token (no lowercasing); en: lowercased, whitespace-separated words
    rate = word edit distance / reference tokens, both as jiwer counts them (tokens split on " " only), which can
    exceed 1; empty hypothesis -> 1.0
An empty reference after normalisation is a ValueError (the sample cannot be scored: the scorer marks it invalid).

Reward: exp(-k * rate), k = 2.5 (upstream GLM-TTS).
ASR: Paraformer for zh, Whisper for en (rewards/asr.py), chosen per sample from the target text (`lang: auto`:
any Han character -> zh) or fixed (`lang: zh|en`). A sample whose language has no ASR model configured is invalid.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rewards.asr import ASR_RATE, load_asr, to_asr_rate
from rewards.base import Sample, ScoreResult, audio_problem


def _punctuation() -> str:
    from zhon.hanzi import punctuation as zh

    return "".join(c for c in zh + string.punctuation if c != "'")


PUNCTUATION = _punctuation()


def normalize(text: str, lang: str) -> str:
    """seed-tts-eval's process_one normalisation of one text."""
    for c in PUNCTUATION:
        text = text.replace(c, "")
    text = text.replace("  ", " ")
    if lang == "zh":
        return " ".join(list(text))
    if lang == "en":
        return text.lower()
    raise ValueError(f"lang must be 'zh' or 'en', got {lang!r}")


def edit_counts(ref: str, hyp: str, lang: str) -> tuple[int, int]:
    """(edits, reference tokens) of `hyp` against `ref` after seed-tts-eval's text path (module docstring):
    the rate is edits / reference tokens, and summing both over a corpus gives the corpus-level rate."""
    import jiwer

    if lang == "zh":
        import zhconv

        hyp = zhconv.convert(hyp, "zh-cn")
    truth, hypo = normalize(ref, lang), normalize(hyp, lang)
    # tokens as jiwer counts them (collapse spaces, strip, split on " " only: a tab or a no-break space is no
    # word boundary), which is the denominator of seed-tts-eval's jiwer WER
    n_ref = len(jiwer.wer_default(truth)[0])
    if not n_ref:
        raise ValueError(f"the reference is empty after normalisation: {ref!r}")
    if not jiwer.wer_default(hypo)[0]:
        return n_ref, n_ref  # everything deleted
    out = jiwer.process_words(truth, hypo)
    return out.substitutions + out.deletions + out.insertions, n_ref


def error_rate(ref: str, hyp: str, lang: str) -> float:
    """CER (zh) or WER (en) of `hyp` against `ref`, exactly as seed-tts-eval computes it (module docstring)."""
    edits, n_ref = edit_counts(ref, hyp, lang)
    return edits / n_ref


def detect_lang(text: str) -> str:
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


class CERScorer:
    def __init__(
        self,
        paraformer_dir: str | None = None,
        whisper_dir: str | None = None,
        lang: Literal["auto", "zh", "en"] = "auto",
        k: float = 2.5,
        device: str = "cpu",
        asr_batch_size: int = 16,
    ):
        """paraformer_dir: local FunASR Paraformer directory (zh); whisper_dir: local Whisper directory (en);
        lang: per-sample detection or one fixed language; k: reward = exp(-k * rate); asr_batch_size:
        utterances per Paraformer batch (1 = one by one, which FunASR's padded decoding can differ from)."""
        if paraformer_dir is None and whisper_dir is None:
            raise ValueError("CERScorer needs paraformer_dir (zh) and/or whisper_dir (en)")
        if lang not in ("auto", "zh", "en"):
            raise ValueError(f"lang must be auto, zh or en, got {lang!r}")
        self.asr = {}
        if paraformer_dir is not None:
            self.asr["zh"] = load_asr("paraformer", str(paraformer_dir), device, asr_batch_size)
        if whisper_dir is not None:
            self.asr["en"] = load_asr("whisper", str(whisper_dir), device)
        self.lang, self.k = lang, k

    def transcribe(self, samples: Sequence[Sample]) -> tuple[list[str | None], list[str], list[str | None]]:
        """(transcripts, languages, reasons) for every sample; one batched ASR call per language."""
        n = len(samples)
        langs = [self.lang if self.lang != "auto" else detect_lang(s.target_text) for s in samples]
        reasons: list[str | None] = [audio_problem(s.audio, s.sample_rate) for s in samples]
        hyps: list[str | None] = [None] * n
        for lang in ("zh", "en"):
            idx = [i for i in range(n) if langs[i] == lang and reasons[i] is None]
            if not idx:
                continue
            if lang not in self.asr:
                for i in idx:
                    reasons[i] = f"no ASR model for {lang} (set {'paraformer_dir' if lang == 'zh' else 'whisper_dir'})"
                continue
            texts = self.asr[lang].transcribe([to_asr_rate(samples[i].audio, samples[i].sample_rate) for i in idx])
            for i, t in zip(idx, texts):
                hyps[i] = t
        return hyps, langs, reasons

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        hyps, langs, reasons = self.transcribe(samples)
        values, rates = np.zeros(len(samples)), np.full(len(samples), np.nan)
        for i, s in enumerate(samples):
            if reasons[i] is not None:
                continue
            try:
                rates[i] = error_rate(s.target_text, hyps[i], langs[i])
            except ValueError as e:
                reasons[i] = str(e)
                continue
            values[i] = math.exp(-self.k * rates[i])
        return ScoreResult.build(values, reasons, {"cer": rates})


__all__ = ["ASR_RATE", "CERScorer", "edit_counts", "error_rate", "normalize", "detect_lang"]
