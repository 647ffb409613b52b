"""IndexTTS2's GPT (`UnifiedVoice` as released in index-tts `indextts/gpt/model_v2.py`), this project's own code.

Parameter names equal the released `gpt.pth`'s: the GPT-2 core is transformers' stock `GPT2Model` under `gpt.*`
(its token and position tables removed, as released: positions come from the learned `text_pos_embedding` and
`mel_pos_embedding`), `text_embedding`, `mel_embedding`, `final_norm`, `text_head`, `mel_head`, `speed_emb`, the
speaker conditioner (`conditioning_encoder` Conformer + `perceiver_encoder`, 32 latents) and the emotion conditioner
(`emo_conditioning_encoder` + `emo_perceiver_encoder`, 1 latent, `emovec_layer`, `emo_layer`);
policies/indextts2_conditioning.py holds the two conditioners.

Input layout of one row, as released (`prepare_gpt_inputs` + `GPT2InferenceModel`), left-padded in a batch:

    [pad...] [32 speaker latents + emotion vector] [speed_emb(1)] [speed_emb(0)]
             [start_text, BPE ids..., stop_text] (+ text positions 0..L+1)
             [start_mel] (+ mel position 0) [c_0] (+ mel position 2) [c_1] (+ 3) ...

The released inference model adds `mel_pos_embedding(attention_mask length - conditioning length)` to every fed
code, so generated code k sits at mel position k + 2 while the start token sits at 0; its training `forward` uses
positions 0, 1, 2, ... instead. Sampling and teacher forcing here both use the inference convention, so the
teacher-forced log-probs are the ones the codes were sampled from (`mel_positions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from policies.indextts2_conditioning import ConformerEncoder, PerceiverResampler

EMO_DIM = 1024  # the emotion perceiver's width and emovec_layer's input, fixed in the released code
SPK_FEATS = 1024  # w2v-BERT 2.0 features, the conditioners' input size (the released code fixes it; tiny models differ)


class IndexTTS2ConfigError(ValueError):
    """config.yaml's gpt section is incomplete or wrong (the message names the key)."""


@dataclass(frozen=True)
class ConditionModule:
    """gpt.condition_module / gpt.emo_condition_module of config.yaml."""

    output_size: int = 512
    linear_units: int = 2048
    attention_heads: int = 8
    num_blocks: int = 6
    input_layer: str = "conv2d2"
    perceiver_mult: int = 2


@dataclass(frozen=True)
class GPTConfig:
    """The gpt section of the released config.yaml (the keys UnifiedVoice(**cfg.gpt) takes)."""

    model_dim: int = 1280
    max_mel_tokens: int = 1815
    max_text_tokens: int = 600
    heads: int = 20
    layers: int = 24
    number_text_tokens: int = 12000
    number_mel_codes: int = 8194
    start_mel_token: int = 8192
    stop_mel_token: int = 8193
    start_text_token: int = 0
    stop_text_token: int = 1
    use_mel_codes_as_input: bool = True
    mel_length_compression: int = 1024
    train_solo_embeddings: bool = False
    condition_type: str = "conformer_perceiver"
    condition_num_latent: int = 32
    max_conditioning_inputs: int = 1
    types: int = 1
    condition_module: ConditionModule = field(default_factory=ConditionModule)
    emo_condition_module: ConditionModule = field(default_factory=lambda: ConditionModule(num_blocks=4))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> GPTConfig:
        """Strict: unknown keys and wrong types are IndexTTS2ConfigError naming `where` and the key."""
        if not isinstance(data, dict):
            raise IndexTTS2ConfigError(f"{where}: gpt must be a mapping")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("checkpointing", "use_accel"):
                continue  # the released constructor's run-time switches, not architecture
            if key not in known:
                raise IndexTTS2ConfigError(f"{where}: unknown key gpt.{key}")
            if key in ("condition_module", "emo_condition_module"):
                values[key] = _condition_module(value, f"{where}: gpt.{key}")
            else:
                values[key] = _typed(value, type(getattr(cls(), key)), f"{where}: gpt.{key}")
        cfg = cls(**values)
        if cfg.condition_type != "conformer_perceiver":
            raise IndexTTS2ConfigError(
                f"{where}: gpt.condition_type {cfg.condition_type!r}: IndexTTS2 uses conformer_perceiver"
            )
        if not cfg.use_mel_codes_as_input or cfg.train_solo_embeddings or cfg.types != 1:
            raise IndexTTS2ConfigError(f"{where}: only the released IndexTTS2 layout is supported")
        if cfg.model_dim % cfg.heads:
            raise IndexTTS2ConfigError(f"{where}: gpt.model_dim must be a multiple of gpt.heads")
        return cfg


def _typed(value: Any, tp: type, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise IndexTTS2ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise IndexTTS2ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise IndexTTS2ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _condition_module(data: Any, where: str) -> ConditionModule:
    if not isinstance(data, dict):
        raise IndexTTS2ConfigError(f"{where} must be a mapping")
    known = {f.name for f in fields(ConditionModule)}
    bad = sorted(set(data) - known)
    if bad:
        raise IndexTTS2ConfigError(f"{where}: unknown key {bad[0]}")
    return ConditionModule(
        **{k: _typed(v, type(getattr(ConditionModule(), k)), f"{where}.{k}") for k, v in data.items()}
    )


def _conformer(cm: ConditionModule, feat_dim: int) -> ConformerEncoder:
    """A conditioner's Conformer over the w2v-BERT features (1024-d as released), as UnifiedVoice builds it."""
    return ConformerEncoder(
        input_size=feat_dim,
        output_size=cm.output_size,
        linear_units=cm.linear_units,
        attention_heads=cm.attention_heads,
        num_blocks=cm.num_blocks,
        input_layer=cm.input_layer,
    )


class LearnedPositions(nn.Module):
    """A learned position table; `emb.weight` as released."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(length, dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:  # [...] long -> [..., dim]
        return self.emb(positions)


class NullPositions(nn.Module):
    """GPT-2's position table replaced by zeros (positions are added by the learned tables), as released."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, device=position_ids.device)


class IndexGPT(nn.Module):
    """UnifiedVoice's parameters and the pieces sampling and teacher forcing use (see the module docstring)."""

    def __init__(self, cfg: GPTConfig, feat_dim: int = SPK_FEATS):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.cfg, self.feat_dim = cfg, feat_dim
        d, cm, em = cfg.model_dim, cfg.condition_module, cfg.emo_condition_module
        self.conditioning_encoder = _conformer(cm, feat_dim)
        self.perceiver_encoder = PerceiverResampler(
            d,
            dim_context=cm.output_size,
            ff_mult=cm.perceiver_mult,
            heads=cm.attention_heads,
            num_latents=cfg.condition_num_latent,
        )
        self.speed_emb = nn.Embedding(2, d)
        self.emo_conditioning_encoder = _conformer(em, feat_dim)
        self.emo_perceiver_encoder = PerceiverResampler(
            EMO_DIM, dim_context=em.output_size, ff_mult=em.perceiver_mult, heads=em.attention_heads, num_latents=1
        )
        self.text_embedding = nn.Embedding(cfg.number_text_tokens * cfg.types + 1, d)
        self.emo_layer = nn.Linear(d, d)
        self.emovec_layer = nn.Linear(EMO_DIM, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        n_mel = cfg.max_mel_tokens + 2 + cfg.max_conditioning_inputs
        gpt_cfg = GPT2Config(
            vocab_size=256,  # unused: the token table is removed
            n_positions=n_mel + cfg.max_text_tokens + 2,
            n_embd=d,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            resid_pdrop=0.0,  # the released inference runs in eval mode: no dropout; RL needs none (exact ratios)
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=True,
            bos_token_id=None,  # no token table: GPT-2's default ids (50256) name nothing here
            eos_token_id=None,
        )
        self.gpt = GPT2Model(gpt_cfg)
        del self.gpt.wte
        self.gpt.wpe = NullPositions(d)  # type: ignore[assignment]  # zeros: the learned tables add positions
        self.mel_pos_embedding = LearnedPositions(n_mel, d)
        self.text_pos_embedding = LearnedPositions(cfg.max_text_tokens + 2, d)
        self.final_norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.number_text_tokens * cfg.types + 1)
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)

    # --- conditioning -----------------------------------------------------------------------------------------
    def speaker_latents(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """get_conditioning: w2v-BERT features [B, T, 1024] -> [B, 32, D]. `lengths` as the released code passes
        them (infer_v2 passes the feature size, 1024, for every prompt)."""
        x, mask = self.conditioning_encoder(feats, lengths)  # [B, T', C], [B, 1, T']
        mask = torch.nn.functional.pad(mask.squeeze(1), (self.cfg.condition_num_latent, 0), value=True)
        return self.perceiver_encoder(x, mask)

    def emotion_vector(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """get_emovec: emotion features [B, T, 1024] -> [B, D] (conditioner, emovec_layer, emo_layer)."""
        x, mask = self.emo_conditioning_encoder(feats, lengths)
        mask = torch.nn.functional.pad(mask.squeeze(1), (1, 0), value=True)
        latent = self.emo_perceiver_encoder(x, mask).squeeze(1)
        return self.emo_layer(self.emovec_layer(latent))

    def merge_emovec(
        self, spk: torch.Tensor, emo: torch.Tensor, spk_len: torch.Tensor, emo_len: torch.Tensor, alpha: float = 1.0
    ) -> torch.Tensor:
        """The released merge: base + alpha (emotion - base), both through the emotion conditioner. [B, D]"""
        base = self.emotion_vector(spk, spk_len)
        return base + alpha * (self.emotion_vector(emo, emo_len) - base)

    def conditioning(self, latents: torch.Tensor, emovec: torch.Tensor) -> torch.Tensor:
        """[speaker latents + emotion vector][speed_emb(1)][speed_emb(0)]: [B, 32, D], [B, D] -> [B, 34, D]."""
        b = latents.shape[0]
        ones = self.speed_emb(torch.ones(b, dtype=torch.long, device=latents.device))
        zeros = self.speed_emb(torch.zeros(b, dtype=torch.long, device=latents.device))
        return torch.cat([latents + emovec[:, None], ones[:, None], zeros[:, None]], 1)

    def text_inputs(self, ids: list[int]) -> torch.Tensor:
        """[start_text, ids..., stop_text] embedded with text positions 0..L+1: [L + 2, D]."""
        dev = self.text_embedding.weight.device
        t = torch.tensor([self.cfg.start_text_token, *ids, self.cfg.stop_text_token], device=dev)
        return self.text_embedding(t) + self.text_pos_embedding(torch.arange(t.shape[0], device=dev))

    def mel_inputs(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Codes [...] (the start token included) embedded at their mel positions [...] -> [..., D]."""
        return self.mel_embedding(codes) + self.mel_pos_embedding(positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """final_norm + mel_head: [..., D] -> [..., number_mel_codes]."""
        return self.mel_head(self.final_norm(hidden))

    def decode_latents(self, cond: torch.Tensor, text: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
        """The latents s2mel decodes, as the released training `forward` (return_latent) computes them after
        generation: [cond][start_text, ids, stop_text][start_mel, c_0 .. c_{L-2}] at mel positions 0, 1, 2, ...
        (the forward's convention, not the sampler's), final_norm applied. cond [N, C, D], codes [N, L] (speech
        codes only, right-padded with anything) -> [N, L, D]; row i's latents past its own length are not used."""
        n, length = codes.shape
        dev = cond.device
        parts = [torch.cat([cond[i], self.text_inputs(ids)]) for i, ids in enumerate(text)]
        width = max(p.shape[0] for p in parts)
        emb = cond.new_zeros(n, width, cond.shape[-1])
        mask = torch.zeros(n, width + length, dtype=torch.long, device=dev)
        for i, p in enumerate(parts):
            emb[i, width - p.shape[0] :] = p
            mask[i, width - p.shape[0] :] = 1
        start = torch.full((n, 1), self.cfg.start_mel_token, dtype=torch.long, device=dev)
        fed = torch.cat([start, codes[:, :-1].to(dev).clamp(min=0)], 1) if length else start[:, :0]
        x = torch.cat([emb, self.mel_inputs(fed, torch.arange(length, device=dev).expand(n, length))], 1)
        hidden = self.gpt(inputs_embeds=x, attention_mask=mask).last_hidden_state[:, width:]
        return self.final_norm(hidden)


def mel_positions(steps: int, device=None) -> torch.Tensor:
    """The mel positions of [start, c_0, c_1, ...] as the released inference model adds them: 0, 2, 3, ... [steps]"""
    pos = torch.arange(steps, device=device) + 1
    pos[0] = 0
    return pos
