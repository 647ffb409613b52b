"""Metrics sinks: a JSONL file always, wandb when enabled (offline without an API key)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from rl.jsonl import read_rows, rewrite_rows


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null means "no value this step"
    return v


class MetricsLogger:
    def __init__(
        self, output_dir: Path, *, config: dict, wandb_cfg, resume_step: int | None = None, wandb_id: str | None = None
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # drop the rows of steps the resumed run will redo (logged after the checkpoint it resumes from), and a
            # torn last line left by a crash mid-write
            rows, torn = read_rows(self.path)
            if torn:
                print(
                    f"ttsrl: warning: {self.path}: dropped a torn last line (the run was killed while writing it)",
                    file=sys.stderr,
                )
            rewrite_rows(self.path, [r for r in rows if int(r.get("step", 0)) <= resume_step])
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self.wandb = None
        self.wandb_id = wandb_id
        if wandb_cfg.enabled:
            import wandb

            mode = wandb_cfg.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            kw = dict(
                project=wandb_cfg.project,
                name=wandb_cfg.run_name or Path(output_dir).name,
                config=config,
                dir=str(output_dir),
                mode=mode,
            )
            try:
                run = wandb.init(**kw, id=wandb_id, resume="allow" if wandb_id else None)
            except Exception as e:  # noqa: BLE001 - e.g. "run ID ... is in use" right after a killed run
                if wandb_id is None:
                    raise
                print(f"ttsrl: wandb could not resume run {wandb_id} ({e}); logging to a new run", file=sys.stderr)
                run = wandb.init(**kw)
            self.wandb = run
            self.wandb_id = run.id

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_samples(self, step: int, samples: list[dict], audio: list, sample_rate: int) -> None:
        """A wandb table of the step's samples: pick, audio, texts, every reward, the advantage (JSONL/wav:
        rl/samples.py)."""
        if self.wandb is None:
            return
        import wandb

        names = sorted({k for s in samples for k in s["rewards"]})
        table = wandb.Table(
            columns=[
                "step",
                "uttid",
                "group",
                "pick",
                "audio",
                "target_text",
                "prompt_text",
                "seconds",
                "finished",
                "advantage",
                *names,
            ]
        )
        for s, wav in zip(samples, audio):
            clip = wandb.Audio(wav, sample_rate=sample_rate) if wav is not None else None
            table.add_data(
                step,
                s["uttid"],
                s["group_id"],
                s.get("pick", "first"),
                clip,
                s["target_text"],
                s["prompt_text"],
                s["seconds"],
                s["finished"],
                s["advantage"],
                *[s["rewards"].get(k) for k in names],
            )
        self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
