"""Batched vs one-by-one vocoding of one step's rollouts, side by side in one process.

    python bench/vocode.py                 # tiny flow + HiFT (the embedded default's sizes)
    python bench/vocode.py --size mid      # a mid-size flow (D 256, 6 blocks) and a 128-channel HiFT
    python bench/vocode.py --device cuda   # on a GPU

Random-weight models in the upstream layout, written to a temporary directory and loaded with
Token2Wav.from_pretrained. The rollouts are `--rows` code sequences of 2-6 s (50-150 codes) with the shipped
voice prompts, seeded per row. Batched and one-by-one runs alternate `--repeats` times; the figure is the
median of the per-pair time ratios, plus the largest difference between the two outputs.
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

from rollouts.flow import FlowModel  # noqa: E402
from rollouts.manifest import read_manifest  # noqa: E402
from rollouts.tiny_vocoder import TINY_FLOW, write_tiny_vocoder  # noqa: E402
from rollouts.token2wav import Token2Wav, VoicePrompt  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny" / "manifest.jsonl"
MID_FLOW = {
    **TINY_FLOW,
    "speech_token_dim": 256,
    "trans_dim": 256,
    "depth": 6,
    "heads": 4,
    "dim_head": 64,
    "conv_layers": 2,
}


def write_mid(ckpt: Path) -> None:
    write_tiny_vocoder(ckpt, hift_channels=128)
    flow = FlowModel(**MID_FLOW)
    (ckpt / "flow" / "config.yaml").write_text(
        "\n".join(["flow: !new:flow.flow.Flow"] + [f"    {k}: {v}" for k, v in MID_FLOW.items()]) + "\n"
    )
    torch.save(flow.state_dict(), ckpt / "flow" / "flow.pt")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-timesteps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_mid(ckpt) if args.size == "mid" else write_tiny_vocoder(ckpt)
        t2w = Token2Wav.from_pretrained(ckpt, device=args.device, n_timesteps=args.n_timesteps)
    records = read_manifest(MANIFEST)
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 32768, int(rng.integers(50, 151))) for _ in range(args.rows)]
    prompts = [VoicePrompt(r.prompt_speech_tokens, r.prompt_feat, r.embedding) for r in records[: args.rows]]
    seeds = [i // 4 for i in range(args.rows)]  # groups of 4 share their noise seed, as in training

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    t2w(codes[:2], prompts[:2], seeds[:2])  # warm-up
    ratios, diffs, tb_all, ts_all = [], [], [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        batched = t2w(codes, prompts, seeds)
        sync()
        t1 = time.perf_counter()
        solo = [t2w([c], [p], [s]).audio[0] for c, p, s in zip(codes, prompts, seeds)]
        sync()
        t2 = time.perf_counter()
        tb_all.append(t1 - t0)
        ts_all.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
        diffs.append(max(float(np.abs(a - b).max()) for a, b in zip(batched.audio, solo)))
    seconds = sum(len(a) for a in batched.audio) / batched.sample_rate
    print(
        f"vocode {args.size} on {args.device} ({torch.get_num_threads()} threads): {args.rows} rollouts, "
        f"{seconds:.1f} s of audio, {args.n_timesteps} flow steps"
    )
    print(f"  batched     {statistics.median(tb_all):7.2f} s   one-by-one {statistics.median(ts_all):7.2f} s")
    print(f"  speed-up (one-by-one / batched, median of {args.repeats} pairs): {statistics.median(ratios):.2f}x")
    print(f"  max |batched - one-by-one| = {max(diffs):.2e}")
    return {
        "batched_s": statistics.median(tb_all),
        "one_by_one_s": statistics.median(ts_all),
        "ratio": statistics.median(ratios),
        "max_diff": max(diffs),
    }


if __name__ == "__main__":
    main()
