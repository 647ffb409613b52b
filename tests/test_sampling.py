"""The sampling distribution on hand-built logits: truncation rules, RAS mixture, and that the recorded
behaviour log-probability is the probability the sampler actually draws with."""

import pytest
import torch

from policies.sampling import (
    SamplingParams,
    behaviour_logprob,
    row_keys,
    sample_step,
    splitmix64,
    step_distribution,
    uniforms,
)

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))  # last index is "stop"
ALL = torch.arange(5)[None]


def probs(params, stop_allowed=True, logits=LOGITS):
    d = step_distribution(logits.clone(), torch.tensor([stop_allowed]), params)
    return d.log_q(ALL).exp()[0], d.log_p(ALL).exp()[0]


def test_plain_softmax_temperature_and_stop_mask():
    q, p = probs(SamplingParams())
    assert torch.allclose(q, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])) and torch.allclose(p, q)
    q, _ = probs(SamplingParams(temperature=0.5))  # p^2 renormalised
    sq = torch.tensor([0.25, 0.04, 0.0225, 0.01, 0.0025])
    assert torch.allclose(q, sq / sq.sum())
    q, _ = probs(SamplingParams(), stop_allowed=False)
    assert q[4] == 0 and torch.allclose(q[:4], torch.tensor([0.5, 0.2, 0.15, 0.1]) / 0.95)


def test_top_k_and_top_p_keep_the_upstream_sets():
    q, p = probs(SamplingParams(top_k=2))
    assert torch.allclose(q, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    # top-p 0.8: keep while the mass before a token is < 0.8 -> 0.5 (0), 0.2 (0.5), 0.15 (0.7); not 0.1 (0.85)
    q, _ = probs(SamplingParams(top_p=0.8))
    assert torch.allclose(q, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    q, _ = probs(SamplingParams(top_p=0.8, top_k=2))
    assert torch.allclose(q, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    q, _ = probs(SamplingParams(top_p=0.3))  # the first token is always kept
    assert torch.allclose(q, torch.tensor([1.0, 0, 0, 0, 0]))


def test_ras_mixture_probability_hand_computed():
    # q = top-2 of p: [5/7, 2/7, 0, 0, 0]; the window holds token 0 once (threshold 10 * 0.1 = 1) -> W = {0}
    params = SamplingParams(top_k=2, ras=True, ras_window=10, ras_tau=0.1)
    d = step_distribution(LOGITS.clone(), torch.tensor([True]), params)
    history = torch.tensor([[3, 0, -1, -1, -1, -1, -1, -1, -1, -1]])  # token 3 is repeated too, but q(3) = 0
    p = [0.5, 0.2, 0.15, 0.1, 0.05]
    q = [5 / 7, 2 / 7, 0, 0, 0]
    qw = q[0] + q[3]
    for y in range(5):
        expected = (0 if y in (0, 3) else q[y]) + qw * p[y]
        got = behaviour_logprob(d, torch.tensor([y]), history, params).exp().item()
        assert got == pytest.approx(expected, abs=1e-6)


def test_recorded_logprob_is_the_sampling_frequency():
    """Monte-Carlo: draw 200k times with RAS + top-k + top-p + temperature; empirical frequencies match
    exp(behaviour_logprob) within sampling error."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, ras=True, ras_window=4, ras_tau=0.5)
    history = torch.tensor([[2, 5, 2, 7]])  # threshold 2: token 2 is "repeated"
    n = 200_000
    d = step_distribution(logits.expand(n, -1).clone(), torch.ones(n, dtype=torch.bool), params)
    keys = row_keys(1, torch.zeros(n, dtype=torch.long), torch.arange(n))
    ys = sample_step(d, history.expand(n, -1), params, keys, step=3)
    freq = torch.bincount(ys, minlength=12).double() / n
    d1 = step_distribution(logits.clone(), torch.tensor([True]), params)
    exact = torch.stack([behaviour_logprob(d1, torch.tensor([y]), history, params).exp()[0] for y in range(12)])
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-6)
    se = torch.sqrt(exact * (1 - exact) / n) + 1e-9
    assert ((freq - exact.double()).abs() <= 5 * se + 1e-4).all(), (freq, exact)
    assert freq[2] < exact.max()  # the repeated token was actually redrawn sometimes


def test_gradients_are_finite_when_the_token_left_the_support():
    logits = torch.tensor([[3.0, 2.0, -1.0, 0.5]], requires_grad=True)
    params = SamplingParams(top_k=2, ras=True, ras_window=2, ras_tau=0.5)
    d = step_distribution(logits, torch.tensor([True]), params)
    lp = behaviour_logprob(d, torch.tensor([2]), torch.tensor([[-1, -1]]), params)  # outside top-2, no repeats
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert lp.item() <= -1e3  # effectively zero probability (floored, not -inf)


def test_counter_based_uniforms_are_uniform_and_independent_of_the_batch():
    keys = row_keys(7, torch.arange(2000) // 4, torch.arange(2000) % 4)
    u = uniforms(keys, 5)
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([u, uniforms(keys, 6)]))[0, 1])) < 0.1
    assert torch.equal(uniforms(keys[[5, 17]], 5), u[[5, 17]])  # a row's draw does not depend on its neighbours
    assert len(set(keys.tolist())) == 2000
    # splitmix64 reference values (unsigned): mix(0) = 0xE220A8397B1DCDAF
    assert splitmix64(torch.tensor([0])).item() % (1 << 64) == 0xE220A8397B1DCDAF
