"""Gradient accumulation with global denominators is exact: micro-batches (and ranks) that each divide their sums by
the whole minibatch's counts (`policy_loss(..., denom=...)`) and sum their gradients give the whole-batch gradient,
for every aggregation, ratio level and with the KL term. A tiny linear "policy" stands in for the model."""

from __future__ import annotations

import pytest
import torch

from rl.losses import LossDenominators, policy_loss

B, T, H, V = 7, 6, 4, 5
LENGTHS = [6, 3, 0, 5, 1, 4, 2]  # varied lengths; row 2 has no valid token
NORM_LEN = 8
AGGS = ("token_mean", "seq_mean", "seq_sum_const")


class Setup:
    """A linear layer producing logits; log-probs of fixed tokens; an anchor and a reference from perturbed copies."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        self.tokens = torch.randint(V, (B, T), generator=g)
        self.lin = torch.nn.Linear(H, V, dtype=torch.float64)
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
        self.mask[0, 2] = False  # a hole inside a sequence, too
        self.adv = torch.randn(B, generator=g, dtype=torch.float64)
        with torch.no_grad():
            w, b = self.lin.weight, self.lin.bias
            self.anchor = self._logp(w + 0.3 * torch.randn(w.shape, generator=g, dtype=w.dtype), b)
            self.ref = self._logp(w + 0.5 * torch.randn(w.shape, generator=g, dtype=w.dtype), b)

    def _logp(self, weight, bias, rows=slice(None)):
        logits = torch.nn.functional.linear(self.x[rows], weight, bias)
        return logits.log_softmax(-1).gather(-1, self.tokens[rows][..., None]).squeeze(-1)

    def logp(self, rows):
        return self._logp(self.lin.weight, self.lin.bias, rows)

    def loss(self, rows, *, agg, ratio_level, kl_coef, denom):
        return policy_loss(
            self.logp(rows),
            self.anchor[rows],
            self.adv[rows],
            self.mask[rows],
            eps_low=0.2,
            eps_high=0.28,
            ratio_level=ratio_level,
            agg=agg,
            norm_len=NORM_LEN,
            kl_coef=kl_coef,
            ref_logp=self.ref[rows] if kl_coef > 0 else None,
            denom=denom,
        )

    def grad(self, rows: torch.Tensor, micro: int, denom: LossDenominators | None, **kw):
        """Backward of each micro-batch's loss over `rows` (micro 0 = one micro-batch), the gradients summed.
        Returns (flat gradient, summed loss, summed pg, summed kl)."""
        self.lin.zero_grad(set_to_none=True)
        total = torch.zeros(3, dtype=torch.float64)
        for mic in torch.split(rows, micro or len(rows)):
            out = self.loss(mic, denom=denom, **kw)
            out.loss.backward()
            total += torch.stack([out.loss.detach(), out.pg.detach(), out.kl.detach()])
        flat = torch.cat([p.grad.flatten() for p in self.lin.parameters()])
        return flat, total


CASES = [(agg, ratio_level, kl) for agg in AGGS for ratio_level in ("token", "sequence") for kl in (0.0, 0.1)]


@pytest.fixture(scope="module")
def setup():
    s = Setup()
    ratio = (s.logp(slice(None)) - s.anchor).exp()[s.mask]
    assert ((ratio < 0.8) | (ratio > 1.28)).any() and ((ratio > 0.8) & (ratio < 1.28)).any()  # the clip binds somewhere
    return s


@pytest.mark.parametrize("agg,ratio_level,kl_coef", CASES)
@pytest.mark.parametrize("micro", [0, 1, 3])
def test_micro_batches_with_global_denominators_give_the_whole_batch_gradient(setup, agg, ratio_level, kl_coef, micro):
    kw = dict(agg=agg, ratio_level=ratio_level, kl_coef=kl_coef)
    rows = torch.arange(B)
    whole, whole_loss = setup.grad(rows, 0, None, **kw)  # one batch, its own (local) denominators
    assert whole.abs().sum() > 0
    glob = LossDenominators.from_mask(setup.mask)
    acc, acc_loss = setup.grad(rows, micro, glob, **kw)
    assert torch.allclose(acc, whole, rtol=0, atol=1e-6), (acc - whole).abs().max()
    assert torch.allclose(acc_loss, whole_loss, rtol=0, atol=1e-9)  # loss, pg and kl shares add up too


@pytest.mark.parametrize("agg,ratio_level,kl_coef", CASES)
@pytest.mark.parametrize("micro", [0, 2])
def test_two_simulated_ranks_summing_gradients_give_the_single_process_gradient(
    setup, agg, ratio_level, kl_coef, micro
):
    kw = dict(agg=agg, ratio_level=ratio_level, kl_coef=kl_coef)
    whole, whole_loss = setup.grad(torch.arange(B), 0, None, **kw)
    shards = [torch.arange(0, 4), torch.arange(4, B)]  # rank 0 holds the row without tokens
    # each rank counts its rows; the global counts are their all-reduce SUM (what the trainer computes)
    counts = [LossDenominators.from_mask(setup.mask[r]) for r in shards]
    glob = LossDenominators(
        tokens=sum(c.tokens for c in counts), seqs=sum(c.seqs for c in counts), rows=sum(c.rows for c in counts)
    )
    assert glob == LossDenominators.from_mask(setup.mask)
    per_rank = [setup.grad(r, micro, glob, **kw) for r in shards]
    summed = per_rank[0][0] + per_rank[1][0]  # all-reduce SUM of the gradients, not mean
    assert torch.allclose(summed, whole, rtol=0, atol=1e-6), (summed - whole).abs().max()
    assert torch.allclose(per_rank[0][1] + per_rank[1][1], whole_loss, rtol=0, atol=1e-9)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_micro_batch_own_denominators_averaged_are_not_the_whole_batch_gradient(setup, agg):
    """The control: each micro-batch's own mean, averaged over micro-batches, is biased when they hold different
    numbers of tokens or sequences; the tests above would catch a loss that silently used local denominators."""
    kw = dict(agg=agg, ratio_level="token", kl_coef=0.0)
    rows = torch.arange(B)
    whole, _ = setup.grad(rows, 0, None, **kw)
    chunks = torch.split(rows, 3)
    naive, _ = setup.grad(rows, 3, None, **kw)
    naive = naive / len(chunks)
    assert not torch.allclose(naive, whole, rtol=0, atol=1e-6)


def test_metrics_stay_local_with_global_denominators(setup):
    rows = torch.arange(3)
    kw = dict(agg="token_mean", ratio_level="token", kl_coef=0.1)
    local = setup.loss(rows, denom=None, **kw)
    shared = setup.loss(rows, denom=LossDenominators.from_mask(setup.mask), **kw)
    assert shared.metrics == pytest.approx(local.metrics)
    own, glob = float(setup.mask[rows].sum()), float(setup.mask.sum())
    assert shared.pg.item() == pytest.approx(local.pg.item() * own / glob)
    assert shared.kl.item() == pytest.approx(local.kl.item() * own / glob)


@pytest.mark.slow
@pytest.mark.parametrize("agg", AGGS)
def test_the_trainer_gives_the_same_update_for_every_micro_batch_size(tmp_path, tiny_ckpt, agg):
    """Through rl/trainer.py: one step with optim.micro_batch_size 0 (whole minibatch), 1 and 3 logs the same loss and
    the same norm of the summed gradient (weights after AdamW's first, sign-like step are no test: a gradient entry
    near 0 flips with rounding). The 2-process equivalence is tests/test_distributed.py."""
    import json

    from conftest import run_config

    from rl.config import DEFAULT_CONFIG, load_config
    from rl.trainer import train

    logged = {}
    for micro in (0, 1, 3):
        cfg, derived = load_config(
            DEFAULT_CONFIG,
            run_config(
                tmp_path / f"m{micro}",
                tiny_ckpt,
                "train.steps=1",
                "vocoder.enabled=false",
                "optim.minibatches=1",
                f"optim.micro_batch_size={micro}",
                f"loss.agg={agg}",
                "dynamic_sampling.mode=off",
                "train.save_every=0",
            ),
        )
        train(cfg, derived, progress=False)
        logged[micro] = json.loads((tmp_path / f"m{micro}" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged[0]["grad_norm"] > 0
    for micro in (1, 3):
        for k in ("loss", "pg_loss", "grad_norm", "clip/low_frac", "clip/high_frac", "ratio/mean", "entropy"):
            assert logged[micro][k] == pytest.approx(logged[0][k], rel=1e-5, abs=1e-7), (micro, k)
