"""Scoring a step's rollouts: batched over a reward service vs one request per sample, and all scorers at once
vs one after another. Side by side in one process.

    python bench/scoring.py
    python bench/scoring.py --rows 64 --repeats 5

Tiny random reward models in their real formats (Paraformer CER, WavLM + ECAPA SIM, emotion2vec, duration),
written to a temporary directory; `--rows` samples of 2-5 s of 24 kHz audio, 4 per voice prompt.
(1) The CER scorer behind a loopback `ttsrl serve-reward`-style server: one batched request for the whole step
(RemoteScorer's default) vs one synchronous request per sample (what upstream GLM-TTS does).
(2) The four scorers locally: concurrent (one thread each, the trainer's default) vs sequential.
(3) Two reward services, each its own `ttsrl serve-reward` process whose scorer takes --service-s seconds per
batch (a stand-in for models on other GPUs or hosts), called as the trainer calls remote scorers: concurrent vs
sequential.
Each figure is the median over --repeats alternating pairs of the time ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import ServerThread  # noqa: E402

from rewards.base import Sample  # noqa: E402
from rewards.cer import CERScorer  # noqa: E402
from rewards.duration import DurationScorer  # noqa: E402
from rewards.emotion import EmotionScorer  # noqa: E402
from rewards.remote import RemoteScorer  # noqa: E402
from rewards.runner import score  # noqa: E402
from rewards.server import create_app  # noqa: E402
from rewards.sim import SimScorer  # noqa: E402
from rewards.tiny import write_all  # noqa: E402


def make_samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    prompts = [(0.1 * rng.standard_normal(48000)).astype(np.float32) for _ in range((n + 3) // 4)]
    out = []
    for i in range(n):
        sec = float(rng.uniform(2.0, 5.0))
        out.append(
            Sample(
                uttid=f"u{i // 4}",
                group_id=i // 4,
                target_text="今天天气很好，我们一起去公园散步吧。",
                prompt_text="你好",
                codes=np.zeros(int(25 * sec), np.int64),
                finished=True,
                prompt_codes=np.zeros(50, np.int64),
                duration_s=sec,
                prompt_duration_s=2.0,
                audio=(0.1 * rng.standard_normal(int(24000 * sec))).astype(np.float32),
                sample_rate=24000,
                prompt_audio=prompts[i // 4],
                prompt_sample_rate=24000,
            )
        )
    return out


def pairs(a, b, repeats: int) -> tuple[float, float, float]:
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def service_process(seconds: float):
    """`ttsrl serve-reward` in its own process, with a scorer that takes `seconds` per batch."""
    import json
    import os
    import subprocess

    from conftest import free_port

    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rl.cli",
            "serve-reward",
            "--scorer",
            "scorers_for_tests:Slow",
            "--kwargs",
            json.dumps({"seconds": seconds}),
            "--port",
            str(port),
        ],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(scorer: RemoteScorer, timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            scorer.health()
            return
        except httpx.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--service-s", type=float, default=0.5, help="(3): seconds each stand-in service takes")
    args = ap.parse_args(argv)
    out = {}
    samples = make_samples(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        m = write_all(tmp)
        cer = CERScorer(paraformer_dir=m["paraformer_dir"])
        scorers = {
            "cer": cer,
            "sim": SimScorer(m["sv_checkpoint"], wavlm_cfg=m["wavlm_cfg"]),
            "emotion": EmotionScorer(m["emotion_dir"]),
            "duration": DurationScorer(),
        }
        srv = ServerThread(create_app(cer, "cer"))
        try:
            batched = RemoteScorer(srv.url, batch_size=len(samples))
            per_sample = RemoteScorer(srv.url, batch_size=1, max_concurrency=1)
            batched(samples[:2])  # warm-up
            tb, ts, r = pairs(lambda: batched(samples), lambda: per_sample(samples), args.repeats)
        finally:
            srv.stop()
        print(f"service (cer, {len(samples)} samples, {torch.get_num_threads()} threads):")
        print(f"  one batched request {tb:6.2f} s   one request per sample {ts:6.2f} s   ratio {r:.2f}x")
        out["service_batched_vs_per_sample"] = r
        score(scorers, samples[:4])  # warm-up (prompt embeddings are cached per voice prompt either way)
        tc, tq, r = pairs(
            lambda: score(scorers, samples, concurrent=True),
            lambda: score(scorers, samples, concurrent=False),
            args.repeats,
        )
        print(f"scorers (cer, sim, emotion, duration; {len(samples)} samples):")
        print(f"  concurrent {tc:6.2f} s   sequential {tq:6.2f} s   ratio {r:.2f}x")
        out["local_concurrent_vs_sequential"] = r
    servers = [service_process(args.service_s) for _ in range(2)]
    try:
        remote = {f"s{i}": RemoteScorer(url, batch_size=len(samples)) for i, (_, url) in enumerate(servers)}
        for scorer in remote.values():
            wait_ready(scorer)
        score(remote, samples[:2])  # warm-up
        tc, tq, r = pairs(
            lambda: score(remote, samples, concurrent=True),
            lambda: score(remote, samples, concurrent=False),
            args.repeats,
        )
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    print(f"two services of {args.service_s:g} s per batch ({len(samples)} samples):")
    print(f"  concurrent {tc:6.2f} s   sequential {tq:6.2f} s   ratio {r:.2f}x")
    out["services_concurrent_vs_sequential"] = r
    return out


if __name__ == "__main__":
    main()
