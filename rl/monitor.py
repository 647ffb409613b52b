"""A reward-hacking monitor: how the rewards move together over the last `monitor.window` steps.

A policy that learns to game one reward often does it at the cost of another: CER goes up while speaker similarity
or audio quality goes down (it speaks fast, flat or noisy). The monitor keeps a sliding window of each step's
per-reward mean (`reward/<name>/mean`, every configured reward, weighted or not) and logs:

    monitor/corr/<a>__<b>   Pearson correlation of the two rewards' means over the window, for every pair of rewards
                            (names sorted, a < b); only steps where both are finite count; NaN with fewer than 3
                            such steps or when either has zero variance over them
    monitor/trend/<name>    least-squares slope of the reward's mean against the step number (reward units per step)
                            over the window's finite points; NaN with fewer than 2
    monitor/hacking         how many pairs are flagged: {a, b} is flagged when a has a positive weight (the update
                            pushes it up), trend(a) > 0, trend(b) < 0 and corr(a, b) < min_corr (NaN never flags);
                            b may be any other reward, weight 0 included (a reward logged only to watch it)

The window is a list of rows {"step": s, "means": {name: value or None}} (None = no finite mean that step), JSON-
ready: the trainer keeps it in its TrainState, so a resumed run goes on with the same window.
"""

from __future__ import annotations

import math
from itertools import combinations


def push(window: list[dict], step: int, means: dict[str, float], size: int) -> list[dict]:
    """The window with this step's reward means appended, cut to its last `size` rows (a new list)."""
    row = {"step": int(step), "means": {k: _finite_or_none(v) for k, v in means.items()}}
    return ([*window, row])[-size:] if size > 0 else []


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation of the pairs (x_i, y_i) where both are finite; NaN with fewer than 3 such pairs or when
    either side has zero variance over them."""
    pts = [(x, y) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
    if len(pts) < 3:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    syy = sum((y - my) ** 2 for _, y in pts)
    if sxx <= 0.0 or syy <= 0.0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def trend(steps: list[float], ys: list[float]) -> float:
    """Least-squares slope of y against the step, over the finite y; NaN with fewer than 2 of them."""
    pts = [(float(s), y) for s, y in zip(steps, ys) if _finite(y)]
    if len(pts) < 2:
        return math.nan
    ms = sum(s for s, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sss = sum((s - ms) ** 2 for s, _ in pts)
    if sss <= 0.0:
        return math.nan
    return sum((s - ms) * (y - my) for s, y in pts) / sss


def monitor_metrics(window: list[dict], weights: dict[str, float], min_corr: float) -> dict[str, float | int]:
    """monitor/corr/<a>__<b>, monitor/trend/<name> and monitor/hacking (see the module docstring) of the window,
    for the rewards in `weights` (name -> weight in the fused advantage)."""
    names = sorted(weights)
    steps = [row["step"] for row in window]
    series = {k: [_nan_if_none(row["means"].get(k)) for row in window] for k in names}
    slopes = {k: trend(steps, series[k]) for k in names}
    out: dict[str, float | int] = {}
    hacking = 0
    for a, b in combinations(names, 2):
        r = pearson(series[a], series[b])
        out[f"monitor/corr/{a}__{b}"] = r
        hacking += int(any(_gamed(weights[x], slopes[x], slopes[y], r, min_corr) for x, y in ((a, b), (b, a))))
    for k in names:
        out[f"monitor/trend/{k}"] = slopes[k]
    out["monitor/hacking"] = hacking
    return out


def _gamed(weight_up: float, slope_up: float, slope_down: float, corr: float, min_corr: float) -> bool:
    """The weighted reward rises while the other falls, and the two are anti-correlated below min_corr (NaN: no)."""
    if not all(_finite(v) for v in (slope_up, slope_down, corr)):
        return False
    return weight_up > 0 and slope_up > 0 and slope_down < 0 and corr < min_corr


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _finite_or_none(v) -> float | None:
    return float(v) if _finite(v) else None


def _nan_if_none(v) -> float:
    return math.nan if v is None else float(v)
