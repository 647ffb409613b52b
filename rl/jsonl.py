"""Append-only JSONL logs (metrics.jsonl, samples.jsonl) read back on resume, where the file is untrusted: the last
line may be torn by a crash mid-write, anything else must parse."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rl.errors import InputError


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """(rows, torn): every line as a JSON object; a last line that does not parse is dropped (torn = True). A bad
    line before the last is an InputError naming the file and the line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows, torn = [], False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines):
                torn = True
                break
            raise InputError(f"{path}:{n}: not a JSON object ({e}); repair or remove the line to resume") from None
        rows.append(row)
    return rows, torn


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace the file's content with `rows`, atomically (a temporary file renamed over it)."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
