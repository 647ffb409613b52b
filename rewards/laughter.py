"""Laughter reward (GLM-TTS report, section 3.3), for texts that ask for laughter.

Applies only when the target text asks for laughter: two or more consecutive laughter units, either Han characters
(哈 嘿 呵 嘻) or Latin ones (ha, he, hi, ho, hah, heh, hee, hey, inside or across words: "haha", "ha ha", "hey hey").
Other samples are **invalid** (not 0), so the reward does not distort groups without laughter text.

For an applicable sample, with a laughter detector and the ASR of the CER reward:
    1  if the detector finds a laughter segment AND the ASR transcribes the text's laughter span as a deletion
       (every laughter token of the reference is deleted in the seed-tts-eval alignment: the laughter was
       laughed, not read out)
    0  otherwise (no laughter detected, or the laughter words were transcribed, i.e. read as words)
Sub-scores: `detected` (0/1), `deleted` (fraction of the span's tokens deleted), `laughter_s` (seconds detected).

Detector: by default an AudioSet classifier (`ASTForAudioClassification` from a local directory; the class is
looked up by name, "Laughter"; sigmoid; sliding windows of `window_s` with hop `hop_s`; windows scoring >=
`threshold` become segments, merged). Any frame-level segmenter plugs in through `detector` (a dotted path to a
class with `segments(wavs_16k: list[np.ndarray]) -> list[list[tuple[float, float]]]`) and `detector_kwargs`;
see docs/rewards.md ("Plugging in a laughter segmenter").
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from rewards.asr import ASR_RATE, require_dir, to_asr_rate
from rewards.base import Sample, ScoreResult, audio_problem, resolve_scorer_class
from rewards.cer import PUNCTUATION, CERScorer, detect_lang

HAN_LAUGH = set("哈嘿呵嘻")
LATIN_UNIT = re.compile(r"hey|h[aeio](?:h(?![aeio]))?")  # "haha" = ha + ha, "hah" = hah, "hehe" = he + he


def laughter_tokens(text: str, lang: str) -> tuple[list[str], list[bool]]:
    """The seed-tts-eval reference tokens of `text` and, per token, whether it is part of a laughter span."""
    cleaned = "".join(c for c in text if c not in PUNCTUATION)
    if lang == "zh":
        tokens = [c for c in cleaned if not c.isspace()]
        units = [1 if t in HAN_LAUGH else 0 for t in tokens]
    else:
        tokens = cleaned.lower().split()
        units = [len(LATIN_UNIT.findall(t)) if LATIN_UNIT.sub("", t) == "" else 0 for t in tokens]
    flags = [False] * len(tokens)
    i = 0
    while i < len(tokens):  # runs of consecutive laughter tokens holding >= 2 units
        if units[i]:
            j = i
            while j < len(tokens) and units[j]:
                j += 1
            if sum(units[i:j]) >= 2:
                flags[i:j] = [True] * (j - i)
            i = j
        else:
            i += 1
    return tokens, flags


def asks_for_laughter(text: str) -> bool:
    return any(laughter_tokens(text, detect_lang(text))[1])


def deleted_fraction(ref_tokens: list[str], flags: list[bool], hyp: str, lang: str) -> float:
    """Fraction of the flagged reference tokens that the alignment with the hypothesis marks as deleted."""
    import jiwer
    import zhconv

    from rewards.cer import normalize

    if lang == "zh":
        hyp = zhconv.convert(hyp, "zh-cn")
    hyp_norm = normalize(hyp, lang)
    if not hyp_norm.split():
        return 1.0
    out = jiwer.process_words(" ".join(ref_tokens), hyp_norm)
    ops = ["equal"] * len(ref_tokens)
    for chunk in out.alignments[0]:
        for k in range(chunk.ref_start_idx, chunk.ref_end_idx):
            ops[k] = chunk.type
    flagged = [ops[k] for k in range(len(ref_tokens)) if flags[k]]
    return sum(op == "delete" for op in flagged) / len(flagged)


class ASTLaughterDetector:
    """AudioSet classifier (transformers ASTForAudioClassification) over sliding windows."""

    def __init__(
        self,
        model_dir: str,
        device: str = "cpu",
        window_s: float = 2.0,
        hop_s: float = 1.0,
        threshold: float = 0.5,
        label: str = "Laughter",
        batch_size: int = 16,
    ):
        d = require_dir(model_dir, ("config.json", "preprocessor_config.json"), "laughter")
        from transformers import ASTFeatureExtractor, ASTForAudioClassification

        with warnings.catch_warnings():  # transformers' numpy fbank warns about empty mel filters at 128 bins
            warnings.simplefilter("ignore", UserWarning)
            self.extractor = ASTFeatureExtractor.from_pretrained(str(d), local_files_only=True)
        self.model = ASTForAudioClassification.from_pretrained(str(d), local_files_only=True).to(device).eval()
        if label not in self.model.config.label2id:
            raise ValueError(f"laughter: {d} has no class named {label!r} (its labels are AudioSet's?)")
        self.label_id = int(self.model.config.label2id[label])
        self.device, self.window_s, self.hop_s = device, window_s, hop_s
        self.threshold, self.batch_size = threshold, batch_size

    @torch.no_grad()
    def segments(self, wavs: list[np.ndarray]) -> list[list[tuple[float, float]]]:
        win, hop = int(self.window_s * ASR_RATE), int(self.hop_s * ASR_RATE)
        windows, owner = [], []
        for i, w in enumerate(wavs):
            start = 0
            while True:
                windows.append((w[start : start + win], start / ASR_RATE))
                owner.append(i)
                if start + win >= len(w):
                    break
                start += hop
        probs = []
        for b in range(0, len(windows), self.batch_size):
            chunk = [np.asarray(w, np.float32) for w, _ in windows[b : b + self.batch_size]]
            with warnings.catch_warnings():  # transformers' numpy fbank warns about empty mel filters at 128 bins
                warnings.simplefilter("ignore", UserWarning)
                feats = self.extractor(chunk, sampling_rate=ASR_RATE, return_tensors="pt").input_values.to(self.device)
            probs.append(torch.sigmoid(self.model(input_values=feats).logits[:, self.label_id]).cpu())
        p = torch.cat(probs).tolist() if probs else []
        out: list[list[tuple[float, float]]] = [[] for _ in wavs]
        for (w, t0), i, pi in zip(windows, owner, p):
            if pi >= self.threshold:
                seg = (t0, t0 + len(w) / ASR_RATE)
                if out[i] and seg[0] <= out[i][-1][1]:
                    out[i][-1] = (out[i][-1][0], max(out[i][-1][1], seg[1]))
                else:
                    out[i].append(seg)
        return out


class LaughterScorer:
    def __init__(
        self,
        ast_dir: str | None = None,
        paraformer_dir: str | None = None,
        whisper_dir: str | None = None,
        detector: str | None = None,
        detector_kwargs: dict | None = None,
        device: str = "cpu",
    ):
        """ast_dir: local AudioSet AST classifier (the default detector); detector/detector_kwargs: another
        segmenter class by dotted path instead; paraformer_dir/whisper_dir: the ASR (as for the CER reward)."""
        if detector is not None:
            self.detector = resolve_scorer_class(detector, "laughter.detector")(**(detector_kwargs or {}))
        elif ast_dir is not None:
            self.detector = ASTLaughterDetector(ast_dir, device, **(detector_kwargs or {}))
        else:
            raise ValueError("LaughterScorer needs ast_dir (the default AudioSet detector) or a detector class")
        self.asr = CERScorer(paraformer_dir=paraformer_dir, whisper_dir=whisper_dir, device=device)

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        reasons = [audio_problem(s.audio, s.sample_rate) for s in samples]
        spans = []
        for i, s in enumerate(samples):
            lang = detect_lang(s.target_text)
            tokens, flags = laughter_tokens(s.target_text, lang)
            spans.append((tokens, flags, lang))
            if reasons[i] is None and not any(flags):
                reasons[i] = "not applicable: the text does not ask for laughter"
        ok = [i for i in range(n) if reasons[i] is None]
        values = np.zeros(n)
        detected, deleted, seconds = (np.full(n, np.nan) for _ in range(3))
        if ok:
            segs = self.detector.segments([to_asr_rate(samples[i].audio, samples[i].sample_rate) for i in ok])
            hyps, _, asr_reasons = self.asr.transcribe([samples[i] for i in ok])
            for j, i in enumerate(ok):
                if asr_reasons[j] is not None:
                    reasons[i] = asr_reasons[j]
                    continue
                tokens, flags, lang = spans[i]
                detected[i] = float(bool(segs[j]))
                seconds[i] = sum(b - a for a, b in segs[j])
                deleted[i] = deleted_fraction(tokens, flags, hyps[j], lang)
                values[i] = 1.0 if detected[i] and deleted[i] == 1.0 else 0.0
        return ScoreResult.build(values, reasons, {"detected": detected, "deleted": deleted, "laughter_s": seconds})
