"""Run safety: what the trainer checks so that a run never loses another run's work, never trains on garbage, and
never "succeeds" having trained on nothing. Each check is a small function or class the trainer calls by name.

    run_files / claim_output_dir   an output directory that holds another run is refused (or, with --overwrite,
                                   cleared of that run's files, saying which) before anything is written
    check_prompt_lengths           texts longer than data.max_text_tokens, or prompts that leave no room in the LM's
                                   context, are errors naming the manifest line
    check_prompt_audio             a reward that compares against the voice prompt's audio needs every prompt wav
    RewardHealth                   one line per step for every weighted reward with invalid samples; a weighted
                                   reward invalid for every sample `max_dead_steps` steps in a row stops the run
    UpdateGuard                    optimizer steps with a non-finite loss or gradient norm are skipped and counted;
                                   `max_skipped` in a row stop the run
    check_finite                   no checkpoint is written with non-finite weights
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

from rl.errors import InputError, RunError

# what a ttsrl run writes into its output directory
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "samples", "plots", "wandb")


def run_files(out: Path) -> list[Path]:
    """The files of a run already in `out` (empty: no run there)."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    checkpoints = out / "checkpoints"
    if found == [checkpoints] and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        return []  # an empty checkpoints/ folder holds nothing to lose
    return found


def refuse_other_run(out: Path, overwrite: bool) -> list[Path]:
    """A fresh run into a directory that holds another run: an InputError saying what to do, unless `overwrite`.
    Returns the files --overwrite will delete (once the run's inputs are all checked)."""
    found = run_files(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise InputError(
            f"{out} already holds a run ({names}): continue it with `ttsrl train --resume {out}`, "
            f"train into another --output-dir, or pass --overwrite to delete that run's files first"
        )
    return found


def clear_run(out: Path, found: list[Path], say) -> None:
    """--overwrite: delete the previous run's files (only those a run writes), saying so."""
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if found:
        say(f"ttsrl: --overwrite: deleted the previous run's {', '.join(p.name for p in found)} from {out}")


def check_prompt_lengths(records, prompts, *, max_text_tokens: int, context: int | None, max_new_tokens: int) -> None:
    """Each record's target text (and prompt text) within max_text_tokens LM tokens, and prompt + the longest
    generation within the LM's context. `prompts[i]` holds `ids` and `text_len` (target-text tokens)."""
    for rec, p in zip(records, prompts):
        if p.text_len > max_text_tokens:
            raise InputError(
                f"{rec.source}: field 'syn_text': {p.text_len} tokens, above data.max_text_tokens="
                f"{max_text_tokens} (split long texts, or raise the bound)"
            )
        prompt_text = getattr(p, "prompt_text_len", None)  # the policy's own count, or GLM-TTS's layout
        if prompt_text is None:
            prompt_text = len(p.ids) - p.text_len - 1 - len(rec.prompt_speech_tokens)
        if prompt_text > max_text_tokens:
            raise InputError(
                f"{rec.source}: field 'prompt_text': {prompt_text} tokens, above data.max_text_tokens={max_text_tokens}"
            )
        if context is not None and len(p.ids) + max_new_tokens > context:
            raise InputError(
                f"{rec.source}: the prompt is {len(p.ids)} tokens; with sampling.max_new_tokens="
                f"{max_new_tokens} it exceeds the LM's context of {context} positions"
            )


def check_text_size(records, max_text_tokens: int) -> None:
    """Before tokenising: a text far longer than any bound (tokens are at least a character each, at most a few
    dozen) is refused at once, so a 10 MB line costs nothing."""
    limit = 32 * max_text_tokens
    for rec in records:
        for field, text in (("syn_text", rec.target_text), ("prompt_text", rec.prompt_text)):
            if len(text) > limit:
                raise InputError(
                    f"{rec.source}: field '{field}': {len(text)} characters, far above "
                    f"data.max_text_tokens={max_text_tokens}"
                )


def check_prompt_audio(records, needing: list[str]) -> None:
    """Rewards in `needing` compare against the voice prompt's audio: every record must name a readable wav."""
    if not needing:
        return
    for rec in records:
        if not rec.prompt_wav:
            why = "is missing"
        elif not Path(rec.prompt_wav).is_file():
            why = f"file not found: {rec.prompt_wav}"
        else:
            continue
        raise InputError(
            f"{rec.source}: field 'prompt_speech' {why}; reward(s) {', '.join(needing)} compare "
            f"against the voice prompt's audio"
        )


class RewardHealth:
    """Per step: a line for each weighted reward with invalid samples (count and the most common reasons), and
    the run stopped when one is invalid for every sample `max_dead_steps` steps in a row (0 = never)."""

    def __init__(self, weights: dict[str, float], max_dead_steps: int):
        self.weighted = [k for k, w in weights.items() if w != 0]
        self.max_dead_steps = max_dead_steps
        self.dead: dict[str, int] = {k: 0 for k in self.weighted}  # consecutive all-invalid steps
        self.last: dict[str, str] = {}  # the latest step's most common reasons per invalid reward

    def observe(self, step: int, results: dict, n_rows: int) -> list[str]:
        """results: reward name -> ScoreResult over the whole step's rows. Returns the lines to print (then ask
        `stop_reason`)."""
        lines = []
        self.last: dict[str, str] = {}
        for k in self.weighted:
            res = results[k]
            bad = int((~res.valid).sum())
            self.dead[k] = self.dead[k] + 1 if n_rows and bad == n_rows else 0
            if bad:
                common = Counter(r for r, ok in zip(res.reasons or [], res.valid) if not ok and r).most_common(2)
                why = "; ".join(f"{c} x {_short(r)}" for r, c in common) or "no reason given"
                self.last[k] = why
                lines.append(f"ttsrl: step {step}: reward '{k}' invalid for {bad}/{n_rows} samples ({why})")
        return lines

    def stop_reason(self, step: int) -> str | None:
        """Why the run must stop now (a weighted reward dead for max_dead_steps steps in a row), or None."""
        for k in self.weighted:
            if self.max_dead_steps and self.dead[k] >= self.max_dead_steps:
                return (
                    f"reward '{k}' was invalid for every sample {self.dead[k]} steps in a row (last step {step}: "
                    f"{self.last.get(k, '')}); check its scorer or service "
                    f"(train.max_dead_reward_steps={self.max_dead_steps})"
                )
        return None

    def state_dict(self) -> dict:
        return dict(self.dead)

    def load_state_dict(self, state: dict) -> None:
        self.dead.update({k: int(v) for k, v in state.items() if k in self.dead})


def _short(reason: str, width: int = 160) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= width else reason[: width - 3] + "..."


class UpdateGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite (the weights never see them), counts them,
    and stops the run after `max_skipped` in a row."""

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.in_a_row = 0

    def allow(self, loss: float, grad_norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.max_skipped:
            raise RunError(
                f"step {step}: {self.in_a_row} optimizer steps in a row had a non-finite loss ({loss}) or "
                f"gradient norm ({grad_norm}) and were skipped; the weights were not changed by them. "
                f"Lower optim.lr or check the rewards (train.max_skipped_updates={self.max_skipped})"
            )
        return False

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row = int(state.get("in_a_row", 0))


def check_finite(finite: bool, step: int, last_checkpoint: str | None) -> None:
    """No checkpoint is ever written with non-finite weights (`finite`: every weight on every rank is)."""
    if not finite:
        intact = f"the last checkpoint ({last_checkpoint}) is intact" if last_checkpoint else "no checkpoint"
        raise RunError(f"step {step}: the policy's weights hold NaN or inf; no checkpoint was written ({intact})")
