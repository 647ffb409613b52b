"""VoxCPM2 as a policy (policies/voxcpm.py): the contract's rollout, the ratio of both stages, prompts as the
released encoder makes them, LoRA and export in VoxCPM's own formats, `ttsrl prepare --policy voxcpm`, and the tiny
training run with `ttsrl eval` on its checkpoint."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MANIFEST
from test_voxcpm_model import _load_released, _released

from policies.voxcpm import VoxCPMPolicy
from rollouts.types import SamplingParams

PARAMS = SamplingParams()
K = 2  # policy.voxcpm.sde_steps [1, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def vox_ckpt(tmp_path_factory, tiny_records):
    d = tmp_path_factory.mktemp("voxpol") / "tiny-voxcpm2"
    VoxCPMPolicy.write_tiny(d, [t for r in tiny_records for t in (r.prompt_text, r.target_text)], seed=0, vocoder=True)
    return d


def lora(**kw):
    from rl.config import LoraConfig

    return dataclasses.replace(LoraConfig(enabled=True, dropout=0.0, r=4, alpha=8), **kw)


def sample(pol, records, group_size=3, seed=5, max_new_tokens=40):
    prompts = [pol.prompt_input(r) for r in records]
    return pol.sample_groups(
        prompts, group_size, PARAMS, group_ids=list(range(len(prompts))), seed=seed, max_new_tokens=max_new_tokens
    )


def test_rollout_columns_and_the_ratio_of_both_stages(vox_ckpt, tiny_records):
    pol = VoxCPMPolicy.from_pretrained(vox_ckpt)
    ro = sample(pol, tiny_records[:2])
    n, t = ro.token_mask.shape
    assert n == 6 and t == int(ro.lengths.max()) * (K + 1)
    stages = pol.action_stages(ro)
    assert stages[0, : 2 * (K + 1)].tolist() == [0, 0, 1, 0, 0, 1]  # patch-major: its SDE steps, then its stop
    # a patch's SDE actions are valid while the row runs; stop decisions from patch index min_len + 1 (= 3) on
    per = ro.token_mask.view(n, -1, K + 1)
    assert torch.equal(per[..., 0].sum(1), ro.lengths) and torch.equal(per[..., K].sum(1), (ro.lengths - 3).clamp(0))
    assert bool(ro.finished.any()) and torch.equal(ro.truncated, ~ro.finished)
    logp, ent = pol.token_logprobs(ro)
    m = ro.token_mask
    for s in (0, 1):
        assert (logp - ro.behaviour_logp)[m & (stages == s)].abs().max() < 1e-4
    assert torch.isnan(ent).all() and (ro.behaviour_logp[m & (stages == 0)] < 0).all()  # per-element log-probs
    sub = ro.select([4, 1])
    torch.testing.assert_close(pol.token_logprobs(sub)[0], logp[[4, 1]].detach(), rtol=0, atol=1e-5)
    (logp * m).sum().backward()
    grads = {k: p.grad for k, p in pol.model.named_parameters()}
    for part in ("base_lm.", "residual_lm.", "feat_decoder.estimator.", "stop_head.", "feat_encoder."):
        assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.startswith(part)), part
    assert all(g is None for k, g in grads.items() if k.startswith("audio_vae."))
    wavs = pol.load_decoder([], n_timesteps=10, dtype="float32")(ro, [0] * n, batch_size=2)
    assert wavs.sample_rate == 48000 and pol.speech_rate == 6.25
    assert [len(a) for a in wavs.audio] == [int(x) * 4 * 1920 for x in ro.lengths]


def test_the_closed_form_kl_covers_the_sde_actions_only(vox_ckpt, tiny_records):
    pol = VoxCPMPolicy.from_pretrained(vox_ckpt)
    ro = sample(pol, tiny_records[:1], group_size=2)
    pol.make_reference()
    assert pol.reference_kl(ro).abs().max() == 0.0
    with torch.no_grad():
        pol.net.feat_decoder.estimator.out_proj.bias.add_(0.05)
    kl = pol.reference_kl(ro)
    stages, m = pol.action_stages(ro), ro.token_mask
    assert (kl[m & (stages == 0)] > 0).all() and (kl[stages == 1] == 0).all() and (kl[~m] == 0).all()
    kl.sum().backward()
    assert pol.net.feat_decoder.estimator.out_proj.bias.grad.abs().sum() > 0


def test_prompts_are_encoded_as_the_released_model_does(vox_ckpt, tiny_records, tmp_path):
    pol = VoxCPMPolicy.from_pretrained(vox_ckpt)
    released = _load_released(vox_ckpt)
    rec = tiny_records[0]
    for pad in ("left", "right"):
        ours = pol.prompt_latent(rec, pad)
        theirs = released._encode_wav(rec.prompt_wav, padding_mode=pad)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    # a manifest line's prompt_latent (ttsrl prepare --policy voxcpm) is used as it is, and is checked
    lat = pol.prompt_latent(rec, "left").numpy()
    assert pol.prompt_input(dataclasses.replace(rec, prompt_latent=lat, prompt_wav=None)).prompt.feats.shape[0] > 0
    from rollouts.manifest import ManifestError

    with pytest.raises(ManifestError, match="field 'prompt_latent': patches of"):
        pol.prompt_input(dataclasses.replace(rec, prompt_latent=lat[:, :, :3]))
    with pytest.raises(ManifestError, match="field 'prompt_speech'"):
        pol.prompt_input(dataclasses.replace(rec, prompt_wav=None))


def test_lora_export_loads_in_the_released_package_both_ways(vox_ckpt, tiny_records, tmp_path):
    pol = VoxCPMPolicy.from_pretrained(vox_ckpt, lora=lora())
    assert all("lora_" in k for k in pol.state_for_checkpoint())
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = sample(pol, tiny_records[:1], group_size=2)
    trained = pol.token_logprobs(ro)[0].detach()
    fresh = VoxCPMPolicy.from_pretrained(vox_ckpt, lora=lora())
    fresh.load_checkpoint_state(pol.state_for_checkpoint())
    torch.testing.assert_close(fresh.token_logprobs(ro)[0].detach(), trained, rtol=0, atol=1e-6)
    pol.export(tmp_path / "out")
    merged = VoxCPMPolicy.from_pretrained(tmp_path / "out")  # ours reads the merged weights
    torch.testing.assert_close(merged.token_logprobs(ro)[0].detach(), trained, rtol=0, atol=1e-4)
    info = json.loads((tmp_path / "out" / "lora_config.json").read_text())
    assert info["base_model"] == str(vox_ckpt.resolve()) and info["lora_config"]["r"] == 4
    # the released package: the merged directory, and the base + VoxCPM's LoRA files, speak alike
    _released()
    from voxcpm.model.voxcpm2 import LoRAConfig

    base = _released().from_local(
        info["base_model"], optimize=False, device="cpu", lora_config=LoRAConfig(**info["lora_config"])
    )
    loaded, skipped = base.load_lora_weights(str(tmp_path / "out"))
    assert skipped == [] and len(loaded) == len(pol.released_lora_weights()) > 0
    whole = _load_released(tmp_path / "out")
    wavs = []
    for m in (base, whole):
        torch.manual_seed(3)
        wavs.append(m.generate("hello world", min_len=2, max_len=6)[0])
    assert wavs[0].shape == wavs[1].shape and (wavs[0] - wavs[1]).abs().max() <= 1e-4 * wavs[1].abs().max()


def test_settings_the_policy_cannot_take_are_refused_before_the_run_writes(tmp_path):
    from rl.config import load_config
    from rl.configlib import ConfigError
    from rl.trainer import train

    base = [f"policy.ckpt_dir={tmp_path / 'ckpt'}", f"train.output_dir={tmp_path / 'run'}", "wandb.enabled=false"]
    with pytest.raises(ConfigError, match="share their parameters"):
        cfg, d = load_config(REPO / "configs" / "tiny_voxcpm.yaml", [*base, "stages.stop.lr=1e-3"])
        train(cfg, d, progress=False)
    assert not (tmp_path / "run").exists()
    for extra, msg in [
        ("data.text_normalize=upstream", "does not fit policy.kind voxcpm"),
        ("policy.voxcpm.sde_steps=[0, 1]", r"sde_steps must be distinct steps in \[1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(REPO / "configs" / "tiny_voxcpm.yaml", [*base, extra])


def test_voxcpm_text_normalisation_is_the_released_one():
    from rollouts.text import LMTexts, released_voxcpm_normalizer

    texts, released = LMTexts("voxcpm"), released_voxcpm_normalizer()
    for t in ("今天是2024年5月3日，气温25°C。", "I have 3 apples."):
        assert texts.target(t) == released.normalize(t) != t
    assert texts.prompt("我有3个苹果") == "我有3个苹果"  # the released generate normalises the target text only


def test_prepare_writes_the_prompt_latents_the_policy_reads(vox_ckpt, tmp_path):
    from rl.cli import main
    from rollouts.manifest import read_manifest

    voices = REPO / "configs" / "data" / "tiny" / "voices"
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps({"prompt_wav": str(voices / "en_a.wav"), "prompt_text": "Hello there.", "target_text": "Good 2 go"})
        + "\n"
    )
    args = ["prepare", str(items), "--policy", "voxcpm", "--model", str(vox_ckpt), "--out", str(tmp_path / "m")]
    assert main([*args, "--text-normalize", "voxcpm", "--no-progress"]) == 0
    (rec,) = read_manifest(tmp_path / "m" / "manifest.jsonl")
    assert rec.prompt_speech_tokens is None and rec.prompt_latent is not None
    line = json.loads((tmp_path / "m" / "manifest.jsonl").read_text())
    assert line["syn_text_tn"] == "Good two go" and "prompt_speech_token" not in line
    pol = VoxCPMPolicy.from_pretrained(vox_ckpt)
    assert np.array_equal(rec.prompt_latent, pol.encode_wav(voices / "en_a.wav", "left").numpy())
    assert main(["prepare", str(items), "--policy", "voxcpm", "--out", str(tmp_path / "x"), "--no-progress"]) == 2


# ---- the trainer on configs/tiny_voxcpm.yaml -------------------------------------------------------------------------


def voxcpm_run(out, ckpt, *extra):
    from conftest import train_shipped

    return train_shipped("tiny_voxcpm.yaml", out, ckpt, f"data.manifest={TINY_MANIFEST}", *extra)


@pytest.mark.slow
def test_tiny_voxcpm_learns_its_duration_and_eval_compares_the_checkpoints(tmp_path, vox_ckpt):
    from rl.cli import main

    log = voxcpm_run(tmp_path / "run", vox_ckpt, "train.steps=8", "train.save_every=8")
    reward = [r["reward/duration/mean"] for r in log]
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.1, reward
    assert log[-1]["voxcpm/patches"] > log[0]["voxcpm/patches"]  # it learned to stop later
    for r in log:
        assert abs(r["dit/ratio/mean"] - 1) < 1e-3 and r["stop/clip/eps_low"] == 0.2 and "dit/lr" not in r
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "voxcpm.png").is_file() and (
        tmp_path / "run" / "plots" / "stages.png"
    ).is_file()
    meta = tmp_path / "meta.lst"
    voices = REPO / "configs" / "data" / "tiny" / "voices"
    # short targets: the random stop head's argmax may never stop, and a row then runs to the released cap of
    # 6 patches per text token + 10, three times (the released retry)
    meta.write_text(f"u1|Hello there.|{voices}/en_a.wav|Good day.\nu2|I like books.|{voices}/en_b.wav|Turn right.\n")
    common = ["--meta", str(meta), "--lang", "en", "--tiny-models"]
    assert main(["eval", "--ckpt", str(vox_ckpt), "--out", str(tmp_path / "A"), *common]) == 0
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "B"), *common]) == 0
    a, b = (json.loads((tmp_path / x / "eval.json").read_text()) for x in ("A", "B"))
    assert a["metrics"]["synthesised"] == b["metrics"]["synthesised"] == 2
    from rollouts.audio import read_wav

    wa, wb = (read_wav(x["items"][0]["wav"])[0] for x in (a, b))
    assert wa.shape != wb.shape or not np.allclose(wa, wb)  # the trained model speaks differently
    assert main(["eval", "--compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 0


@pytest.mark.slow
def test_one_update_per_rollout_gives_ratio_1_on_both_stages(tmp_path, vox_ckpt):
    log = voxcpm_run(
        tmp_path / "run",
        vox_ckpt,
        "train.steps=2",
        "optim.minibatches=1",
        "optim.ppo_epochs=1",
        "policy.lora.enabled=true",
        "policy.lora.dropout=0.0",
    )
    for r in log:
        for stage in ("dit", "stop"):
            assert abs(r[f"{stage}/ratio/min"] - 1) < 1e-3 and abs(r[f"{stage}/ratio/max"] - 1) < 1e-3, r
