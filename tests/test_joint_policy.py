"""Both GLM-TTS stages as one policy (policies/glmtts_joint.py): sampling, the ratio of each stage, the stages' loss,
learning rates and clipping in the trainer (rl/stages.py), checkpoints, export, and the tiny joint run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from policies.glmtts import GLMTTSPolicy
from policies.glmtts_flow import GLMTTSFlowPolicy
from policies.glmtts_joint import FLOW_STREAM, GLMTTSJointPolicy
from policies.sampling import row_keys
from rollouts.types import SamplingParams

PARAMS = SamplingParams(temperature=1.0, top_k=25, top_p=0.8, ras=True)
K = 2  # policy.flow.sde_steps [1, 2]


@pytest.fixture(scope="module")
def joint_ckpt(tmp_path_factory, tiny_records):
    d = tmp_path_factory.mktemp("joint") / "tiny-glmtts"
    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    GLMTTSJointPolicy.write_tiny(d, texts, seed=0, vocoder=True)
    return d


def sample(pol, records, group_size=3, seed=7):
    prompts = [pol.prompt_input(r) for r in records]
    return pol.sample_groups(
        prompts, group_size, PARAMS, group_ids=list(range(len(prompts))), seed=seed, max_new_tokens=40
    )


def lora(**kw):
    from rl.config import LoraConfig

    return dataclasses.replace(LoraConfig(enabled=True, dropout=0.0), **kw)


def test_rows_sample_codes_as_the_lm_policy_and_mel_as_the_flow_policy(joint_ckpt, tiny_records):
    pol = GLMTTSJointPolicy.from_pretrained(joint_ckpt)
    ro = sample(pol, tiny_records[:2])
    assert pol.action_stages(ro)[:, :K].eq(1).all() and pol.action_stages(ro)[:, K:].eq(0).all()
    # the LM's columns are what `glmtts` samples with the same seed: row j of group g from stream (seed, g, j)
    lm = GLMTTSPolicy.from_pretrained(joint_ckpt)
    want = lm.sample_groups(
        [lm.prompt_input(r) for r in tiny_records[:2]], 3, PARAMS, group_ids=[0, 1], seed=7, max_new_tokens=40
    )
    assert torch.equal(ro.tokens[:, K:], want.tokens) and torch.equal(ro.token_mask[:, K:], want.token_mask)
    assert torch.equal(ro.behaviour_logp[:, K:], want.behaviour_logp)
    codes = pol.speech_codes(ro)
    assert len({tuple(c.tolist()) for c in codes[:3]}) > 1  # a group's rows have codes of their own
    # the flow's columns are `glmtts_flow`'s sampler on each row's codes, from stream (seed, g, j + 2^32)
    flow = GLMTTSFlowPolicy.from_pretrained(joint_ckpt)
    keys = row_keys(7, ro.group_ids, torch.arange(3).repeat(2) + FLOW_STREAM)
    fa = flow.sample_flow([flow.prompt_input(tiny_records[int(i)]).voice for i in ro.prompt_index], codes, keys)
    torch.testing.assert_close(ro.extras["mel"], fa.extras["mel"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ro.behaviour_logp[:, :K], fa.logp, rtol=0, atol=1e-6)
    assert ro.token_mask[:, :K].all() and torch.equal(ro.tokens[:, :K], torch.tensor([[1, 2]] * 6))


def test_ratio_is_1_on_both_stages_before_any_update_and_gradients_reach_both(joint_ckpt, tiny_records):
    pol = GLMTTSJointPolicy.from_pretrained(joint_ckpt)
    ro = sample(pol, tiny_records[:3])
    logp, ent = pol.token_logprobs(ro)
    m = ro.token_mask
    assert (logp - ro.behaviour_logp)[m].abs().max() < 1e-4
    assert torch.isnan(ent[:, :K]).all() and not torch.isnan(ent[:, K:][m[:, K:]]).all()
    pol.make_reference()
    ref, _ = pol.token_logprobs(ro, reference=True)
    assert (ref - ro.behaviour_logp)[m].abs().max() < 1e-4
    assert pol.reference_kl(ro).abs().max() == 0.0
    sub = ro.select([7, 0, 4])  # a subset in another order scores as it did in the batch
    torch.testing.assert_close(pol.token_logprobs(sub)[0], logp[[7, 0, 4]].detach(), rtol=0, atol=1e-4)
    (logp * m).sum().backward()
    own = pol.stage_parameters()
    for stage in ("lm", "flow"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own[stage]), stage
    assert pol.flow.model.estimator.text_emb_layer.text_embed.weight.grad is None  # frozen as in glmtts_flow
    assert not any(p.requires_grad for p in pol.flow.hift.parameters())
    assert {id(p) for p in pol.trainable_parameters()} == {id(p) for v in own.values() for p in v}
    # a perturbed DiT: the flow's closed-form KL is positive on its columns, 0 on the LM's
    with torch.no_grad():
        for p in own["flow"]:
            p.add_(0.02 * torch.randn_like(p))
    kl = pol.reference_kl(ro)
    assert (kl[:, :K] > 0).all() and (kl[:, K:] == 0).all()


def test_checkpoint_state_and_lora_export_hold_both_stages(joint_ckpt, tiny_records, tmp_path):
    from rollouts.token2wav import Token2Wav

    pol = GLMTTSJointPolicy.from_pretrained(joint_ckpt, lora=lora())
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = sample(pol, tiny_records[:2], group_size=2)
    trained = pol.token_logprobs(ro)[0].detach()
    state = pol.state_for_checkpoint()
    assert {k.split(".")[0] for k in state} == {"lm", "flow"} and all("lora_" in k for k in state if "flow." in k)
    fresh = GLMTTSJointPolicy.from_pretrained(joint_ckpt, lora=lora())
    fresh.load_checkpoint_state(state)
    torch.testing.assert_close(fresh.token_logprobs(ro)[0].detach(), trained, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="outside lm"):
        fresh.load_checkpoint_state({**state, "hift.x": torch.zeros(1)})
    pol.export(tmp_path / "out")
    src = torch.load(joint_ckpt / "flow" / "flow.pt", weights_only=True)
    out = torch.load(tmp_path / "out" / "flow" / "flow.pt", weights_only=True)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in src.items()}  # LoRA merged, no adapter keys
    assert not list((tmp_path / "out" / "flow").glob("*.partial"))
    Token2Wav.from_pretrained(tmp_path / "out")  # upstream's vocoder loads the trained flow strictly
    merged = GLMTTSJointPolicy.from_pretrained(tmp_path / "out")  # both stages trained, no adapters
    torch.testing.assert_close(merged.token_logprobs(ro)[0].detach(), trained, rtol=0, atol=1e-4)


def test_a_stage_the_policy_does_not_have_is_refused_before_the_run_writes(tmp_path, joint_ckpt):
    from conftest import REPO

    from rl.config import load_config
    from rl.configlib import ConfigError
    from rl.trainer import train

    base = [f"policy.ckpt_dir={joint_ckpt}", f"train.output_dir={tmp_path / 'run'}", "wandb.enabled=false"]
    for extra, msg in [
        (["stages.vocoder.lr=1e-3"], "no stage 'vocoder'; its stages: lm, flow"),
        (["policy.kind=glmtts", "stages.flow.lr=1e-3"], "policy.kind glmtts has no stage 'flow'; its stages: lm"),
        (["stages.lm.loss_weight=0", "stages.flow.loss_weight=0"], "nothing would train"),
    ]:
        cfg, d = load_config(REPO / "configs" / "tiny_joint.yaml", base + extra)
        with pytest.raises(ConfigError, match=msg):
            train(cfg, d, progress=False)
        assert not (tmp_path / "run").exists()


# ---- the trainer on configs/tiny_joint.yaml --------------------------------------------------------------------------


def joint_run(out, ckpt, *extra):
    from conftest import train_shipped

    return train_shipped("tiny_joint.yaml", out, ckpt, *extra)


@pytest.mark.slow
def test_tiny_joint_trains_both_stages_each_with_its_own_lr_and_clipping(tmp_path, joint_ckpt):
    from rl.checkpoint import find_checkpoint, load_checkpoint
    from rl.cli import main as cli_main

    log = joint_run(
        tmp_path / "run",
        joint_ckpt,
        "train.steps=8",
        "train.save_every=8",
        "optim.grad_clip=0.5",
        "sampling.max_new_tokens=48",
        "stages.flow.lr=4e-3",
    )
    loud = [r["reward/loudness/mean"] for r in log]
    assert sum(loud[-3:]) / 3 > sum(loud[:3]) / 3 + 0.1, loud  # the flow learns the level
    for r in log:
        assert r["grad_norm"] == pytest.approx(math.hypot(r["lm/grad_norm"], r["flow/grad_norm"]), rel=1e-6)
        assert r["lm/lr"] == 2.5e-5 and r["flow/lr"] == 4e-3 and r["flow/clip/eps_low"] == 0.2
        assert r["flow/eta"] == 0.7 and r["flow/sde_steps"] == 2 and r["flow/logprob_mean"] < 0
        # the stages' own ratios: the LM's per token, the flow's per element (much closer to 1)
        assert abs(r["flow/ratio/mean"] - 1) < 1e-3 and abs(r["lm/ratio/mean"] - 1) < 0.1
    ckpt = load_checkpoint(find_checkpoint(tmp_path / "run"))
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [2.5e-5, 4e-3]
    start = GLMTTSJointPolicy.from_pretrained(joint_ckpt).state_for_checkpoint()
    for stage in ("lm.", "flow."):  # both stages moved
        assert any(not torch.equal(v, start[k]) for k, v in ckpt["policy"].items() if k.startswith(stage)), stage
    assert cli_main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "stages.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = GLMTTSJointPolicy.from_pretrained(tmp_path / "out").state_for_checkpoint()
    assert all(torch.equal(exported[k], v) for k, v in ckpt["policy"].items())


@pytest.mark.slow
def test_one_update_per_rollout_gives_ratio_1_on_both_stages_and_resume_is_exact(tmp_path, joint_ckpt):
    one = ("optim.minibatches=1", "optim.ppo_epochs=1", "sampling.max_new_tokens=48", "data.prompts_per_step=2")
    a = joint_run(tmp_path / "a", joint_ckpt, "train.steps=3", "train.save_every=0", *one)
    for r in a:
        for stage in ("lm", "flow"):
            assert abs(r[f"{stage}/ratio/min"] - 1) < 1e-3 and abs(r[f"{stage}/ratio/max"] - 1) < 1e-3, r
    joint_run(tmp_path / "b", joint_ckpt, "train.steps=2", "train.save_every=1", *one)
    from conftest import REPO

    from rl.config import load_config
    from rl.trainer import train

    cfg, d = load_config(
        REPO / "configs" / "tiny_joint.yaml",
        [
            f"policy.ckpt_dir={joint_ckpt}",
            f"train.output_dir={tmp_path / 'b'}",
            "wandb.enabled=false",
            "train.samples_every=0",
            "train.steps=3",
            "train.save_every=1",
            *one,
        ],
    )
    train(cfg, d, resume=str(tmp_path / "b"), progress=False)
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward/fused/mean", "lm/loss", "flow/loss", "lm/grad_norm", "flow/grad_norm", "flow/logprob_mean")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
