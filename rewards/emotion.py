"""Emotion reward: emotion2vec+ (FunASR) class probabilities at utterance level, on a local model directory.

Labels (emotion2vec+ order; the manifest's `emotion` is an index into it):
    0 angry, 1 disgusted, 2 fearful, 3 happy, 4 neutral, 5 other, 6 sad, 7 surprised, 8 <unk>

reward = p(target emotion) when the sample has a target, else 1 - p(neutral) (upstream GLM-TTS).
Sub-scores: `p_neutral`, `hit` (the argmax is the target: CV3-eval's accuracy), and one `emo_<label>` per target
label holding the reward of the samples with that target (NaN elsewhere), so each emotion's mean is logged.
The label indices are checked against the model's own label list, by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rewards.asr import keep_torch_state, require_dir
from rewards.base import Sample, ScoreResult, audio_problem
from rollouts.audio import resample

EMO_RATE = 16000
LABELS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "<unk>"]


def english(label: str) -> str:
    """'开心/happy' -> 'happy'"""
    return label.split("/")[-1].strip().lower()


class EmotionScorer:
    def __init__(self, model_dir: str, device: str = "cpu"):
        """model_dir: local emotion2vec+ directory (config.yaml, model.pt, tokens.txt)."""
        d = require_dir(model_dir, ("config.yaml", "model.pt"), "emotion")
        with keep_torch_state():
            from funasr import AutoModel

            # trust_remote_code=False whatever the model directory's config.yaml says: no code from it runs
            self.model = AutoModel(
                model=str(d),
                device=device,
                disable_update=True,
                trust_remote_code=False,
                disable_pbar=True,
                disable_log=True,
                ncpu=torch.get_num_threads(),
            )

    def probabilities(self, wavs: list[np.ndarray]) -> np.ndarray:
        """[N, 9] class probabilities, columns in LABELS order."""
        with keep_torch_state():
            res = self.model.generate(
                input=[np.ascontiguousarray(w, dtype=np.float32) for w in wavs],
                granularity="utterance",
                extract_embedding=False,
                batch_size=len(wavs),
                disable_pbar=True,
            )
        if len(res) != len(wavs):
            raise RuntimeError(f"emotion2vec returned {len(res)} results for {len(wavs)} inputs")
        probs = np.zeros((len(wavs), len(LABELS)))
        for i, r in enumerate(res):
            names = [english(x) for x in r["labels"]]
            for name, p in zip(names, r["scores"]):
                if name not in LABELS:
                    raise ValueError(f"emotion model returned an unknown label {name!r}; expected {LABELS}")
                probs[i, LABELS.index(name)] = p
        return probs

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        reasons = [audio_problem(s.audio, s.sample_rate) for s in samples]
        for i, s in enumerate(samples):
            if reasons[i] is None and s.emotion is not None and not 0 <= s.emotion < len(LABELS):
                reasons[i] = f"target emotion {s.emotion} is not a label index 0..{len(LABELS) - 1}"
        ok = [i for i in range(n) if reasons[i] is None]
        wavs = [resample(samples[i].audio, samples[i].sample_rate, EMO_RATE) for i in ok]
        probs = self.probabilities(wavs) if ok else None
        values = np.zeros(n)
        neutral, hit = np.full(n, np.nan), np.full(n, np.nan)
        targets = {samples[i].emotion for i in ok if samples[i].emotion is not None}
        per_label = {f"emo_{LABELS[t]}": np.full(n, np.nan) for t in sorted(targets)}
        for j, i in enumerate(ok):
            p, target = probs[j], samples[i].emotion
            neutral[i] = p[LABELS.index("neutral")]
            if target is None:
                values[i] = 1.0 - neutral[i]
            else:
                values[i] = p[target]
                hit[i] = float(int(np.argmax(p)) == target)
                per_label[f"emo_{LABELS[target]}"][i] = values[i]
        return ScoreResult.build(values, reasons, {"p_neutral": neutral, "hit": hit, **per_label})
