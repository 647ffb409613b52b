"""policies/flow_sde.py: hand-computed SDE steps and log-probs, both time conventions, and the ODE limit."""

from __future__ import annotations

import math

import pytest
import torch

from policies.flow_sde import (
    FlowTime,
    diffusion_coefficient,
    gaussian_kl_same_std,
    gaussian_logprob,
    score_from_velocity,
    sde_step,
    sde_step_mean_std,
)

VOX = FlowTime(data_at=0.0)
GLM = FlowTime(data_at=1.0, sigma_min=1e-6)


def test_flow_time_validation():
    with pytest.raises(ValueError, match="data_at"):
        FlowTime(data_at=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        FlowTime(sigma_min=1.0)


def test_score_matches_gaussian_path_by_hand():
    # VoxCPM path x_t = (1 - t) x0 + t z with x0 = 2, z = -1, t = 0.25: x = 1.25, v = z - x0 = -3.
    # z_hat = x + (1 - t) v = 1.25 - 2.25 = -1  ->  score = -z_hat / t = 4.
    x, v = torch.tensor([[1.25]]), torch.tensor([[-3.0]])
    assert score_from_velocity(x, v, 0.25, VOX).item() == pytest.approx(4.0)
    # GLM path x_t = t x1 + (1 - (1 - s) t) z with x1 = 2, z = -1, t = 0.75, s = 0: x = 1.25, v = x1 - z = 3.
    # z_hat = x - t v = 1.25 - 2.25 = -1 -> score = 1 / (1 - t) = 4.
    glm0 = FlowTime(data_at=1.0, sigma_min=0.0)
    assert score_from_velocity(x, torch.tensor([[3.0]]), 0.75, glm0).item() == pytest.approx(4.0)


def test_flow_grpo_step_by_hand():
    # Flow-GRPO: std_t = eta sqrt(s / (1 - s)); mean = x (1 + std^2 dt / (2 s)) + v (1 + std^2 (1 - s) / (2 s)) dt.
    x, v = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]])
    t, dt, eta = 0.6, -0.1, 0.7
    g = diffusion_coefficient(t, eta, VOX).item()
    assert g == pytest.approx(0.7 * math.sqrt(0.6 / 0.4))
    mean, std = sde_step_mean_std(x, v, t, dt, g, VOX)
    want = x * (1 + g * g * dt / (2 * t)) + v * (1 + g * g * (1 - t) / (2 * t)) * dt
    torch.testing.assert_close(mean, want)
    assert std.shape == (1, 1) and std.item() == pytest.approx(g * math.sqrt(0.1))


def test_constant_sigma_step_by_hand():
    # DanceGRPO: mean = x + v dt - (eta^2 / 2) score dt (dt < 0), std = eta sqrt(|dt|).
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    t, dt, eta = 0.5, -0.2, 0.3
    g = diffusion_coefficient(t, eta, VOX, schedule="constant").item()
    score = -(1.0 + (1 - t) * 2.0) / t
    mean, std = sde_step_mean_std(x, v, t, dt, g, VOX)
    assert mean.item() == pytest.approx(1.0 + 2.0 * dt - 0.5 * eta**2 * score * dt)
    assert std.item() == pytest.approx(eta * math.sqrt(0.2))
    with pytest.raises(ValueError, match="noise schedule"):
        diffusion_coefficient(t, eta, VOX, schedule="cosine")


def test_glm_convention_runs_forward_in_time():
    # Noise at t = 0, data at t = 1: dt > 0 and the correction uses |dt|.
    x, v = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t, dt = torch.tensor([0.2, 0.5, 0.7]), 0.1
    g = diffusion_coefficient(t, 0.5, GLM)
    mean, std = sde_step_mean_std(x, v, t, dt, g, GLM)
    score = score_from_velocity(x, v, t, GLM)
    want = x + v * dt + 0.5 * g.view(3, 1, 1) ** 2 * score * dt
    torch.testing.assert_close(mean, want)
    torch.testing.assert_close(std.flatten(), g * math.sqrt(dt))


def test_eta_zero_is_exactly_the_ode_step_and_small_eta_converges():
    x, v = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    for time, t, dt in ((VOX, 0.4, -0.07), (GLM, 0.4, 0.07)):
        ode = x + v * dt
        x_next, mean, std = sde_step(x, v, t, dt, diffusion_coefficient(t, 0.0, time), time, torch.randn_like(x))
        assert torch.equal(x_next, ode) and torch.equal(mean, ode) and torch.all(std == 0)
        # the VoxCPM sampler writes the ODE step as x - |dt| v: identical bits
        assert torch.equal(x - abs(dt) * v, x + (-abs(dt)) * v) if dt < 0 else True
        x_small, _, _ = sde_step(x, v, t, dt, diffusion_coefficient(t, 1e-6, time), time, torch.randn_like(x))
        torch.testing.assert_close(x_small, ode, atol=1e-5, rtol=0)


def test_gaussian_logprob_is_summed_over_dims():
    x = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])  # [2, 1, 2]
    mean = torch.zeros_like(x)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    lp = gaussian_logprob(x, mean, std)
    c = 0.5 * math.log(2 * math.pi)
    want0 = -(1 / (2 * 0.25)) - (4 / (2 * 0.25)) - 2 * math.log(0.5) - 2 * c
    want1 = -2 * math.log(2.0) - 2 * c
    assert lp.shape == (2,) and lp.dtype == torch.float32
    assert lp[0].item() == pytest.approx(want0) and lp[1].item() == pytest.approx(want1)
    # sampled actions: the log-prob matches torch.distributions.Normal summed over dims
    m, s = torch.randn(4, 3, 2), torch.rand(4, 1, 1) + 0.1
    y = m + s * torch.randn_like(m)
    ref = torch.distributions.Normal(m, s.expand_as(m)).log_prob(y).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_logprob(y, m, s), ref)


def test_closed_form_kl():
    p, q = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert gaussian_kl_same_std(p, q, torch.tensor(0.5)).item() == pytest.approx((1 + 4) / (2 * 0.25))
    m1, m2, s = torch.randn(3, 5), torch.randn(3, 5), torch.rand(3, 1) + 0.2
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, s.expand_as(m1)), torch.distributions.Normal(m2, s.expand_as(m2))
    ).sum(1)
    torch.testing.assert_close(gaussian_kl_same_std(m1, m2, s), ref)


def test_bf16_inputs_compute_in_float32():
    x, v = torch.randn(2, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    x_next, mean, std = sde_step(x, v, 0.5, -0.1, 0.3, VOX, torch.randn(2, 4))
    assert x_next.dtype == mean.dtype == std.dtype == torch.float32
