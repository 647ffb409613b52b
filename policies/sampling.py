"""The sampling distribution of a speech LM step, shared by the sampler and the teacher-forced pass.

Logits are over the restricted vocabulary V = [speech codes 0..C-1, stop] (the stop token is the last index).
For one step:

    p  = softmax(logits / T), with stop masked (p(stop) = 0) before the minimum length
    q  = p truncated to its top-k and top-p (nucleus) set S and renormalised; q = p when both are off.
         The nucleus keeps, in descending order, every token whose preceding mass is < top_p (upstream's rule).
    RAS (repetition-aware sampling, VALL-E 2 / CosyVoice): draw y1 ~ q; if y1 occurs >= window * tau times among
         the last `window` generated tokens, draw y ~ p instead. With W the set of such repeated tokens, the
         probability of emitting y is exactly

             P(y) = q(y) [y not in W] + q(W) p(y)

The behaviour log-probability recorded for a sampled token is log P(y) (log q(y) without RAS), i.e. under the
distribution actually sampled from. Teacher forcing evaluates the same formula with the same T, top-k, top-p,
window and minimum length, so before any update the two agree to float precision (ratio = 1). The support S is
recomputed from the current logits; membership carries no gradient, the renormalisation does.

`StepDist` never materialises q or p over V: it keeps the scaled logits, log-sum-exp terms and the support, so a
teacher-forced pass over thousands of positions costs a few passes over [positions, V], and without RAS the
gradient of log q(y) touches only the top-k logits of each position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollouts.types import SamplingParams  # noqa: F401  (re-exported: the samplers take it)

NEG_INF = float("-inf")
# log-probabilities are floored here (e^-10000 = 0 in float32) where they feed logsumexp/logaddexp: those ops
# back-propagate NaN when every input is -inf, even into a zero gradient.
LOGP_FLOOR = -1e4


@dataclass
class StepDist:
    """p and q of M steps, without materialising them over V."""

    scaled: torch.Tensor  # [M, V] logits / T, stop = -inf where not allowed
    lse: torch.Tensor  # [M] logsumexp(scaled): log-normaliser of p
    lse_q: torch.Tensor  # [M] logsumexp(scaled over S): log-normaliser of q
    support: torch.Tensor | None  # [M, K] indices of S (top-k path), None when S is all or a threshold set
    support_ok: torch.Tensor | None  # [M, K] which of those K are in S
    threshold: torch.Tensor | None  # [M, 1] top-p without top-k: S = {scaled >= threshold}
    support_vals: torch.Tensor | None = None  # [M, K] scaled at `support` (the top-k values), when there is one

    def in_support(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [M, J] -> [M, J] bool"""
        if self.support is not None:
            hit = (self.support[:, :, None] == idx[:, None, :]) & self.support_ok[:, :, None]
            return hit.any(1)
        if self.threshold is not None:
            return self.scaled.gather(1, idx) >= self.threshold
        return torch.ones_like(idx, dtype=torch.bool)

    def log_p(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [M, J] -> log p [M, J]"""
        return self.scaled.gather(1, idx) - self.lse[:, None]

    def log_q(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [M, J] -> log q [M, J] (-inf outside S)"""
        if self.support is not None and self.support_vals is not None:
            # read the logit among the K top-k values: the gradient then only touches those (no [M, V] scatter)
            hit = (self.support[:, :, None] == idx[:, None, :]) & self.support_ok[:, :, None]  # [M, K, J]
            x = self.support_vals.gather(1, hit.to(torch.uint8).argmax(1))  # a support index occurs once per row
            return (x - self.lse_q[:, None]).masked_fill(~hit.any(1), NEG_INF)
        lq = self.scaled.gather(1, idx) - self.lse_q[:, None]
        return lq.masked_fill(~self.in_support(idx), NEG_INF)

    def entropy(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Entropy of p (no grad) for `rows` (default: all). [len(rows)]"""
        with torch.no_grad():
            x, lse = (self.scaled, self.lse) if rows is None else (self.scaled[rows], self.lse[rows])
            p = torch.exp(x - lse[:, None])
            return lse - (p * x.masked_fill(p == 0, 0.0)).sum(-1)


def step_distribution(
    logits: torch.Tensor,  # [M, V] raw logits over [codes..., stop]
    stop_allowed: torch.Tensor,  # [M] bool: False before the minimum length
    params: SamplingParams,
) -> StepDist:
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if params.temperature != 1.0:
        x = x / params.temperature
    elif x is logits:
        x = x.clone()  # a new tensor: edited in place below
    # in place on the stop column: its backward passes the gradient through (no [M, V] zeros + copy of a select)
    x[:, -1].masked_fill_(~stop_allowed, NEG_INF)
    lse = torch.logsumexp(x, dim=-1)
    if params.top_k <= 0 and params.top_p >= 1.0:
        return StepDist(x, lse, lse, None, None, None)
    if params.top_k > 0:  # the nucleus lies inside the top-k: select, don't sort the whole vocabulary
        vals, order = x.topk(min(params.top_k, x.shape[-1]), dim=-1)  # descending
        ok = torch.isfinite(vals)
        if params.top_p < 1.0:
            with torch.no_grad():
                probs = torch.exp(vals - lse[:, None])
                ok = ok & ((torch.cumsum(probs, dim=-1) - probs) < params.top_p)
                ok[:, 0] = True
        lse_q = torch.logsumexp(vals.masked_fill(~ok, NEG_INF), dim=-1)
        return StepDist(x, lse, lse_q, order, ok, None, support_vals=vals)
    with torch.no_grad():  # top-p alone: a full sort to find the nucleus' smallest kept value
        vals, _ = x.sort(dim=-1, descending=True, stable=True)
        probs = torch.exp(vals - lse[:, None])
        n_keep = ((torch.cumsum(probs, dim=-1) - probs) < params.top_p).sum(-1, keepdim=True).clamp(min=1)
        threshold = vals.gather(1, n_keep - 1)
    lse_q = torch.logsumexp(x.masked_fill(x < threshold, NEG_INF), dim=-1)
    return StepDist(x, lse, lse_q, None, None, threshold)


def in_window(token: torch.Tensor, history: torch.Tensor, threshold: float) -> torch.Tensor:
    """[M] bool: the token occurs >= threshold times among the window's tokens (history [M, W], -1 = empty)."""
    return ((history == token[:, None]) & (history >= 0)).sum(-1) >= threshold


def first_repeated(history: torch.Tensor, threshold: float) -> torch.Tensor:
    """[M, W] bool: the slot holds a token repeated >= threshold times in the window, and is its first slot."""
    valid = history >= 0
    same = (history[:, :, None] == history[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [M, W, W]
    earlier = torch.tril(same, diagonal=-1).any(-1)  # an earlier slot holds the same token: count it once
    return valid & (same.sum(-1) >= threshold) & ~earlier


def behaviour_logprob(
    dist: StepDist,
    token: torch.Tensor,  # [M] restricted ids
    history: torch.Tensor | None,  # [M, W], None without RAS
    params: SamplingParams,
) -> torch.Tensor:
    """log P(token) under the sampling procedure (see module docstring), floored at LOGP_FLOOR. [M]"""
    if not params.ras:
        return dist.log_q(token[:, None]).squeeze(1).clamp(min=LOGP_FLOOR)
    assert history is not None
    idx = torch.cat([token[:, None], history.clamp(min=0)], dim=1)  # one gather for y and the window
    vals = dist.scaled.gather(1, idx)  # [M, 1 + W]
    lq = (vals - dist.lse_q[:, None]).masked_fill(~dist.in_support(idx), NEG_INF).clamp(min=LOGP_FLOOR)
    lp_y = (vals[:, 0] - dist.lse).clamp(min=LOGP_FLOOR)
    # log q(W): q-mass of the distinct tokens repeated >= threshold times in the window
    log_qw = torch.logsumexp(lq[:, 1:].masked_fill(~first_repeated(history, params.ras_threshold), LOGP_FLOOR), -1)
    direct = lq[:, 0].masked_fill(in_window(token, history, params.ras_threshold), LOGP_FLOOR)
    return torch.logaddexp(direct, (log_qw + lp_y).clamp(min=LOGP_FLOOR))


def sample_step(
    dist: StepDist,
    history: torch.Tensor | None,  # [M, W]
    params: SamplingParams,
    row_keys: torch.Tensor,  # [M] int64: each row's random stream (see row_keys)
    step: int,  # position in the sequence
) -> torch.Tensor:
    """Draw one token per row. [M] restricted ids. A row's draws depend only on its key and the step, never on
    the other rows of the batch: the same sample comes out batched, alone, or on another process."""
    u = uniforms(row_keys, 2 * step)
    if dist.support is not None:  # draw among the K candidates of S
        k = draw(dist.scaled.gather(1, dist.support).masked_fill(~dist.support_ok, NEG_INF), u)
        y = dist.support.gather(1, k[:, None]).squeeze(1)
    elif dist.threshold is not None:
        y = draw(dist.scaled.masked_fill(dist.scaled < dist.threshold, NEG_INF), u)
    else:
        y = draw(dist.scaled, u)
    if not params.ras:
        return y
    assert history is not None
    y_full = draw(dist.scaled, uniforms(row_keys, 2 * step + 1))
    return torch.where(in_window(y, history, params.ras_threshold), y_full, y)


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact inverse-CDF sampling from softmax(logits) with one uniform u in [0, 1) per row: [M, V] -> [M].
    Zero-probability entries are never drawn (the first index whose cumulative mass exceeds u * total)."""
    w = torch.exp(logits.double() - logits.double().max(dim=-1, keepdim=True).values)
    cdf = torch.cumsum(w, dim=-1)
    idx = torch.searchsorted(cdf, u.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return idx.clamp(max=logits.shape[-1] - 1)


# --- counter-based random numbers (splitmix64 on int64 tensors) ------------------------------------------------


def _u64(x: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _u64(0x9E3779B97F4A7C15), _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Bijective 64-bit mixing (int64 arithmetic wraps modulo 2^64)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def row_keys(seed: int, group_ids: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """[M] int64 keys: row j of group g draws from stream (seed, g, j)."""
    k = splitmix64(torch.full_like(group_ids, _u64(seed % (1 << 64)), dtype=torch.int64))
    k = splitmix64(k ^ group_ids.to(torch.int64))
    return splitmix64(k ^ member.to(torch.int64))


def uniforms(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """[M] float64 uniforms in [0, 1), one per key, for this counter value."""
    z = splitmix64(keys ^ _u64(counter % (1 << 64)))
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))
