"""The GRPO trainer on the tiny model: learning, exact resume, kill-and-resume, LoRA, invalid rewards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_config
from safetensors.torch import load_file

from rl.config import DEFAULT_CONFIG, load_config
from rl.dynamic_sampling import DynamicSamplingExhausted
from rl.errors import RunError
from rl.trainer import train

REQUIRED = [
    "reward/duration/mean",
    "reward/duration/std",
    "reward/duration/invalid_frac",
    "reward/fused/mean",
    "adv/frac_uninformative",
    "resample/tries",
    "clip/low_frac",
    "clip/high_frac",
    "clip/eps_low",
    "clip/eps_high",
    "sampling/temperature",
    "loss",
    "kl",
    "entropy",
    "len/mean",
    "len/truncated_frac",
    "lr",
    "grad_norm",
    "time/rollout_s",
    "time/score_s",
    "time/update_s",
]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "policy.safetensors"))


def test_short_run_learns_and_logs_every_metric(tmp_path, tiny_ckpt):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=10",
            "optim.lr=1e-4",
            "sampling.max_token_text_ratio=8",
            "sampling.max_new_tokens=100",
            "train.save_every=0",
        ),
    )
    train(cfg, d, progress=False)
    run = tmp_path / "run"
    log = rows(run)
    assert [r["step"] for r in log] == list(range(1, 11))
    for key in REQUIRED:
        assert key in log[0], key
    first = sum(r["reward/fused/mean"] for r in log[:3]) / 3
    last = sum(r["reward/fused/mean"] for r in log[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert log[-1]["len/mean"] > log[0]["len/mean"]  # it learned to speak at a slower, closer-to-expected pace
    assert log[0]["clip/eps_low"] == pytest.approx(0.2) and log[-1]["clip/eps_high"] > log[0]["clip/eps_high"]
    start = load_file(str(tiny_ckpt / "llm" / "model.safetensors"))
    end = weights(run, 10)
    assert any(not torch.equal(start[k], end[k]) for k in start)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resume_is_exact(tmp_path, tiny_ckpt, zero_stage):
    base = (
        "data.prompts_per_step=2",
        "sampling.group_size=3",
        "train.save_every=2",
        "optim.minibatches=2",
        f"optim.zero_stage={zero_stage}",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "a", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, progress=False)
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=2", *base))
    train(cfg, d, progress=False)
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, resume=str(tmp_path / "b" / "run"), progress=False)
    a, b = weights(tmp_path / "a" / "run", 4), weights(tmp_path / "b" / "run", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(tmp_path / "a" / "run"), rows(tmp_path / "b" / "run")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["reward/fused/mean"] == y["reward/fused/mean"] and x["len/mean"] == y["len/mean"]
        # the reward-hacking monitor's window comes back with the checkpoint (rl/monitor.py)
        assert {k: v for k, v in x.items() if k.startswith("monitor/")} == {
            k: v for k, v in y.items() if k.startswith("monitor/")
        }
    assert rb[2]["monitor/trend/duration"] is not None  # step 3's window holds steps 1 and 2 from the checkpoint


@pytest.mark.slow
def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path, tiny_ckpt):
    common = [
        "data.prompts_per_step=2",
        "sampling.group_size=2",
        "train.save_every=1",
        "train.keep_last=10",
        "train.steps=6",
    ]
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "ref", tiny_ckpt, *common))
    train(cfg, d, progress=False)

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "rl.cli", "train", str(DEFAULT_CONFIG), "--no-progress"]
    for o in run_config(killed, tiny_ckpt, *common):
        args += ["--set", o]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    target = killed / "run" / "checkpoints" / "step-000003"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never reached its third checkpoint"
    assert not (killed / "run" / "checkpoints" / "step-000006").exists()

    out = cli("train", "--resume", str(killed / "run"), "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = weights(tmp_path / "ref" / "run", 6), weights(killed / "run", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(killed / "run")] == [1, 2, 3, 4, 5, 6]  # redone steps are not logged twice


def cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "rl.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tmp_path, tiny_ckpt):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(tmp_path, tiny_ckpt, "train.steps=1", "data.prompts_per_step=1", "sampling.group_size=2"),
    )
    train(cfg, d, progress=False)
    args = ["train", str(DEFAULT_CONFIG), "--resume", str(tmp_path / "run"), "--no-progress"]
    for o in run_config(
        tmp_path, tiny_ckpt, "train.steps=2", "data.prompts_per_step=1", "sampling.group_size=2", "optim.lr=1e-3"
    ):
        args += ["--set", o]
    out = cli(*args)
    assert out.returncode == 2 and "optim.lr" in out.stderr
    # without a config file, --set on a resumed run may change the run length only
    out = cli(
        "train",
        "--resume",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        "optim.lr=1e-3",
        "--set",
        "loss.agg=seq_mean",
    )
    assert out.returncode == 2 and "optim.lr" in out.stderr and "loss.agg" in out.stderr


@pytest.mark.slow
def test_a_run_from_a_relative_config_path_resumes_from_anywhere(tmp_path, tiny_ckpt):
    # configs/tiny.yaml's own relative paths (manifest, ...) resolve against the file; the saved config holds
    # them as absolute paths, so --resume works from another directory
    run = tmp_path / "run"
    small = [
        "--set",
        f"policy.ckpt_dir={tiny_ckpt}",
        "--set",
        "data.prompts_per_step=1",
        "--set",
        "sampling.group_size=2",
        "--set",
        "sampling.max_new_tokens=24",
        "--set",
        "wandb.enabled=false",
        "--set",
        "train.samples_every=0",
    ]
    out = cli("train", "configs/tiny.yaml", "--output-dir", str(run), "--no-progress", "--set", "train.steps=1", *small)
    assert out.returncode == 0, out.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = cli("train", "--resume", str(run), "--no-progress", "--set", "train.steps=2", cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["step"] for r in rows(run)] == [1, 2]


@pytest.mark.slow
def test_train_without_a_config_runs_the_embedded_default_and_builds_the_tiny_models(tmp_path):
    ckpt = tmp_path / "fresh-tiny"  # absent: the embedded default writes the tiny LM and vocoder first
    out = cli(
        "train",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
        "--set",
        f"policy.ckpt_dir={ckpt}",
        "--set",
        "train.steps=1",
        "--set",
        "data.prompts_per_step=1",
        "--set",
        "sampling.max_new_tokens=24",
        "--set",
        "wandb.enabled=false",
        "--set",
        "train.samples_every=0",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wrote a tiny random GLM-TTS speech LM" in out.stdout and "wrote a tiny random flow + HiFT" in out.stdout
    assert (ckpt / "llm" / "config.json").is_file() and (ckpt / "flow" / "flow.pt").is_file()
    assert (ckpt / "hift" / "hift.pt").is_file()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "duration" in saved and rows(tmp_path / "run")[0]["step"] == 1  # configs/tiny.yaml's reward


def test_old_anchor_clip_binds_in_later_minibatches(tmp_path, tiny_ckpt):
    # ratio against the behaviour policy: the first minibatch sees ratio 1, later ones (and the second epoch) see
    # the updated policy, so the ratio moves and the clip range can bind
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=4",
            "loss.ratio_anchor=old",
            "optim.minibatches=2",
            "optim.ppo_epochs=2",
            "optim.lr=3e-2",
            "loss.eps_low=0.05",
            "loss.eps_high=0.05",
            "dynamic_sampling.mode=off",
            "train.save_every=0",
        ),
    )
    m = train(cfg, d, progress=False)
    assert m["ratio/max"] > 1.05 or m["ratio/min"] < 0.95, m
    assert m["clip/low_frac"] + m["clip/high_frac"] > 0, m


def test_lora_with_reference_anchor_and_kl(tmp_path, tiny_ckpt):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=2",
            "data.prompts_per_step=2",
            "sampling.group_size=3",
            "policy.lora.enabled=true",
            "policy.lora.dropout=0",
            "loss.ratio_anchor=ref",
            "loss.kl_coef=0.1",
            "optim.lr=1e-2",
            "optim.minibatches=2",
            "rewards.duration.scorer=scorers_for_tests:Longer",
        ),
    )
    metrics = train(cfg, d, progress=False)
    assert metrics["kl"] > 0 and metrics["ratio/max"] > 1.0
    state = weights(tmp_path / "run", 2)
    assert state and all("lora_" in k or "modules_to_save" in k or "embed_tokens" in k or "lm_head" in k for k in state)
    check_export(tmp_path, tiny_ckpt, cfg)


def check_export(tmp_path, tiny_ckpt, cfg):
    """`ttsrl export` writes the upstream layout: the LoRA merged into llm/, which loads strictly with plain
    transformers and with the policy's loader, and scores the run's rollouts as the trained policy does."""
    from conftest import TINY_MANIFEST
    from transformers import LlamaForCausalLM

    from policies.glmtts import GLMTTSPolicy
    from rl.checkpoint import find_checkpoint, load_checkpoint
    from rl.cli import main
    from rollouts.manifest import read_manifest
    from rollouts.types import SamplingParams

    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_ckpt.iterdir())
    _, info = LlamaForCausalLM.from_pretrained(str(out / "llm"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    trained = GLMTTSPolicy.from_pretrained(tiny_ckpt, lora=cfg.policy.lora)
    trained.load_checkpoint_state(load_checkpoint(find_checkpoint(tmp_path / "run"))["policy"])
    exported = GLMTTSPolicy.from_pretrained(out)
    assert not exported.lora
    prompts = [trained.prompt_input(r) for r in read_manifest(TINY_MANIFEST)[:2]]
    ro = trained.sample_groups(prompts, 2, SamplingParams(top_k=25), group_ids=[0, 1], seed=3, max_new_tokens=20)
    with torch.no_grad():
        a, _ = trained.token_logprobs(ro)
        b, _ = exported.token_logprobs(ro)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert main(["export", str(tmp_path / "run"), str(out)]) == 2  # never into a directory that holds files


def test_invalid_rewards_are_counted_and_masked(tmp_path, tiny_ckpt):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "rewards.duration.scorer=scorers_for_tests:InvalidOddGroups",
            "dynamic_sampling.mode=off",
        ),
    )
    m = train(cfg, d, progress=False)
    assert m["reward/duration/invalid_frac"] == pytest.approx(0.5)
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path / "none",
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "rewards.duration.scorer=scorers_for_tests:AlwaysInvalid",
            "dynamic_sampling.mode=off",
        ),
    )
    with pytest.raises(RunError, match="the run trained on nothing"):  # a run that trained on nothing fails
        train(cfg, d, progress=False)
    m = rows(tmp_path / "none" / "run")[-1]
    assert m["reward/duration/invalid_frac"] == 1.0 and m["grad_norm"] == 0.0  # nothing left to train on
    start = load_file(str(tiny_ckpt / "llm" / "model.safetensors"))
    end = weights(tmp_path / "none" / "run", 1)
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_dynamic_sampling_rerolls_and_refill_can_stop(tmp_path, tiny_ckpt):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "rewards.duration.scorer=scorers_for_tests:Constant",
            "dynamic_sampling.max_tries=3",
        ),
    )
    m = train(cfg, d, progress=False)
    assert m["resample/tries"] == 3 and m["adv/frac_uninformative"] == 1.0 and m["resample/discarded_groups"] == 4
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path / "refill",
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "rewards.duration.scorer=scorers_for_tests:Constant",
            "dynamic_sampling.mode=refill",
            "dynamic_sampling.max_gen_batches=2",
            "dynamic_sampling.on_exhausted=error",
        ),
    )
    with pytest.raises(DynamicSamplingExhausted, match="0 of 2 groups were informative after 2"):
        train(cfg, d, progress=False)


def test_wandb_runs_offline_without_an_api_key(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=1",
            "sampling.group_size=2",
            "wandb.enabled=true",
            "wandb.project=ttsrl-test",
        ),
    )
    train(cfg, d, progress=False)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_rollouts_are_vocoded_and_scorers_get_audio(tmp_path, tiny_ckpt, monkeypatch):
    from rollouts.token2wav import Token2Wav

    calls = []
    real = Token2Wav.__call__

    def spy(self, codes, prompts, seeds, **kw):
        calls.append(list(seeds))
        return real(self, codes, prompts, seeds, **kw)

    monkeypatch.setattr(Token2Wav, "__call__", spy)
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "rewards.audio.scorer=scorers_for_tests:AudioSeconds",
            "vocoder.n_timesteps=2",
        ),
    )
    m = train(cfg, d, progress=False)
    assert m["reward/audio/invalid_frac"] == 0.0
    # decoder noise is seeded per group: the rows of a group (consecutive) share a seed, groups do not
    assert calls and all(len(c) == 4 and c[0] == c[1] and c[2] == c[3] and c[0] != c[2] for c in calls)
    # 2 mel frames per code (within one frame): audio seconds track code seconds
    assert abs(m["reward/audio/mean"] - m["reward/duration/seconds"]) < 0.05
    assert m["time/vocode_s"] > 0


def test_vocoding_needs_prompt_features(tmp_path, tiny_ckpt, tiny_records):
    import json

    from conftest import TINY_MANIFEST

    from rollouts.manifest import ManifestError

    lines = TINY_MANIFEST.read_text(encoding="utf-8").splitlines()
    obj = json.loads(lines[1])
    del obj["prompt_speech_feat"]
    lines[1] = json.dumps(obj, ensure_ascii=False)
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for p in (TINY_MANIFEST.parent / "voices").iterdir():
        (tmp_path / "voices").mkdir(exist_ok=True)
        (tmp_path / "voices" / p.name).write_bytes(p.read_bytes())
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, "train.steps=1", f"data.manifest={m}"))
    with pytest.raises(ManifestError, match=r"m.jsonl:2: field 'prompt_speech_feat' is missing; vocoding needs it"):
        train(cfg, d, progress=False)


def test_training_with_every_audio_reward(tmp_path, tiny_ckpt, reward_models):
    r = reward_models
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=1",
            "data.prompts_per_step=3",
            "sampling.group_size=2",
            "data.shuffle=false",
            "vocoder.n_timesteps=2",
            "rewards.duration.weight=0.1",
            "rewards.cer.scorer=cer",
            f"rewards.cer.kwargs.paraformer_dir={r['paraformer_dir']}",
            f"rewards.cer.kwargs.whisper_dir={r['whisper_dir']}",
            "rewards.sim.scorer=sim",
            "rewards.sim.weight=0.1",
            f"rewards.sim.kwargs.checkpoint={r['sv_checkpoint']}",
            f"rewards.sim.kwargs.wavlm_cfg={json.dumps(r['wavlm_cfg'])}",
            "rewards.emo.scorer=emotion",
            "rewards.emo.weight=0.5",
            f"rewards.emo.kwargs.model_dir={r['emotion_dir']}",
            "rewards.laugh.scorer=laughter",
            "rewards.laugh.weight=2",
            f"rewards.laugh.kwargs.ast_dir={r['ast_dir']}",
            f"rewards.laugh.kwargs.paraformer_dir={r['paraformer_dir']}",
            f"rewards.laugh.kwargs.whisper_dir={r['whisper_dir']}",
        ),
    )
    m = train(cfg, d, progress=False)
    for k in ("cer", "sim", "emo"):
        assert m[f"reward/{k}/invalid_frac"] == 0.0 and m[f"reward/{k}/errors"] == 0
    assert 0.0 <= m["reward/cer/mean"] <= 1.0 and 0.0 <= m["reward/sim/mean"] <= 1.0
    assert "reward/cer/cer" in m and "reward/sim/cos" in m and "reward/emo/p_neutral" in m
    # laughter applies only where the text asks for it: none of the first three tiny prompts does
    assert m["reward/laugh/invalid_frac"] == 1.0 and m["reward/laugh/errors"] == 0
