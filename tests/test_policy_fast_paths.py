"""The policy's fast paths compute what the plain computation does: one stacked restricted head, one prompt pass
per group (sampling and teacher forcing), and top-k log-probs read from the top-k values."""

import pytest
import torch

from policies.glmtts import GLMTTSPolicy, _dropout_active, _forced_states
from policies.sampling import SamplingParams, step_distribution


@pytest.fixture(scope="module")
def policy64(tiny_ckpt):
    return GLMTTSPolicy.from_pretrained(tiny_ckpt, dtype=torch.float64)


def test_restricted_head_is_the_speech_and_stop_rows(policy64):
    s = policy64.special
    h = torch.randn(5, policy64.model.config.hidden_size, dtype=torch.float64)
    full = policy64.model.lm_head(h)
    expected = torch.cat([full[:, s.ats : s.ate + 1], full[:, s.eoa : s.eoa + 1]], dim=-1)
    assert torch.allclose(policy64.restricted_logits(h), expected, atol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=25, top_p=0.8),
        SamplingParams(top_k=25, top_p=0.8, ras=True),
        SamplingParams(temperature=0.7),
    ],
    ids=["topk-topp", "ras", "plain"],
)
def test_shared_prompt_pass_matches_one_pass_per_row(policy64, tiny_records, params):
    """Teacher forcing with one prompt pass per group gives the log-probs and gradients of scoring row by row."""
    pol = policy64
    prompts = [pol.prompt_input(r) for r in tiny_records[:3]]
    ro = pol.sample_groups(prompts, 3, params, group_ids=[0, 1, 2], seed=4, max_ratio=5)
    w = torch.randn(ro.tokens.shape, dtype=torch.float64)
    pol.model.train()
    try:
        pol.model.zero_grad()
        together, _ = pol.token_logprobs(ro)
        (together * w).sum().backward()
        grads = [p.grad.clone() for p in pol.model.parameters()]
        pol.model.zero_grad()
        alone = []
        for i in range(ro.num_rows):  # a single row has nothing to share: the plain single pass
            lp, _ = pol.token_logprobs(ro.select([i]))
            (lp * w[i : i + 1, : lp.shape[1]]).sum().backward()
            alone.append(torch.nn.functional.pad(lp.detach(), (0, together.shape[1] - lp.shape[1])))
        assert torch.allclose(together.detach(), torch.cat(alone), atol=1e-9)
        for g, p in zip(grads, pol.model.parameters()):
            # the model's RMSNorm computes in float32 even for a float64 model: agreement to float32 rounding
            assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))
    finally:
        pol.model.zero_grad()
        pol.model.eval()


def test_forced_states_shared_equals_unshared(policy64, tiny_records):
    pol = policy64
    prompts = [pol.prompt_input(r) for r in tiny_records[:2]]
    ro = pol.sample_groups(prompts, 4, SamplingParams(top_k=25), group_ids=[0, 1], seed=1, max_ratio=4)
    t = int(ro.token_mask.sum(-1).max())
    prompt, pmask = ro.prompt_ids, ro.prompt_mask
    ids = torch.cat([prompt, ro.tokens[:, : t - 1]], 1)
    attn = torch.cat([pmask, ro.token_mask[:, : t - 1]], 1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    backbone = pol.model.model
    with torch.no_grad():
        shared = _forced_states(backbone, prompt, pmask, ids, attn, pos)
        plain = _forced_states(backbone, prompt, pmask, ids, attn, pos, share=False)
    assert shared.shape == plain.shape == (8, t, pol.model.config.hidden_size)
    assert torch.allclose(shared, plain, atol=1e-6)


def test_dropout_turns_sharing_off(tiny_ckpt):
    from rl.config import LoraConfig

    noisy = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1))
    noisy.model.train()
    assert _dropout_active(noisy.model)  # independent noise per row: one pass over every row
    noisy.model.eval()
    assert not _dropout_active(noisy.model)
    exact = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    exact.model.train()
    assert not _dropout_active(exact.model)


def test_top_k_log_q_from_the_top_k_values_matches_the_full_gather():
    torch.manual_seed(0)
    logits = torch.randn(64, 300, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(64) > 0.3
    dist = step_distribution(logits, allowed, SamplingParams(temperature=1.2, top_k=20, top_p=0.9))
    assert dist.support_vals is not None
    idx = torch.cat([dist.support[:, :3], torch.randint(0, 300, (64, 3))], dim=1)  # in and (mostly) out of S
    fast = dist.log_q(idx)
    plain = (dist.scaled.gather(1, idx) - dist.lse_q[:, None]).masked_fill(~dist.in_support(idx), float("-inf"))
    assert torch.equal(fast, plain)
    w = torch.randn(64, 6, dtype=torch.float64)
    g_fast = torch.autograd.grad((fast.clamp(min=-1e4) * w).sum(), logits, retain_graph=True)[0]
    g_plain = torch.autograd.grad((plain.clamp(min=-1e4) * w).sum(), logits)[0]
    assert torch.allclose(g_fast, g_plain, atol=1e-12)


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=25, top_p=0.8, ras=True), SamplingParams(temperature=1.3)], ids=["ras", "plain"]
)
def test_static_cache_decoding_samples_what_the_dynamic_cache_does(policy64, tiny_records, params):
    prompts = [policy64.prompt_input(r) for r in tiny_records[:3]]
    for group_size in (1, 3):
        kw = dict(group_ids=[7, 8, 9], seed=5, max_ratio=5)
        dyn = policy64.sample_groups(prompts, group_size, params, **kw)
        sta = policy64.sample_groups(prompts, group_size, params, decode="static", **kw)
        assert torch.equal(dyn.tokens, sta.tokens) and torch.equal(dyn.lengths, sta.lengths)
        assert torch.equal(dyn.finished, sta.finished) and torch.equal(dyn.truncated, sta.truncated)
        assert torch.allclose(dyn.behaviour_logp, sta.behaviour_logp, atol=1e-9)


def test_compiled_decoding_matches_and_reuses_its_graph_across_rollouts(tiny_ckpt, tiny_records):
    """torch.compile of the static-cache step (CUDA graphs on GPU; inductor here): the same samples as eager
    decoding, and a rollout of another size inside the same shape bucket runs without recompiling."""
    from torch._dynamo.utils import counters

    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    prompts = [pol.prompt_input(r) for r in tiny_records[:4]]
    params = SamplingParams(top_k=25, top_p=0.8)
    eager = pol.sample_groups(prompts[:3], 2, params, group_ids=[0, 1, 2], seed=3, max_ratio=3)
    compiled = pol.sample_groups(prompts[:3], 2, params, group_ids=[0, 1, 2], seed=3, max_ratio=3, decode="compiled")
    n = min(eager.tokens.shape[1], compiled.tokens.shape[1])
    same = (eager.tokens[:, :n] == compiled.tokens[:, :n]).float().mean()
    assert same > 0.95  # float32 kernels of the compiled graph round differently; a tie may flip a draw
    first = eager.token_mask[:, 0]
    assert torch.allclose(eager.behaviour_logp[first, 0], compiled.behaviour_logp[first, 0], atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    again = pol.sample_groups(prompts[1:4], 2, params, group_ids=[5, 6, 7], seed=4, max_ratio=2.5, decode="compiled")
    assert counters["stats"]["unique_graphs"] == graphs  # 6 rows pad to the 8-row bucket; lengths to 256
    assert again.token_mask.any()
