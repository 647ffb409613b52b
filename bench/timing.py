"""Side-by-side timing for the benchmarks: variants run alternately, so that a noisy machine slows them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], None]], repeats: int, device: str, baseline: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Run every variant once as a warm-up, then `repeats` rounds of all of them in turn, each under no_grad.
    Returns (median seconds per variant, median per-round ratio baseline time / variant time)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            sync(device)
            if rep:  # round 0 is the warm-up
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median(b / o for b, o in zip(times[baseline], v)) for k, v in times.items()}
    return med, ratios


def rollout_args(doc: str, sizes: list[str]):
    """The group-rollout benches' shared command line: --size, --prompts, --group, --repeats, --device, --dtype,
    --threads (a bench adds its own, then calls `parse`)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(sizes), default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="B: prompts (groups)")
    ap.add_argument("--group", type=int, default=4, help="G: rows per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    return ap


def parse(ap, argv: list[str] | None):
    """Parse the command line and apply --threads."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
