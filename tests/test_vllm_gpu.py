"""The vLLM backend on real vLLM (needs a GPU and `pip install vllm`, 0.10 or newer; skipped otherwise): vLLM's
processed log-probs of its own samples against the trainer's teacher-forced log-probs, with top-k alone and top-p
alone (with both, vLLM's top-p acts on the renormalised top-k mass and the two differ by design; see
policies/vllm_rollout.py), before and after a weight sync through `LLM.apply_model`."""

import pytest
import torch

vllm = pytest.importorskip("vllm")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a GPU", allow_module_level=True)

from policies.glmtts import GLMTTSPolicy  # noqa: E402
from policies.sampling import SamplingParams  # noqa: E402
from policies.tiny import write_tiny_checkpoint  # noqa: E402
from policies.vllm_rollout import VLLMSampler  # noqa: E402


def test_vllm_log_probs_match_the_trainer_before_and_after_a_sync(tmp_path, tiny_records):
    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", texts, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
    pol = GLMTTSPolicy.from_pretrained(ckpt, device="cuda")
    sampler = VLLMSampler(pol, dtype="float32", gpu_memory_utilization=0.2)
    prompts = [pol.prompt_input(r) for r in tiny_records[:4]]

    def gap(seed, params):
        ro = sampler.sample_groups(prompts, 4, params, group_ids=[0, 1, 2, 3], seed=seed, max_ratio=6)
        with torch.no_grad():
            logp, _ = pol.token_logprobs(ro)
        d = (logp.cpu() - ro.behaviour_logp)[ro.token_mask].abs()
        print(
            f"top_k {params.top_k} top_p {params.top_p}: |log p_vllm - log p_trainer|: mean {float(d.mean()):.2e}, "
            f"p99 {float(d.quantile(0.99)):.2e}, max {float(d.max()):.2e} over {d.numel()} tokens"
        )
        return d

    top_k = SamplingParams(temperature=1.0, top_k=25, top_p=1.0)
    top_p = SamplingParams(temperature=1.0, top_k=0, top_p=0.8)
    for i, params in enumerate((top_k, top_p)):
        d = gap(i, params)
        assert d.numel() > 100 and float(d.mean()) < 1e-3 and float(d.quantile(0.99)) < 1e-2
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stale = gap(2, top_k)  # not synced yet: the engine samples with the old weights
    sampler.sync_weights()
    synced = [gap(3 + i, params) for i, params in enumerate((top_k, top_p))]
    for d in synced:
        assert float(d.mean()) < 1e-3 and float(d.quantile(0.99)) < 1e-2
    assert float(stale.mean()) > float(synced[0].mean())
