"""The clipped policy loss against hand-computed values."""

import math

import pytest
import torch

from rl.losses import LossDenominators, agg_loss, policy_loss

# ratios [[1.5, 0.5, 1.0], [1.1, 0.7, (masked)]], anchor 0, advantages [+1, -1], eps 0.2 / 0.3
RATIOS = [[1.5, 0.5, 1.0], [1.1, 0.7, 1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])


def inputs():
    logp = torch.tensor([[math.log(r) for r in row] for row in RATIOS], dtype=torch.float64, requires_grad=True)
    anchor = torch.zeros(2, 3, dtype=torch.float64)
    return logp, anchor


# per-token losses: row 0 (A=+1): -min(r, clip(r)) = [-1.3, -0.5, -1.0]
#                   row 1 (A=-1): max(r, clip(r))   = [1.1, 0.8]
ROW0 = [-1.3, -0.5, -1.0]
ROW1 = [1.1, 0.8]


def test_token_mean_hand_computed_and_sign_aware_clip_fractions():
    logp, anchor = inputs()
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3)
    assert out.loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5)
    # high: ratio 1.5 > 1.3 with A > 0 (1 of 5). low: 0.7 < 0.8 with A < 0 (1 of 5); 0.5 < 0.8 has A > 0: not counted
    assert out.metrics["clip/high_frac"] == pytest.approx(0.2)
    assert out.metrics["clip/low_frac"] == pytest.approx(0.2)
    assert out.metrics["ratio/mean"] == pytest.approx(4.8 / 5)
    assert out.metrics["ratio/min"] == pytest.approx(0.5) and out.metrics["ratio/max"] == pytest.approx(1.5)
    assert out.metrics["kl"] == 0.0


def test_gradient_only_through_unclipped_tokens():
    logp, anchor = inputs()
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3)
    out.loss.backward()
    # d/dlogp of -A*r/5 where unclipped: (0,1) -> -0.5/5, (0,2) -> -1/5, (1,0) -> +1.1/5; clipped/masked -> 0
    expected = torch.tensor([[0.0, -0.1, -0.2], [0.22, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-9)


def test_seq_mean_and_seq_sum_const():
    logp, anchor = inputs()
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_mean")
    assert out.loss.item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2)
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_sum_const", norm_len=4)
    assert out.loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / (2 * 4))
    with pytest.raises(ValueError, match="norm_len"):
        policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_sum_const")


def test_sequence_level_ratio_gspo():
    logp, anchor = inputs()
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, ratio_level="sequence")
    r0 = 0.75 ** (1 / 3)  # geometric mean of 1.5, 0.5, 1.0 -> inside [0.8, 1.3]
    r1 = 0.77**0.5  # geometric mean of 1.1, 0.7
    assert out.loss.item() == pytest.approx((3 * -r0 + 2 * r1) / 5)
    assert out.metrics["ratio/min"] == pytest.approx(r1)


def test_k3_kl_to_reference():
    logp, anchor = inputs()
    ref = torch.zeros(2, 3, dtype=torch.float64)
    k3 = lambda r: 1 / r + math.log(r) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref = 0  # noqa: E731
    kl = sum(k3(r) for r in [1.5, 0.5, 1.0, 1.1, 0.7]) / 5
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.1, ref_logp=ref)
    assert out.metrics["kl"] == pytest.approx(kl)
    assert out.loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5 + 0.1 * kl)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.1)


def test_gradient_flows_only_through_logp():
    logp, _ = inputs()
    anchor = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = ADV.clone().double().requires_grad_(True)
    ref = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    out = policy_loss(logp, anchor, adv, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.5, ref_logp=ref)
    out.loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert anchor.grad is None and adv.grad is None and ref.grad is None


def test_old_policy_anchor_ratio_one_means_no_clip_and_plain_policy_gradient():
    logp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    out = policy_loss(logp, logp.detach(), adv, mask, eps_low=0.0, eps_high=0.0)
    m = out.metrics
    assert m["clip/low_frac"] == 0 and m["clip/high_frac"] == 0 and m["ratio/max"] == pytest.approx(1.0)
    out.loss.backward()
    assert torch.allclose(logp.grad, (-adv[:, None] / 15).expand(3, 5))


def test_masked_padding_with_nan_or_inf_cannot_poison_the_loss():
    logp = torch.tensor([[0.0, float("-inf")], [0.1, float("nan")]], requires_grad=True)
    anchor = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    out = policy_loss(
        logp, anchor, torch.tensor([1.0, 1.0]), mask, eps_low=0.2, eps_high=0.3, kl_coef=1.0, ref_logp=torch.zeros(2, 2)
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), MASK, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), MASK, eps_low=0.2, eps_high=0.2)


# ---- agg_loss and global denominators ------------------------------------------------------------------------------

# per-token losses of 3 rows; row 1's last entry and all of row 2 are masked (NaN/inf there must not leak)
PT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")], [7.0, float("inf"), 7.0]], dtype=torch.float64)
PT_MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
# a minibatch this micro-batch is part of: 10 valid tokens, 4 sequences with tokens, 6 rows; norm_len 5
GLOBAL = LossDenominators(tokens=10, seqs=4, rows=6, norm_len=5)


def test_agg_loss_with_global_denominators_hand_computed():
    # valid sum 1+2+3+4+5 = 15; per-sequence means 6/3 = 2 and 9/2 = 4.5 (row 2 has no tokens: adds nothing)
    assert agg_loss(PT, PT_MASK, "token_mean", GLOBAL).item() == pytest.approx(15 / 10)  # 1.5
    assert agg_loss(PT, PT_MASK, "seq_mean", GLOBAL).item() == pytest.approx((2 + 4.5) / 4)  # 1.625
    assert agg_loss(PT, PT_MASK, "seq_sum_const", GLOBAL).item() == pytest.approx(15 / (6 * 5))  # 0.5


def test_agg_loss_with_own_denominators_is_the_batch_mean():
    own = LossDenominators.from_mask(PT_MASK, norm_len=5)
    assert (own.tokens, own.seqs, own.rows, own.norm_len) == (5.0, 2.0, 3.0, 5)
    assert agg_loss(PT, PT_MASK, "token_mean", own).item() == pytest.approx(15 / 5)  # 3
    assert agg_loss(PT, PT_MASK, "seq_mean", own).item() == pytest.approx((2 + 4.5) / 2)  # 3.25
    assert agg_loss(PT, PT_MASK, "seq_sum_const", own).item() == pytest.approx(15 / (3 * 5))  # 1


def test_agg_loss_shares_add_up_to_the_whole():
    # rows {0} and {1, 2} as two micro-batches under the whole batch's denominators: 6/5 + 9/5 = 15/5 etc.
    own = LossDenominators.from_mask(PT_MASK, norm_len=5)
    for agg in ("token_mean", "seq_mean", "seq_sum_const"):
        parts = agg_loss(PT[:1], PT_MASK[:1], agg, own) + agg_loss(PT[1:], PT_MASK[1:], agg, own)
        assert parts.item() == pytest.approx(agg_loss(PT, PT_MASK, agg, own).item())


def test_agg_loss_gradient_is_masked_and_divided_by_the_global_count():
    pt = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    agg_loss(pt, mask, "seq_mean", LossDenominators(tokens=8, seqs=4, rows=5)).backward()
    # row 0: mean of 2 tokens over 4 sequences -> each valid token 1 / (2 * 4) = 0.125; the rest 0
    assert torch.equal(pt.grad, torch.tensor([[0.125, 0.125, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_agg_loss_zero_counts_and_errors():
    none = torch.zeros(2, 3, dtype=torch.bool)
    zero = LossDenominators(tokens=0, seqs=0, rows=2, norm_len=3)
    for agg in ("token_mean", "seq_mean", "seq_sum_const"):
        assert agg_loss(PT[:2], none, agg, zero).item() == 0.0  # 0 / max(0, 1), not NaN
    with pytest.raises(ValueError, match="norm_len"):
        agg_loss(PT, PT_MASK, "seq_sum_const", LossDenominators(tokens=10, seqs=4, rows=6))
    with pytest.raises(ValueError, match="agg"):
        agg_loss(PT, PT_MASK, "mean", GLOBAL)
    with pytest.raises(ValueError, match="shape"):
        agg_loss(PT, PT_MASK[:2], "token_mean", GLOBAL)
    with pytest.raises(ValueError, match="tokens"):
        LossDenominators(tokens=-1, seqs=0, rows=1)
    with pytest.raises(ValueError, match="exceed"):
        LossDenominators(tokens=2, seqs=3, rows=3)


def test_policy_loss_with_global_denominators_hand_computed():
    # the module's inputs: valid per-token losses sum to -2.8 + 1.9 = -0.9 over 5 tokens, 2 sequences, 2 rows;
    # as a micro-batch of a minibatch of 10 tokens, 4 sequences, 4 rows (norm_len 4)
    d = LossDenominators(tokens=10, seqs=4, rows=4)
    logp, anchor = inputs()
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, denom=d)
    assert out.pg.item() == pytest.approx(-0.9 / 10) and out.loss.item() == pytest.approx(-0.09)
    assert out.metrics["pg_loss"] == pytest.approx(-0.9 / 5)  # metrics stay this batch's own
    out.loss.backward()  # half of test_gradient_only_through_unclipped_tokens': 10 tokens instead of 5
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.05, -0.1], [0.11, 0.0, 0.0]], dtype=torch.float64))

    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_mean", denom=d)
    assert out.pg.item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 4)  # (-2.8/3 + 0.95) / 4
    assert out.metrics["pg_loss"] == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2)
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_sum_const", norm_len=4, denom=d)
    assert out.pg.item() == pytest.approx(-0.9 / (4 * 4))  # norm_len filled in from the argument

    ref = torch.zeros(2, 3, dtype=torch.float64)
    k3 = sum(1 / r + math.log(r) - 1 for r in [1.5, 0.5, 1.0, 1.1, 0.7])  # token sum of the k3 KL
    out = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.1, ref_logp=ref, denom=d)
    assert out.kl.item() == pytest.approx(k3 / 10) and out.metrics["kl"] == pytest.approx(k3 / 5)
    assert out.loss.item() == pytest.approx(-0.9 / 10 + 0.1 * k3 / 10)


def test_policy_loss_with_own_denominators_equals_without():
    logp, anchor = inputs()
    ref = torch.zeros(2, 3, dtype=torch.float64)
    for agg in ("token_mean", "seq_mean", "seq_sum_const"):
        kw = dict(eps_low=0.2, eps_high=0.3, agg=agg, norm_len=4, kl_coef=0.1, ref_logp=ref)
        a = policy_loss(logp, anchor, ADV, MASK, **kw)
        b = policy_loss(logp, anchor, ADV, MASK, **kw, denom=LossDenominators.from_mask(MASK))
        assert a.loss.item() == pytest.approx(b.loss.item()) and a.metrics == pytest.approx(b.metrics)


def test_policy_loss_refuses_denominators_smaller_than_the_batch_or_a_second_norm_len():
    logp, anchor = inputs()
    with pytest.raises(ValueError, match="smaller"):  # 5 tokens here: these cannot be the minibatch's counts
        policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, denom=LossDenominators(4, 2, 2))
    with pytest.raises(ValueError, match="disagrees"):
        policy_loss(
            logp,
            anchor,
            ADV,
            MASK,
            eps_low=0.2,
            eps_high=0.3,
            agg="seq_sum_const",
            norm_len=4,
            denom=LossDenominators(10, 4, 4, norm_len=8),
        )


def test_a_closed_form_kl_replaces_k3():
    logp = torch.zeros(2, 2, requires_grad=True)
    kl_tok = torch.tensor([[0.5, 1.0], [2.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    out = policy_loss(
        logp, logp.detach(), torch.zeros(2), mask, eps_low=0.2, eps_high=0.2, kl_coef=0.1, kl_tokens=kl_tok
    )
    assert float(out.kl) == pytest.approx((0.5 + 1.0 + 2.0) / 3)  # the masked 7 does not count
    assert float(out.loss) == pytest.approx(0.1 * 3.5 / 3)
    out.loss.backward()
    torch.testing.assert_close(kl_tok.grad, torch.tensor([[0.1, 0.1], [0.1, 0.0]]) / 3)
    with pytest.raises(ValueError, match="kl_tokens"):
        policy_loss(logp, logp.detach(), torch.zeros(2), mask, eps_low=0.2, eps_high=0.2, kl_tokens=kl_tok[:1])


# ---- staged_loss: a policy whose actions come in stages (rl/stages.py) ------------------------------------------
# stage 0 = column 0 (clip 0.05 / 0.05, weight 2), stage 1 = columns 1-2 (clip 0.2 / 0.3, weight 0.5)
STAGE0 = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool)
STAGE1 = MASK & ~STAGE0


def staged(logp, anchor, **kw):
    from rl.losses import staged_loss

    denoms = [LossDenominators.from_mask(STAGE0), LossDenominators.from_mask(STAGE1)]
    return staged_loss(
        logp, anchor, ADV, [STAGE0, STAGE1], denoms, eps=[(0.05, 0.05), (0.2, 0.3)], weights=[2.0, 0.5], **kw
    )


def test_staged_loss_weights_each_stages_own_clipped_mean_hand_computed():
    logp, anchor = inputs()
    total, (s0, s1) = staged(logp, anchor)
    # stage 0: row 0 r 1.5 (A +1) -> -min(1.5, 1.05) = -1.05; row 1 r 1.1 (A -1) -> max(1.1, 0.95) = 1.1; over 2
    assert s0.loss.item() == pytest.approx((-1.05 + 1.1) / 2)
    # stage 1: r 0.5, 1.0 (A +1) -> -0.5, -1.0; r 0.7 (A -1) -> max(0.7, 0.8) = 0.8; over its own 3 actions
    assert s1.loss.item() == pytest.approx((-0.5 - 1.0 + 0.8) / 3)
    assert total.item() == pytest.approx(2.0 * 0.025 + 0.5 * (-0.7 / 3))
    assert s0.metrics["clip/high_frac"] == pytest.approx(0.5) and s1.metrics["clip/low_frac"] == pytest.approx(1 / 3)
    total.backward()
    # unclipped only: (1, 0) -> +1.1 / 2 * 2; (0, 1) -> -0.5 / 3 * 0.5; (0, 2) -> -1.0 / 3 * 0.5
    expected = torch.tensor([[0.0, -1 / 12, -1 / 6], [1.1, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-9)


def test_staged_loss_kl_closed_form_on_one_stage_k3_on_the_other():
    logp, anchor = inputs()
    ref = torch.zeros(2, 3, dtype=torch.float64)
    closed_kl = torch.full((2, 3), 0.5, dtype=torch.float64)
    total, (s0, s1) = staged(logp, anchor, kl_coef=1.0, ref_logp=ref, kl_tokens=closed_kl, closed=[True, False])
    assert s0.kl.item() == pytest.approx(0.5)  # the closed form, averaged over stage 0's two actions

    def k3(r):  # d = ref - logp = -log r
        return 1 / r + math.log(r) - 1

    assert s1.kl.item() == pytest.approx((k3(0.5) + k3(1.0) + k3(0.7)) / 3)
    assert total.item() == pytest.approx(2.0 * (0.025 + 0.5) + 0.5 * (-0.7 / 3 + s1.kl.item()))


def test_one_stage_of_weight_1_is_exactly_policy_loss():
    from rl.losses import staged_loss

    logp, anchor = inputs()
    d = LossDenominators.from_mask(MASK)
    one = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, denom=d)
    total, (res,) = staged_loss(logp, anchor, ADV, [MASK], [d], eps=[(0.2, 0.3)], weights=[1.0])
    assert total.item() == one.loss.item() and res.metrics == one.metrics
    with pytest.raises(ValueError, match="one entry per stage"):
        staged_loss(logp, anchor, ADV, [MASK], [d, d], eps=[(0.2, 0.3)], weights=[1.0])
