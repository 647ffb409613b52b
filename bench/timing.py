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
