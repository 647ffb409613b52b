"""Joint training of both GLM-TTS stages against training one of them, on the same tiny run, side by side.

    python bench/joint_vs_stages.py                 # 30 steps each, CPU, about 5 minutes on 2 cores
    python bench/joint_vs_stages.py --steps 60 --seeds 0 1 2

Three runs of configs/tiny_joint.yaml (the same tiny random GLM-TTS, the same rewards: `duration`, which the LM
decides, and `loudness`, which the flow sets through the mel), differing only in what is trained:
  joint   policy.kind glmtts_joint: the LM's tokens and the flow's SDE transitions, one advantage per row
  lm      policy.kind glmtts (the config's stages.lm settings): the LM alone; its rows are vocoded by the upstream
          flow ODE (the same flow, untrained)
  flow    policy.kind glmtts_flow (stages.flow settings): the flow alone, G noise trajectories of one code sequence
Printed per run (and seed): each reward's mean over the first and the last 5 steps, and seconds per step (a ratio
to the LM-only run, measured in the same process, one run after the other).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.glmtts_joint import GLMTTSJointPolicy  # noqa: E402
from rl.config import CONFIG_DIR, config_from_data  # noqa: E402
from rl.trainer import train  # noqa: E402
from rollouts.manifest import read_manifest  # noqa: E402

CONFIG = CONFIG_DIR / "tiny_joint.yaml"
KINDS = {"joint": "glmtts_joint", "lm": "glmtts", "flow": "glmtts_flow"}


def variant(name: str, ckpt: Path, out: Path, steps: int, seed: int) -> tuple:
    data = yaml.safe_load(CONFIG.read_text())
    data = copy.deepcopy(data)
    data["policy"]["kind"] = KINDS[name]
    if name != "joint":  # a single-stage policy keeps its own stage's settings
        data["stages"] = {name: data["stages"][name]}
    overrides = [
        f"policy.ckpt_dir={ckpt}",
        "policy.build_tiny=false",
        f"train.output_dir={out}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.save_every=0",
        "train.samples_every=0",
        "wandb.enabled=false",
    ]
    return config_from_data(data, str(CONFIG), overrides)


def run(name: str, ckpt: Path, root: Path, steps: int, seed: int) -> dict:
    out = root / f"{name}-{seed}"
    cfg, derived = variant(name, ckpt, out, steps, seed)
    t = time.perf_counter()
    train(cfg, derived, progress=False)
    seconds = (time.perf_counter() - t) / steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    res = {"run": name, "seed": seed, "s_per_step": seconds}
    for k in ("duration", "loudness", "fused"):
        series = [r[f"reward/{k}/mean"] for r in rows]
        res[f"{k}_first"] = sum(series[:5]) / len(series[:5])
        res[f"{k}_last"] = sum(series[-5:]) / len(series[-5:])
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--runs", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "ckpt"
        data = yaml.safe_load(CONFIG.read_text())
        records = read_manifest(CONFIG.parent / data["data"]["manifest"])
        GLMTTSJointPolicy.write_tiny(
            ckpt, [t for r in records for t in (r.prompt_text, r.target_text)], seed=0, vocoder=True
        )
        for seed in args.seeds:
            for name in args.runs:
                results.append(run(name, ckpt, root, args.steps, seed))
    base = {r["seed"]: r["s_per_step"] for r in results if r["run"] == "lm"}
    print("| run | seed | duration first 5 -> last 5 | loudness first 5 -> last 5 | fused | s/step (x lm) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f" ({r['s_per_step'] / base[r['seed']]:.2f}x)" if r["seed"] in base else ""
        print(
            f"| {r['run']} | {r['seed']} | {r['duration_first']:.3f} -> {r['duration_last']:.3f} | "
            f"{r['loudness_first']:.3f} -> {r['loudness_last']:.3f} | {r['fused_first']:.3f} -> "
            f"{r['fused_last']:.3f} | {r['s_per_step']:.2f}{ratio} |"
        )
    return results


if __name__ == "__main__":
    main()
