"""Dashboards of a run: listening samples on disk, the wandb table with audio, and `ttsrl plot` curves."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_config

from rl.config import DEFAULT_CONFIG, load_config
from rl.trainer import train
from rollouts.audio import read_wav

pytestmark = pytest.mark.slow  # runs the CLI in a subprocess


def test_samples_wandb_audio_table_and_plots(tmp_path, tiny_ckpt, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tables = []

    class RecordingTable(wandb.Table):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            tables.append(self)

    monkeypatch.setattr(wandb, "Table", RecordingTable)
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=2",
            "data.prompts_per_step=3",
            "sampling.group_size=2",
            "vocoder.n_timesteps=2",
            "wandb.enabled=true",
            "train.samples_every=1",
            "train.samples_per_step=2",
            "train.save_every=0",
        ),
    )
    train(cfg, d, progress=False)
    run = tmp_path / "run"

    # samples.jsonl + wavs: one sample from each of the first 2 groups, every logged step, and the monitor's best-
    # and worst-advantage rows of the first 2 groups (monitor.sample_groups, default 2)
    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    # (a first row that is also its group's best or worst is saved once, as that)
    assert len({(x["step"], x["group_id"]) for x in lines}) == 4 and {x["step"] for x in lines} == {1, 2}
    assert {x["pick"] for x in lines} <= {"first", "best", "worst"}
    for key in {(x["step"], x["group_id"]) for x in lines}:
        picks = [x["pick"] for x in lines if (x["step"], x["group_id"]) == key]
        assert len(picks) == len(set(picks)) and (picks == ["first"] or {"best", "worst"} <= set(picks)), picks
    assert len({x["wav"] for x in lines}) == len(lines)  # no wav written over another
    for x in lines:
        assert set(x["rewards"]) == {"duration"} and x["target_text"] and x["prompt_text"]
        wav, rate = read_wav(x["wav"])
        assert rate == 24000 and len(wav) / rate == pytest.approx(x["seconds"])
        assert x["wav"].startswith(str(run / "samples" / f"step-{x['step']:06d}"))

    # the wandb table: audio, texts, every reward and the advantage, one row per saved sample
    assert len(tables) == 2
    t = tables[0]
    for col in ("pick", "audio", "target_text", "prompt_text", "advantage", "duration"):
        assert col in t.columns, col
    assert len(t.data) == sum(x["step"] == 1 for x in lines) and all(
        isinstance(row[t.columns.index("audio")], wandb.Audio) for row in t.data
    )
    assert list((run / "wandb").glob("offline-run-*"))

    # curves without wandb
    out = subprocess.run(
        [sys.executable, "-m", "rl.cli", "plot", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    for name in ("rewards", "length", "clip", "loss"):
        png = run / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
