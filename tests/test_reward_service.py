"""Reward services on loopback: round trips, failures, limits, auth and a bounded load test."""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import REPO, ServerThread, audio_sample, free_port
from scorers_for_tests import Broken, Slow

from rewards.cer import CERScorer
from rewards.duration import DurationScorer
from rewards.remote import RemoteScorer
from rewards.runner import score
from rewards.server import create_app
from rewards.wire import encode_request


def same(a, b):
    assert np.array_equal(a.valid, b.valid)
    assert np.allclose(a.values[a.valid], b.values[b.valid], rtol=0, atol=0)
    assert a.reasons == b.reasons
    assert a.sub_scores.keys() == b.sub_scores.keys()
    for k in a.sub_scores:
        assert np.allclose(a.sub_scores[k], b.sub_scores[k], equal_nan=True, rtol=0, atol=0)


@pytest.fixture(scope="module")
def samples():
    return [audio_sample("今天天气很好", seed=i, seconds=0.8 + 0.2 * i, uttid=f"u{i % 2}") for i in range(5)] + [
        audio_sample(audio=None),
        audio_sample("Hello world", seed=9),
    ]


def test_round_trip_equals_local_scoring(samples, reward_models):
    for scorer in (DurationScorer(), CERScorer(paraformer_dir=reward_models["paraformer_dir"])):
        srv = ServerThread(create_app(scorer, "x"))
        try:
            remote = RemoteScorer(srv.url, batch_size=3)  # 3 concurrent requests
            same(remote(samples), scorer(samples))
            stats = remote.pop_stats()
            assert stats["requests"] == 3 and stats["errors"] == 0 and stats["failed_requests"] == 0
            h = remote.health()
            assert h["scorer"] == "x" and h["ready"] and h["samples"] == len(samples)
        finally:
            srv.stop()


def test_voice_prompts_travel_once_per_request(samples):
    body = encode_request(samples)
    assert len(body["prompt_audio"]) == 3  # three distinct voice prompts among 7 samples
    pcm = encode_request(samples, "pcm16")
    assert len(json.dumps(pcm)) < 0.6 * len(json.dumps(body))


def test_bad_payloads_get_clear_4xx_and_the_server_stays_up():
    srv = ServerThread(create_app(DurationScorer(), "d", max_batch=4, max_request_mb=0.05))
    try:
        post = lambda **kw: httpx.post(f"{srv.url}/score", timeout=10, **kw)  # noqa: E731
        r = post(content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = post(json={"samples": []}, headers={"X-Client-Timeout": "soon"})
        assert r.status_code == 400 and "X-Client-Timeout" in r.json()["error"]
        r = post(json={"samples": [{"uttid": "a"}]})
        assert r.status_code == 422 and "samples[0].target_text: missing" in r.json()["error"]
        mp3 = {"encoding": "mp3", "sample_rate": 1, "data": ""}
        r = post(json={"samples": [{"uttid": "a", "target_text": "x", "audio": mp3}]})
        assert r.status_code == 422 and "samples[0].audio.encoding" in r.json()["error"]
        not_b64 = {"encoding": "pcm16", "sample_rate": 16000, "data": "@@@"}
        r = post(json={"samples": [{"uttid": "a", "target_text": "x", "audio": not_b64}]})
        assert r.status_code == 422 and "not valid base64" in r.json()["error"]
        r = post(json={"samples": [{"uttid": "a", "target_text": "x"}] * 5})
        assert r.status_code == 413 and "too many samples" in r.json()["error"]
        r = post(content=b"x" * 60_000, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = post(json={"samples": [{"uttid": "a", "target_text": "x", "codes": [10**30]}]})
        assert r.status_code == 422 and "samples[0].codes: must be a list of 64-bit integers" in r.json()["error"]
        r = post(json={"prompt_audio": {}, "samples": [{"uttid": "a", "target_text": "x", "prompt_audio_ref": [1]}]})
        assert r.status_code == 422 and "samples[0].prompt_audio_ref: expected str" in r.json()["error"]
        for bad in (-1.0, "2", True):
            r = post(json={"samples": [{"uttid": "a", "target_text": "x", "duration_s": bad}]})
            assert r.status_code == 422 and "samples[0].duration_s: must be a finite number" in r.json()["error"]
        r = post(json={"samples": [{"uttid": "a", "target_text": "今天", "codes": [1, 2, 3], "duration_s": 0.12}]})
        assert r.status_code == 200 and r.json()["valid"] == [True]
        r = post(json={"samples": [{"uttid": "a", "target_text": "今天", "codes": [1, 2, 3]}]})  # no duration
        assert r.status_code == 200 and r.json()["valid"] == [False] and "duration is unknown" in r.json()["reasons"][0]
    finally:
        srv.stop()


def test_auth_token(samples):
    srv = ServerThread(create_app(DurationScorer(), "d", token="s3cret"))
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 401
        assert httpx.post(f"{srv.url}/score", json={"samples": []}).status_code == 401
        wrong = httpx.post(f"{srv.url}/score", json={"samples": []}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        res = RemoteScorer(srv.url, token="s3cret")(samples[:2])
        assert res.valid.all()
        res = RemoteScorer(srv.url, token=None, retries=2, backoff_s=0.01)(samples[:2])
        assert not res.valid.any() and "HTTP 401" in res.reasons[0]  # 4xx: no retry
    finally:
        srv.stop()


def test_slow_service_times_out_then_samples_are_invalid(samples):
    srv = ServerThread(create_app(Slow(1.5), "slow"))
    try:
        remote = RemoteScorer(srv.url, timeout_s=0.3, retries=1, backoff_s=0.01)
        t0 = time.perf_counter()
        res = remote(samples[:3])
        assert time.perf_counter() - t0 < 1.5
        assert not res.valid.any() and np.isnan(res.values).all()
        assert "Timeout" in res.reasons[0]
        stats = remote.pop_stats()
        assert stats["requests"] == 2 and stats["errors"] == 2 and stats["failed_requests"] == 1
        # the retry queued behind the first attempt; its client left, so the server drops it unscored (on a busy
        # machine the first attempt may already have been given up on before it reached the scorer)
        deadline = time.time() + 10
        while (h := remote.health())["abandoned"] + h["requests"] < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert h["abandoned"] + h["requests"] == 2 and h["abandoned"] >= 1, h
    finally:
        srv.stop()


def test_scorer_errors_are_500_then_invalid(samples):
    srv = ServerThread(create_app(Broken(), "broken"))
    try:
        remote = RemoteScorer(srv.url, retries=2, backoff_s=0.01)
        res = remote(samples[:2])
        assert not res.valid.any() and "HTTP 500" in res.reasons[0] and "lost its GPU" in res.reasons[0]
        stats = remote.pop_stats()
        assert stats["requests"] == 3 and stats["errors"] == 3 and stats["failed_requests"] == 1
    finally:
        srv.stop()


@pytest.mark.slow
def test_killed_server_retries_then_invalid(samples):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl.cli", "serve-reward", "--scorer", "duration", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        remote = RemoteScorer(url, retries=2, backoff_s=0.05, timeout_s=5)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                remote.health()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert remote(samples[:2]).valid.all()
    finally:
        proc.kill()
        proc.wait()
    res = remote(samples[:2])
    assert not res.valid.any() and "failed" in res.reasons[0]
    remote.pop_stats()


def test_load_many_concurrent_clients_all_answered(samples):
    srv = ServerThread(create_app(DurationScorer(), "d"))
    try:
        body = encode_request(samples)
        n_clients, n_requests = 8, 6

        def client(_):
            codes = []
            with httpx.Client(timeout=30) as c:
                for _ in range(n_requests):
                    codes.append(c.post(f"{srv.url}/score", json=body).status_code)
            return codes

        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            codes = [c for cs in pool.map(client, range(n_clients)) for c in cs]
        assert codes == [200] * n_clients * n_requests
        assert time.perf_counter() - t0 < 60
        assert httpx.get(f"{srv.url}/health").json()["requests"] == n_clients * n_requests
    finally:
        srv.stop()


def test_concurrent_scoring_equals_sequential(samples, reward_models):
    scorers = {"d": DurationScorer(), "c": CERScorer(paraformer_dir=reward_models["paraformer_dir"])}
    a = score(scorers, samples, concurrent=True)
    b = score(scorers, samples, concurrent=False)
    for k in scorers:
        same(a.results[k], b.results[k])


def test_scorers_waiting_on_services_overlap(samples):
    # two services that each take 0.6 s: scored concurrently, a step waits for the slower one, not the sum
    servers = [ServerThread(create_app(Slow(0.6), f"s{i}")) for i in range(2)]
    try:
        scorers = {f"s{i}": RemoteScorer(srv.url, timeout_s=10) for i, srv in enumerate(servers)}
        t0 = time.perf_counter()
        res = score(scorers, samples[:3], concurrent=True)
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        score(scorers, samples[:3], concurrent=False)
        apart = time.perf_counter() - t0
        assert all(r.valid.all() for r in res.results.values())
        assert apart > 1.2 and together < 0.75 * apart, (together, apart)
    finally:
        for srv in servers:
            srv.stop()


def test_serve_reward_cli_errors_name_the_problem(tmp_path, capsys):
    from rl.cli import main

    assert main(["serve-reward", "--scorer", "nope", "--config", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert "has no reward named 'nope'; it has: duration" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "base: " + str(REPO / "configs" / "tiny.yaml") + "\n"
        "rewards:\n  d: {scorer: remote, kwargs: {url: 'http://127.0.0.1:1'}}\n"
    )
    assert main(["serve-reward", "--scorer", "d", "--config", str(cfg)]) == 2
    assert "is itself remote" in capsys.readouterr().err
