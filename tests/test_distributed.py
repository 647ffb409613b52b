"""Data-parallel training: 2 processes under `accelerate launch` on CPU (gloo) give the single-process run with the
same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_MANIFEST
from safetensors.torch import load_file

from rl.config import DEFAULT_CONFIG, load_config
from rl.trainer import train

pytestmark = pytest.mark.slow  # every test runs `accelerate launch` subprocesses


def launch(tmp, ckpt, procs, *overrides, resume=False, config=DEFAULT_CONFIG):
    args = ["train", str(config), "--no-progress", "--output-dir", str(tmp)] + (["--resume", str(tmp)] * resume)
    for o in (
        f"policy.ckpt_dir={ckpt}",
        f"data.manifest={TINY_MANIFEST}",
        "data.prompts_per_step=4",
        "sampling.group_size=2",
        "sampling.max_token_text_ratio=4",
        "sampling.max_new_tokens=48",
        "wandb.enabled=false",
        "train.samples_every=0",
        "vocoder.n_timesteps=2",
        *overrides,
    ):
        args += ["--set", o]
    # `accelerate launch --multi_gpu` starts the processes through torch.distributed; without a GPU they use gloo
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={procs}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "-m",
        "rl.cli",
    ]
    cmd = launcher + args if procs > 1 else [sys.executable, "-m", "rl.cli"] + args
    out = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"; {procs} processes" in out.stdout) == (procs > 1), out.stdout[-2000:]  # really data-parallel
    assert ("ttsrl: resumed from" in out.stdout) == resume
    return [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_ckpt):
    """One process, plain AdamW: the run every data-parallel variant must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    # two steps: step 2 samples from the updated weights. Further on, weights that differ by float summation order
    # (gradients summed over ranks) can flip a sampled token that sits on a tie, and the runs drift apart
    return tmp, launch(tmp, tiny_ckpt, 1, "train.steps=2")


@pytest.mark.parametrize(
    "zero_stage, micro",
    [(0, 0), (0, 1), (2, 0), (3, 1)],
    ids=["ddp", "ddp-micro1", "fsdp2-zero2", "fsdp2-zero3-micro1"],
)
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, tiny_ckpt, single, zero_stage, micro):
    # tiny.yaml: dynamic re-rolls, 2 minibatches per step (so the global minibatch partition matters). micro 1: one
    # row per forward, so the ranks hold different numbers of micro-batches and pad with zero-weight ones
    one_dir, one = single
    two = launch(
        tmp_path / "two",
        tiny_ckpt,
        2,
        "train.steps=2",
        f"optim.zero_stage={zero_stage}",
        f"optim.micro_batch_size={micro}",
    )
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("reward/duration/mean", "len/mean", "resample/tries", "adv/frac_uninformative"):
            assert a[key] == b[key], key  # the same samples, the same resampling decisions
        for key in ("loss", "grad_norm", "clip/high_frac", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    ck_one, ck_two = one_dir / "checkpoints" / "step-000002", tmp_path / "two" / "checkpoints" / "step-000002"
    wa = load_file(str(ck_one / "policy.safetensors"))
    wb = load_file(str(ck_two / "policy.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5  # float summation order only
    # the optimizer state is whole in the checkpoint (under FSDP2: gathered from both ranks' shards)
    oa = torch.load(ck_one / "optimizer.pt", weights_only=True)
    ob = torch.load(ck_two / "optimizer.pt", weights_only=True)
    assert sorted(oa["state"]) == sorted(ob["state"]) == list(range(len(wa)))
    for i in oa["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            x, y = oa["state"][i][k], ob["state"][i][k]
            assert float((x - y).abs().max()) <= 1e-4 * float(x.abs().max()) + 1e-12, (i, k)


def test_a_rank_without_rows_pads_and_a_sharded_run_resumes_on_one_process(tmp_path, tiny_ckpt):
    # one group per step on 2 processes: rank 1 never holds a row, yet joins every gather (sampling, FSDP2 units)
    # and runs zero-weight micro-batches with a row sent over from rank 0. Saved sharded (ZeRO-3) after step 1,
    # the run resumes on one process without sharding and logs what the one-process run logs.
    common = ("data.prompts_per_step=1", "sampling.group_size=4", "optim.minibatches=2")
    one = launch(tmp_path / "one", tiny_ckpt, 1, "train.steps=2", *common)
    launch(tmp_path / "two", tiny_ckpt, 2, "train.steps=1", "optim.zero_stage=3", *common)
    resumed = launch(tmp_path / "two", tiny_ckpt, 1, "train.steps=2", *common, resume=True)
    assert len(one) == len(resumed) == 2
    for a, b in zip(one, resumed):
        for key in ("reward/duration/mean", "len/mean", "resample/tries"):
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "ratio/mean", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-000002" / "policy.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "policy.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_pipelined_run_on_two_processes_resumes_only_with_two(tmp_path, tiny_ckpt):
    two = launch(tmp_path / "run", tiny_ckpt, 2, "train.steps=2", "train.pipeline=true", "dynamic_sampling.mode=off")
    assert [r["pipeline/lag_steps"] for r in two] == [0, 1]
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    pending = load_file(str(ckpt / "pending.safetensors"))
    assert any(k.startswith("rank0.") for k in pending) and any(k.startswith("rank1.") for k in pending)
    cfg, d = load_config(
        DEFAULT_CONFIG,
        [
            f"policy.ckpt_dir={tiny_ckpt}",
            f"data.manifest={TINY_MANIFEST}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.steps=3",
            "train.pipeline=true",
            "data.prompts_per_step=4",
            "sampling.group_size=2",
            "dynamic_sampling.mode=off",
            "wandb.enabled=false",
        ],
    )
    with pytest.raises(RuntimeError, match="saved by 2 processes; resume it with as many"):
        train(cfg, d, resume=str(tmp_path / "run"), progress=False)


JOINT = REPO / "configs" / "tiny_joint.yaml"
JOINT_RUN = ("train.steps=2", "data.prompts_per_step=2", "optim.grad_clip=0.5")


@pytest.fixture(scope="module")
def joint_single(tmp_path_factory):
    """The joint policy (LM tokens + flow transitions) on one process: what two processes must reproduce."""
    from policies.glmtts_joint import GLMTTSJointPolicy
    from rollouts.manifest import read_manifest

    tmp = tmp_path_factory.mktemp("joint")
    texts = [t for r in read_manifest(TINY_MANIFEST) for t in (r.prompt_text, r.target_text)]
    GLMTTSJointPolicy.write_tiny(tmp / "ckpt", texts, seed=0, vocoder=True)
    return tmp, launch(tmp / "one", tmp / "ckpt", 1, *JOINT_RUN, config=JOINT)


def test_joint_policy_on_two_processes_equals_one(tmp_path, joint_single):
    # two stages: per-stage denominators, parameter groups and clipping over ranks; ZeRO-3 shards the LM's layers
    # and the DiT's blocks as units of their own (DDP runs the same stage code; the LM's tests above cover it)
    root, one = joint_single
    two = launch(tmp_path / "two", root / "ckpt", 2, *JOINT_RUN, "optim.zero_stage=3", config=JOINT)
    for a, b in zip(one, two):
        for key in ("reward/duration/mean", "reward/loudness/mean", "len/mean", "flow/logprob_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        for key in ("loss", "lm/loss", "flow/loss", "lm/grad_norm", "flow/grad_norm", "lm/ratio/min", "flow/ratio/max"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(str(root / "one" / "checkpoints" / "step-000002" / "policy.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "policy.safetensors"))
    assert {k.split(".")[0] for k in wa} == {"lm", "flow"}
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


ITTS = REPO / "configs" / "tiny_indextts2.yaml"
ITTS_RUN = (
    "train.steps=2",
    "data.prompts_per_step=2",
    "sampling.max_new_tokens=40",
    "policy.indextts2.diffusion_steps=2",
)


def test_indextts2_on_two_processes_equals_one(tmp_path):
    # FSDP2 (ZeRO-2, the policy one unit): sampling and the decode latents run inside the gathered weights, the
    # teacher-forced pass and the update on the shards; two processes reproduce one with the same global batch
    from policies.indextts2 import IndexTTS2Policy
    from rollouts.manifest import read_manifest

    texts = [t for r in read_manifest(TINY_MANIFEST) for t in (r.prompt_text, r.target_text)]
    IndexTTS2Policy.write_tiny(tmp_path / "ckpt", texts, seed=0, vocoder=True)
    one = launch(tmp_path / "one", tmp_path / "ckpt", 1, *ITTS_RUN, config=ITTS)
    two = launch(tmp_path / "two", tmp_path / "ckpt", 2, *ITTS_RUN, "optim.zero_stage=2", config=ITTS)
    for a, b in zip(one, two):
        for key in ("reward/duration/mean", "len/mean", "indextts2/codes", "indextts2/logprob_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        for key in ("loss", "lm/grad_norm", "lm/ratio/min", "lm/ratio/max"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa = load_file(str(tmp_path / "one" / "checkpoints" / "step-000002" / "policy.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "policy.safetensors"))
    # within a tenth of one step (lr 1e-3): the attention's key bias has a gradient of 0 up to rounding (it shifts
    # every score of a query alike), which AdamW scales up to lr-sized steps; the summation order of the gradients
    # over ranks then shows in those entries only
    assert set(wa) == set(wb) and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
