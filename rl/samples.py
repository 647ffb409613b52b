"""A few samples per logged step, for listening: wav files, samples.jsonl and (with wandb) a table with audio.

    <output_dir>/samples/step-000010/<uttid>_g<group>.wav        (the uttid made file-safe: rollouts/paths.py)
    <output_dir>/samples/step-000010/<uttid>_g<group>_best.wav   (and _worst: see pick_samples)
    <output_dir>/samples.jsonl    one line per sample: step, uttid, group id, pick, texts, wav path, seconds,
                                  finished, every reward (null = invalid, with the reason), the advantage
The first row of each of the first `train.samples_per_step` groups (pick "first"), and the highest- and
lowest-advantage rows of the first `monitor.sample_groups` groups (pick "best" / "worst": what the update
reinforces and what it discourages).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rollouts.audio import write_wav
from rollouts.paths import inside, safe_stem


def pick_rows(group_ids: list[int], n: int) -> list[int]:
    """The first row of each of the first n groups (none for n <= 0)."""
    seen, rows = set(), []
    if n <= 0:
        return rows
    for i, g in enumerate(group_ids):
        if g not in seen:
            seen.add(g)
            rows.append(i)
            if len(rows) == n:
                break
    return rows


def pick_samples(group_ids: list[int], advantages: list[float], n_first: int, n_groups: int) -> list[tuple[int, str]]:
    """(row, pick) of the rows a logged step saves: the first row of each of the first `n_first` groups ("first",
    as pick_rows), then the highest- ("best") and lowest-advantage ("worst") row of each of the first `n_groups`
    groups (the first such row on ties; NaN advantages are left out). A row picked twice is saved once, marked best
    or worst; a group whose advantages are all equal (nothing is reinforced) has no best or worst row."""
    picks = dict.fromkeys(pick_rows(group_ids, n_first), "first")
    order = list(picks)
    for g in [group_ids[i] for i in pick_rows(group_ids, n_groups)]:
        rows = [i for i, x in enumerate(group_ids) if x == g and math.isfinite(advantages[i])]
        if not rows:
            continue
        best = max(rows, key=lambda i: advantages[i])
        worst = min(rows, key=lambda i: advantages[i])
        if advantages[best] == advantages[worst]:
            continue
        for i, name in ((best, "best"), (worst, "worst")):
            if i not in picks:
                order.append(i)
            picks[i] = name
    return [(i, picks[i]) for i in order]


def write_samples(
    output_dir: Path, step: int, rows: list[dict], audio: list[np.ndarray | None], sample_rate: int
) -> list[dict]:
    """rows: one dict per sample (uttid, group_id, target_text, prompt_text, finished, rewards, reasons, advantage;
    optionally pick); writes the wavs and appends to samples.jsonl. Returns the rows with their wav paths."""
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    out, used = [], set()
    with open(Path(output_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
        for row, wav in zip(rows, audio):
            path = None
            if wav is not None:  # the file is named after a sanitised uttid; the true one is in the JSON row
                path = inside(folder, _wav_name(row, used))
                write_wav(path, wav, sample_rate)
            rec = {
                "step": step,
                **row,
                "wav": str(path) if path else None,
                "seconds": None if wav is None else len(wav) / sample_rate,
            }
            rec["rewards"] = {k: (None if v is None or not math.isfinite(v) else v) for k, v in row["rewards"].items()}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.append(rec)
    return out


def _wav_name(row: dict, used: set[str]) -> str:
    """<uttid>_g<group>[_<pick>].wav (no suffix for "first"), made unique within the step's folder."""
    pick = row.get("pick", "first")
    stem = f"{safe_stem(row['uttid'])}_g{int(row['group_id'])}" + ("" if pick == "first" else f"_{pick}")
    name, n = f"{stem}.wav", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}.wav"
    used.add(name)
    return name


def truncate_samples(output_dir: Path, step: int) -> list[str]:
    """A resumed run redoes the steps after its checkpoint: drop their rows from samples.jsonl and their wav folders,
    so the log equals an uninterrupted run's. A torn last line (a crash mid-write) is dropped too. Returns warnings."""
    import shutil

    from rl.jsonl import read_rows, rewrite_rows

    out = Path(output_dir)
    warnings: list[str] = []
    path = out / "samples.jsonl"
    if path.exists():
        rows, torn = read_rows(path)
        if torn:
            warnings.append(f"{path}: dropped a torn last line (the run was killed while writing it)")
        rewrite_rows(path, [r for r in rows if int(r.get("step", 0)) <= step])
    folder = out / "samples"
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit() and int(d.name[5:]) > step:
                shutil.rmtree(d)
    return warnings
