"""Shared fixtures: a tiny random GLM-TTS checkpoint in the upstream layout, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_MANIFEST = REPO / "configs" / "data" / "tiny" / "manifest.jsonl"


@pytest.fixture(scope="session")
def tiny_records():
    from rollouts.manifest import read_manifest

    return read_manifest(TINY_MANIFEST)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_records):
    from policies.tiny import write_tiny_checkpoint

    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-glmtts", texts, seed=0)


def run_config(tmp_path: Path, ckpt: Path, *extra: str) -> list[str]:
    """Overrides for a fast training run on the shipped tiny prompts."""
    return [
        f"policy.ckpt_dir={ckpt}",
        f"data.manifest={TINY_MANIFEST}",
        f"train.output_dir={tmp_path / 'run'}",
        "sampling.max_token_text_ratio=4",
        "sampling.max_new_tokens=48",
        *extra,
    ]
