"""The embedded default run (`ttsrl train --set train.steps=6`, a fresh tiny checkpoint) logs the metrics recorded in
tests/data/tiny_run_metrics.jsonl, to float rounding: a refactor of the trainer or the policy keeps behaviour.

After a deliberate change of behaviour, rewrite the record with `python tests/test_tiny_run_golden.py --write`
and say why in the change."""

import json
import math
import sys
from pathlib import Path

import pytest

RECORD = Path(__file__).parent / "data" / "tiny_run_metrics.jsonl"
STEPS = 6


def run_tiny(tmp: Path) -> list[dict]:
    from rl.config import DEFAULT_CONFIG, load_config
    from rl.trainer import train

    cfg, derived = load_config(
        DEFAULT_CONFIG,
        [
            f"train.steps={STEPS}",
            f"train.output_dir={tmp / 'run'}",
            f"policy.ckpt_dir={tmp / 'ckpt'}",
            "wandb.enabled=false",
        ],
    )
    train(cfg, derived, progress=False)
    return [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and k not in ("time", "wall_s")}


@pytest.mark.slow
def test_the_default_run_logs_the_recorded_metrics(tmp_path):
    got = [comparable(r) for r in run_tiny(tmp_path)]
    want = [json.loads(x) for x in RECORD.read_text().splitlines()]
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert set(g) == set(w), f"step {step}: keys differ: {sorted(set(g) ^ set(w))}"
        for k, v in w.items():
            x = g[k]
            if isinstance(v, float) and isinstance(x, float):
                assert (math.isnan(v) and math.isnan(x)) or math.isclose(x, v, rel_tol=1e-5, abs_tol=1e-6), (
                    f"step {step} {k}: {x} != recorded {v}"
                )
            else:
                assert x == v, f"step {step} {k}: {x!r} != recorded {v!r}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rows = [comparable(r) for r in run_tiny(Path(d))]
    RECORD.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {RECORD} ({len(rows)} rows)")
