"""Speech-quality reward: a MOS predictor's score, a guard against the acoustic artifacts that emotion and
similarity rewards can be hacked with (noise, clipping, buzz).

Backend `distillmos` (the default, works on a fresh machine): DistillMOS (Microsoft, MIT), its released weights
shipped in the `distillmos` package (`distillmos/weights/distill_mos_v7.pt`, loaded here with
`weights_only=True`, strictly). It reads 16 kHz audio in 7.68 s windows (peak-normalised; a shorter clip is
zero-padded to one window, which leaves its score unchanged; a longer one is scored over hopped windows) and
predicts MOS in [1, 5].
    reward = (MOS - 1) / 4          0 for the worst quality, 1 for the best; sub-score `mos` (logged)
The package's module imports torchaudio (for its file loader only); torchaudio must never be installed here, so
the import runs with a stand-in module that is removed right after.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rewards.base import Sample, ScoreResult, audio_problem, require
from rollouts.audio import resample

MOS_RATE = 16000
WINDOW = 122880  # DistillMOS's window: 7.68 s at 16 kHz


def distillmos_weights() -> Path:
    spec = importlib.util.find_spec("distillmos")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the quality reward needs the distillmos package (installed by `make run` / `make test`)")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "distill_mos_v7.pt"


def load_distillmos(device: str = "cpu") -> torch.nn.Module:
    """DistillMOS with its released weights, loaded strictly (missing / unexpected keys are an error)."""
    path = distillmos_weights()
    had = "torchaudio" in sys.modules
    if not had:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")  # imported at its top, used by its CLI only
    try:
        from distillmos import ConvTransformerSQAModel
    finally:
        if not had:
            del sys.modules["torchaudio"]
    model = ConvTransformerSQAModel(load_weights=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: expected a dict with the key 'model'")
    model.load_state_dict(state["model"], strict=True)
    return model.to(device).eval()


class QualityScorer:
    """kwargs: backend ("distillmos"), device, batch_size (clips per forward pass)."""

    def __init__(self, backend: str = "distillmos", device: str = "cpu", batch_size: int = 16):
        self.check_kwargs(backend=backend, batch_size=batch_size)
        self.device, self.batch_size = device, batch_size
        self.model = load_distillmos(device)

    @classmethod
    def check_kwargs(cls, backend: str = "distillmos", batch_size: int = 16, **_: object) -> None:
        """Range checks of the constructor's arguments (config check calls this without building the scorer)."""
        require(backend == "distillmos", "backend", f"must be 'distillmos', got {backend!r}")
        ok = isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
        require(ok, "batch_size", f"must be an integer >= 1, got {batch_size!r}")

    def mos(self, wavs16k: list[np.ndarray]) -> np.ndarray:
        """[N] MOS of 16 kHz waveforms: clips of one window batched (zero-padded), longer ones one by one."""
        out = np.full(len(wavs16k), np.nan)
        short = [i for i, w in enumerate(wavs16k) if len(w) <= WINDOW]
        with torch.no_grad():
            for start in range(0, len(short), self.batch_size):
                idx = short[start : start + self.batch_size]
                x = torch.zeros(len(idx), WINDOW)
                for j, i in enumerate(idx):
                    x[j, : len(wavs16k[i])] = torch.from_numpy(np.asarray(wavs16k[i], np.float32))
                out[idx] = self.model(x.to(self.device)).float().cpu().numpy().reshape(-1)
            for i in (i for i, w in enumerate(wavs16k) if len(w) > WINDOW):
                x = torch.from_numpy(np.asarray(wavs16k[i], np.float32))[None].to(self.device)
                out[i] = float(self.model(x).float().cpu().reshape(-1)[0])
        return out

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        reasons: list[str | None] = [None] * n
        wavs, rows = [], []
        for i, s in enumerate(samples):
            problem = audio_problem(s.audio, s.sample_rate)
            if problem is None and not np.any(s.audio):
                problem = "silent audio (all zeros): no quality to predict"
            if problem is not None:
                reasons[i] = problem
                continue
            assert s.audio is not None and s.sample_rate is not None
            wavs.append(resample(s.audio, s.sample_rate, MOS_RATE) if s.sample_rate != MOS_RATE else s.audio)
            rows.append(i)
        mos = np.full(n, np.nan)
        if wavs:
            mos[rows] = self.mos(wavs)
        return ScoreResult.build((mos - 1.0) / 4.0, reasons, {"mos": mos})
