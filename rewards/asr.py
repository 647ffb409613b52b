"""Speech recognisers for the CER and laughter rewards, loaded from local directories only.

    Paraformer (zh)  funasr.AutoModel on a local model directory (config.yaml + model.pt + tokens + am.mvn);
                     no VAD or punctuation model; dither 0 so that transcripts do not change from call to call;
                     no update check (no network).
    Whisper (en)     transformers WhisperForConditionalGeneration + WhisperProcessor from a local directory;
                     greedy decoding, language English, task transcribe, one 30 s window (as seed-tts-eval).

Both take a batch: a list of float32 16 kHz mono waveforms -> a list of transcripts. A model is loaded once per
(kind, directory, device) and shared by every scorer that asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from pathlib import Path

import numpy as np
import torch

ASR_RATE = 16000


class ModelDirError(FileNotFoundError):
    """A reward model directory is missing or lacks the files its loader needs."""


def require_dir(path: str | Path, files: tuple[str, ...], what: str) -> Path:
    """The directory must exist and hold each file; "a|b" means either a or b."""
    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(f"{what}: model directory not found: {p}")
    missing = [f for f in files if not any((p / alt).exists() for alt in f.split("|"))]
    if missing:
        raise ModelDirError(f"{what}: {p} lacks {', '.join(m.replace('|', ' or ') for m in missing)}")
    return p


_FUNASR_LOCK = threading.RLock()


@contextlib.contextmanager
def keep_torch_state():
    """funasr sets torch's thread count on every call and reseeds the global RNGs when a model is built: undo
    both, so rewards never change how (or how reproducibly) the trainer runs. FunASR calls also print to stdout,
    which is silenced; as that redirect is process-wide, FunASR calls are serialised (scorers may run in threads)."""
    with _FUNASR_LOCK:
        threads = torch.get_num_threads()
        rng = torch.get_rng_state()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # funasr prints notices and progress to stdout
                yield
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)


class ParaformerASR:
    """FunASR zero-pads a batch and its batched decoding can differ slightly from one-by-one decoding, so
    batches are formed from length-sorted utterances (little padding, and the same batches for the same inputs).
    batch_size 1 decodes one by one."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 16):
        d = require_dir(model_dir, ("config.yaml", "model.pt"), "paraformer")
        with keep_torch_state():
            from funasr import AutoModel

            self.model = AutoModel(
                model=str(d),
                device=device,
                disable_update=True,
                disable_pbar=True,
                disable_log=True,
                trust_remote_code=False,  # whatever the model directory's config.yaml says: no code from it runs
                frontend_conf={"dither": 0.0},
                ncpu=torch.get_num_threads(),
            )
        self.batch_size = max(1, batch_size)

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        out = [""] * len(wavs)
        order = sorted(range(len(wavs)), key=lambda i: -len(wavs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = [np.ascontiguousarray(wavs[i], dtype=np.float32) for i in idx]
            with keep_torch_state():
                res = self.model.generate(input=inputs, batch_size=len(inputs), disable_pbar=True)
                if len(res) != len(inputs):  # funasr returns one entry for a batch that decodes to nothing at all
                    res = [r for w in inputs for r in self.model.generate(input=[w], batch_size=1, disable_pbar=True)]
            for i, r in zip(idx, res):
                out[i] = r.get("text", "")
        return out


class WhisperASR:
    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        d = require_dir(model_dir, ("config.json", "preprocessor_config.json|processor_config.json"), "whisper")
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(str(d), local_files_only=True)
        self.model = WhisperForConditionalGeneration.from_pretrained(str(d), local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        if not wavs:
            return []
        feats = self.processor(
            [np.asarray(w, dtype=np.float32) for w in wavs], sampling_rate=ASR_RATE, return_tensors="pt"
        ).input_features.to(self.device)
        ids = self.model.generate(feats, language="en", task="transcribe", do_sample=False, num_beams=1)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


@functools.cache
def load_asr(kind: str, model_dir: str, device: str = "cpu", batch_size: int = 16):
    """One shared instance per (kind, directory, device, batch size)."""
    if kind == "paraformer":
        return ParaformerASR(model_dir, device, batch_size)
    if kind == "whisper":
        return WhisperASR(model_dir, device)
    raise ValueError(f"unknown ASR kind {kind!r}")


def to_asr_rate(wav: np.ndarray, sr: int) -> np.ndarray:
    """seed-tts-eval's resampling to 16 kHz (FFT-based scipy.signal.resample)."""
    if sr == ASR_RATE:
        return np.asarray(wav, dtype=np.float32)
    from scipy.signal import resample

    return resample(np.asarray(wav, dtype=np.float64), int(len(wav) * ASR_RATE / sr)).astype(np.float32)
