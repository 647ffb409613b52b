"""Training with remote rewards (same metrics as local), a service dying mid-run, the invalid-fraction limit,
and pipelined rollouts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, ServerThread, free_port, run_config
from safetensors.torch import load_file

from rewards.cer import CERScorer
from rewards.duration import DurationScorer
from rewards.server import create_app
from rl.config import DEFAULT_CONFIG, load_config
from rl.trainer import RewardFailure, train

COMMON = ("data.prompts_per_step=2", "sampling.group_size=3", "vocoder.n_timesteps=2", "train.steps=2")


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_remote_rewards_give_the_same_metrics_as_local(tmp_path, tiny_ckpt, reward_models):
    para = reward_models["paraformer_dir"]
    local = ("rewards.cer.scorer=cer", f"rewards.cer.kwargs.paraformer_dir={para}", "rewards.cer.weight=0.5")
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "local", tiny_ckpt, *COMMON, *local))
    train(cfg, d, progress=False)
    servers = [
        ServerThread(create_app(DurationScorer(), "duration")),
        ServerThread(create_app(CERScorer(paraformer_dir=para), "cer")),
    ]
    try:
        remote = (
            "rewards.duration.scorer=remote",
            f"rewards.duration.kwargs={{url: '{servers[0].url}'}}",
            "rewards.cer.scorer=remote",
            f"rewards.cer.kwargs={{url: '{servers[1].url}', batch_size: 2}}",
            "rewards.cer.weight=0.5",
        )
        cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "remote", tiny_ckpt, *COMMON, *remote))
        train(cfg, d, progress=False)
    finally:
        for s in servers:
            s.stop()
    a, b = rows(tmp_path / "local" / "run"), rows(tmp_path / "remote" / "run")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(("time/", "service/"))}
        assert keys == {k for k in y if not k.startswith(("time/", "service/"))}
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}
    assert b[0]["service/cer/requests"] >= 3 and b[0]["service/cer/errors"] == 0
    wa = load_file(str(tmp_path / "local" / "run" / "checkpoints" / "step-000002" / "policy.safetensors"))
    wb = load_file(str(tmp_path / "remote" / "run" / "checkpoints" / "step-000002" / "policy.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def start_server(port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl.cli", "serve-reward", "--scorer", "duration", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import httpx

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


@pytest.mark.slow
def test_a_service_killed_mid_run_makes_samples_invalid_and_the_run_goes_on(tmp_path, tiny_ckpt):
    port = free_port()
    server = start_server(port)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rl.cli", "train", str(DEFAULT_CONFIG), "--no-progress"]
    for o in run_config(
        tmp_path,
        tiny_ckpt,
        "data.prompts_per_step=2",
        "sampling.group_size=2",
        "train.steps=4",
        "train.max_dead_reward_steps=0",  # 0 = never stop for a dead reward (default: 3 steps)
        "vocoder.enabled=false",
        "rewards.dur2.scorer=remote",
        "rewards.dur2.weight=0.5",
        f"rewards.dur2.kwargs={{url: 'http://127.0.0.1:{port}', retries: 2, backoff_s: 0.05, timeout_s: 5}}",
    ):
        args += ["--set", o]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait()
        _, err = proc.communicate(timeout=180)
    finally:
        server.kill()
    assert proc.returncode == 0, err[-2000:]
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[0]["reward/dur2/invalid_frac"] == 0.0
    assert log[-1]["reward/dur2/invalid_frac"] == 1.0 and log[-1]["service/dur2/failed_requests"] >= 1
    assert log[-1]["service/dur2/errors"] >= 3  # each failed request was tried 1 + retries times
    assert log[-1]["reward/duration/invalid_frac"] == 0.0  # the local reward still trains


def test_a_reward_that_mostly_fails_stops_the_run_with_a_clear_error(tmp_path, tiny_ckpt):
    from scorers_for_tests import Broken

    server = ServerThread(create_app(Broken(), "x"))  # answers /health, fails every batch with a 500
    try:
        cfg, d = load_config(
            DEFAULT_CONFIG,
            run_config(
                tmp_path,
                tiny_ckpt,
                "data.prompts_per_step=2",
                "sampling.group_size=2",
                "train.steps=2",
                "vocoder.enabled=false",
                "rewards.x.scorer=remote",
                f"rewards.x.kwargs={{url: '{server.url}', retries: 0}}",
                "rewards.x.max_invalid_frac=0.5",
            ),
        )
        with pytest.raises(
            RewardFailure,
            match=r"reward 'x': 100% of step 1's samples are invalid.*"
            r"max_invalid_frac=0.5.*reward service",
        ):
            train(cfg, d, progress=False)
    finally:
        server.stop()


def test_pipelined_rollouts_are_one_step_off_policy_and_resume_exactly(tmp_path, tiny_ckpt):
    base = (
        "data.prompts_per_step=2",
        "sampling.group_size=3",
        "vocoder.n_timesteps=2",
        "train.pipeline=true",
        "dynamic_sampling.mode=off",
        "train.save_every=2",
        "optim.minibatches=2",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "a", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, progress=False)
    log = rows(tmp_path / "a" / "run")
    assert [r["pipeline/offpolicy_frac"] for r in log] == [0.0, 1.0, 1.0, 1.0]
    assert [r["pipeline/lag_steps"] for r in log] == [0, 1, 1, 1]
    assert log[1]["ratio/max"] != 1.0  # sampled by the previous policy: the ratio is not 1 from the first minibatch
    ck = tmp_path / "a" / "run" / "checkpoints"
    assert (ck / "step-000002" / "pending.safetensors").exists()
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=2", *base))
    train(cfg, d, progress=False)
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, resume=str(tmp_path / "b" / "run"), progress=False)
    wa = load_file(str(ck / "step-000004" / "policy.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step-000004" / "policy.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pipelining_hides_generation_behind_scoring(tmp_path, tiny_ckpt):
    # a reward service that takes 0.8 s per step: the next round's generation runs meanwhile
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=2",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "vocoder.n_timesteps=2",
            "train.pipeline=true",
            "dynamic_sampling.mode=off",
            "train.save_every=0",
            "rewards.wait.scorer=scorers_for_tests:Slow",
            "rewards.wait.weight=0",
            "rewards.wait.kwargs.seconds=0.8",
        ),
    )
    train(cfg, d, progress=False)
    log = rows(tmp_path / "run")
    assert all(r["time/prefetch_hidden_s"] > 0 for r in log), [r["time/prefetch_hidden_s"] for r in log]
