"""IndexTTS2's released sampling distribution, batched group rollouts with a KV cache, and teacher-forced log-probs.

The released inference (`infer_v2.py` -> `UnifiedVoice.inference_speech` -> transformers' `generate`) samples each
code from the logits of `final_norm + mel_head` processed, in transformers' order, by
    repetition penalty p (10): every id already in the sequence has its logit divided by p (multiplied when < 0);
        the sequence starts with the fake prompt ids (all 1) and start_mel (8192), so ids 1 and 8192 are penalised
        from the first step on, and every generated code after it is sampled;
    temperature T (0.8): logits / T;
    top-k (30): logits below the k-th largest become -inf;
    top-p (0.8): sorted ascending, the tokens whose cumulative probability is <= 1 - top_p are removed, the most
        likely always kept.
The released default also uses 3 beams (beam sampling), which is not a sampling distribution of one sequence:
RL samples one sequence per row without beams. The behaviour log-prob of a code is log softmax of the processed
logits at it; teacher forcing applies the same processing to the recomputed logits (the penalty depends on the
history, which teacher forcing knows), so before any update the two agree. Stop (code 8193) is an action.

Row j of group g draws from stream (seed, g, j) (policies/sampling.py row_keys / uniforms): its draws do not depend
on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.indextts2_model import IndexGPT, mel_positions
from policies.sampling import uniforms

FAKE_PROMPT_ID = 1  # the released generate() is fed all-ones ids for the embedded prompt (penalised as history)
TF_CHUNK = 2048  # teacher forcing processes this many positions' logits at a time (memory: chunk x vocabulary)


@dataclass(frozen=True)
class Sampling:
    """The released generation settings (infer_v2 defaults), beams excluded."""

    temperature: float = 0.8
    top_k: int = 30
    top_p: float = 0.8
    repetition_penalty: float = 10.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("IndexTTS2 sampling: temperature > 0, top_k >= 0, top_p in (0, 1], penalty > 0")


def processed_logits(logits: torch.Tensor, seen: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The released logits processing, in transformers' order. logits [M, V] (float32 math), seen [M, V] bool
    (ids in the history) -> [M, V] with -inf where top-k / top-p removed a token. Differentiable in the kept ones."""
    x = logits.float()
    if s.repetition_penalty != 1.0:
        p = s.repetition_penalty
        x = torch.where(seen, torch.where(x < 0, x * p, x / p), x)
    if s.temperature != 1.0:
        x = x / s.temperature
    if s.top_k > 0:
        k = min(s.top_k, x.shape[-1])
        kth = torch.topk(x.detach(), k, dim=-1).values[..., -1:]
        x = x.masked_fill(x.detach() < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x.detach(), dim=-1)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - s.top_p
        drop_sorted[..., -1] = False  # min_tokens_to_keep = 1
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def _prefix(model: IndexGPT, cond: torch.Tensor, text: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[pad][conditioning][text] per row, left-padded: (embeddings [N, P, D], mask [N, P] bool)."""
    parts = [torch.cat([cond[i], model.text_inputs(ids)]) for i, ids in enumerate(text)]
    width = max(p.shape[0] for p in parts)
    emb = cond.new_zeros(len(parts), width, cond.shape[-1])
    mask = torch.zeros(len(parts), width, dtype=torch.bool, device=cond.device)
    for i, p in enumerate(parts):
        emb[i, width - p.shape[0] :] = p
        mask[i, width - p.shape[0] :] = True
    return emb, mask


def _initial_seen(n: int, v: int, start: int, device) -> torch.Tensor:
    seen = torch.zeros(n, v, dtype=torch.bool, device=device)
    seen[:, FAKE_PROMPT_ID] = True
    seen[:, start] = True
    return seen


@dataclass
class Sampled:
    """N rows: codes [N, T] (the stop code included, then padding), mask [N, T], behaviour log-probs [N, T],
    lengths [N] (speech codes, stop excluded), finished [N] (stopped), truncated [N]."""

    codes: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    truncated: torch.Tensor


@torch.no_grad()
def sample_rows(
    model: IndexGPT,
    cond: torch.Tensor,  # [N, C, D] each row's conditioning (speaker latents + emotion, speed)
    text: list[list[int]],  # per row its BPE ids
    s: Sampling,
    keys: torch.Tensor,  # [N] int64 random-stream keys (policies/sampling.py row_keys)
    max_len: torch.Tensor,  # [N] a row is truncated at this many speech codes
) -> Sampled:
    """Every row in one left-padded batch with a KV cache (the released sampler's distribution, one sequence per
    row). The conditioning of a group's rows is the same, so the prefix could be shared; rows are few next to the
    codes they generate, so the prefix runs once per row."""
    cfg, dev = model.cfg, cond.device
    n, v = cond.shape[0], cfg.number_mel_codes
    emb, mask = _prefix(model, cond, text)
    start = torch.full((n, 1), cfg.start_mel_token, device=dev)
    emb = torch.cat([emb, model.mel_inputs(start, torch.zeros_like(start))], 1)
    attn = torch.cat([mask, torch.ones(n, 1, dtype=torch.bool, device=dev)], 1).long()
    out = model.gpt(inputs_embeds=emb, attention_mask=attn, use_cache=True)
    hidden, cache = out.last_hidden_state[:, -1], out.past_key_values
    steps = int(max_len.max()) + 1  # the stop code may follow the last speech code
    codes = torch.full((n, steps), cfg.stop_mel_token, dtype=torch.long, device=dev)
    logp = torch.zeros(n, steps, device=dev)
    tmask = torch.zeros(n, steps, dtype=torch.bool, device=dev)
    seen = _initial_seen(n, v, cfg.start_mel_token, dev)
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    truncated = torch.zeros(n, dtype=torch.bool, device=dev)
    lengths = torch.zeros(n, dtype=torch.long, device=dev)
    keys = keys.to(dev)
    for t in range(steps):
        active = ~(finished | truncated)
        x = processed_logits(model.logits(hidden), seen, s)
        lp_all = F.log_softmax(x, -1)
        u = uniforms(keys, t).to(dev)
        cdf = lp_all.exp().double().cumsum(-1)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1).clamp(max=v - 1)
        tok = torch.where(lp_all.gather(1, tok[:, None]).squeeze(1).isfinite(), tok, lp_all.argmax(-1))
        codes[:, t] = torch.where(active, tok, codes[:, t])
        logp[:, t] = torch.where(active, lp_all.gather(1, tok[:, None]).squeeze(1), logp[:, t])
        tmask[:, t] = active
        stop = active & (tok == cfg.stop_mel_token)
        speech = active & ~stop
        finished |= stop
        lengths += speech.long()
        truncated |= speech & (lengths >= max_len.to(dev))
        seen[speech, tok[speech]] = True
        if bool((finished | truncated).all()) or t == steps - 1:
            break
        fed = torch.where(speech, tok, torch.full_like(tok, cfg.stop_mel_token))
        attn = torch.cat([attn, speech[:, None].long()], 1)
        pos = torch.full((n, 1), t + 2, device=dev)  # the released inference positions: code k at k + 2
        out = model.gpt(
            inputs_embeds=model.mel_inputs(fed[:, None], pos),
            attention_mask=attn,
            past_key_values=cache,
            use_cache=True,
        )
        hidden, cache = out.last_hidden_state[:, -1], out.past_key_values
    width = int(tmask.sum(1).max()) if n else 0
    return Sampled(codes[:, :width], tmask[:, :width], logp[:, :width], lengths, finished, truncated)


def teacher_forced_logprobs(
    model: IndexGPT,
    cond: torch.Tensor,  # [N, C, D]
    text: list[list[int]],
    codes: torch.Tensor,  # [N, T] sampled codes (stop included), padded
    mask: torch.Tensor,  # [N, T] bool
    s: Sampling,
    *,
    positions: str = "inference",
) -> torch.Tensor:
    """Log-probs [N, T] (0 where masked) of the codes under `model`, with grad: one GPT pass over
    [prefix][start, c_0 .. c_{T-2}] at the released inference positions (0, 2, 3, ...) and the sampler's logits
    processing with each step's history. positions="forward" uses the released training forward's positions
    (0, 1, 2, ...), which the codes were NOT sampled from (tests show the difference)."""
    cfg, dev = model.cfg, cond.device
    n, t = codes.shape
    if t == 0:
        return torch.zeros(n, 0, device=dev)
    emb, pmask = _prefix(model, cond, text)
    fed = torch.cat([torch.full((n, 1), cfg.start_mel_token, device=dev), codes[:, :-1].to(dev)], 1)
    fed = torch.where(fed >= 0, fed, torch.full_like(fed, cfg.stop_mel_token))
    pos = mel_positions(t, dev) if positions == "inference" else torch.arange(t, device=dev)
    x = torch.cat([emb, model.mel_inputs(fed, pos.expand(n, t))], 1)
    attn = torch.cat([pmask, torch.ones(n, 1, dtype=torch.bool, device=dev), mask[:, :-1].to(dev)], 1).long()
    hidden = model.gpt(inputs_embeds=x, attention_mask=attn).last_hidden_state[:, emb.shape[1] :]
    logits = model.logits(hidden).reshape(n * t, -1)  # [N T, V]
    v = logits.shape[-1]
    target = codes.to(dev).clamp(min=0)
    # the ids before step t: the generated codes c_0 .. c_{t-1} (a row's stop code is its last: never history),
    # plus the fake prompt id and start_mel; padded steps are masked out of the loss
    steps = torch.arange(t, device=dev)
    first = torch.full((n, v), t, dtype=torch.long, device=dev)  # the first step each id is generated at
    first.scatter_reduce_(1, target, steps.expand(n, t), reduce="amin")
    flat_target = target.reshape(-1, 1)
    parts = []
    for p0 in range(0, n * t, TF_CHUNK):  # the processing's temporaries (sorts, cumsums) a chunk at a time
        pos = torch.arange(p0, min(n * t, p0 + TF_CHUNK), device=dev)
        seen = (pos % t)[:, None] > first[pos // t]  # [chunk, V] bool
        seen[:, FAKE_PROMPT_ID] = True
        seen[:, cfg.start_mel_token] = True
        x = processed_logits(logits[pos], seen, s)
        parts.append(F.log_softmax(x, -1).gather(1, flat_target[pos]))
    lp = torch.cat(parts).reshape(n, t)
    return torch.where(mask.to(dev), lp, torch.zeros_like(lp))
