"""The vLLM rollout backend (policies/vllm_rollout.py) against a fake of vLLM's public API (tests/fake_vllm.py): the
request each row becomes, the Rollout built from vLLM's outputs, the weight sync through `LLM.apply_model` (LoRA
merged, every weight, the prefix cache dropped), the trainer with `sampling.backend: vllm`, what the fake refuses
(as vLLM does), and, where vLLM is installed, the fake's surface and top-k/top-p rule against vLLM's own. A
real-vLLM check on a GPU is tests/test_vllm_gpu.py."""

import copy
import json

import fake_vllm
import pytest
import torch
from conftest import run_config

from policies.glmtts import GLMTTSPolicy
from policies.sampling import SamplingParams
from policies.vllm_rollout import VLLMRolloutError, VLLMSampler, hf_weights, rollout_from_outputs, row_seeds
from rl.config import DEFAULT_CONFIG, LoraConfig, load_config
from rl.trainer import train


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def ratio_gap(pol, ro) -> float:
    """max |trainer's log q - the engine's| over the sampled tokens (0 up to float rounding: ratio 1)."""
    with torch.no_grad():
        logp, _ = pol.token_logprobs(ro)
    return float((logp - ro.behaviour_logp)[ro.token_mask].abs().max())


def perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def test_rows_become_requests_and_outputs_a_rollout_with_ratio_one(fake, tiny_ckpt, tiny_records):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    eng = fake_vllm.engine(sampler.llm)
    assert eng.args["model"] == str(tiny_ckpt / "llm") and eng.args["skip_tokenizer_init"]
    assert eng.args["enable_prefix_caching"] and eng.args["distributed_executor_backend"] == "external_launcher"
    assert eng.logprobs_mode == "processed_logprobs"
    prompts = [pol.prompt_input(r) for r in tiny_records[:3]]
    params = SamplingParams(temperature=1.2, top_k=25, top_p=1.0)
    ro = sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=2, min_ratio=1, max_ratio=2)
    # each row is one request: its prompt's ids and that row's bounds, seed and restricted vocabulary
    rows = pol.row_batch(prompts, 3, min_ratio=1, max_ratio=2)
    s = pol.special
    assert len(eng.requests) == 9
    for r, (ids, sp) in enumerate(eng.requests):
        assert ids == prompts[r // 3].ids
        assert (sp.n, sp.temperature, sp.top_k, sp.top_p, sp.logprobs, sp.detokenize) == (1, 1.2, 25, 1.0, 0, False)
        assert (sp.min_tokens, sp.max_tokens) == (int(rows.min_len[r]), int(rows.max_len[r]))
        assert sp.stop_token_ids == [s.eoa] and sp.allowed_token_ids == list(range(s.ats, s.ate + 1)) + [s.eoa]
    assert [sp.seed for _, sp in eng.requests] == row_seeds(2, [4, 5, 6], 3)
    # the rollout record
    assert ro.finished.any() and ro.group_ids.tolist() == [4, 4, 4, 5, 5, 5, 6, 6, 6]
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(ro.min_lengths, rows.min_len) and torch.equal(ro.prompt_ids, rows.prompt_ids)
    assert (ro.lengths <= rows.max_len).all() and torch.equal(ro.truncated, ~ro.finished)
    assert (ro.lengths >= rows.min_len).all()
    assert torch.equal(ro.lengths[ro.truncated], rows.max_len[ro.truncated])
    last = ro.token_mask.sum(-1) - 1
    assert (ro.tokens[ro.finished, last[ro.finished]] == s.eoa).all()  # the stop token is kept (trained)
    # the engine's weights are the policy's and vLLM's processed log-probs are log q: ratio 1 on every token
    assert ratio_gap(pol, ro) < 1e-4
    nucleus = SamplingParams(temperature=0.9, top_k=0, top_p=0.8)
    free = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    for p in (nucleus, free):
        other = sampler.sample_groups(prompts, 3, p, group_ids=[4, 5, 6], seed=3, min_ratio=1, max_ratio=2)
        assert ratio_gap(pol, other) < 1e-4
    # a short max_len truncates rows
    short = sampler.sample_groups(prompts, 3, free, group_ids=[4, 5, 6], seed=2, min_ratio=0.5, max_ratio=1.1)
    short_rows = pol.row_batch(prompts, 3, min_ratio=0.5, max_ratio=1.1)
    assert short.truncated.any() and torch.equal(short.lengths[short.truncated], short_rows.max_len[short.truncated])
    # each row its own seed: the rows of a group differ, the same seed repeats
    again = sampler.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=2, min_ratio=1, max_ratio=2)
    assert torch.equal(ro.tokens, again.tokens) and not torch.equal(ro.tokens[0], ro.tokens[1])


def test_top_k_with_top_p_samples_a_narrower_distribution_than_the_trainers(fake, tiny_ckpt, tiny_records):
    """vLLM applies top-p to the renormalised top-k mass, policies/sampling.py to the whole distribution: with both
    on, vLLM's tokens are drawn from a smaller support, with higher log-probs than the trainer's q gives them."""
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    prompts = [pol.prompt_input(r) for r in tiny_records[:2]]
    both = SamplingParams(temperature=1.0, top_k=25, top_p=0.8)
    with pytest.warns(UserWarning, match="vLLM applies top-p to the renormalised top-k"):
        ro = sampler.sample_groups(prompts, 2, both, group_ids=[0, 1], seed=0, max_ratio=2)
    with torch.no_grad():
        logp, _ = pol.token_logprobs(ro)
    gap = (ro.behaviour_logp - logp)[ro.token_mask]
    assert (gap > -1e-4).all() and float(gap.mean()) > 1e-2


def test_ras_is_refused_and_bad_outputs_name_the_row(fake, tiny_ckpt, tiny_records):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    prompts = [pol.prompt_input(tiny_records[0])]
    with pytest.raises(ValueError, match="no repetition-aware sampling"):
        sampler.sample_groups(prompts, 2, SamplingParams(ras=True), group_ids=[0], seed=0)
    rows = pol.row_batch(prompts, 2)
    s = pol.special

    def out(ids, reason, logprobs=True):
        steps = [{t: fake_vllm.Logprob(-1.0, 1)} for t in ids] if logprobs else None
        completion = fake_vllm.CompletionOutput(
            index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=steps, finish_reason=reason
        )
        return fake_vllm.RequestOutput("0", None, [], None, [completion], True)

    good = out([s.ats + 1, s.eoa], "stop")
    with pytest.raises(VLLMRolloutError, match=r"row 1: tokens outside the speech tokens \+ stop: \[5\]"):
        rollout_from_outputs(s, rows, [good, out([s.ats, 5, s.ats], "length")], [0], 2, SamplingParams())
    with pytest.raises(VLLMRolloutError, match="row 0: vLLM stopped without returning the stop token"):
        rollout_from_outputs(s, rows, [out([s.ats + 1], "stop"), good], [0], 2, SamplingParams())
    with pytest.raises(VLLMRolloutError, match="row 1: vLLM returned no log-prob for every token"):
        rollout_from_outputs(s, rows, [good, out([s.ats], "length", logprobs=False)], [0], 2, SamplingParams())
    with pytest.raises(VLLMRolloutError, match="1 outputs for 2 rows"):
        rollout_from_outputs(s, rows, [good], [0], 2, SamplingParams())


def test_weight_sync_merges_lora_under_hf_names(tiny_ckpt):
    full = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    names = set(full.model.state_dict())
    lora = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    perturb(lora.model)  # trained adapters and modules_to_save
    x = torch.tensor([[5, 6, 7]])
    before = lora.model(input_ids=x).logits
    merged = dict(hf_weights(lora.model))
    assert set(merged) == names  # what vLLM's Llama load_weights takes
    expected = copy.deepcopy(lora.model).merge_and_unload().state_dict()
    for k in names:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k
    assert torch.equal(lora.model(input_ids=x).logits, before)  # unmerged again
    assert set(dict(hf_weights(full.model))) == names
    # vLLM's layout takes every one of them, with its shape, and fills every parameter
    engine_model = fake_vllm.LlamaForCausalLM(full.model.state_dict())
    loaded = engine_model.load_weights(hf_weights(lora.model))
    assert loaded == {n for n, _ in engine_model.named_parameters()} and engine_model.loaded == names
    assert "model.layers.0.self_attn.qkv_proj.weight" in loaded and "model.layers.0.mlp.gate_up_proj.weight" in loaded
    for k in names:
        assert torch.allclose(engine_model.hf_tensor(k), expected[k], atol=1e-6), k


@pytest.mark.parametrize("lora", [False, True])
def test_sync_loads_the_policys_weights_through_apply_model(fake, tiny_ckpt, tiny_records, lora):
    cfg = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0) if lora else None
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=cfg)
    sampler = VLLMSampler(pol)
    eng = fake_vllm.engine(sampler.llm)
    prompts = [pol.prompt_input(r) for r in tiny_records[:2]]
    params = SamplingParams(temperature=1.0, top_k=25, top_p=1.0)

    def sample(seed):
        return sampler.sample_groups(prompts, 2, params, group_ids=[0, 1], seed=seed, max_ratio=2)

    assert ratio_gap(pol, sample(0)) < 1e-4
    perturb(pol.model)
    stale = sample(1)  # not marked stale: the engine still samples with the weights it loaded
    assert ratio_gap(pol, stale) > 1e-3 and eng.model.loaded == set()
    sampler.mark_stale()
    ro = sample(1)
    assert not sampler.stale and eng.prefix_resets == 1
    assert eng.model.loaded == set(eng.model.shards)  # every weight, under its HF name
    expected = copy.deepcopy(pol.model).merge_and_unload().state_dict() if lora else pol.model.state_dict()
    for name in eng.model.shards:
        assert torch.allclose(eng.model.hf_tensor(name), expected[name], atol=1e-6), name
    assert ratio_gap(pol, ro) < 1e-4


def test_a_sync_without_a_prefix_cache_reset_samples_on_stale_keys(fake, tiny_ckpt, tiny_records, monkeypatch):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    sampler = VLLMSampler(pol)
    prompts = [pol.prompt_input(r) for r in tiny_records[:2]]
    params = SamplingParams(temperature=1.0, top_k=25, top_p=1.0)
    sampler.sample_groups(prompts, 2, params, group_ids=[0, 1], seed=0, max_ratio=2)  # the prompts are cached
    monkeypatch.setattr(fake_vllm.LLM, "reset_prefix_cache", lambda self: True)  # claims a reset, keeps the cache
    perturb(pol.model)
    sampler.mark_stale()
    ro = sampler.sample_groups(prompts, 2, params, group_ids=[0, 1], seed=1, max_ratio=2)
    assert ratio_gap(pol, ro) > 1e-3  # the cached prompts' keys and values are the old weights'
    monkeypatch.setattr(fake_vllm.LLM, "reset_prefix_cache", lambda self: False)  # vLLM refuses a reset
    sampler.mark_stale()
    with pytest.raises(VLLMRolloutError, match="did not reset its prefix cache"):
        sampler.sample_groups(prompts, 2, params, group_ids=[0, 1], seed=1, max_ratio=2)
    assert sampler.stale  # synced again before the next sample


def test_the_fake_refuses_what_vllm_refuses(fake, tiny_ckpt):
    """The fake can fail: a private attribute, a field or engine argument vLLM does not have, a wrong prompt or a
    wrong weight are errors, as they are (or would break) in vLLM."""
    llm = fake.LLM(str(tiny_ckpt / "llm"), skip_tokenizer_init=True, logprobs_mode="processed_logprobs")
    eng = fake_vllm.engine(llm)
    for private in ("llm_engine", "model_executor", "engine_core"):
        with pytest.raises(AttributeError, match="not part of the vllm.LLM API"):
            getattr(llm, private)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tokenizer_pool_size'"):
        fake.LLM(str(tiny_ckpt / "llm"), skip_tokenizer_init=True, tokenizer_pool_size=2)
    with pytest.raises(ValueError, match="logprobs_mode"):
        fake.LLM(str(tiny_ckpt / "llm"), skip_tokenizer_init=True, logprobs_mode="processed")
    with pytest.raises(OSError, match="no tokenizer"):
        fake.LLM(str(tiny_ckpt / "llm"))
    SP = fake.SamplingParams
    for bad in (dict(top_k=-2), dict(temperature=2.5), dict(top_p=0.0), dict(min_tokens=5, max_tokens=4)):
        with pytest.raises(ValueError):
            SP(**bad)
    for bad in (dict(stop_token_id=[1]), dict(allowed_tokens=[1]), dict(max_new_tokens=4)):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            SP(**bad)
    with pytest.raises(TypeError, match="min_tokens must be int"):
        SP(min_tokens=torch.tensor(3))
    with pytest.raises(TypeError):
        SP(1)  # keyword arguments only
    ok = SP(max_tokens=4, seed=0, logprobs=0)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate(["hello"], ok, use_tqdm=False)
    with pytest.raises(ValueError, match=f"Token id {eng.vocab_size} is out of vocabulary"):
        llm.generate([fake.TokensPrompt(prompt_token_ids=[1, eng.vocab_size])], ok, use_tqdm=False)
    with pytest.raises(TypeError, match="list of int"):
        llm.generate([fake.TokensPrompt(prompt_token_ids=torch.tensor([1, 2]))], ok, use_tqdm=False)
    with pytest.raises(ValueError, match=r"lengths of prompts \(2\) and params \(1\)"):
        llm.generate([{"prompt_token_ids": [1]}, {"prompt_token_ids": [2]}], [ok], use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids contains out-of-vocab"):
        llm.generate([{"prompt_token_ids": [1]}], SP(allowed_token_ids=[eng.vocab_size]), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SP(max_tokens=4, seed=0, logprobs=0), use_tqdm=False)[0]
    c = out.outputs[0]
    assert out.prompt_token_ids == [1, 2, 3] and len(c.token_ids) == len(c.logprobs) <= 4 and c.text == ""
    assert all(set(step) == {t} for step, t in zip(c.logprobs, c.token_ids))
    # the weights: HF names in vLLM's Llama, shape checked, nothing but tensors
    hf = eng.hf.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="no module or parameter named 'model.layers.0.self_attn.qkv_proj.weight'"):
        llm.apply_model(lambda m: m.load_weights([("model.layers.0.self_attn.qkv_proj.weight", hf[q])]))
    with pytest.raises(AssertionError, match="Attempted to load weight"):
        llm.apply_model(lambda m: m.load_weights([(q, hf[q][:, :-1])]))
    with pytest.raises(ValueError, match="no module or parameter named 'base_model.model"):
        llm.apply_model(lambda m: m.load_weights([("base_model.model." + q, hf[q])]))  # a PEFT name
    with pytest.raises(RuntimeError):
        llm.apply_model(lambda m: m.load_state_dict(hf))  # vLLM's names are not HF's
    assert llm.apply_model(lambda m: sorted(m.load_weights([(q, hf[q])]))) == [
        ["model.layers.0.self_attn.qkv_proj.weight"]
    ]


def test_the_fake_matches_the_installed_vllm():
    vllm = pytest.importorskip("vllm")
    assert fake_vllm.surface_mismatches(vllm) == []


def test_the_fake_llama_matches_vllms():
    llama = pytest.importorskip("vllm.model_executor.models.llama")
    assert fake_vllm.llama_mismatches(llama.LlamaForCausalLM) == []


def test_the_fake_top_k_top_p_is_vllms():
    ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    real = getattr(ops, "apply_top_k_top_p_pytorch", None) or ops.apply_top_k_top_p
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 300, generator=gen)
    k = torch.tensor([0, 5, 25, 300, 1, 40])
    p = torch.tensor([1.0, 1.0, 0.8, 0.5, 0.9, 0.3])
    mine = fake_vllm.top_k_top_p(logits.clone(), k, p)
    kk = torch.where(k == 0, torch.full_like(k, logits.shape[-1]), k)  # vLLM's engine passes "off" as the vocab size
    theirs = real(logits.clone(), kk, p)
    assert torch.equal(torch.isinf(mine), torch.isinf(theirs))
    assert torch.equal(mine[~torch.isinf(mine)], theirs[~torch.isinf(theirs)])


def test_training_with_the_vllm_backend_keeps_the_engine_in_sync(fake, tmp_path, tiny_ckpt, monkeypatch):
    common = (
        "train.steps=3",
        "data.prompts_per_step=2",
        "sampling.group_size=2",
        "sampling.backend=vllm",
        "sampling.ras=false",
        "sampling.top_p=1.0",  # top-k alone: vLLM's q is the trainer's (with top-p too it is not; see above)
        "optim.lr=5e-3",
        "dynamic_sampling.mode=off",
        "train.save_every=0",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "synced", tiny_ckpt, *common))
    train(cfg, d, progress=False)
    eng = fake_vllm.CREATED[-1]
    assert eng.prefix_resets == 2 and eng.model.loaded == set(eng.model.shards)
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
