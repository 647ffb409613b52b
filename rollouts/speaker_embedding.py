"""CAMPPlus speaker embedding (the GLM-TTS flow's `embedding`, [192]) from the upstream `frontend/campplus.onnx`.

As upstream `TTSFrontEnd._extract_spk_embedding`:
  1. average the channels and resample to 16 kHz (here `rollouts.audio.resample`, scipy polyphase; upstream uses
     torchaudio's sinc-Hann resampler, so non-16 kHz input can give slightly different features);
  2. Kaldi fbank, 80 bins, as torchaudio.compliance.kaldi.fbank with its defaults and dither 0: 25 ms frames every
     10 ms, snip_edges (T = 1 + (N - 400) // 160, needs N >= 400), remove the frame mean, pre-emphasis 0.97, povey
     window, 512-point power spectrum, Kaldi mel banks 20 Hz..8 kHz, ln(max(E, float32 eps));
     computed with kaldi-native-fbank, which implements the same Kaldi recipe;
  3. subtract the per-utterance mean over time;
  4. run the ONNX model on [1, T, 80] float32 (its first input), take its first output, flatten -> [192] float32.
No normalisation is applied (the flow L2-normalises the embedding itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rollouts.audio import resample

SAMPLE_RATE = 16000
MIN_SAMPLES = 400  # one 25 ms frame at 16 kHz
NUM_BINS = 80
EMBEDDING_DIM = 192


class SpeakerEmbeddingError(ValueError):
    """A bad model file or input; the message names it."""


def kaldi_fbank(wav16: np.ndarray) -> np.ndarray:
    """[N] float waveform at 16 kHz (N >= 400) -> [1 + (N - 400) // 160, 80] float32 log mel filterbank."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.dither = 0.0
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = NUM_BINS
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # Nyquist
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SAMPLE_RATE, np.ascontiguousarray(wav16, dtype=np.float32))
    fbank.input_finished()
    n = fbank.num_frames_ready
    return (
        np.stack([fbank.get_frame(i) for i in range(n)]).astype(np.float32)
        if n
        else np.zeros((0, NUM_BINS), np.float32)
    )


def campplus_features(wav16: np.ndarray) -> np.ndarray:
    """[N] at 16 kHz -> [T, 80] float32 fbank with the per-utterance mean over time removed."""
    feat = kaldi_fbank(wav16)
    return feat - feat.mean(axis=0, keepdims=True)


def session_options():
    """onnxruntime SessionOptions as upstream: all graph optimisations, one intra-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    return opts


class SpeakerEmbedder:
    """Waveform -> [192] CAMPPlus embedding. `session` is anything with onnxruntime's get_inputs() / run()."""

    def __init__(self, session, source: str = "campplus"):
        self.session = session
        self.source = source
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "cpu") -> SpeakerEmbedder:
        """Load `campplus.onnx`. device 'cuda...' uses onnxruntime's CUDA provider when it is available."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise SpeakerEmbeddingError("speaker embedding needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise SpeakerEmbeddingError(f"speaker embedding: model not found: {path}")
        providers: list = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            index = str(device).partition(":")[2] or "0"
            providers.insert(
                0,
                (
                    "CUDAExecutionProvider",
                    {
                        "device_id": int(index),
                        "arena_extend_strategy": "kSameAsRequested",
                        "cudnn_conv_algo_search": "DEFAULT",
                    },
                ),
            )
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise SpeakerEmbeddingError(f"{path}: cannot load the ONNX model: {e}") from None
        return cls(session, source=str(path))

    def __call__(self, wav: np.ndarray, sr: int) -> np.ndarray:
        """wav [N] or [C, N] (channels are averaged) float in [-1, 1] at `sr` -> [192] float32."""
        a = np.asarray(wav, dtype=np.float32)
        if a.ndim == 2:
            a = a.mean(axis=0)
        if a.ndim != 1:
            raise SpeakerEmbeddingError(f"expected a waveform [N] or [channels, N], got shape {np.shape(wav)}")
        if not np.isfinite(a).all():
            raise SpeakerEmbeddingError("waveform contains NaN or inf")
        a = resample(a, int(sr), SAMPLE_RATE)
        if len(a) < MIN_SAMPLES:
            raise SpeakerEmbeddingError(
                f"audio too short: {len(a)} samples at 16 kHz, the fbank needs at least {MIN_SAMPLES} (25 ms)"
            )
        feat = campplus_features(a)[None]  # [1, T, 80]
        out = np.asarray(self.session.run(None, {self.input_name: feat})[0], dtype=np.float32).reshape(-1)
        if out.shape != (EMBEDDING_DIM,):
            raise SpeakerEmbeddingError(
                f"{self.source}: expected a {EMBEDDING_DIM}-dim embedding, got {out.size} values"
            )
        if not np.isfinite(out).all():
            raise SpeakerEmbeddingError(f"{self.source}: embedding contains NaN or inf")
        return out
