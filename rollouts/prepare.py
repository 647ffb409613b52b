"""`ttsrl prepare`: turn a list of (prompt wav, prompt text, target text, emotion) items into a training manifest.

Input list, paths relative to the list file:
    .jsonl  one object per line: prompt_wav (or prompt_speech), prompt_text, target_text (or syn_text),
            optional emotion, optional id, optional target_wav (a recording of target_text: its speech tokens
            become the line's syn_speech_token, the fixed codes policy.flow.codes manifest trains the flow on),
            optional emotion_wav (an emotion reference clip: the line's emotion_speech, IndexTTS2's emotion source)
    other   one item per line: prompt_wav|prompt_text|target_text[|emotion]
Empty lines and lines starting with '#' (text lists only) are skipped. `emotion` is an emotion2vec label index
(0..8, -1 or empty = none) or a label name (`happy`, `开心` or `开心/happy`; see rewards/emotion.py).

Front-end directory (upstream layout): speech_tokenizer/ (config.json, preprocessor_config.json,
model*.safetensors) and frontend/campplus.onnx.

Output directory: manifest.jsonl in the upstream GRPO layout that rollouts/manifest.py reads, one line per item:
    {"uttid": "<prompt stem>--<item id>", "prompt_text", "prompt_speech" (the wav, relative to the output dir),
     "prompt_speech_token": "prompt_speech_token/<stem>.npy",   int64 [N]       speech tokens, 25 per second
     "embedding": "embedding/<stem>.npy",                       float32 [192]   CAMPPlus speaker embedding
     "prompt_speech_feat": "prompt_speech_feat/<stem>.npy",     float32 [T, 80] 24 kHz prompt log-mel
     "syn_text", "emotion": int (-1 = none),
     "syn_speech_token": "syn_speech_token/<target stem>.npy"   int64 [M]  with target_wav: its speech tokens
     "emotion_speech": the emotion_wav (relative to the output dir), with emotion_wav
     "prompt_text_tn", "syn_text_tn"}   the texts as the LM reads them
                                        (rollouts/text.py; not with --text-normalize none)
Feature files are keyed by the prompt wav's stem and computed once per prompt however many items use it. The item
id is the jsonl `id` field, else the line number. prompt_text and syn_text are stored raw, next to their normalised
forms for a reader; the trainer and `ttsrl eval` normalise the raw texts themselves (data.text_normalize) and get the
same `_tn` texts.

Each prompt goes through the front end alone, as upstream does (tokens depend on the batch layout):
    tokens      rollouts.speech_tokenizer on channel 0 at 16 kHz
    embedding   rollouts.speaker_embedding on the channel mean at 16 kHz
    prompt mel  rollouts.audio.mel_spectrogram on the channel mean at 24 kHz, [T = floor(N24 / 480), 80]
Resampling is scipy polyphase (rollouts.audio.resample); upstream uses torchaudio's sinc resampler, so prompts
that are not already at 16 / 24 kHz can give slightly different features than upstream's front end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rollouts.audio import HOP, N_FFT, mel_spectrogram, resample
from rollouts.audio import SAMPLE_RATE as MEL_RATE
from rollouts.speaker_embedding import MIN_SAMPLES, SpeakerEmbedder, SpeakerEmbeddingError
from rollouts.speaker_embedding import SAMPLE_RATE as EMB_RATE
from rollouts.speech_tokenizer import SpeechTokenizer, SpeechTokenizerError

TOKENIZER_DIR = "speech_tokenizer"
CAMPPLUS_PATH = "frontend/campplus.onnx"
MANIFEST = "manifest.jsonl"
KINDS = ("prompt_speech_token", "embedding", "prompt_speech_feat")
TARGET_KIND = "syn_speech_token"  # the target recordings' tokens (items with target_wav)
# emotion2vec+ labels, in rewards.emotion.LABELS order (tests check they agree), with their Chinese names
EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "<unk>"]
EMOTIONS_ZH = ["生气", "厌恶", "恐惧", "开心", "中立", "其他", "难过", "吃惊", "<unk>"]
MEL_MIN_SAMPLES = (N_FFT - HOP) // 2 + 1  # the reflect pad needs more samples than it pads


class PrepareError(ValueError):
    """A bad item list, item or front-end directory; the message names the file, line and field."""


class PromptAudioError(ValueError):
    """A prompt wav that cannot be read or is too short for the front end."""


@dataclass(frozen=True)
class Item:
    where: str  # "list file:line"
    item_id: str
    prompt_wav: Path
    prompt_text: str
    target_text: str
    emotion: int  # emotion2vec label index; -1 = none
    target_wav: Path | None = None  # a recording of target_text (its tokens: the line's syn_speech_token)
    emotion_wav: Path | None = None  # an emotion reference clip (IndexTTS2): the line's emotion_speech


def feature_fields(pf: PromptFeatures) -> dict[str, np.ndarray]:
    """GLM-TTS's prompt features as the manifest's fields."""
    return dict(zip(KINDS, (pf.tokens.astype(np.int64), pf.embedding.astype(np.float32), pf.feat.astype(np.float32))))


class Frontend(Protocol):
    """What `prepare` runs on each voice prompt: GLM-TTS's PromptFrontend, or a policy's own (VoxCPM's AudioVAE,
    `policies/voxcpm.py` VoxCPMPromptFrontend)."""

    def features(self, prompt: str | Path) -> dict[str, np.ndarray]:
        """The manifest's feature fields of one voice prompt (each written to <field>/<stem>.npy)."""
        ...

    def codes(self, path: str | Path) -> np.ndarray:
        """A target recording's speech tokens (an item's target_wav)."""
        ...


@dataclass(frozen=True)
class PromptFeatures:
    tokens: np.ndarray  # [N] int64 speech tokens
    feat: np.ndarray  # [T, 80] float32 24 kHz log-mel
    embedding: np.ndarray  # [192] float32 CAMPPlus embedding


def parse_emotion(value, where: str) -> int:
    """An index (int or digit string; -1, None or '' = none) or a label name -> label index, -1 for none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return -1
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PrepareError(f"{where}: field 'emotion' must be a label index or name, got {value!r}")
    if isinstance(value, str):
        v = value.strip()
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            for name in (v.lower(), v.split("/")[-1].strip().lower(), v.split("/")[0].strip()):
                if name in EMOTIONS:
                    return EMOTIONS.index(name)
                if name in EMOTIONS_ZH:
                    return EMOTIONS_ZH.index(name)
            raise PrepareError(
                f"{where}: field 'emotion': unknown label {value!r}; expected one of {', '.join(EMOTIONS)} "
                f"(or an index 0..{len(EMOTIONS) - 1}, -1 = none)"
            )
    if not -1 <= value < len(EMOTIONS):
        raise PrepareError(f"{where}: field 'emotion': index {value} is not in -1..{len(EMOTIONS) - 1}")
    return value


def _text(value, name: str, where: str) -> str:
    if value is None:
        raise PrepareError(f"{where}: field '{name}' is missing")
    if not isinstance(value, str):
        raise PrepareError(f"{where}: field '{name}' must be a string, got {value!r}")
    if not value.strip():
        raise PrepareError(f"{where}: field '{name}' is empty")
    return value.strip()


def _item(fields: dict, base: Path, where: str, lineno: int) -> Item:
    wav = _text(fields.get("prompt_wav"), "prompt_wav", where)
    path = Path(wav) if Path(wav).is_absolute() else base / wav
    if not path.is_file():
        raise PrepareError(f"{where}: field 'prompt_wav': file not found: {path}")
    target_path, emotion_path = (_audio_field(fields, name, base, where) for name in ("target_wav", "emotion_wav"))
    item_id = fields.get("id", lineno)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise PrepareError(f"{where}: field 'id' must be a non-empty string or integer, got {item_id!r}")
    return Item(
        where=where,
        item_id=str(item_id).strip(),
        prompt_wav=path,
        prompt_text=_text(fields.get("prompt_text"), "prompt_text", where),
        target_text=_text(fields.get("target_text"), "target_text", where),
        emotion=parse_emotion(fields.get("emotion"), where),
        target_wav=target_path,
        emotion_wav=emotion_path,
    )


def _audio_field(fields: dict, name: str, base: Path, where: str) -> Path | None:
    """An optional audio path of an item (relative to the list), which must exist."""
    value = fields.get(name)
    if value is None:
        return None
    path = Path(_text(value, name, where))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise PrepareError(f"{where}: field '{name}': file not found: {path}")
    return path


def read_items(path: str | Path) -> list[Item]:
    """Parse and check an item list (see the module docstring); every bad line is a PrepareError."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"item list not found: {path}")
    jsonl = path.suffix.lower() == ".jsonl"
    items: list[Item] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        where = f"{path}:{lineno}"
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            fields = dict(obj)
            for alias, name in (("prompt_speech", "prompt_wav"), ("syn_text", "target_text")):
                if fields.get(name) is None and alias in fields:
                    fields[name] = fields[alias]
        else:
            parts = line.split("|")
            if len(parts) not in (3, 4):
                raise PrepareError(
                    f"{where}: expected 3 or 4 '|'-separated fields (prompt_wav|prompt_text|target_text[|emotion]), "
                    f"got {len(parts)}"
                )
            fields = dict(zip(("prompt_wav", "prompt_text", "target_text", "emotion"), parts))
        items.append(_item(fields, path.parent, where, lineno))
    if not items:
        raise PrepareError(f"{path}: no items")
    return items


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """[C, N] float32 in [-1, 1] and the sample rate; PromptAudioError if it cannot be read or is empty."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise PromptAudioError(f"cannot read {path} as audio: {e}") from None
    if data.shape[0] == 0:
        raise PromptAudioError(f"{path} holds no audio samples")
    return np.ascontiguousarray(data.T), int(sr)


def prompt_mel(wav: np.ndarray, sr: int) -> np.ndarray:
    """[N] mono at `sr` -> [floor(N24 / 480), 80] float32 24 kHz log-mel (the flow's prompt condition)."""
    y = resample(np.asarray(wav, dtype=np.float32), sr, MEL_RATE)
    if len(y) < MEL_MIN_SAMPLES:
        raise PromptAudioError(
            f"audio too short for the prompt mel: {len(y)} samples at 24 kHz, needs at least {MEL_MIN_SAMPLES}"
        )
    with torch.inference_mode():
        mel = mel_spectrogram(torch.from_numpy(y)[None])  # [1, 80, T]
    return mel[0].T.contiguous().numpy().astype(np.float32)


class PromptFrontend:
    """Voice prompt -> PromptFeatures (speech tokens, 24 kHz mel, speaker embedding), as upstream's front end."""

    def __init__(self, tokenizer: SpeechTokenizer, embedder: SpeakerEmbedder):
        self.tokenizer = tokenizer
        self.embedder = embedder

    @classmethod
    def from_dir(
        cls,
        frontend_dir: str | Path | None,
        device: str = "cpu",
        *,
        speech_tokenizer_dir: str | Path | None = None,
        campplus_path: str | Path | None = None,
    ) -> PromptFrontend:
        """frontend_dir in the upstream layout; either model may be given on its own instead."""
        if frontend_dir is None and (speech_tokenizer_dir is None or campplus_path is None):
            raise PrepareError("front end: give a front-end directory, or both the speech tokenizer and campplus.onnx")
        if frontend_dir is not None and not Path(frontend_dir).is_dir():
            raise PrepareError(f"front end: directory not found: {frontend_dir}")
        tok_dir = Path(speech_tokenizer_dir) if speech_tokenizer_dir else Path(frontend_dir) / TOKENIZER_DIR
        onnx_path = Path(campplus_path) if campplus_path else Path(frontend_dir) / CAMPPLUS_PATH
        if not tok_dir.is_dir():
            raise PrepareError(f"front end: speech tokenizer directory not found: {tok_dir}")
        if not onnx_path.is_file():
            raise PrepareError(f"front end: speaker embedding model not found: {onnx_path}")
        tokenizer = SpeechTokenizer.from_pretrained(tok_dir, device=device)
        return cls(tokenizer, SpeakerEmbedder.from_onnx(onnx_path, device))

    def __call__(self, prompt: str | Path | tuple[np.ndarray, int]) -> PromptFeatures:
        """prompt: a wav path, or (waveform [N] or [C, N] float in [-1, 1], sample rate)."""
        if isinstance(prompt, tuple):
            wav, sr = np.asarray(prompt[0], dtype=np.float32), int(prompt[1])
            wav = wav[None] if wav.ndim == 1 else wav
        else:
            wav, sr = read_audio(prompt)
        if wav.ndim != 2 or wav.shape[1] == 0:
            raise PromptAudioError(f"expected a non-empty waveform [N] or [C, N], got shape {wav.shape}")
        if not np.isfinite(wav).all():
            raise PromptAudioError("waveform contains NaN or inf")
        seconds = wav.shape[1] / sr
        need = max(MIN_SAMPLES / EMB_RATE, MEL_MIN_SAMPLES / MEL_RATE)
        if seconds < need:
            raise PromptAudioError(f"audio too short: {seconds:.4f} s; the front end needs at least {need:.4f} s")
        mono = wav.mean(axis=0)
        tokens = self.tokenizer([(wav[0], sr)])[0]  # channel 0, alone in its batch (upstream)
        return PromptFeatures(tokens=tokens, feat=prompt_mel(mono, sr), embedding=self.embedder(mono, sr))

    def features(self, prompt: str | Path) -> dict[str, np.ndarray]:
        """The manifest's feature fields of one voice prompt (prepare writes each to <field>/<stem>.npy)."""
        return feature_fields(self(prompt))

    def codes(self, path: str | Path) -> np.ndarray:
        """A recording's speech tokens [M] int64, as the prompt's (channel 0, alone in its batch)."""
        wav, sr = read_audio(path)
        if not np.isfinite(wav).all():
            raise PromptAudioError("waveform contains NaN or inf")
        codes = np.asarray(self.tokenizer([(wav[0], sr)])[0], dtype=np.int64)
        if codes.size == 0:
            raise PromptAudioError(f"audio too short: {wav.shape[1] / sr:.4f} s gives no speech tokens")
        return codes


@dataclass(frozen=True)
class PrepareResult:
    manifest: Path
    items: int
    prompts: int


def prepare(
    items_path: str | Path,
    frontend_dir: str | Path | None,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    overwrite: bool = False,
    frontend: Frontend | None = None,
    speech_tokenizer_dir: str | Path | None = None,
    campplus_path: str | Path | None = None,
    progress: bool = False,
    text_normalize: str = "upstream",
    custom_replace: str | Path | None = None,
) -> PrepareResult:
    """Write out_dir/manifest.jsonl and its feature files (see the module docstring). `frontend`: an already
    loaded front end (then frontend_dir is not read)."""
    items = read_items(items_path)
    from rollouts.text import LMTexts

    lm = LMTexts(text_normalize, custom_replace=custom_replace) if text_normalize != "none" else None
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.exists() and not overwrite:
        raise PrepareError(f"{manifest} already exists (overwrite it with --overwrite)")

    prompts: dict[Path, Item] = {}  # resolved wav -> first item using it
    stems: dict[str, Path] = {}
    uttids: dict[str, str] = {}
    for it in items:
        wav = it.prompt_wav.resolve()
        stem = wav.stem
        if stems.setdefault(stem, wav) != wav:
            first = prompts[stems[stem]]
            raise PrepareError(
                f"{it.where}: field 'prompt_wav': {it.prompt_wav} has the same file stem '{stem}' as "
                f"{first.prompt_wav} ({first.where}); feature files are keyed by stem"
            )
        prompts.setdefault(wav, it)
        uttid = f"{stem}--{it.item_id}"
        if uttid in uttids:
            raise PrepareError(f"{it.where}: field 'id': uttid '{uttid}' already used at {uttids[uttid]}")
        uttids[uttid] = it.where

    targets = _target_stems(items)
    if frontend is None:
        frontend = PromptFrontend.from_dir(
            frontend_dir, device, speech_tokenizer_dir=speech_tokenizer_dir, campplus_path=campplus_path
        )
    todo = list(prompts.items())
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="prompts", unit="wav")
    fields: dict[str, None] = {}  # the feature fields written (every prompt has the same)
    for wav, first in todo:
        try:  # a bare callable giving PromptFeatures is GLM-TTS's front end too
            arrays = frontend.features(wav) if hasattr(frontend, "features") else feature_fields(frontend(wav))
        except ValueError as e:
            raise PrepareError(f"{first.where}: field 'prompt_wav': {e}") from None
        for kind, arr in arrays.items():
            (out / kind).mkdir(parents=True, exist_ok=True)
            np.save(out / kind / f"{wav.stem}.npy", arr)
            fields.setdefault(kind)
    if targets:
        (out / TARGET_KIND).mkdir(parents=True, exist_ok=True)
    for wav, first in targets.items():
        try:
            codes = frontend.codes(wav)
        except ValueError as e:
            raise PrepareError(f"{first.where}: field 'target_wav': {e}") from None
        np.save(out / TARGET_KIND / f"{wav.stem}.npy", codes)

    tmp = manifest.with_name(MANIFEST + ".tmp")
    out_abs = out.resolve()
    with open(tmp, "w", encoding="utf-8") as f:
        for it in items:
            stem = it.prompt_wav.resolve().stem
            line = {
                "uttid": f"{stem}--{it.item_id}",
                "prompt_text": it.prompt_text,
                "prompt_speech": os.path.relpath(it.prompt_wav.resolve(), out_abs),
                **{kind: f"{kind}/{stem}.npy" for kind in fields},
                "syn_text": it.target_text,
                "emotion": it.emotion,
            }
            if it.target_wav is not None:
                line[TARGET_KIND] = f"{TARGET_KIND}/{it.target_wav.resolve().stem}.npy"
            if it.emotion_wav is not None:
                line["emotion_speech"] = os.path.relpath(it.emotion_wav.resolve(), out_abs)
            if lm is not None:
                line.update(prompt_text_tn=lm.prompt(it.prompt_text), syn_text_tn=lm.target(it.target_text))
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest)
    return PrepareResult(manifest=manifest, items=len(items), prompts=len(prompts))


def _target_stems(items: list[Item]) -> dict[Path, Item]:
    """Each target recording (resolved) -> the first item using it; two recordings with one file stem are an error
    (their token files are keyed by stem)."""
    targets: dict[Path, Item] = {}
    stems: dict[str, Path] = {}
    for it in items:
        if it.target_wav is None:
            continue
        wav = it.target_wav.resolve()
        if stems.setdefault(wav.stem, wav) != wav:
            first = targets[stems[wav.stem]]
            raise PrepareError(
                f"{it.where}: field 'target_wav': {it.target_wav} has the same file stem '{wav.stem}' as "
                f"{first.target_wav} ({first.where}); token files are keyed by stem"
            )
        targets.setdefault(wav, it)
    return targets


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    """`ttsrl prepare LIST --frontend DIR --out DIR [--device cpu]`."""
    p = subparsers.add_parser(
        "prepare", help="build a training manifest (speech tokens, prompt mel, speaker embedding) from an item list"
    )
    p.add_argument(
        "items",
        metavar="LIST",
        help="items: .jsonl (prompt_wav, prompt_text, target_text[, emotion, id, target_wav, emotion_wav]) or "
        "'prompt_wav|prompt_text|target_text[|emotion]' lines; paths relative to the list",
    )
    p.add_argument(
        "--frontend",
        metavar="DIR",
        help="front-end dir in the upstream layout: speech_tokenizer/ and frontend/campplus.onnx",
    )
    p.add_argument("--speech-tokenizer", metavar="DIR", help="speech tokenizer dir (default DIR/speech_tokenizer)")
    p.add_argument("--campplus", metavar="FILE", help="CAMPPlus ONNX model (default DIR/frontend/campplus.onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir: manifest.jsonl and the .npy features")
    p.add_argument(
        "--policy",
        choices=("glmtts", "voxcpm", "indextts2"),
        default="glmtts",
        help="whose prompt features: glmtts (speech tokens, prompt mel, CAMPPlus; --frontend), voxcpm (AudioVAE "
        "latent patches, prompt_latent; --model) or indextts2 (w2v-BERT features, semantic codes, 22.05 kHz mel, "
        "CAMPPlus: prompt_semantic, prompt_semantic_code, prompt_mel, embedding; --model)",
    )
    p.add_argument(
        "--model", metavar="DIR", help="--policy voxcpm / indextts2: the checkpoint dir (released layout) that encodes"
    )
    p.add_argument("--device", default="cpu", help="speech tokenizer device; cuda also runs CAMPPlus on the GPU")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/manifest.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--text-normalize",
        choices=("upstream", "voxcpm", "none"),
        default="upstream",
        help="store the normalised texts too (prompt_text_tn, syn_text_tn): upstream (GLM-TTS) or voxcpm; none: raw",
    )
    p.add_argument("--custom-replace", metavar="FILE", help="zh substitutions (GLM-TTS configs/custom_replace.jsonl)")
    p.set_defaults(func=cmd_prepare)
    return p


def cmd_prepare(args: argparse.Namespace, policy_frontend=None) -> int:
    """`ttsrl prepare`; `policy_frontend(kind, model_dir, device)` builds a policy's own front end (rl/cli.py gives
    it: the policies' models live in policies/)."""
    from rollouts.text import TextFrontEndError

    try:
        frontend = None
        if args.policy != "glmtts":
            if not args.model or policy_frontend is None:
                raise PrepareError(f"--policy {args.policy} needs --model DIR (its checkpoint in the released layout)")
            frontend = policy_frontend(args.policy, args.model, args.device)
        res = prepare(
            args.items,
            args.frontend,
            args.out,
            device=args.device,
            overwrite=args.overwrite,
            frontend=frontend,
            speech_tokenizer_dir=args.speech_tokenizer,
            campplus_path=args.campplus,
            progress=not args.no_progress,
            text_normalize=args.text_normalize,
            custom_replace=args.custom_replace,
        )
    except (PrepareError, SpeechTokenizerError, SpeakerEmbeddingError, TextFrontEndError, ValueError) as e:
        print(f"ttsrl prepare: {e}", file=sys.stderr)
        return 2
    print(f"ttsrl: wrote {res.manifest} ({res.items} items, {res.prompts} prompts)")
    return 0
