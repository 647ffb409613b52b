"""The GLM-TTS flow-matching model: speech tokens -> 50 Hz log-mel, written so that the upstream `flow/flow.pt`
state dict loads with strict key and shape matching (every key below `estimator.`).

Architecture (a DiT): token embedding (codes 0..32767, rows = vocab_size + 1), nearest interpolation of the token
ids to the mel length, a sinusoidal table and ConvNeXtV2 blocks; the input is proj([noisy mel, prompt-mel
condition, token embedding]) plus a convolutional position embedding; AdaLN-zero transformer blocks conditioned
on [time embedding, L2-normalised 192-d speaker embedding] with rotary attention (rotary on the first `dim_head`
channels of the un-split projection, adjacent pairs, base 10000); final AdaLN and a projection to 80 mels.
Sampling integrates the ODE with Euler steps on a cosine t-schedule and classifier-free guidance (the
unconditional branch zeroes the prompt mel and the speaker embedding, and the tokens when speech_token_cfg).

Unlike upstream (one utterance at a time, no masks), `sample()` runs a padded batch: every position-mixing op
(convolutions, GRN's time norm, attention keys) only sees each row's own frames, and each row draws its noise
from its own generator. A row of a batch therefore gets the same mel as the row run alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SPEAKER_DIM = 192


# --- building blocks -----------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, D]
        half = self.freq_dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        arg = 1000.0 * t[:, None].float() * freqs[None]
        return self.time_mlp(torch.cat([arg.sin(), arg.cos()], dim=-1))


class GRN(nn.Module):
    """Global response normalisation; the L2 norm runs over each row's valid frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T, C], [B, T, 1]
        g = torch.norm(x * mask, p=2, dim=1, keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, inner)
        self.act = nn.GELU()
        self.grn = GRN(inner)
        self.pwconv2 = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.dwconv((x * mask).transpose(1, 2)).transpose(1, 2)
        y = self.act(self.pwconv1(self.norm(y)))
        return x + self.pwconv2(self.grn(y, mask))


class TextEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, conv_layers: int, max_pos: int = 4096):
        super().__init__()
        self.text_embed = nn.Embedding(vocab_size + 1, dim)
        f = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        ang = torch.outer(torch.arange(max_pos), f).float()
        self.register_buffer("freqs_cis", torch.cat([ang.cos(), ang.sin()], dim=-1), persistent=False)
        self.text_blocks = nn.Sequential(*[ConvNeXtV2Block(dim, 2 * dim) for _ in range(conv_layers)])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T] aligned ids
        h = self.text_embed(tokens)
        if len(self.text_blocks):
            pos = torch.arange(tokens.shape[1], device=tokens.device).clamp(max=self.freqs_cis.shape[0] - 1)
            h = h + self.freqs_cis[pos]
            for block in self.text_blocks:
                h = block(h, mask)
        return h


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel: int = 31, groups: int = 16):
        super().__init__()
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, kernel, groups=groups, padding=kernel // 2),
            nn.Mish(),
            nn.Conv1d(dim, dim, kernel, groups=groups, padding=kernel // 2),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        m = mask.transpose(1, 2)
        h = x.transpose(1, 2) * m
        h = self.conv1d[1](self.conv1d[0](h)) * m
        h = self.conv1d[3](self.conv1d[2](h))
        return h.transpose(1, 2)


class EmbeddingConcater(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.conv_pos_embed = ConvPositionEmbedding(dim)

    def forward(self, x, cond, text, mask):
        z = self.proj(torch.cat([x, cond, text], dim=-1))
        return self.conv_pos_embed(z, mask) + z


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, length: int, device) -> torch.Tensor:  # [T, dim]: θ0, θ0, θ1, θ1, ...
        t = torch.arange(length, device=device).float()
        freqs = torch.outer(t, self.inv_freq.float())
        return torch.stack([freqs, freqs], dim=-1).reshape(length, -1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first freqs.shape[-1] channels of x [B, T, C] in adjacent pairs; the rest pass through."""
    d = freqs.shape[-1]
    rot, rest = x[..., :d].float(), x[..., d:]
    pairs = rot.reshape(*rot.shape[:-1], d // 2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(rot.shape)
    out = rot * freqs.cos() + rotated * freqs.sin()
    return torch.cat([out.to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.1):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x, rope, mask, key_mask):
        b, t, _ = x.shape
        q = apply_rotary(self.to_q(x), rope)
        k = apply_rotary(self.to_k(x), rope)
        v = self.to_v(x)
        q, k, v = (z.view(b, t, self.heads, self.dim_head).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        o = self.to_out[1](self.to_out[0](o.transpose(1, 2).reshape(b, t, -1)))
        return o * mask


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float, dropout: float = 0.1):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Dropout(dropout),
            nn.Linear(inner, dim),
        )

    def forward(self, x):
        return self.ff(x)


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int, cond_extra: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim + cond_extra, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(c)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int, cond_extra: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim + cond_extra, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, c):
        scale, shift = self.linear(self.silu(c)).chunk(2, dim=1)  # scale first
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: float, cond_extra: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim, cond_extra)
        self.attn = Attention(dim, heads, dim_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, c, rope, mask, key_mask):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, c)
        x = x + gate_msa[:, None] * self.attn(norm, rope, mask, key_mask)
        norm = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(norm)


class DiT(nn.Module):
    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: float,
        mel_dim: int,
        text_vocab_size: int,
        text_emb_dim: int,
        conv_layers: int,
        condition_dim: int,
        spkr_emb_adaLN: bool,
    ):
        super().__init__()
        cond_extra = SPEAKER_DIM if spkr_emb_adaLN else 0
        self.spkr_emb_adaLN = spkr_emb_adaLN
        self.time_embed = TimestepEmbedding(dim)
        self.text_emb_layer = TextEmbedding(text_vocab_size, text_emb_dim, conv_layers)
        self.emb_concator = EmbeddingConcater(mel_dim + text_emb_dim + condition_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(dim, heads, dim_head, ff_mult, cond_extra) for _ in range(depth)]
        )
        self.norm_out = AdaLayerNormZeroFinal(dim, cond_extra)
        self.proj_out = nn.Linear(dim, mel_dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, M] noisy mel
        cond: torch.Tensor,  # [B, T, C]
        tokens: torch.Tensor,  # [B, T] token ids already aligned to the mel frames
        t: torch.Tensor,  # [B]
        mask: torch.Tensor,  # [B, T] bool, valid frames
        spk: torch.Tensor | None,  # [B, 192] normalised speaker embedding
    ) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        c = self.time_embed(t)
        if self.spkr_emb_adaLN:
            c = torch.cat([c, spk], dim=-1)
        h = self.emb_concator(x, cond, self.text_emb_layer(tokens, m), m)
        rope = self.rotary_embed(x.shape[1], x.device)
        key_mask = None if bool(mask.all()) else mask[:, None, None, :]
        for block in self.transformer_blocks:
            h = block(h, c, rope, m, key_mask)
        return self.proj_out(self.norm_out(h, c))


# --- the flow model --------------------------------------------------------------------------------------------------


class FlowModel(nn.Module):
    """Constructor arguments are upstream `flow.flow.Flow`'s, plus the DiT sizes upstream hard-codes (trans_dim,
    depth, heads, dim_head, ff_mult, conv_layers), whose defaults are upstream's (768/18/12/64/2/4, or
    1024/22/16 with big_model)."""

    def __init__(
        self,
        speech_token_dim: int = 512,
        vocab_size: int = 100000,
        input_frame_rate: float = 12.5,
        spk_embed_dim: int = 80,
        mel_dim: int = 80,
        big_model: bool = False,
        spkr_emb_adaLN: bool = False,
        calc_prompt_mel_loss: bool = True,
        speech_token_cfg: bool = True,
        use_wavlm_emb: bool = False,
        remove_spkr_concat_condition: bool = False,
        t_scheduler: str = "cosine",
        loss_type: str = "l2",
        use_mdt: bool = False,
        mel_framerate: float = 86,
        trans_dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        dim_head: int = 64,
        ff_mult: float = 2,
        conv_layers: int = 4,
    ):
        super().__init__()
        if use_wavlm_emb:
            raise ValueError("use_wavlm_emb=True (WavLM speaker features) is not supported")
        if t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"t_scheduler must be 'cosine' or 'linear', got {t_scheduler!r}")
        self.input_frame_rate = input_frame_rate
        self.mel_framerate = mel_framerate
        self.mel_dim = mel_dim
        self.speech_token_cfg = speech_token_cfg
        self.t_scheduler = t_scheduler
        self.inference_cfg_rate = 0.7
        self.concat_speaker = not remove_spkr_concat_condition
        if self.concat_speaker:
            self.spk_embed_affine_layer = nn.Linear(SPEAKER_DIM, spk_embed_dim)
        self.estimator = DiT(
            dim=trans_dim or (1024 if big_model else 768),
            depth=depth or (22 if big_model else 18),
            heads=heads or (16 if big_model else 12),
            dim_head=dim_head,
            ff_mult=ff_mult,
            mel_dim=mel_dim,
            text_vocab_size=vocab_size,
            text_emb_dim=speech_token_dim,
            conv_layers=conv_layers,
            condition_dim=mel_dim if remove_spkr_concat_condition else mel_dim + spk_embed_dim,
            spkr_emb_adaLN=spkr_emb_adaLN,
        )

    @property
    def num_codes(self) -> int:
        return self.estimator.text_emb_layer.text_embed.num_embeddings

    def feat_len(self, num_tokens: int) -> int:
        """Mel frames for `num_tokens` tokens, computed exactly as upstream (floats can give 2N - 1)."""
        return int(num_tokens / self.input_frame_rate * self.mel_framerate)

    def t_span(self, n_timesteps: int, device) -> torch.Tensor:
        t = torch.linspace(0, 1, n_timesteps + 1, device=device)
        return 1 - torch.cos(t * 0.5 * torch.pi) if self.t_scheduler == "cosine" else t

    def conditions(
        self,
        tokens: list[torch.Tensor],  # per item [N_i] long: prompt codes followed by generated codes
        prompt_feats: list[torch.Tensor],  # per item [P_i, M] prompt mel
        embeddings: torch.Tensor,  # [B, 192] raw speaker embeddings
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The estimator's conditions, as upstream builds them: (cond [B, T, C] prompt mel (+ projected speaker),
        aligned [B, T] token ids at the mel frames, spk [B, 192] normalised, mask [B, T], frames per item)."""
        device = embeddings.device
        b = len(tokens)
        lens = [self.feat_len(int(tok.numel())) for tok in tokens]
        t_max = max(lens)
        mask = torch.zeros(b, t_max, dtype=torch.bool, device=device)
        aligned = torch.zeros(b, t_max, dtype=torch.long, device=device)
        cond = torch.zeros(b, t_max, self.mel_dim, device=device)
        for i, (tok, pf, n) in enumerate(zip(tokens, prompt_feats, lens)):
            mask[i, :n] = True
            aligned[i, :n] = F.interpolate(tok.to(device)[None, None].float(), size=n, mode="nearest")[0, 0].long()
            k = min(pf.shape[0], n)
            if k:
                cond[i, :k] = pf[-k:].to(device)
        spk = F.normalize(embeddings.float(), dim=1)
        if self.concat_speaker:
            cond = torch.cat([cond, self.spk_embed_affine_layer(spk)[:, None].expand(-1, t_max, -1)], dim=-1)
        return cond, aligned, spk, mask, lens

    @torch.no_grad()
    def sample(
        self,
        tokens: list[torch.Tensor],  # per item [N_i] long: prompt codes followed by generated codes
        prompt_feats: list[torch.Tensor],  # per item [P_i, M] prompt mel
        embeddings: torch.Tensor,  # [B, 192] raw speaker embeddings
        generators: list[torch.Generator],  # one per item: the noise source (seed it per group)
        n_timesteps: int = 10,
    ) -> list[torch.Tensor]:
        """Mel for each item after its prompt: list of [M, feat_len(N_i) - P_i]."""
        device = embeddings.device
        b = len(tokens)
        cond, aligned, spk, mask, lens = self.conditions(tokens, prompt_feats, embeddings)
        x = torch.zeros(b, mask.shape[1], self.mel_dim, device=device)
        for i, n in enumerate(lens):
            x[i, :n] = torch.randn(n, self.mel_dim, generator=generators[i], device=generators[i].device).to(device)
        # conditional and unconditional branches as one batch of 2B rows
        cond2 = torch.cat([cond, torch.zeros_like(cond)])
        tok2 = torch.cat([aligned, torch.zeros_like(aligned) if self.speech_token_cfg else aligned])
        spk2 = torch.cat([spk, torch.zeros_like(spk)])
        mask2 = torch.cat([mask, mask])
        t_span = self.t_span(n_timesteps, device)
        t, dt = t_span[0], t_span[1] - t_span[0]
        w = self.inference_cfg_rate
        for step in range(1, n_timesteps + 1):
            v = self.estimator(torch.cat([x, x]), cond2, tok2, t.expand(2 * b), mask2, spk2)
            v_c, v_u = v[:b], v[b:]
            x = x + dt * ((1.0 + w) * v_c - w * v_u)
            t = t + dt
            if step < n_timesteps:
                dt = t_span[step + 1] - t
        return [x[i, pf.shape[0] : n].T.contiguous() for i, (pf, n) in enumerate(zip(prompt_feats, lens))]
