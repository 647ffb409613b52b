"""The vLLM rollout backend (policies/vllm_rollout.py) against a stand-in of vLLM's API (tests/fake_vllm.py): the
request each row becomes, the Rollout built from vLLM's outputs, the weight sync (LoRA merged), and the trainer with
`sampling.backend: vllm`. A real-vLLM check on a GPU is tests/test_vllm_gpu.py."""

import copy
import json

import fake_vllm
import pytest
import torch
from conftest import run_config

from policies.glmtts import GLMTTSPolicy
from policies.sampling import SamplingParams
from policies.vllm_rollout import VLLMRolloutError, VLLMSampler, hf_weights, rollout_from_outputs
from rl.config import DEFAULT_CONFIG, LoraConfig, load_config
from rl.trainer import train


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def test_rows_become_requests_and_outputs_a_rollout_with_ratio_one(fake, tiny_ckpt, tiny_records):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    llm = fake.LLM.instances[-1]
    assert llm.kwargs["enable_prefix_caching"] and llm.kwargs["distributed_executor_backend"] == "external_launcher"
    prompts = [pol.prompt_input(r) for r in tiny_records[:3]]
    params = SamplingParams(temperature=1.2, top_k=25, top_p=0.8)
    ro = sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=2, min_ratio=1, max_ratio=2)
    assert ro.group_ids.tolist() == [4, 4, 4, 5, 5, 5, 6, 6, 6]
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    rows = pol.row_batch(prompts, 3, min_ratio=1, max_ratio=2)
    assert torch.equal(ro.min_lengths, rows.min_len) and torch.equal(ro.prompt_ids, rows.prompt_ids)
    assert (ro.lengths <= rows.max_len).all() and torch.equal(ro.truncated, ~ro.finished)
    assert torch.equal(ro.lengths[ro.truncated], rows.max_len[ro.truncated])
    # a tiny random model stops at about 5% a step: over a few seeds some rows stop; a short max_len truncates rows
    more = [
        sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=s, min_ratio=1, max_ratio=2)
        for s in range(3, 8)
    ]
    short = sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=2, min_ratio=1, max_ratio=1.1)
    assert any(r.finished.any() for r in [ro, *more]) and short.truncated.any()
    short_rows = pol.row_batch(prompts, 3, min_ratio=1, max_ratio=1.1)
    assert torch.equal(short.lengths[short.truncated], short_rows.max_len[short.truncated])
    last = ro.token_mask.sum(-1) - 1
    assert (ro.tokens[ro.finished, last[ro.finished]] == pol.special.eoa).all()  # the stop token is kept (trained)
    with torch.no_grad():
        logp, _ = pol.token_logprobs(ro)  # the engine's weights are the policy's: ratio 1 on every token
    assert (logp - ro.behaviour_logp)[ro.token_mask].abs().max() < 1e-4
    # each row its own seed: the rows of a group differ, the same seed repeats
    again = sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=2, min_ratio=1, max_ratio=2)
    assert torch.equal(ro.tokens, again.tokens) and not torch.equal(ro.tokens[0], ro.tokens[1])


def test_ras_is_refused_and_bad_outputs_name_the_row(fake, tiny_ckpt, tiny_records):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    prompts = [pol.prompt_input(tiny_records[0])]
    with pytest.raises(ValueError, match="no repetition-aware sampling"):
        sampler.sample_groups(prompts, 2, SamplingParams(ras=True), group_ids=[0], seed=0)
    rows = pol.row_batch(prompts, 2)
    s = pol.special

    def out(ids, reason):
        return fake_vllm.RequestOutput(
            [], [fake_vllm.CompletionOutput(ids, [{t: fake_vllm.Logprob(-1.0)} for t in ids], reason)]
        )

    good = out([s.ats + 1, s.eoa], "stop")
    with pytest.raises(VLLMRolloutError, match=r"row 1: tokens outside the speech tokens \+ stop: \[5\]"):
        rollout_from_outputs(s, rows, [good, out([s.ats, 5, s.ats], "length")], [0], 2, SamplingParams())
    with pytest.raises(VLLMRolloutError, match="row 0: vLLM stopped without returning the stop token"):
        rollout_from_outputs(s, rows, [out([s.ats + 1], "stop"), good], [0], 2, SamplingParams())
    with pytest.raises(VLLMRolloutError, match="1 outputs for 2 rows"):
        rollout_from_outputs(s, rows, [good], [0], 2, SamplingParams())


def test_weight_sync_merges_lora_under_hf_names(tiny_ckpt):
    full = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    names = set(full.model.state_dict())
    lora = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for p in lora.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # trained adapters and modules_to_save
    x = torch.tensor([[5, 6, 7]])
    before = lora.model(input_ids=x).logits
    merged = dict(hf_weights(lora.model))
    assert set(merged) == names  # what vLLM's Llama load_weights takes
    expected = copy.deepcopy(lora.model).merge_and_unload().state_dict()
    for k in names:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k
    assert torch.equal(lora.model(input_ids=x).logits, before)  # unmerged again
    assert set(dict(hf_weights(full.model))) == names


def test_training_with_the_vllm_backend_keeps_the_engine_in_sync(fake, tmp_path, tiny_ckpt, monkeypatch):
    common = (
        "train.steps=3",
        "data.prompts_per_step=2",
        "sampling.group_size=2",
        "sampling.backend=vllm",
        "sampling.ras=false",
        "optim.lr=5e-3",
        "dynamic_sampling.mode=off",
        "train.save_every=0",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "synced", tiny_ckpt, *common))
    train(cfg, d, progress=False)
    llm = fake.LLM.instances[-1]
    assert llm.prefix_resets == 2 and len(llm.llm_engine.model_executor.driver_worker.model_runner.model.loaded) > 0
    rows = [json.loads(x) for x in (tmp_path / "synced" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["vllm/logp_abs_diff"] < 1e-4 for r in rows), [r["vllm/logp_abs_diff"] for r in rows]
    assert max(r["grad_norm"] for r in rows[:-1]) > 0  # the policy moved, and the engine moved with it
    # without the sync the engine samples from its stale copy, and the gap shows in the log
    monkeypatch.setattr(VLLMSampler, "sync_weights", lambda self: None)
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "stale", tiny_ckpt, *common))
    train(cfg, d, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "stale" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["vllm/logp_abs_diff"] < 1e-4 and rows[-1]["vllm/logp_abs_diff"] > 1e-3


def test_vllm_config_is_checked():
    with pytest.raises(Exception, match="no repetition-aware sampling"):
        load_config(DEFAULT_CONFIG, ["sampling.backend=vllm"])
    with pytest.raises(Exception, match="compile_decode is for the builtin sampler"):
        load_config(DEFAULT_CONFIG, ["sampling.backend=vllm", "sampling.ras=false", "sampling.compile_decode=true"])
