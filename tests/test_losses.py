"""The clipped policy loss against hand-computed values."""

import math

import pytest
import torch

from rl.losses import policy_loss

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
    loss, m = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3)
    assert loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5)
    # high: ratio 1.5 > 1.3 with A > 0 (1 of 5). low: 0.7 < 0.8 with A < 0 (1 of 5); 0.5 < 0.8 has A > 0: not counted
    assert m["clip/high_frac"] == pytest.approx(0.2)
    assert m["clip/low_frac"] == pytest.approx(0.2)
    assert m["ratio/mean"] == pytest.approx(4.8 / 5)
    assert m["ratio/min"] == pytest.approx(0.5) and m["ratio/max"] == pytest.approx(1.5)
    assert m["kl"] == 0.0


def test_gradient_only_through_unclipped_tokens():
    logp, anchor = inputs()
    loss, _ = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3)
    loss.backward()
    # d/dlogp of -A*r/5 where unclipped: (0,1) -> -0.5/5, (0,2) -> -1/5, (1,0) -> +1.1/5; clipped/masked -> 0
    expected = torch.tensor([[0.0, -0.1, -0.2], [0.22, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-9)


def test_seq_mean_and_seq_sum_const():
    logp, anchor = inputs()
    loss, _ = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_mean")
    assert loss.item() == pytest.approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2)
    loss, _ = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_sum_const", norm_len=4)
    assert loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / (2 * 4))
    with pytest.raises(ValueError, match="norm_len"):
        policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, agg="seq_sum_const")


def test_sequence_level_ratio_gspo():
    logp, anchor = inputs()
    loss, m = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, ratio_level="sequence")
    r0 = 0.75 ** (1 / 3)  # geometric mean of 1.5, 0.5, 1.0 -> inside [0.8, 1.3]
    r1 = 0.77 ** 0.5  # geometric mean of 1.1, 0.7
    assert loss.item() == pytest.approx((3 * -r0 + 2 * r1) / 5)
    assert m["ratio/min"] == pytest.approx(r1)


def test_k3_kl_to_reference():
    logp, anchor = inputs()
    ref = torch.zeros(2, 3, dtype=torch.float64)
    k3 = lambda r: 1 / r + math.log(r) - 1  # exp(ref - logp) - (ref - logp) - 1 with ref = 0  # noqa: E731
    kl = sum(k3(r) for r in [1.5, 0.5, 1.0, 1.1, 0.7]) / 5
    loss, m = policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.1, ref_logp=ref)
    assert m["kl"] == pytest.approx(kl)
    assert loss.item() == pytest.approx((sum(ROW0) + sum(ROW1)) / 5 + 0.1 * kl)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, anchor, ADV, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.1)


def test_gradient_flows_only_through_logp():
    logp, _ = inputs()
    anchor = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    adv = ADV.clone().double().requires_grad_(True)
    ref = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(logp, anchor, adv, MASK, eps_low=0.2, eps_high=0.3, kl_coef=0.5, ref_logp=ref)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert anchor.grad is None and adv.grad is None and ref.grad is None


def test_old_policy_anchor_ratio_one_means_no_clip_and_plain_policy_gradient():
    logp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, m = policy_loss(logp, logp.detach(), adv, mask, eps_low=0.0, eps_high=0.0)
    assert m["clip/low_frac"] == 0 and m["clip/high_frac"] == 0 and m["ratio/max"] == pytest.approx(1.0)
    loss.backward()
    assert torch.allclose(logp.grad, (-adv[:, None] / 15).expand(3, 5))


def test_masked_padding_with_nan_or_inf_cannot_poison_the_loss():
    logp = torch.tensor([[0.0, float("-inf")], [0.1, float("nan")]], requires_grad=True)
    anchor = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    loss, m = policy_loss(logp, anchor, torch.tensor([1.0, 1.0]), mask, eps_low=0.2, eps_high=0.3,
                          kl_coef=1.0, ref_logp=torch.zeros(2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in m.values())


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), MASK, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), MASK, eps_low=0.2, eps_high=0.2)
