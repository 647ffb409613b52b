"""A few samples per logged step, for listening: wav files, samples.jsonl and (with wandb) a table with audio.

    <output_dir>/samples/step-000010/<uttid>_g<group>.wav   (the uttid made file-safe: rollouts/paths.py)
    <output_dir>/samples.jsonl    one line per sample: step, uttid, group id, texts, wav path, seconds, finished,
                                  every reward (null = invalid, with the reason), the advantage
One sample per group, from the first `n` groups of the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rollouts.audio import write_wav
from rollouts.paths import inside, safe_stem


def pick_rows(group_ids: list[int], n: int) -> list[int]:
    """The first row of each of the first n groups."""
    seen, rows = set(), []
    for i, g in enumerate(group_ids):
        if g not in seen:
            seen.add(g)
            rows.append(i)
            if len(rows) == n:
                break
    return rows


def write_samples(
    output_dir: Path, step: int, rows: list[dict], audio: list[np.ndarray | None], sample_rate: int
) -> list[dict]:
    """rows: one dict per sample (uttid, group_id, target_text, prompt_text, finished, rewards, reasons, advantage);
    writes the wavs and appends to samples.jsonl. Returns the rows with their wav paths."""
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with open(Path(output_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
        for row, wav in zip(rows, audio):
            path = None
            if wav is not None:  # the file is named after a sanitised uttid; the true one is in the JSON row
                path = inside(folder, f"{safe_stem(row['uttid'])}_g{int(row['group_id'])}.wav")
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
