"""File names made from untrusted ids (uttids come from manifests and meta files), kept inside their directory.

An uttid can hold anything: `spk0/utt_2`, `../../x`, control characters, 10 kB of text. `safe_stem` keeps letters
(any script), digits, `-`, `_` and `.` and turns every other character into `_`; when that changed anything (or the
result would be empty, hidden or over-long) it appends 10 hex digits of the uttid's hash, so two different uttids
never share a file. The true uttid stays in the JSON records next to the files.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

MAX_STEM = 96


def safe_stem(name: str) -> str:
    """A file-name stem for `name`: itself when it is already a plain name, else a sanitised form + its hash."""
    text = unicodedata.normalize("NFC", str(name))
    kept = "".join(c if (c.isalnum() or c in "-_.") and c.isprintable() else "_" for c in text)
    kept = kept.lstrip(".")  # no hidden files, no "." or ".."
    if kept == text and kept and len(kept) <= MAX_STEM:
        return kept
    digest = hashlib.blake2b(str(name).encode("utf-8", "surrogatepass"), digest_size=5).hexdigest()
    return f"{kept[:MAX_STEM] or 'id'}-{digest}"


def inside(root: str | Path, *parts: str) -> Path:
    """root / parts, refusing any result that is not inside root (a last line of defence behind safe_stem)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{path} is outside {base}")
    return path
