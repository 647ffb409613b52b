"""The policy contract (policies/base.py): the trainer names no concrete policy, `policy.kind` picks a registered one
(checked at `config check`), and a new policy is one file + one registry line: the toy policy of CONTRIBUTING.md
(tests/toy_policy.py) trains and learns through the unchanged trainer."""

import json
from pathlib import Path

import pytest
import torch
import toy_policy
from conftest import TINY_MANIFEST

from policies import base
from rl.config import DEFAULT_CONFIG, load_config
from rl.configlib import ConfigError
from rl.trainer import train

REPO = Path(__file__).resolve().parent.parent


def test_the_trainer_names_no_concrete_policy():
    source = (REPO / "rl" / "trainer.py").read_text()
    for concrete in ("glmtts", "token2wav", "voiceprompt", "policies.tiny", "tiny_vocoder", "24000"):
        assert concrete not in source.lower(), concrete  # the policy owns its model, decoder and tiny writer
    import ast

    for layer in ("rollouts", "rewards"):  # data flows one way: policies -> rollouts -> rewards -> rl
        for f in (REPO / layer).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not any(n.split(".")[0] == "policies" for n in names), f"{f} imports {names}"
    from policies.glmtts import GLMTTSPolicy

    assert base.policy_class("glmtts") is GLMTTSPolicy
    with pytest.raises(ValueError, match="unknown policy kind 'nope'; registered: glmtts"):
        base.policy_class("nope")
    with pytest.raises(ConfigError, match="policy.kind 'nope' is not a registered policy"):
        load_config(DEFAULT_CONFIG, ["policy.kind=nope"])


def toy_run(tmp_path: Path, *extra: str) -> list[str]:
    ckpt = toy_policy.write_toy_checkpoint(tmp_path / "toy", seed=0)
    return [
        "policy.kind=toy",
        f"policy.ckpt_dir={ckpt}",
        "policy.build_tiny=false",
        "vocoder.enabled=false",
        f"data.manifest={TINY_MANIFEST}",
        "data.text_normalize=none",
        f"train.output_dir={tmp_path / 'run'}",
        "wandb.enabled=false",
        "train.samples_every=0",
        "sampling.top_k=0",
        "sampling.top_p=1.0",
        "sampling.ras=false",
        "sampling.temperature=1.0",
        "sampling.min_token_text_ratio=0",
        "sampling.max_token_text_ratio=4",
        "sampling.max_new_tokens=24",
        "rewards.duration.scorer=scorers_for_tests:Longer",
        "optim.lr=0.3",
        "optim.minibatches=1",
        *extra,
    ]


@pytest.mark.slow
def test_a_registered_toy_policy_trains_and_learns(tmp_path, monkeypatch):
    monkeypatch.setitem(base.POLICIES, "toy", "toy_policy:ToyPolicy")
    pol = toy_policy.ToyPolicy.from_pretrained(toy_policy.write_toy_checkpoint(tmp_path / "check"))
    assert isinstance(pol, base.Policy)
    extra = ("train.steps=10", "train.save_every=5", "vocoder.enabled=true", "train.samples_every=5")
    cfg, derived = load_config(DEFAULT_CONFIG, toy_run(tmp_path, *extra))
    train(cfg, derived, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    length = [r["len/mean"] for r in rows]
    assert sum(length[-3:]) / 3 > 1.5 * sum(length[:3]) / 3, length  # rewarded for longer outputs, it stops later
    # the policy's own checkpoint state round-trips through the trainer's checkpoint
    from rl.checkpoint import find_checkpoint, load_checkpoint

    saved = load_checkpoint(find_checkpoint(tmp_path / "run"))["policy"]
    assert set(saved) == {"logits"} and saved["logits"][:, -1].mean() < 2.0  # the stop logits went down
    # the audio the samples hold is the policy's own decoder's (16 kHz tones, 40 ms per action)
    from rollouts.audio import read_wav

    wavs = sorted((tmp_path / "run" / "samples").rglob("*.wav"))
    assert wavs
    wav, rate = read_wav(wavs[0])
    assert rate == 16000 and len(wav) % 640 == 0
    # and `ttsrl export` writes the policy's own layout, which loads back to the trained table
    from rl.cli import main

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    again = toy_policy.ToyPolicy.from_pretrained(tmp_path / "exported")
    assert torch.equal(again.model.logits.detach(), saved["logits"])


def test_toy_rollouts_are_reproduced_teacher_forced(tmp_path):
    from rollouts.types import SamplingParams

    pol = toy_policy.ToyPolicy.from_pretrained(toy_policy.write_toy_checkpoint(tmp_path / "toy"))
    prompts = [toy_policy.ToyPrompt(ids=[1] * 5, text_len=5), toy_policy.ToyPrompt(ids=[1] * 9, text_len=9)]
    params = SamplingParams(temperature=0.7)
    ro = pol.sample_groups(prompts, 3, params, group_ids=[3, 4], seed=1, min_ratio=1, max_ratio=4)
    logp, _ = pol.token_logprobs(ro)
    assert torch.allclose(logp, ro.behaviour_logp, atol=1e-6)
    assert (ro.lengths >= ro.min_lengths).all() and (ro.lengths <= ro.text_lengths * 4).all()
