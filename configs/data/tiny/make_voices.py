"""Regenerate the tiny prompt set: `python configs/data/tiny/make_voices.py` (deterministic).

Writes four synthetic voice prompts (voices/*.wav: harmonic, speech-like signals at 24 kHz; their log-mel via the
same front end the flow uses; random speech codes, two mel frames each; a random 192-d speaker embedding) and
manifest.jsonl in the upstream GRPO format, pairing every sentence of sentences.txt with a voice of its language,
and the same pairs as seed-tts-eval meta files for `ttsrl eval` (meta_zh.lst, meta_en.lst:
utt|prompt_text|prompt_wav|target_text, plus the target emotion of the laughing lines).
The codes and embeddings are placeholders (no speech tokenizer or CAMPPlus model runs here): they have the real
shapes and ranges, which is what the tiny random models need.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from rollouts.audio import HOP, SAMPLE_RATE, mel_spectrogram, write_wav  # noqa: E402

VOICES = {
    "zh_a": ("zh", "你好，很高兴认识你。", 120.0),
    "zh_b": ("zh", "我最喜欢在周末读书。", 210.0),
    "en_a": ("en", "Hello, it is nice to meet you.", 105.0),
    "en_b": ("en", "I like reading books on the weekend.", 190.0),
}
EMOTION = {"哈哈": 3, "Haha": 3}  # happy (emotion2vec label 3) for the laughing lines; -1 = none


def synth(f0: float, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    n = n_tokens * 2 * HOP - HOP  # -> 2 * n_tokens - 1 mel frames, as upstream features have
    t = np.arange(n) / SAMPLE_RATE
    contour = f0 * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t) + 0.03 * rng.standard_normal())
    phase = 2 * np.pi * np.cumsum(contour) / SAMPLE_RATE
    voiced = sum((0.6 / k) * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    wav = 0.25 * envelope * voiced + 0.01 * rng.standard_normal(n)
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    return (wav * fade).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(20251121)
    voices_dir = HERE / "voices"
    voices_dir.mkdir(exist_ok=True)
    by_lang: dict[str, list[str]] = {"zh": [], "en": []}
    for name, (lang, text, f0) in VOICES.items():
        n_tokens = int(round(len(text) / (4.5 if lang == "zh" else 14.0) * 25))
        wav = synth(f0, n_tokens, rng)
        write_wav(voices_dir / f"{name}.wav", wav, SAMPLE_RATE)
        mel = mel_spectrogram(torch.from_numpy(wav)[None])[0].T.numpy()  # [frames, 80]
        np.save(voices_dir / f"{name}_feat.npy", mel.astype(np.float32))
        np.save(voices_dir / f"{name}_tokens.npy", rng.integers(0, 32768, n_tokens).astype(np.int64))
        emb = rng.standard_normal(192).astype(np.float32)
        np.save(voices_dir / f"{name}_emb.npy", emb)
        by_lang[lang].append(name)
    lines, meta = [], {"zh": [], "en": []}
    for i, row in enumerate((HERE / "sentences.txt").read_text(encoding="utf-8").splitlines()):
        lang, text = row.split("\t")
        name = by_lang[lang][i % 2]
        emotion = next((v for k, v in EMOTION.items() if k in text), -1)
        lines.append(
            {
                "uttid": f"tiny_{i:03d}",
                "prompt_text": VOICES[name][1],
                "prompt_speech": f"voices/{name}.wav",
                "prompt_speech_token": f"voices/{name}_tokens.npy",
                "prompt_speech_feat": f"voices/{name}_feat.npy",
                "embedding": f"voices/{name}_emb.npy",
                "syn_text": text,
                "emotion": emotion,
            }
        )
        label = "|happy" if emotion == 3 else ""
        meta[lang].append(f"tiny_{i:03d}|{VOICES[name][1]}|voices/{name}.wav|{text}{label}")
    with open(HERE / "manifest.jsonl", "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    for lang, rows in meta.items():
        (HERE / f"meta_{lang}.lst").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {len(VOICES)} voices and {len(lines)} manifest lines to {HERE}")


if __name__ == "__main__":
    main()
