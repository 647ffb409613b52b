"""Prompt manifests in the upstream GLM-TTS GRPO jsonl format, and a resumable, seeded prompt stream.

Each line is a JSON object:
    uttid                 str   unique id
    prompt_text           str   transcript of the voice prompt
    prompt_speech         str   voice prompt audio (.wav), for speaker similarity
    prompt_speech_token   str   .npy of int speech codes [Tp], 0..32767 (the GLM-TTS policies need it)
    prompt_speech_feat    str   .npy of the prompt's 24 kHz log-mel [Tf, 80] (flow condition)
    embedding             str   .npy of the speaker embedding [192]
    prompt_latent         str   optional .npy [T, P, D] float32: the voice prompt's VoxCPM AudioVAE latent patches
                                (`ttsrl prepare --policy voxcpm`); the VoxCPM policy encodes prompt_speech without it
    prompt_semantic       str   optional .npy [T, D] float32: the voice prompt's normalised w2v-BERT 2.0 layer-17
                                features (IndexTTS2's speaker input; `ttsrl prepare --policy indextts2`)
    prompt_semantic_code  str   optional .npy [T] int: the prompt's MaskGCT semantic codes 0..8191 (IndexTTS2's s2mel
                                prompt condition)
    prompt_mel            str   optional .npy [Tm, 80] float32: the prompt's 22.05 kHz log-mel (IndexTTS2's s2mel
                                prompt); IndexTTS2 computes all three from prompt_speech when they are absent
    emotion_speech        str   optional emotion reference audio (IndexTTS2: its emotion conditioning, mixed with the
                                speaker's by policy.indextts2.emo_alpha)
    syn_text              str   the text to synthesise
    syn_speech_token      str   optional .npy of int speech codes [Tt] of the target (e.g. the speech tokenizer's codes
                                of a recording of syn_text): the fixed codes the flow policy trains on with
                                policy.flow.codes manifest
    emotion               int   emotion2vec label index of the target emotion; -1 or absent = none

Relative paths are relative to the manifest's directory (or `root`). A bad line raises ManifestError naming the
file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rollouts.types import PromptRecord

NUM_SPEECH_CODES = 32768
EMBEDDING_DIM = 192
MEL_BINS = 80


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file, line and field."""


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _load_npy(path: Path, where: str) -> np.ndarray:
    if not path.is_file():
        raise ManifestError(f"{where}: file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ManifestError(f"{where}: cannot read {path} as a .npy array: {e}") from None


def parse_line(obj: dict, base: Path, where: str) -> PromptRecord:
    """One manifest entry -> PromptRecord. `where` is 'file:line' for error messages."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def text(name: str, required: bool = True) -> str | None:
        if name not in obj or obj[name] is None:
            if required:
                raise ManifestError(f"{where}: field '{name}' is missing")
            return None
        v = obj[name]
        if not isinstance(v, str):
            raise ManifestError(f"{where}: field '{name}' must be a string, got {v!r}")
        if required and not v.strip():
            raise ManifestError(f"{where}: field '{name}' is empty")
        return v

    uttid = text("uttid")
    prompt_text = text("prompt_text")
    syn_text = text("syn_text")

    tok_path = text("prompt_speech_token", required=False)
    tokens = _codes(base, tok_path, f"{where}: field 'prompt_speech_token'") if tok_path else None
    syn_tok = text("syn_speech_token", required=False)
    target_tokens = _codes(base, syn_tok, f"{where}: field 'syn_speech_token'") if syn_tok else None

    feat = None
    feat_path = text("prompt_speech_feat", required=False)
    if feat_path:
        feat = _load_npy(_resolve(base, feat_path), f"{where}: field 'prompt_speech_feat'")
        if feat.ndim == 3 and feat.shape[0] == 1:
            feat = feat[0]
        if feat.ndim != 2 or feat.shape[1] != MEL_BINS:
            raise ManifestError(f"{where}: field 'prompt_speech_feat': expected [frames, {MEL_BINS}], got {feat.shape}")
        if not np.isfinite(feat).all():
            raise ManifestError(f"{where}: field 'prompt_speech_feat': contains NaN or inf")
        feat = feat.astype(np.float32)

    emb = None
    emb_path = text("embedding", required=False)
    if emb_path:
        emb = _load_npy(_resolve(base, emb_path), f"{where}: field 'embedding'").reshape(-1)
        if emb.shape != (EMBEDDING_DIM,) or not np.isfinite(emb).all():
            raise ManifestError(f"{where}: field 'embedding': expected {EMBEDDING_DIM} finite values, got {emb.shape}")
        emb = emb.astype(np.float32)

    latent = None
    latent_path = text("prompt_latent", required=False)
    if latent_path:
        latent = _load_npy(_resolve(base, latent_path), f"{where}: field 'prompt_latent'")
        if latent.ndim != 3 or latent.shape[0] == 0 or not np.issubdtype(latent.dtype, np.floating):
            raise ManifestError(
                f"{where}: field 'prompt_latent': expected float latent patches [T, P, D], got shape {latent.shape} "
                f"dtype {latent.dtype}"
            )
        if not np.isfinite(latent).all():
            raise ManifestError(f"{where}: field 'prompt_latent': contains NaN or inf")
        latent = latent.astype(np.float32)
    indextts2 = _indextts2_fields(obj, base, where, text)
    wav = text("prompt_speech", required=False)
    emo_wav = text("emotion_speech", required=False)
    emotion = obj.get("emotion", -1)
    if emotion is None:
        emotion = -1
    if isinstance(emotion, bool) or not isinstance(emotion, int):
        raise ManifestError(f"{where}: field 'emotion' must be an integer label index (-1 = none), got {emotion!r}")
    return PromptRecord(
        uttid=uttid,
        prompt_text=prompt_text,
        target_text=syn_text,
        prompt_speech_tokens=tokens,
        prompt_feat=feat,
        embedding=emb,
        prompt_wav=str(_resolve(base, wav)) if wav else None,
        emotion=None if emotion < 0 else emotion,
        source=where,
        target_speech_tokens=target_tokens,
        prompt_latent=latent,
        prompt_arrays=indextts2,
        emotion_wav=str(_resolve(base, emo_wav)) if emo_wav else None,
    )


def _indextts2_fields(obj: dict, base: Path, where: str, text) -> dict[str, np.ndarray]:
    """IndexTTS2's optional prompt arrays (prompt_semantic [T, D] float, prompt_semantic_code [T] int 0..8191,
    prompt_mel [Tm, 80] float), checked for rank, dtype, range and finiteness; the policy checks D. The lines of one
    voice prompt name the same files (`ttsrl prepare` keys them by prompt): each file is read and checked once and
    its array shared by those lines."""
    out: dict[str, np.ndarray] = {}
    for name in ("prompt_semantic", "prompt_semantic_code", "prompt_mel"):
        path = text(name, required=False)
        if path:
            p = _resolve(base, path)
            stat = p.stat() if p.is_file() else None
            key = (name, str(p.resolve()), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
            if key not in _SHARED:
                if len(_SHARED) >= _SHARED_MAX:
                    _SHARED.pop(next(iter(_SHARED)))
                _SHARED[key] = _indextts2_array(name, p, f"{where}: field '{name}'")
            out[name] = _SHARED[key]
    return out


_SHARED: dict[tuple, np.ndarray] = {}  # IndexTTS2 prompt arrays by (field, file, mtime, size), oldest first
_SHARED_MAX = 4096


def _indextts2_array(name: str, path: Path, what: str) -> np.ndarray:
    """One IndexTTS2 prompt array, read and checked (ManifestError naming the line and field)."""
    ndim, kind = {"prompt_semantic": (2, "f"), "prompt_semantic_code": (1, "i"), "prompt_mel": (2, "f")}[name]
    arr = _load_npy(path, what)
    if arr.ndim != ndim or arr.shape[0] == 0 or arr.dtype.kind not in (kind, "u" if kind == "i" else kind):
        dims = "T, D" if name == "prompt_semantic" else "Tm, 80"
        want = "integer codes [T]" if kind == "i" else f"float [{dims}]"
        raise ManifestError(f"{what}: expected {want}, got shape {arr.shape} dtype {arr.dtype}")
    if kind == "f" and not np.isfinite(arr).all():
        raise ManifestError(f"{what}: contains NaN or inf")
    if kind == "i" and (arr.min() < 0 or arr.max() >= 8192):
        raise ManifestError(f"{what}: codes must be in 0..8191")
    if name == "prompt_mel" and arr.shape[1] != MEL_BINS:
        raise ManifestError(f"{what}: expected [frames, {MEL_BINS}], got {arr.shape}")
    return arr.astype(np.int64 if kind == "i" else np.float32)


def _codes(base: Path, value: str | None, where: str) -> np.ndarray:
    """A .npy of speech codes: a non-empty 1-D integer array (or [1, T]) in [0, NUM_SPEECH_CODES), as int64."""
    tokens = _load_npy(_resolve(base, value or ""), where)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ManifestError(
            f"{where}: expected a non-empty 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
        )
    if tokens.min() < 0 or tokens.max() >= NUM_SPEECH_CODES:
        raise ManifestError(f"{where}: codes must be in [0, {NUM_SPEECH_CODES}), got [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.int64)


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[PromptRecord]:
    """Read every line (blank lines are skipped; any other bad line is an error). Duplicate uttids are errors."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = Path(root) if root else path.parent
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            rec = parse_line(obj, base, where)
            if rec.uttid in seen:
                raise ManifestError(f"{where}: field 'uttid': '{rec.uttid}' already used at {seen[rec.uttid]}")
            seen[rec.uttid] = where
            records.append(rec)
    if not records:
        raise ManifestError(f"{path}: no prompts")
    return records


@dataclass
class PromptStream:
    """Endless stream of manifest indices, reshuffled each epoch from (seed, epoch): resumable from its cursor."""

    size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.epoch)
            take = min(n - len(out), self.size - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.size:
                self.epoch += 1
                self.position = 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
