"""Checkpoint files: atomic writes, pruning to the last N, torn and temporary directories ignored, safe loading."""

import pytest
import torch

from rl.checkpoint import clean_partial, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def save(out, step, keep_last=10):
    return save_checkpoint(
        out,
        step,
        policy_state={"w": torch.full((2, 3), float(step))},
        optimizer_state={"state": {}, "lr": 0.1 * step},
        trainer_state={"step": step},
        config_yaml=f"train: {{steps: {step}}}\n",
        keep_last=keep_last,
    )


def test_only_the_last_n_are_kept(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_round_trip_holds_every_part(tmp_path):
    path = save(tmp_path, 3)
    ck = load_checkpoint(path)
    assert torch.equal(ck["policy"]["w"], torch.full((2, 3), 3.0))
    assert ck["optimizer"]["lr"] == pytest.approx(0.3) and ck["trainer_state"] == {"step": 3}
    assert torch.equal(ck["rng"]["cpu"], torch.get_rng_state()) and ck["config_yaml"].startswith("train:")
    assert ck["pending"] is None


def test_interrupted_writes_are_ignored_and_cleaned(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000003-999").mkdir()  # a write killed before its rename
    (root / ".tmp-step-000003-999" / "policy.safetensors").write_bytes(b"partial")
    (root / "step-000004").mkdir()  # not written by save_checkpoint: no trainer_state.json
    assert find_checkpoint(tmp_path).name == "step-000002"
    clean_partial(tmp_path)
    assert not (root / ".tmp-step-000003-999").exists()
    assert (root / "step-000002").is_dir()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path)
