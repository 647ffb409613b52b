"""VoxCPM2: our model code against the released `voxcpm` package on tiny random checkpoints, the strict loader,
export, batched SDE rollouts and teacher-forced log-probs.

Measured on CPU float32 (tiny configs, with and without muP scaling): LM / residual LM hidden states and the LocDiT
velocity equal the released ones exactly (max |diff| 0); generated latents within 1e-6 (tolerance 1e-5); waveforms
and AudioVAE encode/decode within 6e-7 relative (tolerance 1e-4 / 1e-5); rollout vs teacher-forced |log ratio| at
most 1e-5 per SDE action (|log-prob| about 30, tolerance 1e-3) and 0 for stop decisions (tolerance 1e-5).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.voxcpm_config import VoxCPMConfigError, parse_config
from policies.voxcpm_io import (
    VoxCPMCheckpointError,
    load_voxcpm,
    save_voxcpm,
    tiny_config,
    write_tiny_voxcpm,
)
from policies.voxcpm_rollout import (
    build_prompt,
    decode_rollout,
    encode_patches,
    gaussian_kl_to_reference,
    sample_groups,
    teacher_forced_logprobs,
)
from rollouts.token2wav import VocoderCheckpointError

TEXTS = ["hello world", "good morning, 你好世界", "a b c"]
FEAT = 16


def _released():
    """The `voxcpm` package's VoxCPM2Model; torchaudio is stubbed only while importing it, then removed again."""
    if importlib.util.find_spec("voxcpm") is None:
        pytest.skip("voxcpm not installed")
    added = "torchaudio" not in sys.modules
    if added:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    try:
        from voxcpm.model.voxcpm2 import VoxCPM2Model
    finally:
        if added:
            sys.modules.pop("torchaudio", None)
    return VoxCPM2Model


def _load_released(directory: Path):
    return _released().from_local(str(directory), optimize=False, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_voxcpm(tmp_path_factory.mktemp("vox") / "tiny", TEXTS, seed=0)
    model, tok = load_voxcpm(d)
    return d, model, tok


@pytest.fixture(scope="module", params=[False, True], ids=["no_mup", "mup"])
def both(request, tmp_path_factory):
    """(dir, ours, tokenizer, released) for the released default (no muP scaling) and with muP scaling on."""
    d = write_tiny_voxcpm(tmp_path_factory.mktemp("vox") / "tiny", TEXTS, seed=1, use_mup=request.param)
    model, tok = load_voxcpm(d)
    return d, model, tok, _load_released(d)


def _prompt(tok, text="hello world"):
    return build_prompt(tok, text, 4, FEAT)


# -- writer, config, loader --------------------------------------------------------------------------------------------
def test_tiny_writer_layout_and_speed(tmp_path):
    write_tiny_voxcpm(tmp_path / "warm", TEXTS)  # imports
    t = time.process_time()  # CPU time: robust to a loaded machine
    d = write_tiny_voxcpm(tmp_path / "t", TEXTS, seed=3)
    assert time.process_time() - t < 1.0
    assert {p.name for p in d.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "audiovae.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert not any(k.startswith("audio_vae.") for k in load_file(d / "model.safetensors"))


def test_config_errors_name_the_field():
    good = tiny_config(200)
    parse_config(good)
    bad = json.loads(json.dumps(good))
    bad["lm_config"]["hidden_sise"] = 3
    with pytest.raises(VoxCPMConfigError, match=r"lm_config: unknown fields \['hidden_sise'\]"):
        parse_config(bad)
    bad = json.loads(json.dumps(good))
    del bad["dit_config"]["cfm_config"]
    with pytest.raises(VoxCPMConfigError, match=r"dit_config: missing fields \['cfm_config'\]"):
        parse_config(bad)
    bad = json.loads(json.dumps(good))
    bad["patch_size"] = "4"
    with pytest.raises(VoxCPMConfigError, match="patch_size: expected int"):
        parse_config(bad)
    bad = json.loads(json.dumps(good))
    bad["architecture"] = "voxcpm"
    with pytest.raises(VoxCPMConfigError, match="not supported"):
        parse_config(bad)
    ok = json.loads(json.dumps(good))
    ok["dit_config"]["mean_mode"] = False  # present in released files, unread by the released code
    ok["inference_timesteps"] = 10
    parse_config(ok)


def test_strict_loader_lists_every_bad_key(tmp_path):
    d = write_tiny_voxcpm(tmp_path / "t", TEXTS)
    sd = load_file(d / "model.safetensors")
    sd.pop("stop_head.weight")
    sd["extra.weight"] = torch.zeros(2)
    sd["stop_proj.bias"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(VocoderCheckpointError) as e:
        load_voxcpm(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "stop_head.weight" in msg and "extra.weight" in msg
    assert "stop_proj.bias: checkpoint (3,)" in msg


def test_pth_and_bin_fallbacks(tmp_path, tiny):
    d = write_tiny_voxcpm(tmp_path / "t", TEXTS)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    torch.save({"state_dict": load_file(d / "audiovae.safetensors")}, d / "audiovae.pth")
    (d / "model.safetensors").unlink()
    (d / "audiovae.safetensors").unlink()
    model, _ = load_voxcpm(d)
    assert model.stop_head.weight.shape == (2, 64)
    (d / "audiovae.pth").unlink()
    with pytest.raises(VoxCPMCheckpointError, match="audiovae.safetensors nor audiovae.pth"):
        load_voxcpm(d)


# -- equality with the released package --------------------------------------------------------------------------------
def test_same_parameters_as_released(both):
    _, ours, _, released = both
    a, b = ours.state_dict(), released.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_lm_hidden_and_velocity_equal_released(both):
    _, ours, tok, released = both
    pr = _prompt(tok, "good morning, 你好世界")
    tk, tm, f, fm = pr.tokens[None], pr.text_mask[None], pr.feats[None], pr.feat_mask[None]
    lm_h, res_h = ours.lm_hidden_states(tk, tm, f, fm)
    r = released
    scale = r.config.lm_config.scale_emb if r.config.lm_config.use_mup else 1.0
    fe = r.enc_to_lm_proj(r.feat_encoder(f))
    enc, _ = r.base_lm(
        inputs_embeds=tm.unsqueeze(-1) * r.base_lm.embed_tokens(tk) * scale + fm.unsqueeze(-1) * fe, is_causal=True
    )
    enc = r.fsq_layer(enc) * fm.unsqueeze(-1) + enc * tm.unsqueeze(-1)
    res, _ = r.residual_lm(
        inputs_embeds=r.fusion_concat_proj(torch.cat((enc, fm.unsqueeze(-1) * fe), -1)), is_causal=True
    )
    torch.testing.assert_close(lm_h, enc, atol=1e-5, rtol=0)
    torch.testing.assert_close(res_h, res, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5, FEAT, 4, generator=g), torch.randn(5, FEAT, 4, generator=g)
    mu = torch.randn(5, 64, generator=g)
    t = torch.rand(5, generator=g)
    v = ours.feat_decoder.estimator(x, mu, t, c, torch.zeros(5))
    torch.testing.assert_close(v, r.feat_decoder.estimator(x, mu, t, c, torch.zeros(5)), atol=1e-5, rtol=0)


@torch.no_grad()
def test_deterministic_generate_equals_released(both):
    _, ours, tok, released = both
    text, max_len = "good morning, 你好世界", 16
    torch.manual_seed(11)
    noise = torch.stack([torch.randn(1, FEAT, 4) for _ in range(max_len)], 1)
    ro = sample_groups(
        ours, [_prompt(tok, text)], 1, 0, stochastic=False, min_len=2, max_len=max_len, initial_noise=noise
    )
    assert not ro.sde_mask.any() and not ro.stop_mask.any()
    torch.manual_seed(11)
    pr = _prompt(tok, text)
    _, gen = released.inference(
        pr.tokens[None], pr.text_mask[None].int(), pr.feats[None], pr.feat_mask[None].int(), min_len=2, max_len=max_len
    )
    assert int(ro.lengths[0]) == gen.shape[0]
    torch.testing.assert_close(ro.patches[0, : gen.shape[0]], gen, atol=1e-5, rtol=0)
    torch.manual_seed(11)
    wav = released.generate(text, min_len=2, max_len=max_len)[0]
    ours_wav = decode_rollout(ours, ro)[0]
    assert ours_wav.shape == wav.shape
    assert (ours_wav - wav).abs().max() <= 1e-4 * wav.abs().max()


@torch.no_grad()
def test_prompt_and_reference_modes_equal_released(tmp_path, tiny):
    sf = pytest.importorskip("soundfile")
    _, ours, tok = tiny
    released = _load_released(tiny[0])
    g = torch.Generator().manual_seed(3)
    paths = {}
    for name, n in (("prompt", 16000 + 700), ("ref", 9000)):
        paths[name] = tmp_path / f"{name}.wav"
        sf.write(str(paths[name]), (0.3 * torch.randn(n, generator=g)).numpy(), 16000)
    prompt_feats = encode_patches(ours, torch.from_numpy(sf.read(str(paths["prompt"]), dtype="float32")[0]), "left")
    ref_feats = encode_patches(ours, torch.from_numpy(sf.read(str(paths["ref"]), dtype="float32")[0]), "right")
    text, ptext, max_len = "a b c", "hello world", 10
    for mode in ("continuation", "reference", "both"):
        kw = {}
        if mode in ("continuation", "both"):
            kw.update(prompt_text=ptext, prompt_feats=prompt_feats)
        if mode in ("reference", "both"):
            kw["ref_feats"] = ref_feats
        pr = build_prompt(tok, text, 4, FEAT, **kw)
        torch.manual_seed(4)
        noise = torch.stack([torch.randn(1, FEAT, 4) for _ in range(max_len)], 1)
        ro = sample_groups(ours, [pr], 1, 0, stochastic=False, max_len=max_len, initial_noise=noise)
        torch.manual_seed(4)
        wav = released.generate(
            text,
            prompt_text=ptext if "ref_feats" not in kw or "prompt_feats" in kw else "",
            prompt_wav_path=str(paths["prompt"]) if "prompt_feats" in kw else "",
            reference_wav_path=str(paths["ref"]) if "ref_feats" in kw else "",
            min_len=2,
            max_len=max_len,
        )[0]
        ours_wav = decode_rollout(ours, ro)[0]
        assert ours_wav.shape == wav.shape, mode
        assert (ours_wav - wav).abs().max() <= 1e-4 * wav.abs().max(), mode


@torch.no_grad()
def test_audio_vae_equals_released(tiny):
    _, ours, _ = tiny
    released = _load_released(tiny[0])
    g = torch.Generator().manual_seed(1)
    wav = torch.randn(2, 8000 + 123, generator=g)
    a, b = ours.audio_vae.encode(wav), released.audio_vae.encode(wav, 16000)
    assert a.shape == b.shape == (2, FEAT, 13)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    z = torch.randn(2, FEAT, 4, generator=g)
    a, b = ours.audio_vae.decode(z), released.audio_vae.decode(z)
    assert a.shape == b.shape == (2, 1, 4 * 1920)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@torch.no_grad()
def test_export_loads_in_released_and_ours(tmp_path, tiny):
    _, _, tok = tiny
    trained, _ = load_voxcpm(tiny[0])
    g = torch.Generator().manual_seed(5)
    for name, p in trained.named_parameters():
        if not name.startswith("audio_vae."):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    out = save_voxcpm(trained, tok, tmp_path / "export")
    mine, tok2 = load_voxcpm(out)
    theirs = _load_released(out)
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), trained.state_dict().values()))
    assert tok2("hello world") == tok("hello world")
    text, max_len = "hello world", 8
    torch.manual_seed(2)
    noise = torch.stack([torch.randn(1, FEAT, 4) for _ in range(max_len)], 1)
    ro = sample_groups(mine, [_prompt(tok2, text)], 1, 0, stochastic=False, max_len=max_len, initial_noise=noise)
    torch.manual_seed(2)
    wav = theirs.generate(text, min_len=2, max_len=max_len)[0]
    ours_wav = decode_rollout(mine, ro)[0]
    assert ours_wav.shape == wav.shape and (ours_wav - wav).abs().max() <= 1e-4 * wav.abs().max()


def test_lora_export_format_loads_in_released(tmp_path, tiny):
    d, model, tok = tiny
    cfg = {"enable_lm": True, "enable_dit": True, "r": 4, "alpha": 8}
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, mod in model.named_modules():
        top = name.split(".")[0]
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and (
            top in ("base_lm", "residual_lm") or name.startswith("feat_decoder.estimator.")
        ):
            weights[f"{name}.lora_A"] = torch.randn(4, mod.in_features, generator=g)
            weights[f"{name}.lora_B"] = torch.randn(mod.out_features, 4, generator=g)
    out = save_voxcpm(model, tok, tmp_path / "lora", lora={"config": cfg, "weights": weights, "base_model": str(d)})
    info = json.loads((out / "lora_config.json").read_text())
    assert info["base_model"] == str(d) and info["lora_config"] == cfg
    released = _released()
    from voxcpm.model.voxcpm2 import LoRAConfig

    m = released.from_local(info["base_model"], optimize=False, device="cpu", lora_config=LoRAConfig(**cfg))
    loaded, skipped = m.load_lora_weights(str(out))
    assert skipped == [] and sorted(loaded) == sorted(weights)
    with pytest.raises(ValueError, match="base_model"):
        save_voxcpm(model, tok, tmp_path / "x", lora={"config": cfg, "weights": weights})


# -- rollouts and teacher forcing --------------------------------------------------------------------------------------
def _rollout(model, tok, **kw):
    prompts = [_prompt(tok, "hello world"), _prompt(tok, "good morning, 你好世界")]
    args = {"group_size": 3, "seeds": [7, 8], "max_len": 16, "min_len": 2}
    args.update(kw)
    return prompts, sample_groups(model, prompts, **args)


def test_rollout_records_actions(tiny):
    _, model, tok = tiny
    _, ro = _rollout(model, tok, sde_steps=[1, 4, 9])
    n, length = ro.patches.shape[:2]
    assert n == 6 and ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and ro.members.tolist() == [0, 1, 2] * 2
    assert ro.x_t.shape == (6, length, 3, FEAT, 4) and ro.sde_logp.dtype == torch.float32
    assert length == int(ro.lengths.max())
    steps = torch.arange(length).view(1, -1)
    alive = steps < ro.lengths.view(-1, 1)
    assert torch.equal(ro.sde_mask, alive.unsqueeze(-1).expand_as(ro.sde_mask))
    assert torch.equal(ro.stop_mask, alive & (steps > 2))
    ends = ro.stop_action.nonzero()
    assert torch.equal(ro.lengths[ends[:, 0]], ends[:, 1] + 1) and ro.finished[ends[:, 0]].all()
    assert (ro.sde_logp[ro.sde_mask] != 0).all() and (ro.stop_logp[ro.stop_mask] < 0).all()
    assert len({tuple(ro.patches[r, 0].flatten().tolist()) for r in range(6)}) == 6
    with pytest.raises(ValueError, match="sde_steps"):
        _rollout(model, tok, sde_steps=[0])


def test_rows_are_independent_of_the_batch_and_reproducible(tiny):
    _, model, tok = tiny
    prompts, ro = _rollout(model, tok)
    alone = sample_groups(model, prompts[1:], 3, [8], group_ids=[1], max_len=16, min_len=2)
    again = sample_groups(model, prompts[1:], 3, [8], group_ids=[1], max_len=16, min_len=2)
    assert torch.equal(alone.patches, again.patches) and torch.equal(alone.row_seeds, ro.row_seeds[3:])
    length = alone.patches.shape[1]
    assert torch.equal(alone.lengths, ro.lengths[3:]) and torch.equal(alone.stop_action, ro.stop_action[3:, :length])
    torch.testing.assert_close(alone.patches, ro.patches[3:, :length], atol=1e-5, rtol=0)  # padding: rounding only


def test_teacher_forced_ratio_is_one_and_gradients_flow(tiny):
    _, model, tok = tiny
    _, ro = _rollout(model, tok, max_len=24)
    model.zero_grad(set_to_none=True)
    tf = teacher_forced_logprobs(model, ro, dit_chunk=7)
    d_sde = (tf.sde_logp - ro.sde_logp)[ro.sde_mask].abs().max().item()
    d_stop = (tf.stop_logp - ro.stop_logp)[ro.stop_mask].abs().max().item()
    assert d_sde < 1e-3 and d_stop < 1e-5, (d_sde, d_stop)
    logp, mask = tf.flat()
    assert logp.shape == mask.shape == (6, ro.patches.shape[1] * 10)
    (logp * mask).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for part in (
        "base_lm.",
        "residual_lm.",
        "feat_decoder.estimator.",
        "stop_head.",
        "stop_proj.",
        "feat_encoder.",
        "fsq_layer.",
        "lm_to_dit_proj.",
        "res_to_dit_proj.",
        "fusion_concat_proj.",
        "enc_to_lm_proj.",
    ):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    assert all(g is None for n, g in grads.items() if n.startswith("audio_vae."))
    model.zero_grad(set_to_none=True)


def test_gaussian_kl_to_reference(tiny):
    d, model, tok = tiny
    _, ro = _rollout(model, tok, max_len=10)
    with torch.no_grad():
        base = teacher_forced_logprobs(model, ro)
        assert gaussian_kl_to_reference(base, base, ro).abs().max() == 0
        other, _ = load_voxcpm(d)
        other.feat_decoder.estimator.out_proj.bias.add_(0.05)
        kl = gaussian_kl_to_reference(base, teacher_forced_logprobs(other, ro), ro)
    assert (kl[ro.sde_mask] > 0).all() and (kl[~ro.sde_mask] == 0).all()


def test_constant_sigma_and_subset_rollout(tiny):
    _, model, tok = tiny
    _, ro = _rollout(model, tok, sde_steps=[5], eta=0.3, noise_schedule="constant")
    tf = teacher_forced_logprobs(model, ro)
    assert (tf.sde_logp - ro.sde_logp)[ro.sde_mask].abs().max() < 1e-3
    assert torch.allclose(ro.std[ro.sde_mask], ro.std[ro.sde_mask][0])


def test_decode_lengths(tiny):
    _, model, tok = tiny
    prompts = [_prompt(tok, "a b c")]
    ro = sample_groups(model, prompts, 2, 0, max_len=6, min_len=1)
    wavs = decode_rollout(model, ro)
    assert [w.shape[0] for w in wavs] == [int(n) * 4 * 1920 for n in ro.lengths]


def test_bench_smoke(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import voxcpm_rollout

    res = voxcpm_rollout.main(["--prompts", "1", "--group", "2", "--patches", "3", "--repeats", "1"])
    assert res["patches"] == 6 and all(t > 0 for t in res["seconds"].values())
    assert "| tiny" in capsys.readouterr().out
