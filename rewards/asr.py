"""Speech recognisers for the CER and laughter rewards, loaded from local directories only.

    Paraformer (zh)  funasr.AutoModel on a local model directory (config.yaml + model.pt + tokens + am.mvn);
                     no VAD or punctuation model; dither 0 so that transcripts do not change from call to call;
                     no update check (no network).
    Whisper (en)     transformers WhisperForConditionalGeneration + WhisperProcessor from a local directory;
                     greedy decoding, language English, task transcribe, one 30 s window (as seed-tts-eval).
    faster-whisper   the same Whisper decoding on CTranslate2 (`asr_backend: faster-whisper`): a local
    (en)             CTranslate2 model directory (model.bin + config.json + tokenizer.json, as
                     ct2-transformers-converter writes it); greedy, temperature 0 with no fallback, no
                     no-speech or log-prob skipping, no conditioning on previous text, no VAD.

Each takes a batch: a list of float32 16 kHz mono waveforms -> a list of transcripts. `transcribe_timed` also
returns when each recognised piece was said (`Timed`: text pieces with start and end seconds; Paraformer's
per-token timestamps, Whisper's word timestamps on faster-whisper), which the token-level CER reward maps to
the policy's frames. A model is loaded once per (kind, directory, device, ...) and shared by every scorer that
asks for it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ASR_RATE = 16000


@dataclass(frozen=True)
class Timed:
    """One transcript with timings: `pieces` are (text, start_s, end_s) in the order said; their texts joined
    (as the recogniser joins them) give `text`. A piece is a word (Whisper) or a token (Paraformer)."""

    text: str
    pieces: tuple[tuple[str, float, float], ...]


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
        return [r.get("text", "") for r in self._generate(wavs)]

    def transcribe_timed(self, wavs: list[np.ndarray]) -> list[Timed | None]:
        """With FunASR's CIF timestamps (`output_timestamp`): one (token, start, end) per recognised token; None for
        an utterance whose timestamps do not pair one to one with its tokens."""
        return [_paraformer_timed(r) for r in self._generate(wavs, output_timestamp=True)]

    def _generate(self, wavs: list[np.ndarray], **kwargs) -> list[dict]:
        out: list[dict] = [{} for _ in wavs]
        order = sorted(range(len(wavs)), key=lambda i: -len(wavs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = [np.ascontiguousarray(wavs[i], dtype=np.float32) for i in idx]
            with keep_torch_state():
                res = self.model.generate(input=inputs, batch_size=len(inputs), disable_pbar=True, **kwargs)
                if len(res) != len(inputs):  # funasr returns one entry for a batch that decodes to nothing at all
                    res = [
                        r
                        for w in inputs
                        for r in self.model.generate(input=[w], batch_size=1, disable_pbar=True, **kwargs)
                    ]
            for i, r in zip(idx, res):
                out[i] = r
        return out


def _paraformer_timed(r: dict) -> Timed | None:
    """FunASR's result -> Timed. Its text joins tokens with no space between CJK characters and a space around
    other tokens; its `timestamp` holds one [start_ms, end_ms] per token."""
    text, stamps = r.get("text", ""), r.get("timestamp")
    tokens = _paraformer_tokens(text)
    if not isinstance(stamps, list) or len(stamps) != len(tokens):
        return None if tokens else Timed(text, ())
    return Timed(text, tuple((t, float(a) / 1000, float(b) / 1000) for t, (a, b) in zip(tokens, stamps)))


def _paraformer_tokens(text: str) -> list[str]:
    out: list[str] = []
    for word in text.split():
        run = ""
        for c in word:
            if "\u4e00" <= c <= "\u9fff":
                if run:
                    out.append(run)
                    run = ""
                out.append(c)
            else:
                run += c
        if run:
            out.append(run)
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


class FasterWhisperASR:
    """Whisper on CTranslate2 (faster-whisper), from a local CTranslate2 model directory; English. Decoding is
    greedy with every fallback and skip heuristic off, so it reads the same as the transformers path.

    `transcribe` decodes clips of up to one 30 s window in batches of `batch_size` through CTranslate2's batched
    encoder and generator, with exactly the prompt, suppressed tokens and limits that faster-whisper's own
    `transcribe` uses for one window (tests/test_asr_real.py checks the texts are equal); a longer clip goes
    through faster-whisper's `transcribe` alone. `transcribe_timed` (word timestamps) runs clip by clip."""

    WINDOW_S = 30.0

    def __init__(self, model_dir: str | Path, device: str = "cpu", compute_type: str = "default", batch_size: int = 16):
        d = require_dir(model_dir, ("model.bin", "config.json", "tokenizer.json|vocabulary.txt"), "faster-whisper")
        from faster_whisper import WhisperModel

        self.model = WhisperModel(
            str(d),
            device=device.split(":")[0],
            device_index=int(device.split(":")[1]) if ":" in device else 0,
            compute_type=compute_type,
            cpu_threads=torch.get_num_threads(),
            local_files_only=True,
        )
        self.batch_size = max(int(batch_size), 1)
        self._lock = threading.Lock()  # one decode at a time (scorers may share the model from threads)

    def _segments(self, wav: np.ndarray, words: bool):
        segments, _ = self.model.transcribe(
            np.asarray(wav, dtype=np.float32),
            language="en",
            task="transcribe",
            beam_size=1,
            best_of=1,
            temperature=0.0,
            compression_ratio_threshold=None,
            log_prob_threshold=None,
            no_speech_threshold=None,
            condition_on_previous_text=False,
            without_timestamps=not words,
            word_timestamps=words,
            vad_filter=False,
        )
        return list(segments)  # decoding runs while the generator is consumed

    def _batch(self, wavs: list[np.ndarray]) -> list[str]:
        """One window per clip, batched: faster-whisper's one-window decode (features without their last frame,
        padded to 3000; prompt <|startoftranscript|><|en|><|transcribe|><|notimestamps|> (the language and task
        only for a multilingual model); non-speech tokens suppressed; greedy to 448 tokens)."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        m = self.model
        tok = Tokenizer(m.hf_tokenizer, m.model.is_multilingual, task="transcribe", language="en")
        prompt = m.get_prompt(tok, [], without_timestamps=True)
        feats = np.stack([pad_or_trim(m.feature_extractor(np.asarray(w, np.float32))[:, :-1]) for w in wavs])
        results = m.model.generate(
            m.encode(feats),
            [prompt] * len(wavs),
            beam_size=1,
            patience=1.0,
            length_penalty=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_length=m.max_length,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tok, [-1]),
            max_initial_timestamp_index=int(round(1.0 / m.time_precision)),
        )
        return [tok.decode(r.sequences_ids[0]).strip() for r in results]

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        out = [""] * len(wavs)
        one_window = [i for i, w in enumerate(wavs) if len(w) <= self.WINDOW_S * ASR_RATE]
        with self._lock:
            for start in range(0, len(one_window), self.batch_size):
                idx = one_window[start : start + self.batch_size]
                for i, text in zip(idx, self._batch([wavs[i] for i in idx])):
                    out[i] = text
            for i in sorted(set(range(len(wavs))) - set(one_window)):
                out[i] = "".join(seg.text for seg in self._segments(wavs[i], False)).strip()
        return out

    def transcribe_timed(self, wavs: list[np.ndarray]) -> list[Timed | None]:
        out: list[Timed | None] = []
        with self._lock:
            for w in wavs:
                segs = self._segments(w, True)
                pieces = tuple((x.word, float(x.start), float(x.end)) for seg in segs for x in (seg.words or []))
                out.append(Timed("".join(seg.text for seg in segs).strip(), pieces))
        return out


ASR_KINDS = ("paraformer", "whisper", "faster-whisper")


@functools.cache
def load_asr(kind: str, model_dir: str, device: str = "cpu", batch_size: int = 16, compute_type: str = "default"):
    """One shared instance per (kind, directory, device, batch size, compute type)."""
    if kind == "paraformer":
        return ParaformerASR(model_dir, device, batch_size)
    if kind == "whisper":
        return WhisperASR(model_dir, device)
    if kind == "faster-whisper":
        return FasterWhisperASR(model_dir, device, compute_type, batch_size)
    raise ValueError(f"unknown ASR kind {kind!r}; known: {', '.join(ASR_KINDS)}")


def to_asr_rate(wav: np.ndarray, sr: int) -> np.ndarray:
    """seed-tts-eval's resampling to 16 kHz (FFT-based scipy.signal.resample)."""
    if sr == ASR_RATE:
        return np.asarray(wav, dtype=np.float32)
    from scipy.signal import resample

    return resample(np.asarray(wav, dtype=np.float64), int(len(wav) * ASR_RATE / sr)).astype(np.float32)
