"""Token2Wav: speech codes -> 24 kHz waveforms, batched over a whole step's rollouts.

Loads the upstream layout:
    flow/config.yaml   HyperPyYAML `flow: !new:flow.flow.Flow {...}` (read without executing; sizes from here)
    flow/flow.pt       the flow state dict (raw, or under "model"); strict keys and shapes
    hift/hift.pt       the HiFT state dict; strict keys and shapes (channel widths read from its shapes)

Each item is [voice prompt codes + generated codes] with the prompt's mel as the flow condition and its speaker
embedding. The flow runs all items as one padded, masked batch (optionally in chunks, longest first), then HiFT
does the same; each item's flow and vocoder noise comes from generators seeded with the item's seed (give every
sample of a group the same seed and decoder noise cannot leak into the advantages). A batched item equals the
same item vocoded alone.

Output per item: 480 samples per mel frame, frames = int((Tp + Tg) / 25 * 50) - Tf (upstream's formula: with the
usual Tf = 2 Tp - 1 that is 2 Tg or 2 Tg + 1 frames). Items that cannot be vocoded (no generated codes, codes
out of range, a prompt without mel or embedding) come back as None with a reason; the rest still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollouts.flow import FlowModel
from rollouts.hift import HOP_SAMPLES, SAMPLE_RATE, HiFTGenerator, hift_sizes_from_state
from rollouts.hyperpyyaml import HyperPyYAMLError, expect_object, read_hyperpyyaml
from rollouts.types import VocodeResult


class VocoderCheckpointError(ValueError):
    """A flow/HiFT checkpoint is missing, unreadable, or does not match the model its config describes."""


@dataclass(frozen=True)
class VoicePrompt:
    tokens: np.ndarray  # [Tp] int64 speech codes of the voice prompt
    feat: np.ndarray | None  # [Tf, 80] float32 24 kHz log-mel of the voice prompt
    embedding: np.ndarray | None  # [192] float32 speaker embedding


def strict_load(module: torch.nn.Module, state: dict, where: str) -> None:
    """load_state_dict(strict=True) with one error that lists every missing, unexpected and mis-shaped key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{where}: the checkpoint does not match the model"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]) + more)
        raise VocoderCheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def load_weights_only(
    path: Path, error: type[Exception] = VocoderCheckpointError, what: str = "a weights-only torch checkpoint"
) -> Any:
    """torch.load(weights_only=True) of an untrusted file; a missing or unreadable one is `error` naming it."""
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        raise error(f"{path}: cannot read as {what}: {e}") from None


def load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = load_weights_only(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VocoderCheckpointError(f"{path}: expected a state dict of tensors (raw or under 'model')")
    return dict(obj)


def _legacy_weight_norm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight_g / weight_v (torch.nn.utils.weight_norm) -> parametrizations.weight.original0 / original1."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def load_flow(ckpt_dir: Path) -> FlowModel:
    cfg_path = ckpt_dir / "flow" / "config.yaml"
    if not cfg_path.is_file():
        raise VocoderCheckpointError(f"{cfg_path}: file not found")
    try:
        flow = expect_object(read_hyperpyyaml(cfg_path), "flow", {"flow.flow.Flow": FlowModel}, str(cfg_path))
    except (HyperPyYAMLError, ValueError) as e:
        raise VocoderCheckpointError(str(e)) from None
    strict_load(flow, load_tensor_dict(ckpt_dir / "flow" / "flow.pt"), str(ckpt_dir / "flow" / "flow.pt"))
    return flow.eval()  # inference mode: the estimator's dropout off


def load_hift(ckpt_dir: Path) -> HiFTGenerator:
    path = ckpt_dir / "hift" / "hift.pt"
    state = _legacy_weight_norm_keys(load_tensor_dict(path))
    try:
        sizes = hift_sizes_from_state(state)
    except KeyError as e:
        raise VocoderCheckpointError(f"{path}: no {e.args[0]} weights: this is not a HiFT checkpoint") from None
    hift = HiFTGenerator(**sizes)
    strict_load(hift, state, str(path))
    return hift.eval()


MAX_PADDING = 1.25  # a batch may hold at most 25% padding (compute on padded frames is wasted)


def buckets(lengths: list[int], batch_size: int = 0) -> list[list[int]]:
    """Split positions 0..n-1 of longest-first `lengths` into consecutive batches of at most batch_size items
    (0 = no limit) whose padded size stays within MAX_PADDING x their real size."""
    out: list[list[int]] = []
    for j, n in enumerate(lengths):
        cur = out[-1] if out else None
        if cur is not None and (not batch_size or len(cur) < batch_size):
            longest = lengths[cur[0]]
            if longest * (len(cur) + 1) <= MAX_PADDING * (sum(lengths[k] for k in cur) + n):
                cur.append(j)
                continue
        out.append([j])
    return out


class Token2Wav:
    def __init__(
        self,
        flow: FlowModel,
        hift: HiFTGenerator,
        *,
        device="cpu",
        n_timesteps: int = 10,
        mixed_precision: bool | None = None,
    ):
        """mixed_precision: run the flow under bf16 autocast (None or False: float32, as upstream)."""
        self.device = torch.device(device)
        self.flow = flow.to(self.device).eval().requires_grad_(False)
        self.hift = hift.to(self.device).eval().requires_grad_(False)
        self.n_timesteps = n_timesteps
        self.amp = bool(mixed_precision)
        self.num_codes = flow.num_codes - 1  # valid codes 0..vocab_size-1 (the embedding has vocab_size + 1 rows)

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        device="cpu",
        n_timesteps: int = 10,
        mixed_precision: bool | None = None,
        dtype: str = "float32",
    ) -> Token2Wav:
        """dtype: vocoder.dtype, float32 (upstream) or bfloat16 (flow under bf16 autocast, GPU only)."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"vocoder.dtype: expected float32 or bfloat16, got {dtype!r}")
        ckpt_dir = Path(ckpt_dir)
        amp = (
            mixed_precision
            if mixed_precision is not None
            else (dtype == "bfloat16" and torch.device(device).type == "cuda")
        )
        return cls(
            load_flow(ckpt_dir), load_hift(ckpt_dir), device=device, n_timesteps=n_timesteps, mixed_precision=amp
        )

    def check(self, codes: np.ndarray, prompt: VoicePrompt) -> str | None:
        """Why this item cannot be vocoded (None if it can)."""
        if codes.ndim != 1 or codes.size == 0:
            return "empty generation: no speech codes to vocode"
        if codes.min() < 0 or codes.max() >= self.num_codes:
            return f"speech codes out of range [0, {self.num_codes}): [{codes.min()}, {codes.max()}]"
        if prompt.feat is None or prompt.embedding is None:
            return "voice prompt has no prompt_speech_feat or no embedding (both condition the flow)"
        if prompt.tokens.size == 0:
            return "voice prompt has no speech codes"
        n_frames = self.flow.feat_len(prompt.tokens.size + codes.size) - prompt.feat.shape[0]
        if n_frames <= 0:
            return f"voice prompt mel ({prompt.feat.shape[0]} frames) covers the whole output"
        return None

    @torch.no_grad()
    def __call__(
        self,
        codes: list,  # per item: generated speech codes [Tg] (ints 0..32767)
        prompts: list[VoicePrompt],
        seeds: list[int],  # per item: seeds the item's flow and vocoder noise
        *,
        batch_size: int = 0,  # items per flow/HiFT batch (0 = all at once)
    ) -> VocodeResult:
        if not (len(codes) == len(prompts) == len(seeds)):
            raise ValueError(f"{len(codes)} code sequences, {len(prompts)} prompts and {len(seeds)} seeds")
        arrays = [np.asarray(c, dtype=np.int64).reshape(-1) for c in codes]
        reasons = [self.check(c, p) for c, p in zip(arrays, prompts)]
        audio: list[np.ndarray | None] = [None] * len(arrays)
        todo = [i for i, r in enumerate(reasons) if r is None]
        todo.sort(key=lambda i: -(arrays[i].size + prompts[i].tokens.size))  # longest first
        for chunk in buckets([arrays[i].size + prompts[i].tokens.size for i in todo], batch_size):
            items = [todo[j] for j in chunk]
            for i, wav in zip(
                items, self._run([arrays[i] for i in items], [prompts[i] for i in items], [seeds[i] for i in items])
            ):
                audio[i] = wav
        return VocodeResult(audio=audio, reasons=reasons, sample_rate=SAMPLE_RATE)

    def _run(self, codes: list[np.ndarray], prompts: list[VoicePrompt], seeds: list[int]) -> list[np.ndarray]:
        dev = self.device
        tokens = [torch.from_numpy(np.concatenate([p.tokens.astype(np.int64), c])) for c, p in zip(codes, prompts)]
        feats = [torch.from_numpy(np.asarray(p.feat, dtype=np.float32)) for p in prompts]
        emb = torch.from_numpy(np.stack([np.asarray(p.embedding, dtype=np.float32) for p in prompts])).to(dev)
        flow_gens = [torch.Generator().manual_seed(int(s) % 2**63) for s in seeds]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.amp):
            mels = self.flow.sample(tokens, feats, emb, flow_gens, n_timesteps=self.n_timesteps)
        frames = [m.shape[1] for m in mels]
        batch = torch.zeros(len(mels), mels[0].shape[0], max(frames), device=dev)
        for i, m in enumerate(mels):
            batch[i, :, : m.shape[1]] = m.float()
        voc_gens = [torch.Generator().manual_seed((int(s) * 7919 + 1) % 2**63) for s in seeds]
        wav = self.hift.inference(batch, frames, voc_gens)
        return [wav[i, : n * HOP_SAMPLES].float().cpu().numpy() for i, n in enumerate(frames)]
