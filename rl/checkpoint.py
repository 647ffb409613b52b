"""Atomic, resumable checkpoints.

    <output_dir>/checkpoints/step-000010/
        policy.safetensors   every weight (full fine-tuning) or the adapter + modules_to_save (LoRA)
        pending.safetensors  with train.pipeline: the next step's first round of rollouts, already sampled
        optimizer.pt         the optimizer's state dict (tensors and numbers only; loaded with weights_only=True)
        rng.pt               torch CPU (and CUDA) RNG states
        trainer_state.json   completed steps, data cursor, group-id counter, wandb run id
        config.yaml          the resolved config the run used

A checkpoint is written to a temporary directory next to its final place and renamed into place once every file
is flushed, so a run killed mid-write leaves either the previous checkpoints or the new one, never a torn one.
Pruning (`keep_last`) deletes only checkpoints of the same run (the `run_id` in trainer_state.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rl.errors import RunError

CKPT_RE = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoints are untouched."""


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    policy_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    pending: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then prune this run's older checkpoints to `keep_last`: only
    checkpoints whose trainer_state.json carries this run's `run_id` are ever deleted. A failed write (OSError such
    as ENOSPC / EACCES, or torch's serialiser failing on a full disk) removes its temporary directory and raises
    CheckpointWriteError naming the step and the last intact checkpoint."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write(tmp, final, root, policy_state, optimizer_state, trainer_state, config_yaml, pending)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in list_checkpoints(output_dir) if p != final]
        intact = f"the previous checkpoint {root / previous[-1]} is intact" if previous else "no earlier checkpoint"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} in {root}: {e}; {intact}") from None
    run_id = trainer_state.get("run_id")
    mine = [p for p in list_checkpoints(output_dir) if _run_id(p) == run_id]
    for old in mine[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _write(
    tmp: Path,
    final: Path,
    root: Path,
    policy_state: dict,
    optimizer_state: dict,
    trainer_state: dict,
    config_yaml: str,
    pending: dict | None,
) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(policy_state, str(tmp / "policy.safetensors"))
    if pending is not None:  # train.pipeline: the next step's first round, sampled before this checkpoint
        save_file(pending, str(tmp / "pending.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a resumed run ending where it started)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.json").is_file()]


def clean_partial(output_dir: Path) -> None:
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {path} (looked for {checkpoint_dir(path)}/step-*/)")
    return found[-1]


def load_checkpoint(path: Path) -> dict:
    """Returns {policy, optimizer, rng, trainer_state, config_yaml, pending}. Only safe loaders are used."""
    pending = path / "pending.safetensors"
    return {
        "pending": load_file(str(pending)) if pending.is_file() else None,
        "policy": load_file(str(path / "policy.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "config_yaml": (path / "config.yaml").read_text(),
    }
