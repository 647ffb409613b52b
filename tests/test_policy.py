"""The GLM-TTS policy: loading the upstream layout, prompt layout, group sampling, teacher forcing, LoRA."""

import json
import shutil

import pytest
import torch

from policies.glmtts import CheckpointError, GLMTTSPolicy
from policies.sampling import SamplingParams
from policies.tokenizer import GLMTokenizer, TokenizerError

SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3),
    SamplingParams(top_k=25),
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=1.3, top_k=25, top_p=0.8),
    SamplingParams(top_k=25, top_p=0.8, ras=True),  # the upstream sampler
    SamplingParams(temperature=0.7, ras=True),
]


@pytest.fixture(scope="module")
def policy(tiny_ckpt):
    return GLMTTSPolicy.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def policy64(tiny_ckpt):
    return GLMTTSPolicy.from_pretrained(tiny_ckpt, dtype=torch.float64)


def inputs(policy, records, n=3):
    return [policy.prompt_input(r) for r in records[:n]]


# --- checkpoint layout and tokenizer -----------------------------------------------------------------------------


def test_loads_upstream_layout_and_finds_special_tokens(policy, tiny_ckpt):
    assert (tiny_ckpt / "llm" / "config.json").is_file() and list((tiny_ckpt / "llm").glob("*.safetensors"))
    assert (tiny_ckpt / "vq32k-phoneme-tokenizer" / "tokenizer.model").is_file()
    s = policy.special
    assert s.ate - s.ats == 32767 and s.pad < s.eoa < s.boa < s.ats
    tok = policy.tokenizer
    for text in ("<|audio_0|>", "<|audio_32767|>", "<|begin_of_audio|>", "<|user|>", "<|endoftext|>"):
        assert len(tok.encode(text)) == 1
    assert tok.encode("<|audio_7|>") == [s.ats + 7]
    text = "今天天气很好, fine!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("你好<|user|>hi") == tok.encode("你好") + [s.eoa] + tok.encode("hi")


def test_prompt_layout_matches_upstream(policy, tiny_records):
    rec = tiny_records[0]
    p = policy.prompt_input(rec)
    enc = policy.encode_text
    codes = [int(c) + policy.special.ats for c in rec.prompt_speech_tokens]
    assert p.ids == enc(rec.prompt_text + " ") + enc(rec.target_text) + [policy.special.boa] + codes
    assert p.text_len == len(enc(rec.target_text))


def test_missing_files_and_special_tokens_fail_clearly(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="missing llm/"):
        GLMTTSPolicy.from_pretrained(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg_path = bad / "vq32k-phoneme-tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] != "<|user|>"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"<\|user\|> \(eoa\) encodes to \d+ ids"):
        GLMTTSPolicy.from_pretrained(bad)
    (bad / "vq32k-phoneme-tokenizer" / "tokenizer.model").write_text("not base64 at all\n")
    with pytest.raises((CheckpointError, TokenizerError), match="tokenizer.model:1"):
        GLMTokenizer.from_dir(bad / "vq32k-phoneme-tokenizer")


def test_remote_code_tokenizer_only_on_opt_in(tiny_ckpt, monkeypatch):
    calls = []
    import policies.glmtts as g

    monkeypatch.setattr(g, "RemoteCodeTokenizer", lambda d: calls.append(d) or GLMTokenizer.from_dir(d))
    GLMTTSPolicy.from_pretrained(tiny_ckpt)
    assert calls == []
    GLMTTSPolicy.from_pretrained(tiny_ckpt, trust_remote_code=True)
    assert len(calls) == 1


# --- group sampling ----------------------------------------------------------------------------------------------


def test_group_sampler_rows_tokens_and_length_bounds(policy, tiny_records):
    prompts = inputs(policy, tiny_records)
    ro = policy.sample_groups(
        prompts,
        4,
        SamplingParams(top_k=25, top_p=0.8, ras=True),
        group_ids=[7, 8, 9],
        seed=0,
        min_ratio=2,
        max_ratio=4,
        max_new_tokens=1000,
    )
    s = policy.special
    assert ro.num_rows == 12 and ro.group_ids.tolist() == [7] * 4 + [8] * 4 + [9] * 4
    assert ro.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(ro.num_rows):
        n = int(ro.token_mask[i].sum())
        toks = ro.tokens[i, :n]
        text_len = prompts[i // 4].text_len
        assert ro.min_lengths[i] == 2 * text_len
        assert bool(ro.finished[i]) != bool(ro.truncated[i])
        if ro.finished[i]:
            assert toks[-1] == s.eoa and n == ro.lengths[i] + 1
            assert ro.lengths[i] >= 2 * text_len  # stop is masked before the minimum length
        else:
            assert ro.lengths[i] == 4 * text_len and n == ro.lengths[i]
        speech = toks[: int(ro.lengths[i])]
        assert ((speech >= s.ats) & (speech <= s.ate)).all()  # only speech tokens (+ stop) are ever sampled
        assert (ro.tokens[i, n:] == s.pad).all()
    assert ro.finished.any()


def test_sampling_is_seeded(policy, tiny_records):
    prompts = inputs(policy, tiny_records, 2)
    p = SamplingParams(top_k=25, top_p=0.8, ras=True)
    a = policy.sample_groups(prompts, 3, p, group_ids=[0, 1], seed=11, max_ratio=4)
    b = policy.sample_groups(prompts, 3, p, group_ids=[0, 1], seed=11, max_ratio=4)
    c = policy.sample_groups(prompts, 3, p, group_ids=[0, 1], seed=12, max_ratio=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    assert not torch.equal(a.tokens[:, :5], c.tokens[:, :5])


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-ras{int(p.ras)}")
def test_ratio_is_one_before_any_update(policy64, tiny_records, params):
    """Teacher-forced log-probs under the same processing equal the recorded behaviour log-probs, every token.
    The model runs in float64 so that the check isolates the algorithm from float32 rounding; the fp32 test
    below bounds what rounding adds."""
    prompts = inputs(policy64, tiny_records, 3)
    ro = policy64.sample_groups(prompts, 4, params, group_ids=[0, 1, 2], seed=3, max_ratio=6)
    with torch.no_grad():
        logp, ent = policy64.token_logprobs(ro)
    log_ratio = (logp - ro.behaviour_logp.double())[ro.token_mask]
    assert log_ratio.numel() > 100
    assert log_ratio.abs().max() < 1e-5
    assert torch.isfinite(ro.behaviour_logp[ro.token_mask]).all()


def test_ratio_one_in_float32(policy, tiny_records):
    prompts = inputs(policy, tiny_records, 3)
    for params in SETTINGS:
        ro = policy.sample_groups(prompts, 4, params, group_ids=[0, 1, 2], seed=5, max_ratio=6)
        with torch.no_grad():
            logp, _ = policy.token_logprobs(ro)
        # float32: the incremental decode and the full forward round differently (~1e-6 per logit)
        assert (logp - ro.behaviour_logp)[ro.token_mask].abs().max() < 1e-4


def test_teacher_forcing_is_padding_invariant(policy, tiny_records):
    """A row scored in a left/right-padded batch gets the same log-probs as scored alone."""
    prompts = inputs(policy, tiny_records, 3)
    ro = policy.sample_groups(prompts, 2, SamplingParams(ras=True, top_k=25), group_ids=[0, 1, 2], seed=1, max_ratio=5)
    with torch.no_grad():
        together, _ = policy.token_logprobs(ro)
        for i in (0, 3, 5):
            alone, _ = policy.token_logprobs(ro.select([i]))
            n = int(ro.token_mask[i].sum())
            assert torch.allclose(alone[0, :n], together[i, :n], atol=1e-5)


def test_lora_adapters_reference_and_state_roundtrip(tiny_ckpt, tiny_records):
    from rl.config import LoraConfig

    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in pol.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    prompts = inputs(pol, tiny_records, 2)
    ro = pol.sample_groups(prompts, 2, SamplingParams(top_k=25), group_ids=[0, 1], seed=0, max_ratio=3)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved, _ = pol.token_logprobs(ro)
        ref, _ = pol.token_logprobs(ro, reference=True)
    assert torch.allclose(ref[ro.token_mask], ro.behaviour_logp[ro.token_mask], atol=1e-4)  # adapters off = base
    assert not torch.allclose(moved[ro.token_mask], ref[ro.token_mask], atol=1e-3)
    state = pol.state_for_checkpoint()
    fresh = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    fresh.load_checkpoint_state(state)
    with torch.no_grad():
        again, _ = fresh.token_logprobs(ro)
    assert torch.allclose(again, moved)


def test_full_finetune_reference_is_frozen_copy(tiny_ckpt, tiny_records):
    pol = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    pol.make_reference()
    prompts = inputs(pol, tiny_records, 1)
    ro = pol.sample_groups(prompts, 2, SamplingParams(), group_ids=[0], seed=0, max_ratio=3)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.mul_(1.01)
        ref, _ = pol.token_logprobs(ro, reference=True)
    assert torch.allclose(ref[ro.token_mask], ro.behaviour_logp[ro.token_mask], atol=1e-4)
    assert all(not p.requires_grad for p in pol._reference.parameters())


def test_vocab_must_cover_special_ids(tiny_ckpt, tmp_path):
    bad = tmp_path / "small"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "llm" / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (bad / "llm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocab_size 1000 does not cover"):
        GLMTTSPolicy.from_pretrained(bad)


def test_a_row_samples_the_same_alone_or_in_a_batch(policy, tiny_records):
    prompts = inputs(policy, tiny_records, 3)
    params = SamplingParams(top_k=25, top_p=0.8, ras=True)
    batch = policy.sample_groups(prompts, 3, params, group_ids=[4, 5, 6], seed=9, max_ratio=4)
    alone = policy.sample_groups(prompts[1:2], 3, params, group_ids=[5], seed=9, max_ratio=4)
    n = alone.tokens.shape[1]
    assert torch.equal(batch.tokens[3:6, :n], alone.tokens) and torch.equal(batch.lengths[3:6], alone.lengths)
