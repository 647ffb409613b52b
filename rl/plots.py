"""`ttsrl plot RUN_DIR`: PNG curves from metrics.jsonl, for people without wandb.

<run>/plots/rewards.png   every reward's mean (raw) and the fused reward, with a moving average
<run>/plots/length.png    mean generated length and the truncated fraction
<run>/plots/clip.png      clip fractions (low, high) and the eps_low / eps_high / temperature schedules
<run>/plots/loss.png      loss, KL, entropy, grad norm
<run>/plots/monitor.png   the reward-hacking monitor (rl/monitor.py): every pair's reward correlation over the window,
                          and how many pairs are flagged (only when the metrics have monitor/corr/* keys)
<run>/plots/flow.png      the flow policy's own metrics (flow/eta, flow/sde_steps, flow/logprob_mean, flow/frames;
                          only when the metrics have them)
<run>/plots/voxcpm.png    the VoxCPM policy's own metrics (voxcpm/eta, voxcpm/patches, voxcpm/stopped_frac, ...)
<run>/plots/indextts2.png the IndexTTS2 policy's own metrics (indextts2/codes, indextts2/stopped_frac, ...)
<run>/plots/stages.png    one column per stage of the policy (rl/stages.py: lm, flow): its loss, ratio (mean, with
                          min and max), clip fractions and gradient norm (only when the metrics have <stage>/* keys)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rl.stages import STAGE_METRICS


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a ttsrl run directory?)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _smooth(ys: list[float], k: int) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    k = max(1, len(rows) // 20)
    rewards = sorted(
        {key.split("/")[1] for r in rows for key in r if key.startswith("reward/") and key.endswith("/mean")}
    )
    panels = {
        "rewards.png": [(f"reward/{name}/mean", name) for name in rewards],
        "length.png": [("len/mean", "mean length (tokens)"), ("len/truncated_frac", "truncated fraction")],
        "clip.png": [
            ("clip/low_frac", "clip low fraction"),
            ("clip/high_frac", "clip high fraction"),
            ("clip/eps_low", "eps_low"),
            ("clip/eps_high", "eps_high"),
            ("sampling/temperature", "temperature"),
        ],
        "loss.png": [("loss", "loss"), ("kl", "KL"), ("entropy", "entropy"), ("grad_norm", "grad norm")],
    }
    written = []
    for fname, curves in panels.items():
        curves = [(key, label) for key, label in curves if _series(rows, key)[0]]
        if not curves:
            continue
        fig, axes = plt.subplots(len(curves), 1, figsize=(8, 2.2 * len(curves)), sharex=True, squeeze=False)
        for ax, (key, label) in zip(axes[:, 0], curves):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, alpha=0.35, lw=1)
            ax.plot(xs, _smooth(ys, k), lw=2)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{run_dir.name}: {fname[:-4]}")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if (path := _plot_monitor(plt, rows, out_dir / "monitor.png", run_dir.name)) is not None:
        written.append(path)
    stage_keys = {f"{name}/{m}" for name in _stages(rows) for m in STAGE_METRICS}
    for prefix in ("flow/", "voxcpm/", "indextts2/"):  # the policies' own metrics (Policy.rollout_metrics)
        path = _plot_prefixed(plt, rows, prefix, out_dir / f"{prefix[:-1]}.png", run_dir.name, stage_keys)
        if path is not None:
            written.append(path)
    if (path := _plot_stages(plt, rows, out_dir / "stages.png", run_dir.name)) is not None:
        written.append(path)
    return written


def _stages(rows: list[dict]) -> list[str]:
    """The stages a run logged <stage>/pg_loss for (rl/trainer.py stage_metrics), in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.count("/") == 1 and k.endswith("/pg_loss"):
                names.setdefault(k.split("/")[0])
    return list(names)


def _plot_stages(plt, rows: list[dict], path: Path, title: str) -> Path | None:
    """A column per stage: loss, ratio (mean; min-max shaded), clip fractions, grad norm. None without stages."""
    names = _stages(rows)
    if not names:
        return None
    panels = [("loss", "loss"), ("ratio/mean", "ratio"), ("clip/low_frac", "clip low"), ("clip/high_frac", "clip high")]
    panels.append(("grad_norm", "grad norm"))
    fig, axes = plt.subplots(
        len(panels), len(names), figsize=(4.2 * len(names), 1.8 * len(panels) + 0.6), sharex=True, squeeze=False
    )
    for col, name in enumerate(names):
        for row, (key, label) in enumerate(panels):
            ax = axes[row, col]
            xs, ys = _series(rows, f"{name}/{key}")
            ax.plot(xs, ys, lw=1.5)
            if key == "ratio/mean":
                lo, hi = _series(rows, f"{name}/ratio/min")[1], _series(rows, f"{name}/ratio/max")[1]
                if len(lo) == len(hi) == len(xs):
                    ax.fill_between(xs, lo, hi, alpha=0.2)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
        axes[0, col].set_title(name, fontsize=10)
        axes[-1, col].set_xlabel("step")
    fig.suptitle(f"{title}: stages")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_prefixed(
    plt, rows: list[dict], prefix: str, path: Path, title: str, skip: set[str] | frozenset = frozenset()
) -> Path | None:
    """One panel per metric named <prefix>... (but those in `skip`); None when the run logged none."""
    keys = sorted({k for r in rows for k in r if k.startswith(prefix) and k not in skip and _series(rows, k)[0]})
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 1.8 * len(keys) + 0.6), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, lw=1.5)
        ax.set_ylabel(key[len(prefix) :], fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{title}: {prefix.rstrip('/')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot_monitor(plt, rows: list[dict], path: Path, title: str) -> Path | None:
    """Every monitor/corr/<a>__<b> on one axis in [-1, 1], monitor/hacking below; None when there is no pair."""
    pairs = sorted({k for r in rows for k in r if k.startswith("monitor/corr/")})
    pairs = [k for k in pairs if _series(rows, k)[0]]
    if not pairs:
        return None
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=True
    )
    for key in pairs:
        xs, ys = _series(rows, key)
        top.plot(xs, ys, lw=1.5, label=key[len("monitor/corr/") :].replace("__", " ~ "))
    top.axhline(0.0, color="grey", lw=0.8)
    top.set_ylim(-1.05, 1.05)
    top.set_ylabel("reward correlation (window)", fontsize=8)
    top.legend(fontsize=7, loc="lower left")
    top.grid(alpha=0.3)
    xs, ys = _series(rows, "monitor/hacking")
    bottom.step(xs, ys, where="post", lw=1.5, color="tab:red")
    bottom.set_ylabel("flagged pairs", fontsize=8)
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.suptitle(f"{title}: monitor")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
