"""Run safety: a run never loses another run's work, never trains on garbage, never exits 0 having trained on nothing.

Each test reproduces a failure a user met (another run's directory reused, unsafe uttids, dead reward services,
non-finite settings and updates, malformed service answers, torn logs, remote code from model directories, bad
manifests, a full disk, a stalled reward server) and checks the behaviour docs/training.md's "Failure behaviour" lists.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MANIFEST, ServerThread, audio_sample, run_config
from safetensors.torch import load_file

from rl.config import DEFAULT_CONFIG, load_config
from rl.configlib import ConfigError
from rl.errors import InputError, RunError
from rl.trainer import train


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "rl.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "HOME": str(REPO)},
        timeout=600,
    )


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def manifest_with(tmp_path, edit):
    """A copy of the tiny manifest (absolute paths) with `edit(obj, lineno)` applied to each line's object."""
    out = tmp_path / "manifest.jsonl"
    lines = []
    for n, line in enumerate(TINY_MANIFEST.read_text().splitlines(), 1):
        obj = json.loads(line)
        for k in ("prompt_speech", "prompt_speech_token", "prompt_speech_feat", "embedding"):
            if obj.get(k):
                obj[k] = str(TINY_MANIFEST.parent / obj[k])
        edit(obj, n)
        lines.append(json.dumps(obj, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n")
    return out


QUICK = ("train.steps=1", "data.prompts_per_step=2", "sampling.group_size=2", "vocoder.enabled=false")


# ---- 1. a directory that holds another run ---------------------------------------------------------------------


def test_an_output_dir_holding_another_run_is_refused_or_overwritten(tmp_path, tiny_ckpt, capsys):
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, *QUICK))
    train(cfg, d, progress=False)
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(
        InputError, match=r"already holds a run \(config\.yaml, metrics\.jsonl, checkpoints\).*--resume"
    ):
        train(cfg, d, progress=False)
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    cfg2, d2 = load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, *QUICK, "train.seed=5"))
    train(cfg2, d2, progress=False, overwrite=True)
    assert "--overwrite: deleted the previous run's config.yaml, metrics.jsonl, checkpoints" in capsys.readouterr().out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert "seed: 5" in (run / "config.yaml").read_text()


def test_pruning_never_deletes_another_runs_checkpoints(tmp_path):
    from rl.checkpoint import list_checkpoints, save_checkpoint

    def save(step, run_id, keep_last):
        save_checkpoint(
            tmp_path,
            step,
            policy_state={"w": torch.zeros(1)},
            optimizer_state={},
            config_yaml="",
            trainer_state={"step": step, "run_id": run_id},
            keep_last=keep_last,
        )

    for step in (10, 20):  # an older run with higher step numbers
        save(step, "old", 5)
    for step in (1, 2, 3):
        save(step, "new", 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010", "step-000020"]


@pytest.mark.slow
def test_the_cli_refuses_a_reused_output_dir_with_one_line(tmp_path, tiny_ckpt):
    args = ["train", str(DEFAULT_CONFIG), "--no-progress", *sets(*run_config(tmp_path, tiny_ckpt, *QUICK))]
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr


# ---- 2. uttids that are not file names --------------------------------------------------------------------------


def test_unsafe_uttids_become_safe_unique_file_names_inside_the_run(tmp_path, tiny_ckpt):
    from rollouts.paths import inside, safe_stem

    assert safe_stem("spk0_utt-2.a") == "spk0_utt-2.a" and safe_stem("今天") == "今天"
    names = {safe_stem(u) for u in ("spk0/utt_2", "spk0_utt_2", "spk0\\utt_2", "../../../x", "..", "", "a" * 500)}
    assert len(names) == 7 and all("/" not in n and not n.startswith(".") and len(n) < 120 for n in names)
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path, "../x.wav")

    ids = {1: "spk0/utt_2", 2: "../../../escape"}
    manifest = manifest_with(tmp_path, lambda o, n: o.update(uttid=ids.get(n, o["uttid"])))
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=2",
            "data.prompts_per_step=4",
            "sampling.group_size=2",
            f"data.manifest={manifest}",
            "data.shuffle=false",
            "train.samples_every=1",
            "train.samples_per_step=4",
        ),
    )
    train(cfg, d, progress=False)
    run = tmp_path / "run"
    logged = rows(run / "samples.jsonl")
    assert {r["uttid"] for r in logged} >= set(ids.values())  # the true uttids stay in the records
    written = sorted(run.rglob("*.wav"))
    assert written and all((run / "samples").resolve() in p.resolve().parents for p in written)
    # nothing escaped: no wav named after the uttids lies anywhere above the run (other tests' files aside)
    assert not [p for p in tmp_path.parent.rglob("*escape*.wav") if run.resolve() not in p.resolve().parents]
    assert {str(p.resolve()) for p in written} == {str(Path(r["wav"]).resolve()) for r in logged}


# ---- 3. dead or failing rewards ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dead_reward_service_fails_fast_naming_the_url(tmp_path, tiny_ckpt):
    url = "http://127.0.0.1:9"
    res = cli(
        "train",
        str(DEFAULT_CONFIG),
        "--no-progress",
        *sets(
            *run_config(tmp_path, tiny_ckpt, *QUICK, "rewards.x.scorer=remote", f"rewards.x.kwargs={{url: '{url}'}}")
        ),
    )
    assert res.returncode == 2, res.stderr
    assert f"reward service {url} is not answering /health" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_invalid_rewards_are_reported_each_step_and_a_dead_one_stops_the_run(tmp_path, tiny_ckpt, capsys):
    cfg, d = load_config(
        DEFAULT_CONFIG,
        run_config(
            tmp_path,
            tiny_ckpt,
            "train.steps=6",
            "data.prompts_per_step=2",
            "sampling.group_size=2",
            "vocoder.enabled=false",
            "rewards.gone.scorer=scorers_for_tests:AlwaysInvalid",
            "rewards.gone.weight=0.5",
        ),
    )
    with pytest.raises(
        RunError,
        match=r"reward 'gone' was invalid for every sample 3 steps in a row "
        r"\(last step 3: 4 x unavailable\)",
    ):
        train(cfg, d, progress=False)
    err = capsys.readouterr().err
    assert err.count("reward 'gone' invalid for 4/4 samples (4 x unavailable)") == 3
    assert [r["step"] for r in rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # step 3 stopped before its update


@pytest.mark.slow
def test_a_run_that_trained_on_nothing_does_not_succeed(tmp_path, tiny_ckpt):
    res = cli(
        "train",
        str(DEFAULT_CONFIG),
        "--no-progress",
        *sets(*run_config(tmp_path, tiny_ckpt, *QUICK, "rewards.duration.scorer=scorers_for_tests:AlwaysInvalid")),
    )
    assert res.returncode == 1 and "the run trained on nothing" in res.stderr, res.stderr
    start = load_file(str(tiny_ckpt / "llm" / "model.safetensors"))
    end = load_file(str(tmp_path / "run" / "checkpoints" / "step-000001" / "policy.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start)


# ---- 4. non-finite settings and updates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "optim.lr: expected a finite number, got 'inf'"),
        ("sampling.temperature=nan", "sampling.temperature: expected a finite number"),
        (
            "sampling.temperature={kind: linear, start: 1.0, end: 0.0, steps: 2}",
            r"sampling.temperature must be > 0 over steps 0..10 \(it ranges over \[0, 1\]\)",
        ),
        ("loss.eps_high=-1", "loss.eps_high must be >= 0"),
        ("loss.eps_low=1.5", r"loss.eps_low must be in \[0, 1\)"),
        ("rewards.duration.weight=nan", "rewards.duration.weight: expected a finite number"),
        ("rewards.duration.kwargs={tolerance: -1}", "rewards.duration.kwargs.tolerance: must be a finite number > 0"),
        (
            ("rewards.x.scorer=remote", "rewards.x.kwargs={url: 'ftp://x'}"),
            "rewards.x.kwargs.url: must start with http",
        ),
    ],
)
def test_config_check_validates_every_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, ["train.steps=10", *([override] if isinstance(override, str) else override)])


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, tiny_ckpt, monkeypatch):
    import rl.trainer as trainer

    real = trainer.staged_loss
    calls, poisoned = [0], set()

    def loss(*a, **k):  # one minibatch of one micro-batch per step here: call n is step n
        calls[0] += 1
        total, parts = real(*a, **k)
        if calls[0] in poisoned:
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(trainer, "staged_loss", loss)
    poisoned.add(2)
    base = (*QUICK, "train.steps=3", "train.save_every=1", "train.keep_last=5", "optim.lr=1e-3", "optim.minibatches=1")
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "one", tiny_ckpt, *base))
    train(cfg, d, progress=False)
    logged = rows(tmp_path / "one" / "run" / "metrics.jsonl")
    assert [r["update/skipped_nonfinite"] for r in logged] == [0, 1, 0]
    ck = tmp_path / "one" / "run" / "checkpoints"
    w1 = load_file(str(ck / "step-000001" / "policy.safetensors"))
    w2 = load_file(str(ck / "step-000002" / "policy.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the poisoned step never reached the weights
    assert all(bool(torch.isfinite(v).all()) for v in w2.values())

    calls[0] = 0
    poisoned.update({1, 3})
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "all", tiny_ckpt, *base))
    with pytest.raises(RunError, match=r"step 3: 3 optimizer steps in a row had a non-finite loss"):
        train(cfg, d, progress=False)


def test_no_checkpoint_is_written_with_non_finite_weights(tmp_path):
    from types import SimpleNamespace

    from rl.distributed import Dist
    from rl.engine import all_finite
    from rl.guards import check_finite

    one = Dist(SimpleNamespace(process_index=0, num_processes=1, is_main_process=True))
    p = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    assert all_finite([torch.nn.Parameter(torch.ones(2))], one)
    check_finite(all_finite([torch.nn.Parameter(torch.ones(2))], one), 7, "x")
    with pytest.raises(
        RunError,
        match=r"step 7: the policy's weights hold NaN or inf; no checkpoint was written "
        r"\(the last checkpoint \(x\) is intact\)",
    ):
        check_finite(all_finite([torch.nn.Parameter(torch.ones(2)), p], one), 7, "x")


# ---- 5. malformed answers of a reward service -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"values": [Infinity], "valid": [true]}', "marked valid but is not a finite number"),
        ('{"values": [NaN], "valid": [true]}', "marked valid but is not a finite number"),
        ('{"values": [0.5], "valid": ["false"]}', "JSON booleans"),
        ('{"values": [0.5, 0.1], "valid": [true, true]}', "expected a list of 1 numbers"),
        ('{"values": ["0.5"], "valid": [true]}', "expected a number or null"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_malformed_service_answers_make_samples_invalid(body, message):
    from fastapi import FastAPI
    from fastapi.responses import Response

    from rewards.remote import RemoteScorer

    app = FastAPI()

    @app.post("/score")
    async def answer():
        return Response(body, media_type="application/json")

    server = ServerThread(app)
    try:
        scorer = RemoteScorer(server.url, retries=2, backoff_s=0.01)
        res = scorer([audio_sample()])
    finally:
        server.stop()
    assert not res.valid[0] and np.isnan(res.values[0])
    assert "malformed response" in res.reasons[0] and message in res.reasons[0], res.reasons[0]
    stats = scorer.pop_stats()
    assert stats["failed_requests"] == 1 and stats["requests"] == 1  # not retried: it would answer the same


def test_a_local_scorer_marking_nan_valid_is_invalid_and_counted():
    from rewards.base import ScoreResult
    from rewards.runner import score

    class Liar:
        def __call__(self, samples):
            return ScoreResult(np.array([np.nan, np.inf, 0.3]), np.ones(3, dtype=bool), {}, [None] * 3)

    res = score({"liar": Liar()}, [audio_sample(seed=i) for i in range(3)]).results["liar"]
    assert res.valid.tolist() == [False, False, True] and "non-finite value" in res.reasons[0]


# ---- 6. logs after crashes and resumes --------------------------------------------------------------------------


def test_resume_truncates_the_logs_to_the_checkpoint_and_drops_a_torn_line(tmp_path, tiny_ckpt, capsys):
    base = (
        "data.prompts_per_step=2",
        "sampling.group_size=2",
        "train.save_every=2",
        "train.samples_every=1",
        "train.samples_per_step=1",
    )
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "a", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, progress=False)
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=3", *base))
    train(cfg, d, progress=False)  # checkpoints at 2 and 3; step 3 is logged
    run = tmp_path / "b" / "run"
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if killed after logging step 3, before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # killed mid-write
    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path / "b", tiny_ckpt, "train.steps=4", *base))
    train(cfg, d, resume=str(run), progress=False)
    assert "dropped a torn last line" in capsys.readouterr().err
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(rows(run / "metrics.jsonl")) == strip(rows(tmp_path / "a" / "run" / "metrics.jsonl"))
    sa, sb = rows(tmp_path / "a" / "run" / "samples.jsonl"), rows(run / "samples.jsonl")
    # no duplicate rows of the redone step: the uninterrupted run's rows (first, best and worst of each step)
    assert [(r["step"], r["pick"]) for r in sb] == [(r["step"], r["pick"]) for r in sa]
    assert sorted({r["step"] for r in sb}) == [1, 2, 3, 4]
    assert [r["rewards"] for r in sb] == [r["rewards"] for r in sa]


# ---- 7. remote code -------------------------------------------------------------------------------------------


def test_funasr_runs_no_code_from_a_model_directory(tmp_path, reward_models):
    from rewards.asr import ParaformerASR

    model = tmp_path / "paraformer"
    shutil.copytree(reward_models["paraformer_dir"], model)
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('code from the model dir ran')\n")
    with open(model / "config.yaml", "a") as f:
        f.write(f"trust_remote_code: true\nremote_code: {model / 'evil.py'}\n")
    ParaformerASR(model)
    assert not marker.exists()


@pytest.mark.slow
def test_a_saved_config_never_turns_remote_code_on_by_itself(tmp_path, tiny_ckpt):
    from rl.evaluate import MetaError, load_for_eval

    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, *QUICK))
    train(cfg, d, progress=False)
    ck = tmp_path / "run" / "checkpoints" / "step-000001"
    (ck / "config.yaml").write_text(
        (ck / "config.yaml").read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    )
    with pytest.raises(MetaError, match="pass --trust-remote-code to allow it"):
        load_for_eval(ck)
    res = cli("train", "--resume", str(tmp_path / "run"), "--no-progress", *sets("train.steps=2"))
    assert res.returncode == 2 and "pass --trust-remote-code to allow it" in res.stderr, res.stderr
    res = cli(
        "train",
        str(DEFAULT_CONFIG),
        *sets(*run_config(tmp_path / "x", tiny_ckpt, *QUICK, "policy.trust_remote_code=true")),
    )
    assert res.returncode == 2 and "pass --trust-remote-code" in res.stderr


# ---- 8. bad manifests, long texts, a full disk ------------------------------------------------------------------


@pytest.mark.slow
def test_manifest_errors_are_one_line_before_anything_is_written(tmp_path, tiny_ckpt):
    def run(manifest, *extra):
        res = cli(
            "train",
            str(DEFAULT_CONFIG),
            "--no-progress",
            *sets(*run_config(tmp_path, tiny_ckpt, *QUICK, f"data.manifest={manifest}", *extra)),
        )
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "run").exists()
        return res.stderr

    good = manifest_with(tmp_path, lambda o, n: None).read_text().splitlines()[0]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n{not json\n")
    assert f"{bad_json}:2: not valid JSON" in run(bad_json)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(good.encode() + b"\n" + '{"uttid": "caf\xe9"}'.encode("latin-1"))
    assert f"{latin1}:2: not UTF-8 text" in run(latin1)
    long = manifest_with(tmp_path, lambda o, n: o.update(syn_text="很" * 2_000_000) if n == 3 else None)
    assert ":3: field 'syn_text': 2000000 characters" in run(long)
    assert ":1: field 'syn_text':" in run(manifest_with(tmp_path, lambda o, n: None), "data.max_text_tokens=2")
    no_wav = manifest_with(tmp_path, lambda o, n: o.pop("prompt_speech") if n == 2 else None)
    err = run(no_wav, "rewards.p.scorer=scorers_for_tests:NeedsPromptAudio")
    assert ":2: field 'prompt_speech' is missing; reward(s) p compare against the voice prompt's audio" in err


def test_a_failed_checkpoint_write_names_the_step_and_leaves_the_previous_one(tmp_path, tiny_ckpt, monkeypatch):
    import rl.checkpoint as checkpoint

    cfg, d = load_config(DEFAULT_CONFIG, run_config(tmp_path, tiny_ckpt, *QUICK, "train.steps=2", "train.save_every=1"))
    real = checkpoint.save_file
    calls = []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(
        RunError,
        match=r"could not write checkpoint step-000002 .*No space left on device; "
        r"the previous checkpoint .*step-000001 is intact",
    ):
        train(cfg, d, progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no temporary directory left behind

    monkeypatch.setattr(checkpoint, "save_file", real)
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unexpected pos")))
    with pytest.raises(RunError, match="could not write checkpoint step-000002 .*unexpected pos"):
        train(cfg, d, resume=str(tmp_path / "run"), progress=False)


# ---- 9. the reward server under abuse ---------------------------------------------------------------------------


def test_the_server_answers_deep_json_with_400_and_stays_live_during_a_slow_decode(monkeypatch):
    import rewards.server as server_mod
    from rewards.duration import DurationScorer

    server = ServerThread(server_mod.create_app(DurationScorer(), "d"))
    try:
        deep = "[" * 100_000 + "]" * 100_000
        r = httpx.post(f"{server.url}/score", content=deep, timeout=30)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]

        real = server_mod._parse
        monkeypatch.setattr(server_mod, "_parse", lambda body, n: (time.sleep(3), real(body, n))[1])
        slow = threading.Thread(target=lambda: httpx.post(f"{server.url}/score", json={"samples": []}, timeout=30))
        slow.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 1.5  # answered while the other request was still being decoded
        slow.join()
    finally:
        server.stop()


def test_a_client_that_disconnects_mid_request_is_one_log_line(caplog):
    import logging

    from rewards.duration import DurationScorer
    from rewards.server import create_app

    server = ServerThread(create_app(DurationScorer(), "d"))
    try:
        with caplog.at_level(logging.WARNING, logger="ttsrl.reward_service"):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(
                    b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100000\r\n\r\n{"samples": ['
                )
            deadline = time.time() + 10
            while time.time() < deadline and not caplog.records:
                time.sleep(0.05)
        assert httpx.get(f"{server.url}/health", timeout=10).json()["abandoned"] == 1
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "ttsrl.reward_service"]
    assert lines == ["ttsrl reward service d: a client disconnected while sending its request"]


def test_the_service_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    import argparse

    from rl.cli import read_token

    f = tmp_path / "token"
    f.write_text("s3cret\n")
    assert read_token(argparse.Namespace(token_file=str(f), token=None)) == "s3cret"
    monkeypatch.setenv("TTSRL_REWARD_TOKEN", "from-env")
    assert read_token(argparse.Namespace(token_file=None, token=None)) == "from-env"
    assert read_token(argparse.Namespace(token_file=None, token="cli")) == "cli"
    assert "visible to every user of this machine in `ps`" in capsys.readouterr().err
