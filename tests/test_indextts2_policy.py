"""IndexTTS2 as a policy (policies/indextts2.py) on a tiny random directory in the released layout: the contract's
rollout and its ratio, the position convention the ratio needs, emotion inputs, strict loading, decoding, LoRA and
export, `ttsrl prepare --policy indextts2`, and the tiny training run with `ttsrl eval` on its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MANIFEST

from policies.indextts2 import IndexTTS2Policy
from policies.indextts2_sampling import teacher_forced_logprobs
from rollouts.types import SamplingParams

PARAMS = SamplingParams(temperature=0.8, top_k=30, top_p=0.8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def itts_ckpt(tmp_path_factory, tiny_records):
    d = tmp_path_factory.mktemp("ittspol") / "tiny-indextts2"
    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    IndexTTS2Policy.write_tiny(d, texts, seed=0, vocoder=True)
    return d


@pytest.fixture(scope="module")
def policy(itts_ckpt):
    return IndexTTS2Policy.from_pretrained(itts_ckpt)


def lora(**kw):
    from rl.config import LoraConfig

    return dataclasses.replace(LoraConfig(enabled=True, dropout=0.0, r=4, alpha=8), **kw)


def sample(pol, records, group_size=3, seed=5, max_new_tokens=60):
    prompts = [pol.prompt_input(r) for r in records]
    return pol.sample_groups(
        prompts, group_size, PARAMS, group_ids=list(range(len(prompts))), seed=seed, max_new_tokens=max_new_tokens
    )


def test_rollout_and_ratio_one_before_an_update(policy, tiny_records):
    ro = sample(policy, tiny_records[:2])
    assert ro.num_rows == 6 and ro.extras["cond"].shape[1:] == (34, policy.net.cfg.model_dim)
    m = ro.token_mask
    # a row's actions: its codes, then the stop code when it stopped (trained like any code)
    assert torch.equal(m.sum(1), ro.lengths + ro.finished.long())
    stop = policy.net.cfg.stop_mel_token
    for i in range(ro.num_rows):
        if ro.finished[i]:
            assert int(ro.tokens[i, int(ro.lengths[i])]) == stop
    assert bool(ro.finished.any()), "the tiny model should stop within 60 codes in some rows"
    logp, _ = policy.token_logprobs(ro)
    assert float((logp.detach() - ro.behaviour_logp)[m].abs().max()) < 1e-4
    ref, _ = policy.token_logprobs(ro, reference=True) if policy._reference else (logp, None)
    assert torch.isfinite(ref[m]).all()
    # the same rows, sampled again from the same streams, are the same rows (row j of group g: stream (seed, g, j))
    again = sample(policy, tiny_records[:2])
    assert torch.equal(again.tokens, ro.tokens)


def test_the_training_forwards_positions_would_break_the_ratio(policy, tiny_records):
    ro = sample(policy, tiny_records[:1], group_size=4, seed=8)
    cond, text, codes, mask = policy._rows(ro)
    s = policy.sampling(ro.params)
    with torch.no_grad():
        inf = teacher_forced_logprobs(policy.net, cond, text, codes, mask, s, positions="inference")
        fwd = teacher_forced_logprobs(policy.net, cond, text, codes, mask, s, positions="forward")
    assert float((inf - ro.behaviour_logp)[mask].abs().max()) < 1e-4
    diff = (fwd - ro.behaviour_logp)[mask].abs()
    assert float(diff.max()) > 1e-2, "the forward's positions should give other log-probs"


def test_teacher_forcing_in_chunks_gives_the_same_log_probs(policy, tiny_records, monkeypatch):
    import policies.indextts2_sampling as sampling

    ro = sample(policy, tiny_records[:2], group_size=2, seed=4)
    whole, _ = policy.token_logprobs(ro)
    monkeypatch.setattr(sampling, "TF_CHUNK", 7)  # chunks that split rows
    chunked, _ = policy.token_logprobs(ro)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_emotion_inputs_change_the_conditioning(itts_ckpt, tiny_records):
    from rl.config import IndexTTS2PolicyConfig, PolicyConfig

    pol = IndexTTS2Policy.from_pretrained(itts_ckpt)
    rec = tiny_records[0]
    base = pol.prompt_input(rec).cond
    happy = pol.prompt_input(dataclasses.replace(rec, emotion=3)).cond  # emotion2vec "happy"
    sad = pol.prompt_input(dataclasses.replace(rec, emotion=6)).cond
    unk = pol.prompt_input(dataclasses.replace(rec, emotion=8)).cond  # <unk>: no IndexTTS2 emotion
    assert not torch.allclose(base, happy) and not torch.allclose(happy, sad)
    torch.testing.assert_close(unk, base)
    # the speed rows do not carry the emotion; the 32 latents do
    torch.testing.assert_close(happy[32:], base[32:])
    clip = str(REPO / "configs" / "data" / "tiny" / "voices" / "en_a.wav")
    with_clip = pol.prompt_input(dataclasses.replace(rec, emotion_wav=clip)).cond
    assert not torch.allclose(with_clip, base)
    cfg = PolicyConfig(kind="indextts2", indextts2=IndexTTS2PolicyConfig(emo_alpha=0.0, emotion_label=False))
    pol0 = IndexTTS2Policy.from_pretrained(itts_ckpt, config=cfg)
    torch.testing.assert_close(pol0.prompt_input(dataclasses.replace(rec, emotion_wav=clip)).cond, base)
    torch.testing.assert_close(pol0.prompt_input(dataclasses.replace(rec, emotion=3)).cond, base)


def test_loading_is_strict_and_stays_inside_the_directory(itts_ckpt, tmp_path):
    import yaml

    from policies.indextts2_model import IndexTTS2ConfigError
    from rollouts.token2wav import VocoderCheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(itts_ckpt, bad)
    state = torch.load(bad / "gpt.pth", weights_only=True)
    state.pop("mel_head.bias")
    state["extra.weight"] = torch.zeros(2)
    state["final_norm.weight"] = torch.zeros(3)
    torch.save(state, bad / "gpt.pth")
    with pytest.raises((IndexTTS2ConfigError, VocoderCheckpointError, ValueError)) as e:
        IndexTTS2Policy.from_pretrained(bad)
    msg = str(e.value)
    assert "mel_head.bias" in msg and "extra.weight" in msg and "final_norm.weight" in msg and "gpt.pth" in msg
    cfg = yaml.safe_load((itts_ckpt / "config.yaml").read_text())
    cfg["s2mel_checkpoint"] = "../../elsewhere.pth"
    shutil.copy(itts_ckpt / "gpt.pth", bad / "gpt.pth")
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(IndexTTS2ConfigError, match="s2mel_checkpoint .* outside the model directory"):
        IndexTTS2Policy.from_pretrained(bad)


def test_decoding_is_seeded_per_group_and_has_the_released_length(policy, tiny_records):
    ro = sample(policy, tiny_records[:1], group_size=2, seed=3, max_new_tokens=40)
    dec = policy.load_decoder(tiny_records[:1], n_timesteps=10, dtype="float32")
    a = dec(ro, [11, 11], batch_size=2)
    b = dec(ro, [11, 11], batch_size=1)
    c = dec(ro, [12, 12], batch_size=2)
    assert a.sample_rate == 22050
    for i in range(ro.num_rows):
        n = int(ro.lengths[i])
        if n == 0:
            assert a.audio[i] is None and a.reasons[i]
            continue
        assert a.audio[i].shape == (int(n * 1.72) * 256,)  # BigVGAN's 256 samples per mel frame
        assert 1e-4 < float(np.sqrt(np.mean(a.audio[i] ** 2))) and np.abs(a.audio[i]).max() <= 1.0
        np.testing.assert_allclose(a.audio[i], b.audio[i], atol=1e-5)  # batching does not change a row
        assert not np.allclose(a.audio[i], c.audio[i])  # the seed is the s2mel noise


def test_lora_state_and_export_in_the_released_layout(itts_ckpt, tiny_records, tmp_path):
    from policies.indextts2_io import load_gpt

    pol = IndexTTS2Policy.from_pretrained(itts_ckpt, lora=lora())
    names = [k for k, p in pol.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in k for k in names)
    assert {k.split(".")[-4] for k in names} == {"c_attn", "c_proj", "c_fc"}
    with torch.no_grad():
        for k, p in pol.model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.05)
    ro = sample(pol, tiny_records[:1], group_size=2)
    trained = pol.token_logprobs(ro)[0].detach()
    base, _ = pol.token_logprobs(ro, reference=True)
    m = ro.token_mask
    assert float((trained - base)[m].abs().max()) > 1e-4
    state = pol.state_for_checkpoint()
    pol2 = IndexTTS2Policy.from_pretrained(itts_ckpt, lora=lora())
    pol2.load_checkpoint_state(state)
    torch.testing.assert_close(pol2.token_logprobs(ro)[0], trained)
    out = tmp_path / "export"
    pol.export(out)
    model, _ = load_gpt(out)  # the released keys, nothing else
    released = torch.load(itts_ckpt / "gpt.pth", weights_only=True)
    assert set(torch.load(out / "gpt.pth", weights_only=True)) == set(released)
    for f in ("config.yaml", "s2mel.pth", "bpe.model", "feat1.pt", "hf_cache/bigvgan/config.json"):
        assert (out / f).is_file()
    exported = IndexTTS2Policy.from_pretrained(out)
    torch.testing.assert_close(exported.token_logprobs(ro)[0], trained, atol=1e-5, rtol=0)


def test_full_training_touches_the_core_and_head_only(itts_ckpt):
    pol = IndexTTS2Policy.from_pretrained(itts_ckpt)
    names = {k.split(".")[0] for k, p in pol.model.named_parameters() if p.requires_grad}
    assert names == {"gpt", "final_norm", "mel_head"}


def test_prepare_writes_the_prompt_features_the_policy_reads(itts_ckpt, policy, tmp_path):
    from rl.cli import main
    from rollouts.manifest import read_manifest

    voices = REPO / "configs" / "data" / "tiny" / "voices"
    items = tmp_path / "items.jsonl"
    item = {
        "prompt_wav": f"{voices}/zh_a.wav",
        "prompt_text": "你好",
        "target_text": "今天天气很好。",
        "emotion": "happy",
    }
    second = {**item, "target_text": "请在下一个路口向右转。", "emotion": -1}  # the same voice prompt
    lines = [{**item, "emotion_wav": f"{voices}/en_b.wav"}, second]
    items.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    out = tmp_path / "prepared"
    args = ["prepare", str(items), "--policy", "indextts2", "--model", str(itts_ckpt), "--out", str(out)]
    assert main([*args, "--no-progress", "--text-normalize", "none"]) == 0
    rec, rec2 = read_manifest(out / "manifest.jsonl")
    # the lines of one voice prompt share its arrays and its conditioning (memory: one copy per prompt)
    assert rec.prompt_arrays["prompt_semantic"] is rec2.prompt_arrays["prompt_semantic"]
    plain = dataclasses.replace(rec, emotion_wav=None, emotion=None)
    assert policy.prompt_input(plain).cond is policy.prompt_input(rec2).cond
    assert set(rec.prompt_arrays) == {"prompt_semantic", "prompt_semantic_code", "prompt_mel"}
    assert rec.embedding is not None and rec.emotion == 3
    assert Path(rec.emotion_wav).resolve() == (voices / "en_b.wav").resolve()
    # the clip conditions the emotion (it wins over the label)
    clip = policy.prompt_input(rec).cond
    assert not torch.allclose(clip, policy.prompt_input(dataclasses.replace(rec, emotion_wav=None)).cond)
    rec = dataclasses.replace(rec, emotion_wav=None)
    from_wav = policy.prompt_input(dataclasses.replace(rec, prompt_arrays={}, embedding=None))
    from_manifest = policy.prompt_input(rec)
    torch.testing.assert_close(from_manifest.cond, from_wav.cond)
    assert torch.equal(from_manifest.voice.codes, from_wav.voice.codes)


def test_settings_the_policy_cannot_take_are_refused(tmp_path):
    from rl.config import ConfigError, load_config

    base = [f"train.output_dir={tmp_path / 'r'}"]
    for bad, msg in (
        (["data.text_normalize=upstream"], "text_normalize: none"),
        (["sampling.ras=true"], "sampling.ras: false"),
        (["policy.indextts2.emo_alpha=1.5"], "emo_alpha"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(REPO / "configs" / "tiny_indextts2.yaml", [*base, *bad])
    assert not (tmp_path / "r").exists()


# ---- the trainer on configs/tiny_indextts2.yaml ---------------------------------------------------------------------


def itts_run(out, ckpt, *extra):
    from conftest import train_shipped

    # 2 s2mel steps instead of the released 25: the duration reward reads the codes, decoding is only exercised
    steps = "policy.indextts2.diffusion_steps=2"
    return train_shipped("tiny_indextts2.yaml", out, ckpt, f"data.manifest={TINY_MANIFEST}", steps, *extra)


@pytest.mark.slow
def test_tiny_indextts2_learns_its_duration_and_eval_compares_the_checkpoints(tmp_path, itts_ckpt):
    from rl.cli import main

    log = itts_run(tmp_path / "run", itts_ckpt, "train.steps=8", "train.save_every=8")
    reward = [r["reward/duration/mean"] for r in log]
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.05, reward
    assert log[-1]["indextts2/codes"] > log[0]["indextts2/codes"]  # it learned to stop later
    meta = tmp_path / "meta.lst"
    voices = REPO / "configs" / "data" / "tiny" / "voices"
    meta.write_text(f"u1|你好。|{voices}/zh_a.wav|今天天气很好。\nu2|读书。|{voices}/zh_b.wav|请向右转。\n")
    common = ["--meta", str(meta), "--lang", "zh", "--tiny-models"]
    assert main(["eval", "--ckpt", str(itts_ckpt), "--out", str(tmp_path / "A"), *common]) == 0
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "B"), *common]) == 0
    a, b = (json.loads((tmp_path / x / "eval.json").read_text()) for x in ("A", "B"))
    assert a["metrics"]["synthesised"] == b["metrics"]["synthesised"] == 2
    assert main(["eval", "--compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 0


@pytest.mark.slow
def test_one_update_per_rollout_gives_ratio_1(tmp_path, itts_ckpt):
    log = itts_run(tmp_path / "run", itts_ckpt, "train.steps=2", "optim.minibatches=1", "optim.ppo_epochs=1")
    for r in log:
        assert abs(r["lm/ratio/min"] - 1) < 1e-3 and abs(r["lm/ratio/max"] - 1) < 1e-3, r


@pytest.mark.parametrize("damage", ["gpt_key", "bigvgan_config", "bpe"])
def test_a_broken_model_directory_stops_train_with_one_line_before_writing(itts_ckpt, tmp_path, capsys, damage):
    from rl.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(itts_ckpt, bad)
    if damage == "gpt_key":
        state = torch.load(bad / "gpt.pth", weights_only=True)
        state.pop("mel_head.weight")
        torch.save(state, bad / "gpt.pth")
        named = "gpt.pth"
    elif damage == "bigvgan_config":
        (bad / "hf_cache" / "bigvgan" / "config.json").unlink()
        named = "bigvgan"
    else:
        (bad / "bpe.model").write_bytes(b"not a sentencepiece model")
        named = "bpe.model"
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "tiny_indextts2.yaml"), "--set", f"policy.ckpt_dir={bad}"]
    args += [
        "--set",
        f"train.output_dir={out}",
        "--set",
        f"data.manifest={TINY_MANIFEST}",
        "--set",
        "wandb.enabled=false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    # one error naming the file (a strict load lists its keys below it), after the progress bars of what loaded
    (line,) = [x for x in err.splitlines() if x.startswith("ttsrl: error:")]
    assert named in line and "Traceback" not in err, err
    assert not out.exists()
