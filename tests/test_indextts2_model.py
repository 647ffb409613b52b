"""IndexTTS2's GPT (policies/indextts2_model.py, indextts2_sampling.py) against the public index-tts code on random
weights: the same parameters, the same conditioning, and rollouts whose behaviour log-probs are the public inference
model's logits through transformers' own logits processors; teacher-forced log-probs equal them only with the
released inference position convention.

The public code is read from a git mirror of index-tts/index-tts (not installable from a package index); without
the mirror the comparisons skip, and the self-contained checks (config, processors) still run."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from policies.indextts2_io import TINY_GPT
from policies.indextts2_model import GPTConfig, IndexGPT, IndexTTS2ConfigError, mel_positions
from policies.indextts2_sampling import Sampling, processed_logits, sample_rows, teacher_forced_logprobs
from policies.sampling import row_keys

PUBLIC_FILES = [
    "indextts/gpt/model_v2.py",
    "indextts/gpt/conformer_encoder.py",
    "indextts/gpt/conformer/__init__.py",
    "indextts/gpt/conformer/attention.py",
    "indextts/gpt/conformer/embedding.py",
    "indextts/gpt/conformer/subsampling.py",
    "indextts/gpt/perceiver.py",
    "indextts/utils/arch_util.py",
    "indextts/utils/xtransformers.py",
    "indextts/utils/typical_sampling.py",
    "indextts/utils/common.py",
]
TINY = {  # the tiny writer's GPT with a small code vocabulary (so that the stop code gets sampled)
    **TINY_GPT,
    "max_mel_tokens": 60,
    "max_text_tokens": 40,
    "number_text_tokens": 50,
    "number_mel_codes": 66,
    "start_mel_token": 64,
    "stop_mel_token": 65,
    "condition_module": {**TINY_GPT["condition_module"], "num_blocks": 2},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public index-tts `indextts.gpt.model_v2` module, imported from the mirror's files with stand-ins for what
    this environment lacks (torchaudio, the vendored transformers 4.52 generation code, the tokenizer's whisper)."""
    import transformers
    from conftest import indextts_sources

    stubs = {
        "torchaudio": types.ModuleType("torchaudio"),
        "indextts.gpt.transformers_gpt2": types.ModuleType("indextts.gpt.transformers_gpt2"),
        "transformers.utils.model_parallel_utils": types.ModuleType("transformers.utils.model_parallel_utils"),
        "indextts.utils.tokenizer": types.ModuleType("indextts.utils.tokenizer"),
    }
    stubs["indextts.gpt.transformers_gpt2"].GPT2PreTrainedModel = transformers.GPT2PreTrainedModel
    stubs["indextts.gpt.transformers_gpt2"].GPT2Model = transformers.GPT2Model
    stubs["transformers.utils.model_parallel_utils"].assert_device_map = lambda *a, **k: None
    stubs["transformers.utils.model_parallel_utils"].get_device_map = lambda *a, **k: None
    stubs["indextts.utils.tokenizer"].LANGUAGE_DICT = {}
    root = tmp_path_factory.mktemp("indextts_public")
    with indextts_sources(root, PUBLIC_FILES, ("indextts", "indextts/gpt", "indextts/utils"), stubs):
        yield importlib.import_module("indextts.gpt.model_v2")


def _pair(public, seed: int = 0):
    """(public UnifiedVoice, ours) with the same random weights (every parameter, norms and latents included)."""
    torch.manual_seed(seed)
    theirs = public.UnifiedVoice(**TINY).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    ours = IndexGPT(GPTConfig.from_dict(TINY, "tiny")).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same keys and shapes, or it raises
    return theirs, ours


def _cond(ours, seed=1, frames=(40, 33)):
    g = torch.Generator().manual_seed(seed)
    spk = [torch.randn(t, 1024, generator=g) for t in frames]
    return spk


def test_the_config_is_read_strictly():
    cfg = GPTConfig.from_dict(TINY, "tiny")
    assert cfg.emo_condition_module.num_blocks == 1 and cfg.stop_mel_token == 65
    with pytest.raises(IndexTTS2ConfigError, match="unknown key gpt.n_layers"):
        GPTConfig.from_dict({**TINY, "n_layers": 3}, "config.yaml")
    with pytest.raises(IndexTTS2ConfigError, match="gpt.heads must be an integer"):
        GPTConfig.from_dict({**TINY, "heads": "4"}, "config.yaml")
    assert mel_positions(4).tolist() == [0, 2, 3, 4]


def test_processing_equals_transformers_own_processors():
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    ids = torch.tensor([[1, 1, 38, 5, 9], [1, 1, 38, 7, 7], [1, 1, 38, 2, 30]])
    s = Sampling(temperature=0.8, top_k=12, top_p=0.8, repetition_penalty=10.0)
    want = logits.clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(10.0),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(12),
        TopPLogitsWarper(0.8),
    ):
        want = proc(ids, want)
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter(1, ids, True)
    got = processed_logits(logits, seen, s)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=0, atol=1e-6)


def test_same_parameters_and_conditioning_as_released(public):
    theirs, ours = _pair(public)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    spk = torch.nn.utils.rnn.pad_sequence(_cond(ours), batch_first=True)
    lens = torch.tensor([spk.shape[1], spk.shape[1]])
    with torch.no_grad():
        want = theirs.get_conditioning(spk.transpose(1, 2), lens)
        got = ours.speaker_latents(spk, lens)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        emo = torch.randn(2, 21, 1024)
        want = theirs.merge_emovec(spk, emo, lens, torch.tensor([21, 21]), alpha=0.6)
        got = ours.merge_emovec(spk, emo, lens, torch.tensor([21, 21]), alpha=0.6)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _released_rollout_logprobs(public, theirs, cond, text, codes, s: Sampling):
    """Replay `codes` through the public inference model step by step (its KV cache, its position convention) and
    the released generate()'s processors (transformers' own): the log-probs the released sampler gives them."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    theirs.post_init_gpt2_config(kv_cache=True)
    inf = theirs.inference_model
    procs = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(s.repetition_penalty),
            TemperatureLogitsWarper(s.temperature),
            TopKLogitsWarper(s.top_k),
            TopPLogitsWarper(s.top_p),
        ]
    )
    out = []
    for i in range(cond.shape[0]):
        ids_text = torch.tensor([text[i]])
        input_ids, embeds, attn = theirs.prepare_gpt_inputs(cond[i : i + 1], ids_text)
        inf.store_mel_emb(embeds)
        seq = input_ids
        o = inf(input_ids=seq, attention_mask=attn, use_cache=True, return_dict=True)
        lps = []
        for t in range(codes.shape[1]):
            scores = procs(seq, o.logits[:, -1].float())
            lp = torch.log_softmax(scores, -1)[0, codes[i, t]]
            lps.append(float(lp.detach()))
            if int(codes[i, t]) == theirs.stop_mel_token:
                break
            seq = torch.cat([seq, codes[i : i + 1, t : t + 1]], 1)
            attn = torch.cat([attn, torch.ones(1, 1, dtype=attn.dtype)], 1)
            o = inf(
                input_ids=seq[:, -1:],
                attention_mask=attn,
                past_key_values=o.past_key_values,
                use_cache=True,
                return_dict=True,
            )
        out.append(lps)
    return out


def test_rollouts_are_the_released_samplers_distribution_and_teacher_forcing_matches(public):
    theirs, ours = _pair(public, seed=3)
    s = Sampling(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        lat = ours.speaker_latents(torch.randn(2, 30, 1024, generator=g), torch.tensor([1024, 1024]))
        emo = ours.emotion_vector(torch.randn(2, 30, 1024, generator=g), torch.tensor([1024, 1024]))
        cond = ours.conditioning(lat, emo)
    text = [[5, 9, 12, 3], [7, 8]]
    cond = cond.repeat_interleave(2, 0)
    text = [t for t in text for _ in range(2)]
    keys = row_keys(11, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    ro = sample_rows(ours, cond, text, s, keys, torch.tensor([25] * 4))
    assert ro.mask.any(1).all() and len({tuple(c.tolist()) for c in ro.codes}) > 1
    # the public inference model + transformers' processors give the behaviour log-probs
    want = _released_rollout_logprobs(public, theirs, cond, text, ro.codes, s)
    for i in range(4):
        got = ro.logp[i][ro.mask[i]].tolist()
        assert len(got) == len(want[i])
        assert max(abs(a - b) for a, b in zip(got, want[i])) < 1e-4, (got, want[i])
    # teacher forcing with the inference positions gives them again; the training forward's positions do not
    tf = teacher_forced_logprobs(ours, cond, text, ro.codes, ro.mask, s)
    assert (tf - ro.logp)[ro.mask].abs().max() < 1e-4
    off = teacher_forced_logprobs(ours, cond, text, ro.codes, ro.mask, s, positions="forward")
    assert (off - ro.logp)[ro.mask].abs().max() > 1e-2


def test_the_stop_code_is_an_action_sampled_and_scored_as_released(public):
    theirs, ours = _pair(public, seed=4)
    with torch.no_grad():  # make stopping likely within a few codes, on both sides
        for m in (theirs, ours):
            m.mel_head.bias[TINY["stop_mel_token"]] += 4.0
        cond = ours.conditioning(
            ours.speaker_latents(torch.randn(1, 20, 1024), torch.tensor([1024])),
            ours.emotion_vector(torch.randn(1, 20, 1024), torch.tensor([1024])),
        ).repeat(4, 1, 1)
    text = [[4, 6, 8]] * 4
    s = Sampling()
    ro = sample_rows(ours, cond, text, s, row_keys(2, torch.zeros(4), torch.arange(4)), torch.tensor([40] * 4))
    assert ro.finished.all() and not ro.truncated.any()
    for i in range(4):  # the last trained action of a row is its stop code; lengths count the speech codes
        last = int(ro.mask[i].sum()) - 1
        assert int(ro.codes[i, last]) == TINY["stop_mel_token"] and int(ro.lengths[i]) == last
    want = _released_rollout_logprobs(public, theirs, cond, text, ro.codes, s)
    for i in range(4):
        got = ro.logp[i][ro.mask[i]].tolist()
        assert len(got) == len(want[i]) and max(abs(a - b) for a, b in zip(got, want[i])) < 1e-4
    tf = teacher_forced_logprobs(ours, cond, text, ro.codes, ro.mask, s)
    assert (tf - ro.logp)[ro.mask].abs().max() < 1e-4


def test_the_released_layout_loads_strictly_and_exports_the_same_keys(tmp_path):
    from policies.indextts2_io import load_gpt, save_gpt, write_tiny_gpt
    from rollouts.token2wav import VocoderCheckpointError

    d = write_tiny_gpt(tmp_path / "tiny", seed=1)
    model, cfg = load_gpt(d)
    assert cfg["gpt"]["number_mel_codes"] == 8194 and model.cfg.stop_mel_token == 8193
    state = torch.load(d / "gpt.pth", weights_only=True)
    torch.save({"model": state}, d / "gpt.pth")  # the released loader's other accepted form
    again, _ = load_gpt(d)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    save_gpt(again, tmp_path / "out.pth")
    assert set(torch.load(tmp_path / "out.pth", weights_only=True)) == set(state)
    bad = dict(state)
    bad.pop("mel_head.bias")
    bad["gpt.wte.weight"] = torch.zeros(3)
    bad["speed_emb.weight"] = torch.zeros(3, 64)
    torch.save(bad, d / "gpt.pth")
    with pytest.raises(VocoderCheckpointError) as e:
        load_gpt(d)
    msg = str(e.value)
    assert "missing keys (1): mel_head.bias" in msg and "gpt.wte.weight" in msg and "speed_emb.weight" in msg
    (d / "config.yaml").write_text("gpt:\n  model_dim: 64\n  layerz: 2\n")
    with pytest.raises(IndexTTS2ConfigError, match=r"config\.yaml: unknown key gpt\.layerz"):
        load_gpt(d)


def test_decode_latents_are_the_released_forwards(public):
    """The latents s2mel decodes: the released `forward` (return_latent) after generation, batch 1 per row as
    infer_v2 runs it; ours batch the rows."""
    theirs, ours = _pair(public, seed=4)
    g = torch.Generator().manual_seed(9)
    spk = torch.randn(1, 37, 1024, generator=g)
    lens = torch.tensor([37])
    texts = [[5, 9, 11, 3], [7, 2]]
    codes = [torch.randint(0, 64, (12,), generator=g), torch.randint(0, 64, (7,), generator=g)]
    with torch.no_grad():
        latents = ours.speaker_latents(spk, lens)
        emovec = ours.emotion_vector(spk, lens)
        cond = ours.conditioning(latents, emovec)
        padded = torch.nn.utils.rnn.pad_sequence(codes, batch_first=True, padding_value=-1)
        got = ours.decode_latents(cond.expand(2, -1, -1), texts, padded)
        for i, (t, c) in enumerate(zip(texts, codes)):
            want = theirs(
                latents,
                torch.tensor([t]),
                torch.tensor([len(t)]),
                c[None],
                torch.tensor([c.shape[0]]),
                spk,
                cond_mel_lengths=lens,
                emo_cond_mel_lengths=lens,
                emo_vec=emovec,
                use_speed=torch.zeros(1, dtype=torch.long),
            )
            torch.testing.assert_close(got[i, : c.shape[0]], want[0], rtol=0, atol=2e-5)
