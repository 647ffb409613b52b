"""The cost of a flow-GRPO step (policy.kind glmtts_flow) against plain vocoding of the same rows, side by side.

    python bench/flow_step.py                      # tiny and mid DiT, CPU
    python bench/flow_step.py --device cuda --sizes mid big --rows 32

The same rows (N = --rows, codes of 2-6 s, a voice prompt each) through:
  vocode     what a LM-GRPO step pays to hear its rollouts: Token2Wav, the upstream flow ODE (10 steps, CFG) + HiFT
  rollout    the flow policy's SDE sampler (10 steps, --sde-steps of them SDE, their transitions recorded) + HiFT
  recompute  teacher-forced log-probs of the recorded transitions under the current DiT, with grad
  update     backward of a GRPO loss on them and an AdamW step over the DiT
A flow-GRPO step is rollout + recompute + update (the LM's codes cost the same in both and are left out). Printed:
each part's median seconds over --repeats alternating rounds, and the ratio (rollout + recompute + update) / vocode.
Random weights in the upstream layout (the LM tiny, the DiT at --sizes: tiny = the tests' (64 x 2), mid 512 x 8,
big = upstream's 768 x 18).
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

from policies.glmtts_flow import GLMTTSFlowPolicy  # noqa: E402
from policies.tiny import write_tiny_checkpoint  # noqa: E402
from rollouts.flow import FlowModel  # noqa: E402
from rollouts.tiny_vocoder import TINY_FLOW, write_tiny_vocoder  # noqa: E402
from rollouts.token2wav import Token2Wav, VoicePrompt  # noqa: E402
from rollouts.types import Rollout, SamplingParams  # noqa: E402

SIZES = {
    "tiny": {},
    "mid": {"trans_dim": 512, "depth": 8, "heads": 8, "dim_head": 64},
    "big": {"trans_dim": 768, "depth": 18, "heads": 12, "dim_head": 64},
}


def write_checkpoint(root: Path, size: str) -> Path:
    d = root / size
    write_tiny_checkpoint(d, ["你好", "hello"], seed=0)
    write_tiny_vocoder(d, seed=0, mel_sensitive=True)
    if SIZES[size]:
        cfg = {**TINY_FLOW, **SIZES[size]}
        torch.manual_seed(0)
        flow = FlowModel(**cfg)
        lines = ["flow: !new:flow.flow.Flow"] + [f"    {k}: {v}" for k, v in cfg.items()]
        (d / "flow" / "config.yaml").write_text("\n".join(lines) + "\n")
        torch.save(flow.state_dict(), d / "flow" / "flow.pt")
    return d


def voices_and_codes(n: int, seed: int = 0) -> tuple[list[VoicePrompt], list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    voices, codes = [], []
    for _ in range(n):
        tp = int(rng.integers(25, 50))
        voices.append(
            VoicePrompt(
                rng.integers(0, 32768, tp).astype(np.int64),
                rng.standard_normal((2 * tp, 80)).astype(np.float32),
                rng.standard_normal(192).astype(np.float32),
            )
        )
        codes.append(torch.as_tensor(rng.integers(0, 32768, int(rng.integers(50, 150)))))
    return voices, codes


@torch.no_grad()
def flow_rollout(pol: GLMTTSFlowPolicy, voices, codes, seeds) -> Rollout:
    """The flow part of sample_groups on given codes (the LM's share is the same for both paths)."""
    n = len(codes)
    fb = pol.flow_batch(voices, codes)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    mel, (x, xn, t, dt, lp) = pol._sample(gens, fb)
    k = len(pol.settings.sde_steps)
    extras = pol._extras(n, list(range(n)), codes, max(c.numel() for c in codes), fb, mel, x, xn, t, dt)
    mask = torch.ones(n, k, dtype=torch.bool)
    z = torch.zeros(n, dtype=torch.long)
    return Rollout(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.bool),
        tokens=torch.tensor(pol.settings.sde_steps).repeat(n, 1),
        token_mask=mask,
        behaviour_logp=lp.cpu(),
        group_ids=torch.arange(n),
        prompt_index=torch.arange(n),
        finished=torch.ones(n, dtype=torch.bool),
        truncated=torch.zeros(n, dtype=torch.bool),
        lengths=torch.tensor([c.numel() for c in codes]),
        min_lengths=z,
        text_lengths=z,
        params=SamplingParams(),
        pad_id=-1,
        extras=extras,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(size: str, args, root: Path) -> dict[str, float]:
    d = write_checkpoint(root, size)
    pol = GLMTTSFlowPolicy.from_pretrained(d, device=args.device)
    pol.settings = type(pol.settings)(sde_steps=tuple(args.sde_steps))
    t2w = Token2Wav.from_pretrained(d, device=args.device, n_timesteps=10)
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-5)
    voices, codes = voices_and_codes(args.rows)
    seeds = list(range(args.rows))
    adv = torch.randn(args.rows)
    times: dict[str, list[float]] = {"vocode": [], "rollout": [], "recompute": [], "update": []}

    def timed(key, fn):
        sync(args.device)
        t0 = time.perf_counter()
        out = fn()
        sync(args.device)
        times[key].append(time.perf_counter() - t0)
        return out

    def one_round() -> None:
        timed("vocode", lambda: t2w([c.numpy() for c in codes], voices, seeds))
        ro = timed("rollout", lambda: flow_rollout(pol, voices, codes, seeds))
        decoder = pol.load_decoder([], n_timesteps=10, dtype="float32")
        timed("rollout", lambda: decoder(ro, seeds, batch_size=0))
        logp = timed("recompute", lambda: pol.token_logprobs(ro)[0])
        ratio = torch.exp(logp - ro.behaviour_logp.to(logp.device))

        def step():
            (-(ratio * adv.to(logp.device)[:, None]).mean()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed("update", step)

    one_round()  # warm-up
    for v in times.values():
        v.clear()
    for _ in range(args.repeats):
        one_round()
    # the rollout entry holds two timings per round (flow SDE, then HiFT): sum them per round
    roll = [a + b for a, b in zip(times["rollout"][::2], times["rollout"][1::2])]
    med = {k: statistics.median(v) for k, v in times.items() if k != "rollout"} | {"rollout": statistics.median(roll)}
    med["ratio"] = (med["rollout"] + med["recompute"] + med["update"]) / med["vocode"]
    return med


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--sde-steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            m = measure(size, args, Path(tmp))
            out[size] = m
            print(
                f"{size:5s} DiT, {args.rows} rows, {len(args.sde_steps)} SDE steps of 10: vocode {m['vocode']:.3f} s | "
                f"rollout {m['rollout']:.3f} + recompute {m['recompute']:.3f} + update {m['update']:.3f} s | "
                f"flow-GRPO step / vocode = {m['ratio']:.2f}x"
            )
    return out


if __name__ == "__main__":
    main()
