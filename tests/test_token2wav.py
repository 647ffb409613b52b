"""Token2Wav: upstream-compatible flow and HiFT checkpoints, exact batching, seeds, lengths and bad inputs."""

import shutil

import numpy as np
import pytest
import torch

from rollouts.flow import FlowModel
from rollouts.hift import HiFTGenerator
from rollouts.hyperpyyaml import HyperPyYAMLError, read_hyperpyyaml
from rollouts.tiny_vocoder import write_tiny_vocoder
from rollouts.token2wav import Token2Wav, VocoderCheckpointError, VoicePrompt, buckets


@pytest.fixture(scope="module")
def vocoder_dir(tmp_path_factory):
    return write_tiny_vocoder(tmp_path_factory.mktemp("voc") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def t2w(vocoder_dir):
    return Token2Wav.from_pretrained(vocoder_dir)


@pytest.fixture(scope="module")
def voices(tiny_records):
    return [VoicePrompt(r.prompt_speech_tokens, r.prompt_feat, r.embedding) for r in tiny_records[:4]]


def codes(n, seed):
    return np.random.default_rng(seed).integers(0, 32768, n)


# --- the upstream layout and strict loading ---------------------------------------------------------------------


def test_full_size_models_have_upstream_key_counts():
    """The real GLM-TTS flow (config.yaml values) and HiFT, built on the meta device: upstream's key sets."""
    with torch.device("meta"):
        flow = FlowModel(
            spkr_emb_adaLN=True,
            speech_token_cfg=False,
            remove_spkr_concat_condition=True,
            mel_dim=80,
            mel_framerate=50,
            input_frame_rate=25,
        )
        hift = HiFTGenerator()
    fs, hs = flow.state_dict(), hift.state_dict()
    assert len(fs) == 308 and sum(p.numel() for p in flow.parameters()) == 225_299_792
    assert all(k.startswith("estimator.") for k in fs)
    assert tuple(fs["estimator.text_emb_layer.text_embed.weight"].shape) == (100001, 512)
    assert tuple(fs["estimator.transformer_blocks.17.attn_norm.linear.weight"].shape) == (4608, 960)
    assert tuple(fs["estimator.emb_concator.proj.weight"].shape) == (768, 672)
    assert "estimator.rotary_embed.inv_freq" in fs and "estimator.text_emb_layer.freqs_cis" not in fs
    assert len(hs) == 328 and sum(v.numel() for v in hs.values()) == 20_821_295
    assert tuple(hs["ups.0.parametrizations.weight.original0"].shape) == (512, 1, 1)  # per input channel
    assert tuple(hs["source_downs.0.weight"].shape) == (256, 18, 30)
    assert tuple(hs["f0_predictor.condnet.8.parametrizations.weight.original1"].shape) == (512, 512, 3)


def test_config_yaml_is_read_without_executing(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("flow: !new:os.system\n    command: echo hi\n")
    assert read_hyperpyyaml(p)["flow"].name == "os.system"  # parsed, never called
    p.write_text("a: 1\nflow: !ref <a>\n")
    with pytest.raises(HyperPyYAMLError, match="tag '!ref' is not supported"):
        read_hyperpyyaml(p)


def test_tiny_layout_round_trips_and_mismatches_are_listed(vocoder_dir, tmp_path):
    Token2Wav.from_pretrained(vocoder_dir)
    assert (vocoder_dir / "flow" / "config.yaml").read_text().startswith("flow: !new:flow.flow.Flow")
    bad = tmp_path / "bad"
    shutil.copytree(vocoder_dir, bad)
    state = torch.load(bad / "flow" / "flow.pt", weights_only=True)
    del state["estimator.proj_out.bias"]
    state["estimator.extra.weight"] = torch.zeros(1)
    state["estimator.time_embed.time_mlp.0.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, bad / "flow" / "flow.pt")  # the wrapped form is accepted too
    with pytest.raises(VocoderCheckpointError) as e:
        Token2Wav.from_pretrained(bad)
    msg = str(e.value)
    assert "missing keys (1): estimator.proj_out.bias" in msg and "unexpected keys (1): estimator.extra.weight" in msg
    assert "estimator.time_embed.time_mlp.0.weight: checkpoint (3, 3) != model (64, 256)" in msg
    (bad / "flow" / "config.yaml").write_text("flow: !new:my.Other\n    x: 1\n")
    with pytest.raises(VocoderCheckpointError, match="class 'my.Other' is not supported"):
        Token2Wav.from_pretrained(bad)
    (bad / "flow" / "config.yaml").write_text("flow: !new:flow.flow.Flow\n    mel_dimm: 80\n")
    with pytest.raises(VocoderCheckpointError, match="has no argument"):
        Token2Wav.from_pretrained(bad)
    (bad / "flow" / "config.yaml").write_text((vocoder_dir / "flow" / "config.yaml").read_text())
    shutil.copy(vocoder_dir / "flow" / "flow.pt", bad / "flow" / "flow.pt")
    hift = torch.load(bad / "hift" / "hift.pt", weights_only=True)
    first = next(iter(hift))
    del hift[first]
    hift["f0_predictor.extra.bias"] = torch.zeros(2)
    torch.save(hift, bad / "hift" / "hift.pt")
    with pytest.raises(VocoderCheckpointError) as e:
        Token2Wav.from_pretrained(bad)
    assert f"missing keys (1): {first}" in str(e.value)
    assert "unexpected keys (1): f0_predictor.extra.bias" in str(e.value)
    shutil.rmtree(bad / "hift")
    with pytest.raises(VocoderCheckpointError, match="hift.pt: file not found"):
        Token2Wav.from_pretrained(bad)


def test_hift_accepts_legacy_weight_norm_names(vocoder_dir, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(vocoder_dir, legacy)
    state = torch.load(legacy / "hift" / "hift.pt", weights_only=True)
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    torch.save(renamed, legacy / "hift" / "hift.pt")
    Token2Wav.from_pretrained(legacy)


# --- vocoding -----------------------------------------------------------------------------------------------------


def test_batched_equals_one_by_one_and_lengths(t2w, voices):
    items = [codes(n, i) for i, n in enumerate([30, 11, 57, 29, 2])]
    prompts = [voices[i % 4] for i in range(5)]
    seeds = [100, 100, 7, 8, 9]
    batched = t2w(items, prompts, seeds)
    for i in range(5):
        alone = t2w([items[i]], [prompts[i]], [seeds[i]])
        # float32: the flow and HiFT round differently in a batch (measured 1.2e-7 here; HiFT amplifies rounding,
        # so at larger sizes the gap grows, 1.4e-5 for bench/vocode.py --size mid); exactness is checked in float64
        assert np.abs(batched.audio[i] - alone.audio[0]).max() <= 1e-6, i
        tp, tf = prompts[i].tokens.size, prompts[i].feat.shape[0]
        frames = int((tp + items[i].size) / 25 * 50) - tf  # upstream's frame count
        assert batched.audio[i].shape == (480 * frames,)
        assert abs(frames - 2 * items[i].size) <= 1
        assert np.isfinite(batched.audio[i]).all() and np.abs(batched.audio[i]).max() <= 0.99
    assert batched.sample_rate == 24000


def test_hift_batched_equals_alone_in_float64(t2w):
    """Masking is exact: in float64 a batched row equals the row vocoded alone to rounding (measured 1.5e-16)."""
    import copy

    hift = copy.deepcopy(t2w.hift).double()
    frames = [40, 13, 27]
    mel = torch.randn(3, 80, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, n in enumerate(frames):
        mel[i, :, n:] = 0
    batched = hift.inference(mel, frames, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert batched.dtype == torch.float64
    for i, n in enumerate(frames):
        alone = hift.inference(mel[i : i + 1, :, :n], [n], [torch.Generator().manual_seed(i + 1)])
        assert (batched[i, : 480 * n] - alone[0]).abs().max() <= 1e-13, i


def test_loaded_models_are_in_eval_mode_and_float32_by_default(vocoder_dir):
    from rollouts.token2wav import load_flow, load_hift

    assert not load_flow(vocoder_dir).training and not load_hift(vocoder_dir).training  # dropout off
    assert Token2Wav.from_pretrained(vocoder_dir).amp is False  # float32, as upstream
    assert Token2Wav.from_pretrained(vocoder_dir, dtype="bfloat16", device="cpu").amp is False  # bf16: GPU only
    with pytest.raises(ValueError, match="vocoder.dtype"):
        Token2Wav.from_pretrained(vocoder_dir, dtype="float16")


def test_prompt_mel_of_two_frames_per_token_gives_exactly_2_frames_per_code(t2w, voices):
    v = voices[0]
    tp = 50
    prompt = VoicePrompt(v.tokens[:tp], v.feat[: 2 * tp], v.embedding)
    for n in (10, 20, 40):  # token totals where int(N / 25 * 50) == 2N
        assert int((tp + n) / 25 * 50) == 2 * (tp + n)
        out = t2w([codes(n, n)], [prompt], [0]).audio[0]
        assert out.size == n * 2 * 480


def test_noise_is_seeded_per_item(t2w, voices):
    c = codes(25, 1)
    a = t2w([c, c], [voices[0], voices[0]], [5, 5]).audio
    b = t2w([c], [voices[0]], [6]).audio
    assert np.array_equal(a[0], a[1])  # same seed (same group): identical audio
    assert not np.allclose(a[0], b[0])  # another seed: other noise


def test_bad_items_are_invalid_with_a_reason_not_a_crash(t2w, voices):
    no_feat = VoicePrompt(voices[0].tokens, None, voices[0].embedding)
    res = t2w(
        [codes(20, 0), np.array([], dtype=np.int64), np.array([5, 40000]), codes(20, 1), codes(20, 2)],
        [voices[0], voices[0], voices[0], no_feat, voices[1]],
        [0, 1, 2, 3, 4],
    )
    assert res.audio[0] is not None and res.audio[4] is not None
    assert res.audio[1] is None and "empty generation" in res.reasons[1]
    assert res.audio[2] is None and "out of range" in res.reasons[2]
    assert res.audio[3] is None and "prompt_speech_feat" in res.reasons[3]
    assert res.reasons[0] is None and res.reasons[4] is None


def test_buckets_bound_padding_and_batch_size():
    lengths = [100, 98, 95, 60, 58, 20]
    got = buckets(lengths)
    assert got == [[0, 1, 2, 3, 4], [5]]  # 5 x 100 padded vs 411 real is within 1.25; a 6th would not be
    for b in got:
        assert lengths[b[0]] * len(b) <= 1.25 * sum(lengths[k] for k in b)
    assert buckets(lengths[:3], batch_size=2) == [[0, 1], [2]]


def test_mixed_precision_flag_is_accepted_on_cpu(vocoder_dir, voices):
    t = Token2Wav.from_pretrained(vocoder_dir, mixed_precision=False, n_timesteps=2)
    assert t([codes(10, 0)], [voices[0]], [0]).audio[0].size > 0
