"""Hybrid phoneme input ("Phoneme-in", upstream GLM-TTS `--use_phoneme`), reimplemented from upstream's
`TextFrontEnd.g2p_infer` and `utils/glm_g2p.py::G2P_zh`.

On normalised target text:
  1. longest-match overrides from `G2P_replace_dict.jsonl` ({"弦": "<|X|><|IAN2|>"} per line) are kept verbatim;
  2. every other run of Chinese characters is segmented with jieba (POS mode) and read with pypinyin (initials +
     FINALS_TONE3, neutral tone 5; `i` -> `iii` after zh/ch/sh/r and `ii` after z/c/s);
  3. a character NOT in `G2P_able_1word.json` is replaced by its phoneme tags (`<|SH|><|ANG1|>`); characters in
     that list and all non-Chinese text stay as they are.

Both dictionaries come from a user-given directory (the GLM-TTS repository's `configs/`); none is shipped here.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

PUNCTUATION = "。？！；：、.?!;:，,"
G2P_MARKS = "，。；：！？、"
ABLE_FILE = "G2P_able_1word.json"
REPLACE_FILE = "G2P_replace_dict.jsonl"
TAG = re.compile(r"<\|[^|<>]*\|>")
_RANGES = [
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0x30000, 0x3134F),
    (0x31350, 0x323AF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
    (0x2E80, 0x2EFF),
]


class PhonemeError(ValueError):
    """A phoneme dictionary is missing or malformed, or the tokenizer lacks a phoneme tag."""


def is_chinese(char: str) -> bool:
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _RANGES)


def runs(text: str) -> list[tuple[str, bool]]:
    """Maximal runs of Chinese / non-Chinese characters: [(run, is_chinese)]."""
    out: list[tuple[str, bool]] = []
    for c in text:
        zh = is_chinese(c)
        if out and out[-1][1] == zh:
            out[-1] = (out[-1][0] + c, zh)
        else:
            out.append((c, zh))
    return out


def _strip_trailing(items: list[str], sep: str) -> list[str]:
    while items and items[-1] == sep:
        items.pop()
    return items


def g2p_zh(text: str) -> list[str]:
    """upstream G2P_zh on a Chinese run: ['n', 'i3', '-', 'h', 'ao3'] (initial, final, '-' between syllables)."""
    import jieba
    import jieba.posseg as psg
    from pypinyin import Style, pinyin

    jieba.setLogLevel(logging.INFO)
    text = re.sub(r'[",!\.\?\-—…“”‘’\s]', "，", text)
    text = re.sub(r"[，。；：！？、\s]+", "，", text).strip().replace("嗯", "恩").replace("呣", "母")
    phones: list[str] = []
    for part, _ in runs(text):
        cur: list[str] = []
        for word, _ in psg.lcut(part.strip()):
            initials = [p[0] for p in pinyin(word, neutral_tone_with_five=True, strict=True, style=Style.INITIALS)]
            finals = [p[0] for p in pinyin(word, neutral_tone_with_five=True, strict=True, style=Style.FINALS_TONE3)]
            for ini, fin in zip(initials, finals):
                syl = ini + fin
                if all(c in G2P_MARKS for c in syl):
                    if cur and cur[-1] == "-":
                        cur.pop()
                    cur.append(syl[0])  # IndexError on an empty reading, as upstream (the run stays text)
                    continue
                if fin.startswith("i") and ini in ("zh", "ch", "sh", "r"):
                    fin = "iii" + fin[1:]
                elif fin.startswith("i") and ini in ("z", "c", "s"):
                    fin = "ii" + fin[1:]
                cur += [ini, fin, "-"] if ini else [fin, "-"]
        phones += _strip_trailing(cur, "-")
    return _strip_trailing([p for p in phones if p not in ("|", "")], "-")


def format_tags(parts: list[str]) -> str:
    """['sh', 'ang1'] -> '<|SH|><|ANG1|>' (punctuation kept bare)."""
    out = []
    for p in (p.strip() for p in parts):
        if not p or p == "|":
            continue
        up = p.upper().replace("-", " ")
        out.append(up if up in PUNCTUATION else f"<|{up}|>")
    return "".join(out)


class PhonemeConverter:
    """Characters outside the G2P-able list -> phoneme tags, as upstream's g2p_infer."""

    def __init__(self, dict_dir: str | Path):
        d = Path(dict_dir)
        able, repl = d / ABLE_FILE, d / REPLACE_FILE
        for f in (able, repl):
            if not f.is_file():
                raise PhonemeError(f"data.phoneme_dicts: {f} not found (the GLM-TTS repository's configs/ holds it)")
        try:
            self.able = set(json.loads(able.read_text(encoding="utf-8")))
        except ValueError as e:
            raise PhonemeError(f"{able}: not a JSON list of characters ({e})") from None
        self.replace: dict[str, str] = {}
        for n, line in enumerate(repl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    self.replace.update({str(k): str(v) for k, v in json.loads(line).items()})
                except (ValueError, AttributeError) as e:
                    raise PhonemeError(f"{repl}:{n}: expected one JSON object per line ({e})") from None
        self._keys = sorted(self.replace, key=len, reverse=True)
        self._memo: dict[str, str] = {}

    def _fragments(self, text: str) -> list[tuple[str, bool]]:
        """Longest-match dictionary replacement: [(fragment, replaced)]."""
        out: list[tuple[str, bool]] = []
        i = 0
        while i < len(text):
            key = next((k for k in self._keys if text.startswith(k, i)), None)
            if key is not None:
                out.append((self.replace[key], True))
                i += len(key)
            elif out and not out[-1][1]:
                out[-1], i = (out[-1][0] + text[i], False), i + 1
            else:
                out.append((text[i], False))
                i += 1
        return out

    def _align(self, chunk: str, phones: list[str]) -> str:
        out, k = [], 0
        for char in chunk:
            if char in PUNCTUATION:
                out.append(char)
                k += 1 if k < len(phones) and phones[k] in PUNCTUATION else 0
                continue
            mine = []
            while k < len(phones):
                if phones[k] == "-":
                    k += 1
                    break
                if phones[k] in PUNCTUATION:
                    break
                mine.append(phones[k])
                k += 1
            out.append(format_tags(mine) if char not in self.able and mine else char)
        return "".join(out)

    def __call__(self, text: str) -> str:
        if text not in self._memo:
            out = []
            for frag, replaced in self._fragments(text):
                if replaced:
                    out.append(frag)
                    continue
                for chunk, zh in runs(frag):
                    try:
                        out.append(self._align(chunk, g2p_zh(chunk)) if zh else chunk)
                    except Exception:  # noqa: BLE001 - upstream keeps a chunk it cannot read as text
                        out.append(chunk)
            self._memo[text] = "".join(out)
        return self._memo[text]


def check_tags(text: str, encode, where: str) -> None:
    """Every <|...|> tag in `text` must be one token of the LM's tokenizer."""
    for tag in dict.fromkeys(TAG.findall(text)):
        ids = encode(tag)
        if len(ids) != 1:
            raise PhonemeError(
                f"{where}: phoneme tag {tag} is not a token of the tokenizer (encodes to {len(ids)} "
                f"ids); data.phoneme needs GLM-TTS's phoneme tokenizer"
            )


__all__ = ["PhonemeConverter", "PhonemeError", "check_tags", "format_tags", "g2p_zh"]
