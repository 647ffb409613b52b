"""The GLM-TTS flow stage as a policy (policies/glmtts_flow.py): the SDE sampler, its log-probs, the ratio, export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from policies.glmtts_flow import FlowSettings, GLMTTSFlowPolicy
from rollouts.token2wav import load_flow
from rollouts.types import Rollout, SamplingParams

PARAMS = SamplingParams(temperature=1.0, top_k=25, top_p=0.8)


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory, tiny_records):
    from policies.glmtts import GLMTTSPolicy

    d = tmp_path_factory.mktemp("flow") / "tiny-glmtts"
    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    GLMTTSPolicy.write_tiny(d, texts, seed=0, vocoder=True)
    return d


def policy(ckpt, **settings) -> GLMTTSFlowPolicy:
    pol = GLMTTSFlowPolicy.from_pretrained(ckpt)
    pol.settings = dataclasses.replace(pol.settings, **settings)
    return pol


def sample(pol, records, group_size=3, seed=7, **kw) -> Rollout:
    prompts = [pol.prompt_input(r) for r in records]
    return pol.sample_groups(
        prompts, group_size, PARAMS, group_ids=list(range(len(prompts))), seed=seed, max_new_tokens=40, **kw
    )


def test_with_eta_0_the_sampler_is_the_upstream_ode(flow_ckpt, tiny_records):
    pol = policy(flow_ckpt, eta=0.0)
    ro = sample(pol, tiny_records[:2], group_size=2)
    assert ro.token_mask.all() and ro.tokens.tolist() == [[1, 2]] * 4
    # upstream's sampler (rollouts/flow.py, the one the vocoder runs) from the same initial noise
    flow = load_flow(flow_ckpt)
    codes = pol.speech_codes(ro)
    from policies.sampling import row_keys

    keys = row_keys(7, ro.group_ids, torch.tensor([0, 1, 0, 1]))
    for i in range(ro.num_rows):
        rec = tiny_records[int(ro.prompt_index[i])]
        gen = torch.Generator().manual_seed(int(keys[i]) & (2**63 - 1))
        tokens = torch.cat([torch.as_tensor(rec.prompt_speech_tokens, dtype=torch.long), codes[i]])
        want = flow.sample(
            [tokens], [torch.as_tensor(rec.prompt_feat)], torch.as_tensor(rec.embedding)[None], [gen], n_timesteps=10
        )[0]
        pf, n = int(ro.extras["prompt_frames"][i]), int(ro.extras["frames"][i])
        got = ro.extras["mel"][i, pf:n].T
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_small_eta_stays_close_to_the_ode_and_larger_eta_moves_away(flow_ckpt, tiny_records):
    ode = sample(policy(flow_ckpt, eta=0.0), tiny_records[:1]).extras["mel"]
    near = sample(policy(flow_ckpt, eta=1e-4), tiny_records[:1]).extras["mel"]
    far = sample(policy(flow_ckpt, eta=0.7), tiny_records[:1]).extras["mel"]
    assert (near - ode).abs().max() < 1e-2 < (far - ode).abs().max()


def test_a_row_does_not_depend_on_its_batch(flow_ckpt, tiny_records):
    pol = policy(flow_ckpt)
    both = sample(pol, tiny_records[:2], group_size=2)
    prompts = [pol.prompt_input(r) for r in tiny_records[1:2]]
    one = pol.sample_groups(prompts, 2, PARAMS, group_ids=[1], seed=7, max_new_tokens=40)
    n = int(one.extras["frames"][0])
    torch.testing.assert_close(one.extras["mel"][:, :n], both.extras["mel"][2:, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(one.behaviour_logp, both.behaviour_logp[2:], rtol=0, atol=1e-4)


def test_teacher_forced_logprobs_give_ratio_1_before_any_update(flow_ckpt, tiny_records):
    pol = policy(flow_ckpt)
    ro = sample(pol, tiny_records[:3])
    logp, ent = pol.token_logprobs(ro)
    assert logp.shape == ro.behaviour_logp.shape and torch.isnan(ent).all()
    assert (logp - ro.behaviour_logp).abs().max() < 1e-4
    pol.make_reference()
    ref, _ = pol.token_logprobs(ro, reference=True)
    assert (ref - ro.behaviour_logp).abs().max() < 1e-4
    # a subset of rows, in another order, gives the same values (micro-batches)
    sub = ro.select([5, 0, 3])
    torch.testing.assert_close(pol.token_logprobs(sub)[0], logp[[5, 0, 3]], rtol=0, atol=1e-4)
    # the log-prob moves with the weights and the gradient reaches the DiT
    logp, _ = pol.token_logprobs(ro)
    logp.sum().backward()
    grads = [p.grad for p in pol.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert pol.model.estimator.text_emb_layer.text_embed.weight.grad is None  # the token embedding is frozen


def test_settings_are_checked():
    with pytest.raises(ValueError, match="sde_steps"):
        FlowSettings(sde_steps=(10,))
    with pytest.raises(ValueError, match="logprob"):
        FlowSettings(logprob="median")


def test_export_writes_upstreams_flow_layout_and_reloads_exactly(flow_ckpt, tiny_records, tmp_path):
    pol = policy(flow_ckpt)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    pol.export(tmp_path / "out")
    src = torch.load(flow_ckpt / "flow" / "flow.pt", weights_only=True)
    out = torch.load(tmp_path / "out" / "flow" / "flow.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in src.items()}
    assert (tmp_path / "out" / "flow" / "config.yaml").read_text() == (flow_ckpt / "flow" / "config.yaml").read_text()
    assert (tmp_path / "out" / "llm").is_dir() and (tmp_path / "out" / "hift" / "hift.pt").is_file()
    reloaded = GLMTTSFlowPolicy.from_pretrained(tmp_path / "out")
    for (k, a), (_, b) in zip(pol.model.estimator.state_dict().items(), reloaded.model.estimator.state_dict().items()):
        assert torch.equal(a, b), k
    assert not np.allclose(out["estimator.proj_out.weight"].numpy(), src["estimator.proj_out.weight"].numpy())


# ---- the trainer on configs/tiny_flow.yaml ---------------------------------------------------------------------------


def flow_run(tmp_path, *extra):
    import json

    from conftest import REPO

    from rl.config import load_config
    from rl.trainer import train

    cfg, d = load_config(
        REPO / "configs" / "tiny_flow.yaml",
        [f"policy.ckpt_dir={tmp_path / 'ckpt'}", f"train.output_dir={tmp_path / 'run'}", "wandb.enabled=false", *extra],
    )
    train(cfg, d, progress=False)
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_flow_config_trains_the_flow_and_exports_upstreams_layout(tmp_path):
    from rl.cli import main as cli_main
    from rollouts.token2wav import Token2Wav

    log = flow_run(tmp_path, "train.steps=10", "train.samples_every=0")
    reward = [r["reward/loudness/mean"] for r in log]
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.15, reward  # the flow learns the level
    assert all(abs(r["ratio/mean"] - 1) < 1e-3 for r in log)
    assert all(r["flow/eta"] == 0.7 and r["flow/sde_steps"] == 2 and r["flow/logprob_mean"] < 0 for r in log)
    assert cli_main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "flow.png").read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    src = torch.load(tmp_path / "ckpt" / "flow" / "flow.pt", weights_only=True)
    out = torch.load(tmp_path / "out" / "flow" / "flow.pt", weights_only=True)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in src.items()}
    assert not torch.equal(out["estimator.proj_out.weight"], src["estimator.proj_out.weight"])  # trained
    assert torch.equal(
        out["estimator.text_emb_layer.text_embed.weight"], src["estimator.text_emb_layer.text_embed.weight"]
    )
    Token2Wav.from_pretrained(tmp_path / "out")  # the vocoder (and so upstream inference) loads it strictly


@pytest.mark.slow
def test_with_one_update_per_rollout_every_ratio_is_1_and_lora_exports_merged(tmp_path):
    log = flow_run(
        tmp_path,
        "train.steps=2",
        "optim.minibatches=1",
        "optim.ppo_epochs=1",
        "policy.lora.enabled=true",
        "train.save_every=2",
        "train.samples_every=0",
    )
    for r in log:
        assert abs(r["ratio/min"] - 1) < 1e-3 and abs(r["ratio/max"] - 1) < 1e-3, r
    from rl.cli import main as cli_main

    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    src = torch.load(tmp_path / "ckpt" / "flow" / "flow.pt", weights_only=True)
    out = torch.load(tmp_path / "out" / "flow" / "flow.pt", weights_only=True)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in src.items()}  # no adapter keys


def test_settings_that_need_frame_or_lm_actions_are_refused(tmp_path):
    from conftest import REPO

    from rl.config import load_config
    from rl.configlib import ConfigError
    from rl.trainer import train

    base = [f"policy.ckpt_dir={tmp_path / 'ckpt'}", f"train.output_dir={tmp_path / 'run'}", "wandb.enabled=false"]
    for extra, msg in [
        (["sampling.backend=vllm", "sampling.ras=false", "sampling.top_p=1.0"], "not sampled by vLLM"),
        (
            [
                "rewards.cer.scorer=cer",
                f"rewards.cer.kwargs.paraformer_dir={tmp_path}",
                "rewards.cer.kwargs.token_level=true",
            ],
            "token_level",
        ),
    ]:
        cfg, d = load_config(REPO / "configs" / "tiny_flow.yaml", base + extra)
        with pytest.raises(ConfigError, match=msg):
            train(cfg, d, progress=False)
        assert not (tmp_path / "run").exists()  # refused before the run writes anything


def test_extras_travel_with_the_rows_through_select_cat_and_checkpoints(flow_ckpt, tiny_records):
    from rl.trainer import rollout_from_state, rollout_tensors

    pol = policy(flow_ckpt)
    a = sample(pol, tiny_records[:1], group_size=2, seed=1)
    b = sample(pol, tiny_records[1:3], group_size=2, seed=2)
    both = Rollout.cat([a, b])
    assert both.num_rows == 6 and set(both.extras) == set(a.extras)
    for k, v in a.extras.items():  # zero-padded to the wider part, rows unchanged
        assert both.extras[k].shape[1:] == tuple(max(x, y) for x, y in zip(v.shape[1:], b.extras[k].shape[1:]))
        idx = tuple(slice(0, s) for s in v.shape[1:])
        assert torch.equal(both.extras[k][(slice(0, 2), *idx)], v)
    # the concatenated rows score as they did alone (padding never leaks into a row's log-prob)
    torch.testing.assert_close(
        pol.token_logprobs(both)[0], torch.cat([a.behaviour_logp, b.behaviour_logp]), atol=1e-4, rtol=0
    )
    back = rollout_from_state(rollout_tensors(both), {"params": dataclasses.asdict(both.params)}, both.pad_id)
    assert set(back.extras) == set(both.extras) and all(
        torch.equal(back.extras[k], both.extras[k]) for k in both.extras
    )
    sub = both.select([4, 1])
    assert torch.equal(sub.extras["mel"], both.extras["mel"][[4, 1]])


def test_the_closed_form_kl_to_the_reference(flow_ckpt, tiny_records):
    pol = policy(flow_ckpt)
    ro = sample(pol, tiny_records[:2], group_size=2)
    pol.make_reference()
    assert pol.reference_kl(ro).abs().max() == 0.0  # the same weights
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    kl = pol.reference_kl(ro)
    assert kl.shape == ro.token_mask.shape and bool((kl > 0).all())
    # by hand: ||mean - mean_ref||^2 / (2 std^2), mean over the row's valid elements, for row 1's second action
    x, _, t, dt, fb = pol._transitions(ro, [1])
    with torch.no_grad():
        mean, std = pol._means(x, t, dt, fb, reference=False)
        ref, _ = pol._means(x, t, dt, fb, reference=True)
    n = int(ro.extras["frames"][1])
    want = ((mean[1, :n] - ref[1, :n]) ** 2).sum() / (2 * std[1].squeeze() ** 2) / (n * 80)
    assert float(kl[1, 1].detach()) == pytest.approx(float(want), rel=1e-4)
    kl.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.trainable_parameters())


@pytest.mark.slow
def test_kl_coef_trains_with_the_closed_form_kl(tmp_path):
    log = flow_run(tmp_path, "train.steps=2", "loss.kl_coef=0.5", "train.samples_every=0", "train.save_every=0")
    assert log[0]["kl"] >= 0 and log[1]["kl"] > 0  # the second step's weights have moved from the reference


def test_upstreams_flow_flags_sample_as_upstream(flow_ckpt, tiny_records, tmp_path):
    # the released flow concatenates the projected speaker to the condition, guides the tokens too (speech_token_cfg)
    # and has no speaker adaLN: the tiny checkpoint has the other settings, so rebuild flow/ with these
    import shutil

    from rollouts.flow import FlowModel
    from rollouts.tiny_vocoder import TINY_FLOW

    ckpt = tmp_path / "ckpt"
    shutil.copytree(flow_ckpt, ckpt)
    cfg = {**TINY_FLOW, "spkr_emb_adaLN": False, "speech_token_cfg": True, "remove_spkr_concat_condition": False}
    torch.manual_seed(3)
    flow = FlowModel(**cfg)
    with torch.no_grad():
        for p in flow.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    lines = ["flow: !new:flow.flow.Flow"] + [f"    {k}: {v}" for k, v in cfg.items()]
    (ckpt / "flow" / "config.yaml").write_text("\n".join(lines) + "\n")
    torch.save(flow.state_dict(), ckpt / "flow" / "flow.pt")
    pol = policy(ckpt, eta=0.0)
    assert pol.flow.concat_speaker and pol.flow.speech_token_cfg
    ro = sample(pol, tiny_records[:1], group_size=2)
    from policies.sampling import row_keys

    keys = row_keys(7, ro.group_ids, torch.tensor([0, 1]))
    rec = tiny_records[0]
    tokens = torch.cat([torch.as_tensor(rec.prompt_speech_tokens, dtype=torch.long), pol.speech_codes(ro)[1]])
    gen = torch.Generator().manual_seed(int(keys[1]) & (2**63 - 1))
    want = flow.eval().sample(
        [tokens], [torch.as_tensor(rec.prompt_feat)], torch.as_tensor(rec.embedding)[None], [gen], n_timesteps=10
    )[0]
    pf, n = int(ro.extras["prompt_frames"][1]), int(ro.extras["frames"][1])
    torch.testing.assert_close(ro.extras["mel"][1, pf:n].T, want, rtol=0, atol=1e-5)
    eta = policy(ckpt, eta=0.7)
    ro = sample(eta, tiny_records[:1], group_size=2)
    assert (eta.token_logprobs(ro)[0] - ro.behaviour_logp).abs().max() < 1e-4


def test_fixed_codes_from_the_manifest_replace_the_lm(flow_ckpt, tiny_records):
    from rollouts.manifest import ManifestError

    pol = policy(flow_ckpt, codes="manifest")
    fixed = [np.arange(5 + 3 * i, dtype=np.int64) * 7 for i in range(2)]
    records = [dataclasses.replace(r, target_speech_tokens=c) for r, c in zip(tiny_records[:2], fixed)]
    ro = sample(pol, records, group_size=2)
    assert [c.tolist() for c in pol.speech_codes(ro)] == [fixed[0].tolist()] * 2 + [fixed[1].tolist()] * 2
    assert ro.lengths.tolist() == [5, 5, 8, 8] and ro.finished.all() and not ro.truncated.any()
    assert (pol.token_logprobs(ro)[0] - ro.behaviour_logp).abs().max() < 1e-4
    with pytest.raises(ManifestError, match="field 'syn_speech_token' is missing"):
        pol.prompt_input(tiny_records[0])


def test_fixed_codes_are_for_the_flow_policy_only(tmp_path):
    from conftest import REPO

    from rl.config import load_config
    from rl.configlib import ConfigError

    with pytest.raises(ConfigError, match="policy.flow.codes manifest is for policy.kind glmtts_flow"):
        load_config(REPO / "configs" / "tiny_joint.yaml", ["policy.flow.codes=manifest"])
