"""Speaker-similarity reward: the seed-tts-eval verification model, WavLM-Large + ECAPA-TDNN (256-d embeddings).

Model: s3prl's WavLM (architecture from `wavlm_cfg`, WavLM-Large by default) gives all hidden states (the input
of every transformer layer and the final output, as s3prl's UpstreamExpert hooks them); a softmax-weighted sum
of them feeds the ECAPA-TDNN head below (instance norm, Conv1d-ReLU-BN, three SE-Res2 blocks with dilation 2/3/4,
concat of blocks 2-4, 1x1 conv, attentive statistics pooling, BN, linear). Weights: `wavlm_large_finetune.pth`
({"model": state dict}); the WavLM part sits under `feature_extract.model.`.

Loading is strict: any missing or unexpected key is an error that lists them (the reference code loads with
strict=False and silently keeps random weights). Training-only keys (`loss_calculator.*`, the speaker
classifier) are the one exception; they are ignored.

Scoring: both waveforms at 16 kHz, whole utterance; cosine between the sample's embedding and its **voice
prompt's**; reward (1 + cos) / 2. Utterances are embedded in padded batches with exact masking (the WavLM
padding mask is set to each utterance's own frame count, and the head normalises, convolves and pools over
valid frames only), so a batch gives the embeddings of one-by-one runs.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewards.asr import ModelDirError
from rewards.base import Sample, ScoreResult, audio_problem, require
from rollouts.audio import resample

SV_RATE = 16000
WAVLM_PREFIX = "feature_extract.model."
IGNORED_PREFIXES = ("loss_calculator.",)
# WavLM-Large (what wavlm_large_finetune.pth was trained on). Shape-derivable fields match the checkpoint;
# max_distance, layer_norm_first and normalize follow microsoft/wavlm-large's configuration.
WAVLM_LARGE = dict(
    extractor_mode="layer_norm",
    encoder_layers=24,
    encoder_embed_dim=1024,
    encoder_ffn_embed_dim=4096,
    encoder_attention_heads=16,
    activation_fn="gelu",
    layer_norm_first=True,
    conv_feature_layers="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    conv_bias=False,
    feature_grad_mult=0.0,
    normalize=True,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=800,
    gru_rel_pos=True,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    dropout_features=0.0,
)
_CONV_SPEC = re.compile(r"^[\[\]\(\)\d\s,+*]+$")


# --- ECAPA-TDNN head --------------------------------------------------------------------------------------------


class ConvReluBn(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x, m):
        return self.bn(F.relu(self.conv(x * m)))


class Res2ConvReluBn(nn.Module):
    def __init__(self, channels: int, dilation: int, scale: int = 8):
        super().__init__()
        self.width, self.nums = channels // scale, scale - 1
        self.convs = nn.ModuleList(
            [nn.Conv1d(self.width, self.width, 3, padding=dilation, dilation=dilation) for _ in range(self.nums)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm1d(self.width) for _ in range(self.nums)])

    def forward(self, x, m):
        spx = torch.split(x, self.width, dim=1)
        out, sp = [], None
        for i in range(self.nums):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = self.bns[i](F.relu(self.convs[i](sp * m)))
            out.append(sp)
        out.append(spx[self.nums])
        return torch.cat(out, dim=1)


class SEConnect(nn.Module):
    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x, m):
        s = (x * m).sum(-1) / m.sum(-1)  # mean over valid frames
        s = torch.sigmoid(self.linear2(F.relu(self.linear1(s))))
        return x * s[..., None]


class SERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int, se_bottleneck: int, scale: int):
        super().__init__()
        self.Conv1dReluBn1 = ConvReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2ConvReluBn(channels, dilation, scale)
        self.Conv1dReluBn2 = ConvReluBn(channels, channels)
        self.SE_Connect = SEConnect(channels, se_bottleneck)

    def forward(self, x, m):
        y = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x, m), m), m)
        return x + self.SE_Connect(y, m)


class AttentiveStatsPool(nn.Module):
    def __init__(self, channels: int, attention: int):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention, kernel_size=1)
        self.linear2 = nn.Conv1d(attention, channels, kernel_size=1)

    def forward(self, x, m):
        logits = self.linear2(torch.tanh(self.linear1(x)))
        alpha = torch.softmax(logits.masked_fill(m == 0, float("-inf")), dim=2)
        mean = (alpha * x).sum(2)
        var = (alpha * x * x).sum(2) - mean * mean
        return torch.cat([mean, torch.sqrt(var.clamp(min=1e-9))], dim=1)


class ECAPAHead(nn.Module):
    """seed-tts-eval's ECAPA_TDNN head on WavLM features (attribute names = checkpoint keys)."""

    def __init__(
        self,
        num_states: int,
        feat_dim: int,
        channels: int = 512,
        emb_dim: int = 256,
        se_bottleneck: int = 128,
        attention: int = 128,
        scale: int = 8,
    ):
        super().__init__()
        self.feature_weight = nn.Parameter(torch.zeros(num_states))
        self.layer1 = ConvReluBn(feat_dim, channels, kernel=5, padding=2)
        self.layer2 = SERes2Block(channels, 2, se_bottleneck, scale)
        self.layer3 = SERes2Block(channels, 3, se_bottleneck, scale)
        self.layer4 = SERes2Block(channels, 4, se_bottleneck, scale)
        self.conv = nn.Conv1d(3 * channels, 3 * channels, kernel_size=1)
        self.pooling = AttentiveStatsPool(3 * channels, attention)
        self.bn = nn.BatchNorm1d(6 * channels)
        self.linear = nn.Linear(6 * channels, emb_dim)

    def forward(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """hidden [L, B, T, F], frame_mask [B, T] bool -> embeddings [B, emb]"""
        w = torch.softmax(self.feature_weight, dim=-1)[:, None, None, None]
        x = (w * hidden).sum(0).transpose(1, 2) + 1e-6  # [B, F, T]
        m = frame_mask[:, None, :].to(x.dtype)
        n = m.sum(-1, keepdim=True)
        mean = (x * m).sum(-1, keepdim=True) / n  # instance norm over valid frames (biased variance)
        var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / n
        x = (x - mean) / torch.sqrt(var + 1e-5)
        out1 = self.layer1(x, m)
        out2 = self.layer2(out1, m)
        out3 = self.layer3(out2, m)
        out4 = self.layer4(out3, m)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1) * m))
        return self.linear(self.bn(self.pooling(out, m)))

    @staticmethod
    def sizes_from_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
        return {
            "num_states": int(state["feature_weight"].shape[0]),
            "feat_dim": int(state["layer1.conv.weight"].shape[1]),
            "channels": int(state["layer1.conv.weight"].shape[0]),
            "emb_dim": int(state["linear.weight"].shape[0]),
            "se_bottleneck": int(state["layer2.SE_Connect.linear1.weight"].shape[0]),
            "attention": int(state["pooling.linear1.weight"].shape[0]),
            "scale": 1
            + len([k for k in state if k.startswith("layer2.Res2Conv1dReluBn.convs.") and k.endswith(".weight")]),
        }


# --- WavLM features -----------------------------------------------------------------------------------------------


class WavLMFeatures(nn.Module):
    """s3prl's WavLM with UpstreamExpert's hidden states, exact over padded batches."""

    def __init__(self, cfg: dict):
        super().__init__()
        try:
            from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig
        except ImportError as e:
            raise ImportError(f"the sim reward needs s3prl: pip install --no-deps s3prl==0.4.18 ({e})") from None

        spec = str(cfg.get("conv_feature_layers", ""))
        if not _CONV_SPEC.match(spec):
            raise ValueError(f"wavlm_cfg.conv_feature_layers must be a list expression of numbers, got {spec!r}")
        self.cfg = WavLMConfig(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = WavLM(self.cfg)
        self.model.feature_grad_mult = 0.0
        self.model.encoder.layerdrop = 0.0
        self.convs = [(int(k), int(s)) for _, k, s in eval(spec, {"__builtins__": {}})]  # noqa: S307 - checked digits

    def frames(self, n: int) -> int:
        for k, s in self.convs:
            n = (n - k) // s + 1
        return n

    def forward(self, wavs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """list of 1-D 16 kHz waveforms -> (hidden states [L + 1, B, T, E], frame mask [B, T])"""
        if self.cfg.normalize:
            wavs = [F.layer_norm(w, w.shape) for w in wavs]
        lens = [w.numel() for w in wavs]
        padded = nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        t = self.frames(padded.shape[1])
        valid = [self.frames(n) for n in lens]
        frame_mask = torch.arange(t, device=padded.device)[None] < torch.tensor(valid, device=padded.device)[:, None]
        # a sample-level mask that WavLM's own conversion turns into exactly `frame_mask`
        chunk = padded.shape[1] // t
        sample_pad = F.pad((~frame_mask).repeat_interleave(chunk, dim=1), (0, padded.shape[1] - t * chunk), value=True)
        states: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda mod, inp, out: states.append(inp[0].transpose(0, 1)))
            for layer in self.model.encoder.layers
        ]
        hooks.append(self.model.encoder.register_forward_hook(lambda mod, inp, out: states.append(out[0])))
        try:
            with warnings.catch_warnings():  # s3prl's attention mixes mask types; its weight norm is the legacy one
                warnings.simplefilter("ignore", UserWarning)
                self.model.extract_features(padded, padding_mask=sample_pad, mask=False)
        finally:
            for h in hooks:
                h.remove()
        return torch.stack(states), frame_mask


# --- the scorer ------------------------------------------------------------------------------------------------


class SpeakerVerifier(nn.Module):
    def __init__(self, checkpoint: str | Path, wavlm_cfg: dict | None = None):
        super().__init__()
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelDirError(f"sim: checkpoint not found: {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected {{'model': state dict}}")
        head_state = {
            k: v for k, v in state.items() if not k.startswith(WAVLM_PREFIX) and not k.startswith(IGNORED_PREFIXES)
        }
        wavlm_state = {k[len(WAVLM_PREFIX) :]: v for k, v in state.items() if k.startswith(WAVLM_PREFIX)}
        try:
            sizes = ECAPAHead.sizes_from_state(head_state)
        except KeyError as e:
            raise ValueError(
                f"{path}: no {e.args[0]}: not a WavLM + ECAPA-TDNN speaker-verification checkpoint"
            ) from None
        self.head = ECAPAHead(**sizes)
        self.features = WavLMFeatures({**WAVLM_LARGE, **(wavlm_cfg or {})})
        problems = []
        for name, module, sub in (("head", self.head, head_state), (WAVLM_PREFIX, self.features.model, wavlm_state)):
            own = module.state_dict()
            missing = [k for k in own if k not in sub]
            unexpected = [k for k in sub if k not in own]
            shapes = [k for k in own if k in sub and tuple(own[k].shape) != tuple(sub[k].shape)]
            prefix = WAVLM_PREFIX if name == WAVLM_PREFIX else ""
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
                if keys:
                    problems.append(f"{title} ({len(keys)}): " + ", ".join(prefix + k for k in keys[:12]))
        if problems:
            raise ValueError(f"{path}: the checkpoint does not match the model:\n  " + "\n  ".join(problems))
        self.head.load_state_dict(head_state, strict=True)
        self.features.model.load_state_dict(wavlm_state, strict=True)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, wavs: list[np.ndarray], batch_size: int = 16) -> torch.Tensor:
        """16 kHz waveforms -> [N, emb] speaker embeddings (length-sorted padded batches)."""
        dev = next(self.parameters()).device
        order = sorted(range(len(wavs)), key=lambda i: -len(wavs[i]))
        out = [None] * len(wavs)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            hidden, mask = self.features([torch.from_numpy(np.asarray(wavs[i], np.float32)).to(dev) for i in idx])
            emb = self.head(hidden, mask)
            for j, i in enumerate(idx):
                out[i] = emb[j]
        return torch.stack(out)


def _key(audio: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(audio).tobytes(), digest_size=16).hexdigest()


class SimScorer:
    needs_prompt_audio = True  # every voice prompt's wav must exist (checked before training)

    def __init__(self, checkpoint: str, wavlm_cfg: dict | None = None, device: str = "cpu", batch_size: int = 16):
        """checkpoint: local wavlm_large_finetune.pth; wavlm_cfg: overrides of the WavLM-Large architecture
        (s3prl WavLMConfig fields); batch_size: utterances per forward."""
        self.check_kwargs(checkpoint=checkpoint, batch_size=batch_size)
        self.model = SpeakerVerifier(checkpoint, wavlm_cfg).to(device)
        self.batch_size = batch_size
        self.prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def check_kwargs(cls, checkpoint: str = "", batch_size: int = 16, **_: object) -> None:
        """Range checks of the constructor's arguments (no model is loaded)."""
        require(
            isinstance(checkpoint, str) and bool(checkpoint),
            "checkpoint",
            "must be the path of a local wavlm_large_finetune.pth",
        )
        require(
            isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1,
            "batch_size",
            f"must be an integer >= 1, got {batch_size!r}",
        )

    def __call__(self, samples: Sequence[Sample]) -> ScoreResult:
        n = len(samples)
        reasons = [audio_problem(s.audio, s.sample_rate) for s in samples]
        for i, s in enumerate(samples):
            if reasons[i] is None:
                p = audio_problem(s.prompt_audio, s.prompt_sample_rate)
                if p is not None:
                    reasons[i] = f"voice prompt: {p}"
        ok = [i for i in range(n) if reasons[i] is None]
        keys = {i: _key(samples[i].prompt_audio) for i in ok}
        new_prompts = {keys[i]: i for i in ok if keys[i] not in self.prompt_cache}
        wavs = [resample(samples[i].audio, samples[i].sample_rate, SV_RATE) for i in ok]
        wavs += [
            resample(samples[i].prompt_audio, samples[i].prompt_sample_rate, SV_RATE) for i in new_prompts.values()
        ]
        emb = self.model.embed(wavs, self.batch_size) if wavs else torch.zeros(0)
        for j, key in enumerate(new_prompts):
            self.prompt_cache[key] = emb[len(ok) + j]
        cos = np.full(n, np.nan)
        values = np.zeros(n)
        for j, i in enumerate(ok):
            c = float(F.cosine_similarity(emb[j][None], self.prompt_cache[keys[i]][None].to(emb.device)))
            cos[i], values[i] = c, (1.0 + c) / 2.0
        return ScoreResult.build(values, reasons, {"cos": cos})
