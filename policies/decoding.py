"""One-token decode steps of the group sampler, over the KV cache of the prefilled prompts.

    DynamicDecoder  transformers' growing cache: every step appends K/V and widens the attention mask
    StaticDecoder   a preallocated cache [rows, kv heads, bucketed length, head dim] written in place and a
                    fixed-size attention mask, so every step of every rollout has the same shapes. With
                    compile=True (`sampling.compile_decode`) the step is compiled once per shape bucket by
                    torch.compile (mode "reduce-overhead": replayed as a CUDA graph on GPU, which removes the
                    per-kernel launch cost that dominates decoding a 1.5 B model at small batch).

Both give the hidden state that predicts the next token, [N, H]; they compute the same function (to float
rounding: the static cache attends over a longer, masked key range). Rows are padded up to a bucket with dummy
rows (one attended pad token) so that re-rolls of a few groups reuse the compiled step.
"""

from __future__ import annotations

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LENGTH_BUCKET = 256  # cache lengths are rounded up to a multiple of this


def bucket_rows(n: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= n), -(-n // 1024) * 1024)


def bucket_length(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


class DynamicDecoder:
    def __init__(self, backbone: torch.nn.Module, cache, attn: torch.Tensor):
        self.backbone, self.cache, self.attn = backbone, cache, attn  # attn: [N, P] bool

    def step(self, feed: torch.Tensor, speech: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        """feed [N] ids of generated token t (pad where the row is done), speech [N] bool (it is a real token),
        pos [N, 1] its positions -> hidden [N, H] that predicts token t + 1."""
        self.attn = torch.cat([self.attn, speech[:, None]], dim=1)
        out = self.backbone(
            input_ids=feed[:, None],
            attention_mask=self.attn.long(),
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.last_hidden_state[:, -1]


def _forward(backbone, ids, attn, pos, cache):
    return backbone(
        input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True
    ).last_hidden_state[:, -1]


_COMPILED: dict[str, object] = {}


def compiled_forward(device_type: str):
    """One compiled step function per device type, shared by every rollout (guards recompile per shape bucket)."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_forward, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[device_type]


class StaticDecoder:
    def __init__(
        self,
        backbone: torch.nn.Module,
        config,
        prefill_cache,
        attn: torch.Tensor,
        repeat: int,
        steps: int,
        *,
        compile: bool = False,
        pool: dict | None = None,
    ):
        """prefill_cache: the dynamic cache of the U distinct prompts, [U, kv heads, P, d] per layer; row r of the
        N = U x repeat rows uses prompt r // repeat. attn: [N, P] bool prompt mask of the rows. pool: caches kept
        between rollouts, one per shape (a compiled step replays on the same cache tensors)."""
        from transformers import StaticCache

        n, p = attn.shape
        self.n, self.p = n, p
        self.rows = bucket_rows(n) if compile else n
        length = bucket_length(p + steps) if compile else p + steps
        self.backbone, self.compile = backbone, compile
        key = (self.rows, length, attn.device, next(backbone.parameters()).dtype)
        if pool is not None and key in pool:
            self.cache = pool[key]
            self.cache.reset()
        else:
            self.cache = StaticCache(config=config, max_cache_len=length)
            if pool is not None:
                pool[key] = self.cache
        for src, dst in zip(prefill_cache.layers, self.cache.layers):
            k, v = src.keys.repeat_interleave(repeat, 0), src.values.repeat_interleave(repeat, 0)
            if self.rows > n:  # dummy rows: they attend to one pad position only (no all-masked softmax)
                k = torch.cat([k, k[:1].expand(self.rows - n, -1, -1, -1)])
                v = torch.cat([v, v[:1].expand(self.rows - n, -1, -1, -1)])
            if not dst.is_initialized:
                dst.lazy_initialization(k, v)
            dst.keys[:, :, :p].copy_(k)
            dst.values[:, :, :p].copy_(v)
            dst.cumulative_length.fill_(p)
        self.attn = torch.zeros((self.rows, length), dtype=torch.long, device=attn.device)
        self.attn[:n, :p] = attn.long()
        self.attn[n:, p - 1] = 1
        self.fn = compiled_forward(attn.device.type) if compile else _forward

    def step(self, feed: torch.Tensor, speech: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.attn[: self.n, self.p + t] = speech.long()
        if self.rows > self.n:
            feed = torch.cat([feed, feed.new_zeros(self.rows - self.n)])
            pos = torch.cat([pos, pos.new_zeros(self.rows - self.n, 1)])
        if self.compile and self.attn.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been read
        hidden = self.fn(self.backbone, feed[:, None], self.attn, pos, self.cache)
        return hidden[: self.n].clone() if self.compile else hidden
