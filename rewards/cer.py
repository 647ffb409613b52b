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
ASR: Paraformer for zh, Whisper for en (rewards/asr.py; `asr_backend` transformers or faster-whisper), chosen per
sample from the target text (`lang: auto`: any Han character -> zh) or fixed (`lang: zh|en`). A sample whose
language has no ASR model configured is invalid.

Token level (`token_level: true`, upstream's `cal_token_level_cer`): the ASR also says when each recognised piece
was spoken (Paraformer's token timestamps; Whisper's word timestamps, faster-whisper only), and `error_spans`
turns the alignment of hypothesis to reference into the stretches of audio that were said wrong:
    substituted or inserted hypothesis tokens   from the first one's start to the last one's end
    deleted reference tokens                    the gap between the hypothesis tokens around them (audio start /
                                                end at the edges)
    nothing recognised                          the whole clip
every span clamped to the clip [0, duration] (ASR timestamps can run past its end).
A piece is normalised like the whole text (its time split evenly over the tokens it yields). The rate itself is
still the whole transcript's, as above. The spans go out with the result (`ScoreResult.spans`, seconds of the
sample's audio); the trainer turns them into a per-token advantage term on the frames they cover
(rl/advantages.py). A sample whose timestamps cannot be paired with its tokens has no spans (None) and keeps
only its sequence-level reward.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import Literal

import numpy as np

from rewards.asr import ASR_RATE, Timed, load_asr, to_asr_rate
from rewards.base import Sample, ScoreResult, audio_problem, require


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


def _timed_tokens(timed: Timed, lang: str) -> list[tuple[str, float, float]]:
    """The hypothesis tokens of a timed transcript, each with the time of the piece it came from (split evenly)."""
    import zhconv

    out = []
    for text, start, end in timed.pieces:
        toks = normalize(zhconv.convert(text, "zh-cn") if lang == "zh" else text, lang).split()
        step = (end - start) / max(len(toks), 1)
        out += [(t, start + j * step, start + (j + 1) * step) for j, t in enumerate(toks)]
    return out


def error_spans(ref: str, timed: Timed, lang: str, duration_s: float) -> tuple[tuple[float, float], ...]:
    """(start_s, end_s) stretches of a clip of `duration_s` seconds that were said wrong (module docstring)."""
    import jiwer

    ref_toks = jiwer.wer_default(normalize(ref, lang))[0]
    hyp = _timed_tokens(timed, lang)
    if not hyp:
        return ((0.0, duration_s),)
    out = jiwer.process_words(" ".join(ref_toks), " ".join(t for t, _, _ in hyp))
    spans = []
    for chunk in out.alignments[0]:
        a, b = chunk.hyp_start_idx, chunk.hyp_end_idx
        if chunk.type in ("substitute", "insert"):
            spans.append((hyp[a][1], hyp[b - 1][2]))
        elif chunk.type == "delete":
            before = hyp[a - 1][2] if a > 0 else 0.0
            after = hyp[a][1] if a < len(hyp) else duration_s
            spans.append((min(before, after), max(before, after)))
    clamp = lambda t: min(max(float(t), 0.0), duration_s)  # noqa: E731  ASR times can run past the clip's end
    return tuple((clamp(a), clamp(b)) for a, b in spans)


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
        asr_backend: Literal["transformers", "faster-whisper"] = "transformers",
        asr_compute_type: str = "default",
        token_level: bool = False,
    ):
        """paraformer_dir: local FunASR Paraformer directory (zh); whisper_dir: local Whisper directory (en), in
        transformers' layout or, with asr_backend faster-whisper, CTranslate2's; lang: per-sample detection or one
        fixed language; k: reward = exp(-k * rate); asr_batch_size: utterances per Paraformer or faster-whisper
        batch (1 = one by one, which FunASR's padded decoding can differ from); asr_compute_type: faster-whisper's
        compute type (default = the model's, e.g. int8 or float16); token_level: also return the spans said wrong
        (module docstring), which the trainer turns into per-token advantages."""
        self.check_kwargs(
            paraformer_dir,
            whisper_dir,
            lang,
            k,
            asr_batch_size=asr_batch_size,
            asr_backend=asr_backend,
            token_level=token_level,
        )
        self.asr = {}
        if paraformer_dir is not None:
            self.asr["zh"] = load_asr("paraformer", str(paraformer_dir), device, asr_batch_size)
        if whisper_dir is not None:
            kind = "whisper" if asr_backend == "transformers" else "faster-whisper"
            self.asr["en"] = load_asr(kind, str(whisper_dir), device, asr_batch_size, asr_compute_type)
        self.lang, self.k, self.token_level = lang, k, token_level

    @classmethod
    def check_kwargs(
        cls,
        paraformer_dir=None,
        whisper_dir=None,
        lang="auto",
        k=2.5,
        *,
        asr_batch_size=16,
        asr_backend="transformers",
        token_level=False,
        **_,
    ) -> None:
        require(
            paraformer_dir is not None or whisper_dir is not None,
            "paraformer_dir",
            "the CER reward needs paraformer_dir (zh) and/or whisper_dir (en)",
        )
        require(lang in ("auto", "zh", "en"), "lang", f"must be auto, zh or en, got {lang!r}")
        require(isinstance(k, (int, float)) and k > 0, "k", f"must be > 0, got {k!r}")
        require(isinstance(asr_batch_size, int) and asr_batch_size >= 1, "asr_batch_size", "must be an integer >= 1")
        require(
            asr_backend in ("transformers", "faster-whisper"),
            "asr_backend",
            f"must be transformers or faster-whisper, got {asr_backend!r}",
        )
        require(isinstance(token_level, bool), "token_level", "must be true or false")
        require(
            not (token_level and whisper_dir is not None and asr_backend == "transformers"),
            "token_level",
            "English token-level CER needs Whisper's word timestamps: set asr_backend: faster-whisper",
        )

    def transcribe(self, samples: Sequence[Sample], timed: bool = False) -> tuple[list, list[str], list[str | None]]:
        """(transcripts, languages, reasons) for every sample; one batched ASR call per language. timed: the
        transcripts are `Timed` (None where the ASR's timestamps did not pair with its tokens)."""
        n = len(samples)
        langs = [self.lang if self.lang != "auto" else detect_lang(s.target_text) for s in samples]
        reasons: list[str | None] = [audio_problem(s.audio, s.sample_rate) for s in samples]
        hyps: list = [None] * n
        for lang in ("zh", "en"):
            idx = [i for i in range(n) if langs[i] == lang and reasons[i] is None]
            if not idx:
                continue
            if lang not in self.asr:
                for i in idx:
                    reasons[i] = f"no ASR model for {lang} (set {'paraformer_dir' if lang == 'zh' else 'whisper_dir'})"
                continue
            asr = self.asr[lang]
            wavs = [to_asr_rate(samples[i].audio, samples[i].sample_rate) for i in idx]
            texts = asr.transcribe_timed(wavs) if timed else asr.transcribe(wavs)
            for i, t in zip(idx, texts):
                hyps[i] = t
        return hyps, langs, reasons

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        hyps, langs, reasons = self.transcribe(samples, timed=self.token_level)
        values, rates = np.zeros(n), np.full(n, np.nan)
        spans: list[tuple[tuple[float, float], ...] | None] = [None] * n
        err_s = np.full(n, np.nan)
        for i, s in enumerate(samples):
            if reasons[i] is not None:
                continue
            timed = hyps[i] if self.token_level else None
            text = hyps[i] if not self.token_level else (timed.text if timed is not None else None)
            try:
                if text is None:  # Paraformer's timestamps did not pair: the transcript alone, without spans
                    text = self.asr[langs[i]].transcribe([to_asr_rate(s.audio, s.sample_rate)])[0]
                rates[i] = error_rate(s.target_text, text, langs[i])
                if timed is not None:
                    spans[i] = error_spans(s.target_text, timed, langs[i], len(s.audio) / s.sample_rate)
                    err_s[i] = sum(b - a for a, b in spans[i])
            except ValueError as e:
                reasons[i] = str(e)
                continue
            values[i] = math.exp(-self.k * rates[i])
        subs = {"cer": rates, "error_s": err_s} if self.token_level else {"cer": rates}
        return ScoreResult.build(values, reasons, subs, spans if self.token_level else None)


__all__ = ["ASR_RATE", "CERScorer", "edit_counts", "error_rate", "error_spans", "normalize", "detect_lang"]
