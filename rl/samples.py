"""A few samples per logged step, for listening: wav files, samples.jsonl and (with wandb) a table with audio.

    <output_dir>/samples/step-000010/<uttid>_g<group>.wav
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


def write_samples(output_dir: Path, step: int, rows: list[dict], audio: list[np.ndarray | None], sample_rate: int) -> list[dict]:
    """rows: one dict per sample (uttid, group_id, target_text, prompt_text, finished, rewards, reasons, advantage);
    writes the wavs and appends to samples.jsonl. Returns the rows with their wav paths."""
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with open(Path(output_dir) / "samples.jsonl", "a", encoding="utf-8") as f:
        for row, wav in zip(rows, audio):
            path = None
            if wav is not None:
                path = folder / f"{row['uttid']}_g{row['group_id']}.wav"
                write_wav(path, wav, sample_rate)
            rec = {"step": step, **row, "wav": str(path) if path else None,
                   "seconds": None if wav is None else len(wav) / sample_rate}
            rec["rewards"] = {k: (None if v is None or not math.isfinite(v) else v) for k, v in row["rewards"].items()}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.append(rec)
    return out
