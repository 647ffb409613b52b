"""The GLM-4 style tiktoken text tokenizer of GLM-TTS (`vq32k-phoneme-tokenizer/`), read without running its code.

Files read:
    tokenizer.model        the BPE rank file: one `<base64 token> <rank>` per line
    tokenizer_config.json  `added_tokens_decoder` {id: {"content": str, ...}}: the special tokens
    added_tokens.json      {content: id} (optional, merged in)

Text is split on added tokens first (longest match wins, as transformers does for added tokens), every other
piece is encoded with the GLM-4 pre-tokenizer regex and the BPE ranks. No prefix tokens are added: GLM-TTS
encodes each special string to exactly one id, which it checks, and so do we.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RANK_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
ADDED_FILE = "added_tokens.json"


class TokenizerError(ValueError):
    """The tokenizer directory is missing files or holds malformed ones."""


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}")
            try:
                ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
            except (ValueError, base64.binascii.Error) as e:
                raise TokenizerError(f"{path}:{lineno}: bad token or rank: {e}") from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    return ranks


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None


def read_added_tokens(directory: Path) -> dict[str, int]:
    added: dict[str, int] = {}
    cfg_path = directory / CONFIG_FILE
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
            if not isinstance(entry, dict) or "content" not in entry:
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder[{key!r}] has no 'content'")
            added[entry["content"]] = int(key)
    extra_path = directory / ADDED_FILE
    if extra_path.is_file():
        extra = _read_json(extra_path)
        for content, idx in extra.items():
            if content in added and added[content] != int(idx):
                raise TokenizerError(
                    f"{directory}: '{content}' has id {added[content]} in {CONFIG_FILE} but {idx} in {ADDED_FILE}"
                )
            added[content] = int(idx)
    return added


class GLMTokenizer:
    """encode(text) -> ids, decode(ids) -> text, token_id(special) -> id."""

    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], name: str = "glm4"):
        import tiktoken

        self.added = dict(added)
        clash = [t for t, i in self.added.items() if i < len(ranks)]
        if clash:
            raise TokenizerError(f"added tokens reuse ids of the BPE vocabulary: {clash[:5]}")
        self._bpe = tiktoken.Encoding(name=name, pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._id_to_added = {i: t for t, i in self.added.items()}
        self._split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
            if self.added
            else None
        )
        self.vocab_size = max([len(ranks) - 1, *self.added.values()]) + 1

    @classmethod
    def from_dir(cls, directory: str | Path) -> GLMTokenizer:
        directory = Path(directory)
        rank_path = directory / RANK_FILE
        if not rank_path.is_file():
            raise TokenizerError(f"{directory}: no {RANK_FILE} (the tiktoken BPE rank file)")
        return cls(read_ranks(rank_path), read_added_tokens(directory), name=directory.name)

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._bpe.encode_ordinary(text)
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self.added.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._bpe.encode_ordinary(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._id_to_added:
                if run:
                    out.append(self._bpe.decode(run))
                    run = []
                out.append(self._id_to_added[i])
            else:
                run.append(i)
        if run:
            out.append(self._bpe.decode(run))
        return "".join(out)


class RemoteCodeTokenizer:
    """Opt-in: the checkpoint's own tokenizer class through transformers (`trust_remote_code=True`)."""

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True, local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)
