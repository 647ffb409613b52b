"""Speech-quality reward: a MOS predictor's score, a guard against the acoustic artifacts that emotion and
similarity rewards can be hacked with (noise, clipping, buzz). Two backends, both predicting MOS on 16 kHz audio:
    reward = clip((MOS - 1) / 4, 0, 1)      0 for the worst quality, 1 for the best; sub-score `mos` (logged, raw)

Backend `distillmos` (the default, works on a fresh machine): DistillMOS (Microsoft, MIT), its released weights
shipped in the `distillmos` package (`distillmos/weights/distill_mos_v7.pt`, loaded here with
`weights_only=True`, strictly). It reads 16 kHz audio in 7.68 s windows (peak-normalised; a shorter clip is
zero-padded to one window, which leaves its score unchanged; a longer one is scored over hopped windows) and
predicts MOS in [1, 5].
The package's module imports torchaudio (for its file loader only); torchaudio must never be installed here, so
the import runs with a stand-in module that is removed right after.

Backend `utmos` (`model_dir` required): the UTMOS22 strong learner (Saeki et al. 2022, the VoiceMOS 2022 system
of UTokyo-SaruLab, MIT), without its phoneme encoder, as tarepan/SpeechMOS released it for torch.hub
(`utmos22_strong`, release v1.0.0). The directory must hold exactly that released file, unrenamed:
    <model_dir>/utmos22_strong_step7459_v1.pt
        a plain state dict (parameter name -> float32 tensor; 225 entries, 102.8 M values), loaded with
        `weights_only=True` and strictly (missing, unexpected and mis-shaped keys are listed in one error):
        wav2vec2.*             wav2vec 2.0 Base (fairseq's names: 7 conv layers, 12 post-LN transformer layers
                               of 768, 12 heads, weight-normed positional conv `encoder.pos_conv.0.weight_g/_v`,
                               and the unused pretraining remnant `wav2vec2.mask_emb`)
        domain_emb, judge_emb  [1, 128] each: the data-domain (main track) and listener (the mean judge, id 288)
                               embedding rows of the original model, fixed
        blstm.*                BLSTM, 1024 -> 2 x 512
        projection.0/2.*       Linear 1024 -> 2048, ReLU, Linear 2048 -> 1
MOS = 2 * mean over frames of the projection + 3 (not clipped: it can leave [1, 5] slightly). The wav2vec 2.0
is the `utmos-pytorch` package's fairseq-free port (`utmos_pytorch.wav2vec2`, fairseq's parameter names; its
import needs no torchaudio and downloads nothing); `mask_emb`, which that port lacks, is added here so the
released file loads strictly. Like fairseq and SpeechMOS, its transformer pads the frames to an even count with
a key padding mask. The head around it is the one of SpeechMOS's `UTMOS22Strong` and of
`utmos_pytorch.utmos_torch.UTMOSModel` (domain row 0, judge row 288). Equality, on random weights: with
SpeechMOS's own code (a one-off check, not in the tests) the keys and shapes are identical and the MOS differs by
at most 2.4e-7 (odd and even frame counts, batches of 1 and 3); tests/test_quality.py checks equality with
UTMOSModel (within 1e-5). Audio is scored unnormalised, whole, at 16 kHz. The model has no padding mask over
the samples (its first conv layer's group norm spans the whole clip), so only clips of equal length are
batched; every other clip runs alone, and a batch gives the scores of one-by-one runs. A clip under 400 samples
at 16 kHz (25 ms, one wav2vec 2.0 frame) is invalid.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewards.asr import ModelDirError, require_dir
from rewards.base import Sample, ScoreResult, audio_problem, require
from rollouts.audio import resample

MOS_RATE = 16000
WINDOW = 122880  # DistillMOS's window: 7.68 s at 16 kHz
BACKENDS = ("distillmos", "utmos")
UTMOS_FILE = "utmos22_strong_step7459_v1.pt"  # tarepan/SpeechMOS release v1.0.0, torch.hub `utmos22_strong`
UTMOS_MIN_SAMPLES = 400  # wav2vec 2.0's receptive field: shorter input yields no frame


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


class UTMOS22Strong(nn.Module):
    """UTMOS22 strong learner for inference, in SpeechMOS's released state-dict layout (see the module docstring).
    wave [B, S] float32 at 16 kHz -> MOS [B]."""

    SSL_DIM, EMB_DIM, RNN_DIM, PROJ_DIM = 768, 128, 512, 2048

    def __init__(self):
        super().__init__()
        try:
            from utmos_pytorch.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
        except ImportError as e:
            raise ImportError(
                "the quality reward's utmos backend needs the utmos-pytorch package "
                "(pip install -c constraints.txt utmos-pytorch==0.1.0)"
            ) from e
        with warnings.catch_warnings():  # its positional conv uses the deprecated (state-dict compatible) weight_norm
            warnings.simplefilter("ignore", FutureWarning)
            self.wav2vec2 = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec 2.0 Base, UTMOS22's SSL model
        self.wav2vec2.register_parameter("mask_emb", nn.Parameter(torch.zeros(self.SSL_DIM), requires_grad=False))
        self.domain_emb = nn.Parameter(torch.zeros(1, self.EMB_DIM), requires_grad=False)
        self.judge_emb = nn.Parameter(torch.zeros(1, self.EMB_DIM), requires_grad=False)
        cat = self.SSL_DIM + 2 * self.EMB_DIM
        self.blstm = nn.LSTM(input_size=cat, hidden_size=self.RNN_DIM, batch_first=True, bidirectional=True)
        self.projection = nn.Sequential(
            nn.Linear(2 * self.RNN_DIM, self.PROJ_DIM), nn.ReLU(), nn.Linear(self.PROJ_DIM, 1)
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        ssl = self.wav2vec2(wave, mask=False, features_only=True)[0]  # [B, frames, 768]
        b, t, _ = ssl.shape
        domain = self.domain_emb.unsqueeze(1).expand(b, t, -1)
        judge = self.judge_emb.unsqueeze(1).expand(b, t, -1)
        frames = self.projection(self.blstm(torch.cat([ssl, domain, judge], dim=2))[0])  # [B, frames, 1]
        return frames.mean(dim=1).squeeze(1) * 2 + 3


def check_state(model: nn.Module, state: object, path: Path) -> None:
    """Raise one ValueError naming the file and every missing, unexpected and mis-shaped key."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} (expected {tuple(own[k].shape)})"
        for k in own
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(own[k].shape))
    ]
    problems = [
        f"{title} ({len(keys)}): " + ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    if problems:
        raise ValueError(f"{path}: not the released UTMOS22 strong state dict: " + "; ".join(problems))


def load_utmos(model_dir: str | Path, device: str = "cpu") -> UTMOS22Strong:
    """UTMOS22 strong from `<model_dir>/utmos22_strong_step7459_v1.pt`, loaded strictly with weights_only."""
    path = require_dir(model_dir, (UTMOS_FILE,), "quality (utmos)") / UTMOS_FILE
    if not path.is_file():
        raise ModelDirError(f"quality (utmos): {path} is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = UTMOS22Strong()
    check_state(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


class QualityScorer:
    """kwargs: backend ("distillmos" or "utmos"), model_dir (utmos only: the directory holding
    utmos22_strong_step7459_v1.pt), device, batch_size (clips per forward pass)."""

    def __init__(
        self, backend: str = "distillmos", model_dir: str | None = None, device: str = "cpu", batch_size: int = 16
    ):
        self.check_kwargs(backend=backend, model_dir=model_dir, batch_size=batch_size)
        self.backend, self.device, self.batch_size = backend, device, batch_size
        self.model = load_utmos(model_dir, device) if backend == "utmos" else load_distillmos(device)  # type: ignore[arg-type]

    @classmethod
    def check_kwargs(
        cls, backend: str = "distillmos", model_dir: str | None = None, batch_size: int = 16, **_: object
    ) -> None:
        """Range checks of the constructor's arguments (config check calls this without building the scorer)."""
        require(backend in BACKENDS, "backend", f"must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if backend == "utmos":
            ok = isinstance(model_dir, (str, Path)) and bool(str(model_dir))
            require(ok, "model_dir", f"the utmos backend needs the directory holding {UTMOS_FILE}, got {model_dir!r}")
        else:
            require(model_dir is None, "model_dir", f"only the utmos backend takes a model_dir (backend {backend!r})")
        ok = isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
        require(ok, "batch_size", f"must be an integer >= 1, got {batch_size!r}")

    def mos(self, wavs16k: list[np.ndarray]) -> np.ndarray:
        """[N] MOS of 16 kHz waveforms."""
        return self._mos_utmos(wavs16k) if self.backend == "utmos" else self._mos_distillmos(wavs16k)

    def _mos_distillmos(self, wavs16k: list[np.ndarray]) -> np.ndarray:
        """Clips of one window batched (zero-padded), longer ones one by one."""
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

    def _mos_utmos(self, wavs16k: list[np.ndarray]) -> np.ndarray:
        """Clips of equal length batched (no padding: UTMOS has no padding mask), the others one by one."""
        out = np.full(len(wavs16k), np.nan)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(wavs16k):
            groups.setdefault(len(w), []).append(i)
        with torch.no_grad():
            for _, same in sorted(groups.items()):
                for start in range(0, len(same), self.batch_size):
                    idx = same[start : start + self.batch_size]
                    x = torch.from_numpy(np.stack([np.asarray(wavs16k[i], np.float32) for i in idx]))
                    out[idx] = self.model(x.to(self.device)).float().cpu().numpy().reshape(-1)
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
            wav = resample(s.audio, s.sample_rate, MOS_RATE) if s.sample_rate != MOS_RATE else s.audio
            if self.backend == "utmos" and len(wav) < UTMOS_MIN_SAMPLES:
                reasons[i] = f"too short for UTMOS: {len(wav)} samples at 16 kHz (needs {UTMOS_MIN_SAMPLES}, 25 ms)"
                continue
            wavs.append(wav)
            rows.append(i)
        mos = np.full(n, np.nan)
        if wavs:
            mos[rows] = self.mos(wavs)
        reward = np.where(np.isfinite(mos), np.clip((mos - 1.0) / 4.0, 0.0, 1.0), mos)  # NaN / inf stay invalid
        return ScoreResult.build(reward, reasons, {"mos": mos})
