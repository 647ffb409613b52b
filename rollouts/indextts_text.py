"""IndexTTS2's text front end as released: text normalisation and the SentencePiece tokenizer over `bpe.model`.

A manifest text becomes the GPT's text ids the way the released IndexTTS2 inference makes them:

    raw text
      -> `<word|reading>` pronunciation annotations set aside (restored verbatim at the end)
      -> zh path (a CJK ideograph, no letters, an e-mail address, or tone-numbered pinyin such as `xuan4`):
             `what's` -> `what is` (and the other listed contractions), glossary terms replaced by their zh reading,
             trailing space dropped, hyphenated tech terms (`GPT-5-nano`), pinyin syllables and hyphenated names
             (`克里斯托弗·诺兰`) set aside, WeTextProcessing's Chinese normaliser, the set-aside parts restored
             (pinyin after j/q/x with u/ü becomes v and is upper-cased: `jue2` -> `JVE2`), punctuation mapped
             (`，` -> `,`, `。` -> `.`, brackets and quotes -> `'`, `$` -> `.`, ...)
         en path (otherwise): contractions, glossary terms (en reading), tech terms set aside, WeTextProcessing's
             English normaliser, tech terms restored, punctuation mapped as above (without `$`)
      -> pre-tokenisation: every CJK character becomes its own word, everything is upper-cased
      -> SentencePiece pieces (`tokens`), their ids by piece lookup (`ids`)

A text whose stripped form is one character skips normalisation and pre-tokenisation (SentencePiece alone), as
released. `segments` is the released long-text splitter (at `.`, `!`, `?`; then `,`; then `-`; then by length),
whose segments are what the released inference feeds its GPT one at a time.

The normaliser is WeTextProcessing's `tn` package (the Linux path of the release; `wetext` is its macOS/Windows
path): the Chinese grammar built with remove_interjections=False and remove_erhua=False (every other option at its
default; compiled once into the project cache and shared with the GLM-TTS front end, which uses the same options),
the English grammar as shipped. WeTextProcessing 1.0.3 and 1.0.4.1 ship the same `tn` package.

`<model_dir>/glossary.yaml`, when present, maps terms to readings: `term: reading` or `term: {en: ..., zh: ...}`;
terms match case-insensitively, longest first, and a reading is a `re` replacement template, as released.

The release leaves the order of set-aside pinyin and names to set iteration (string hashes); where one set-aside
syllable is part of another (`u4` inside `ju4`) the result depends on it. This module builds those sets the same
way, so within one process both give the same text.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from sentencepiece import SentencePieceProcessor, SentencePieceTrainer

from rollouts.text import ZH_OPTIONS

log = logging.getLogger(__name__)

BPE_FILE = "bpe.model"
CONFIG_FILE = "config.yaml"
GLOSSARY_FILE = "glossary.yaml"
# WeTextProcessing releases whose `tn` package (rules and shipped grammars) is the one the release runs with
WETEXT_VERSIONS = ("1.0.3", "1.0.4.1")
# the Chinese grammar's options: the released front end passes GLM-TTS's (remove_interjections / remove_erhua off,
# the rest at WeTextProcessing's defaults): rollouts/text.py ZH_OPTIONS

PINYIN = re.compile(
    r"(?<![a-z])((?:[bpmfdtnlgkhjqxzcsryw]|[zcs]h)?(?:[aeiouüv]|[ae]i|u[aio]|ao|ou|i[aue]|[uüv]e|[uvü]ang?|uai"
    r"|[aeiuv]n|[aeio]ng|ia[no]|i[ao]ng)|ng|er)([1-5])",
    re.IGNORECASE,
)
NAME = re.compile(r"[\u4e00-\u9fff]+(?:[-·—][\u4e00-\u9fff]+){1,2}", re.IGNORECASE)
TECH_TERM = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)+")
CONTRACTION = re.compile(r"(what|where|who|which|how|t?here|it|s?he|that|this)'s", re.IGNORECASE)
ANNOTATION = re.compile(r"<([^|>\n]+)\|([^>\n]+)>")
EMAIL = re.compile(r"^[a-zA-Z0-9]+@[a-zA-Z0-9]+\.[a-zA-Z]+$")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_LATIN = re.compile(r"[a-zA-Z]")
_TECH_HYPHEN = re.compile(r"\s*<H>\s*")
_JQX_U = re.compile(r"([jqx])[uü](n|e|an)*(\d)", re.IGNORECASE)
_CJK = re.compile(
    r"([\u1100-\u11ff\u2e80-\ua4cf\ua840-\uD7AF\uF900-\uFAFF\uFE30-\uFE4F\uFF65-\uFFDC\U00020000-\U0002FFFF])"
)

# punctuation after normalisation, in match order (an earlier key wins where keys overlap: `，` before `，，，`)
_PUNCT_PAIRS: tuple[tuple[str, str], ...] = (
    *((c, ",") for c in "：；;，"),
    ("。", "."),
    ("！", "!"),
    ("？", "?"),
    ("\n", " "),
    ("·", "-"),
    ("、", ","),
    *((s, "…") for s in ("...", ",,,", "，，，", "……")),
    *((c, "'") for c in '“”"‘’（）()《》【】[]'),
    *((c, "-") for c in "—～~"),
    *((c, "'") for c in "「」"),
    (":", ","),
)


def _mapper(pairs: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    table = dict(pairs)
    pattern = re.compile("|".join(re.escape(k) for k, _ in pairs))
    return lambda text: pattern.sub(lambda m: table[m.group()], text)


map_punctuation = _mapper(_PUNCT_PAIRS)
map_punctuation_zh = _mapper((("$", "."), *_PUNCT_PAIRS))

SENTENCE_MARKS = (".", "!", "?", "▁.", "▁?", "▁...")
COMMA_MARKS = (",", "▁,")
QUOTE_PIECES = ("'", "▁'")


class IndexTextError(RuntimeError):
    """The IndexTTS2 text front end cannot load (missing or corrupt bpe.model, bad glossary, wrong package)."""


# --- small pieces -------------------------------------------------------------------------------------------------
def pretokenize(text: str) -> str:
    """Every CJK character a word of its own, words joined by one space, everything upper-cased."""
    return " ".join(w.strip().upper() for w in _CJK.split(text.strip()) if w.strip())


def correct_pinyin(syllable: str) -> str:
    """After j/q/x, u or ü becomes v and the syllable is upper-cased (`jue2` -> `JVE2`); others are unchanged."""
    if syllable[0] not in "jqxJQX":
        return syllable
    return _JQX_U.sub(r"\g<1>v\g<2>\g<3>", syllable).upper()


def uses_chinese_path(text: str) -> bool:
    """A CJK ideograph, no Latin letter, a bare e-mail address, or tone-numbered pinyin: the zh normaliser."""
    if _HAN.search(text) or not _LATIN.search(text) or EMAIL.match(text):
        return True
    return bool(PINYIN.search(text))


def _set_aside(text: str, pattern: re.Pattern[str], slot: str) -> tuple[str, list[str]]:
    """Every distinct match replaced by `slot` with a letter (a, b, ... in set order); the matches in that order."""
    found = list({m.group(0) for m in pattern.finditer(text)})  # in set order, as released
    for i, s in enumerate(found):
        text = text.replace(s, slot.format(chr(ord("a") + i)))
    return text, found


def _put_back(text: str, found: list[str], slot: str, fix: Callable[[str], str] = str) -> str:
    for i, s in enumerate(found):
        text = text.replace(slot.format(chr(ord("a") + i)), fix(s))
    return text


def _set_aside_tech(text: str) -> tuple[str, list[str]]:
    """Hyphens inside tech terms (`GPT-5-nano`) become `<H>`, longest term first."""
    terms = sorted(set(TECH_TERM.findall(text)), key=len, reverse=True)
    for term in terms:
        text = text.replace(term, term.replace("-", "<H>"))
    return text, terms


def _put_back_tech(text: str, terms: list[str]) -> str:
    return _TECH_HYPHEN.sub("-", text) if terms else text


def _alpha_index(n: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa, ..."""
    s = ""
    while True:
        s = chr(ord("a") + n % 26) + s
        n = n // 26 - 1
        if n < 0:
            return s


def _protect_annotations(text: str) -> tuple[str, dict[str, str]]:
    """`<字|读音>` annotations become letter-only placeholders the normalisers leave alone."""
    saved: dict[str, str] = {}

    def slot(m: re.Match[str]) -> str:
        key = f"PRONPLACEHOLDER{_alpha_index(len(saved))}PRONPLACEHOLDER"
        saved[key] = m.group(0)
        return key

    return ANNOTATION.sub(slot, text), saved


# --- glossary -------------------------------------------------------------------------------------------------------
Glossary = dict[str, str | dict[str, str]]


def read_glossary(path: Path) -> Glossary:
    """`glossary.yaml` (yaml.safe_load): {} when absent or empty; IndexTextError naming the file when malformed."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise IndexTextError(f"{path}: not valid YAML: {e}") from None
    if not data or not isinstance(data, dict):
        return {}  # the release ignores a glossary that is not a non-empty mapping
    for term, value in data.items():
        readings = list(value.values()) if isinstance(value, dict) else [value]
        if not isinstance(term, str) or not term or not all(isinstance(r, str) for r in readings):
            raise IndexTextError(f"{path}: {term!r}: expected `term: reading` or `term: {{en: ..., zh: ...}}`")
        for r in readings:
            try:
                re.compile(re.escape(term)).sub(r, term)
            except (re.error, IndexError) as e:
                raise IndexTextError(f"{path}: {term!r}: reading {r!r} is not a valid replacement ({e})") from None
    return data


def apply_glossary(text: str, glossary: Glossary, lang: str) -> str:
    """Each term (longest first, case-insensitive) replaced by its `lang` reading (or itself where it has none)."""
    for term in sorted(glossary, key=len, reverse=True):
        value = glossary[term]
        reading = value.get(lang, term) if isinstance(value, dict) else value
        text = re.compile(re.escape(term), re.IGNORECASE).sub(reading, text)
    return text


# --- normalisation --------------------------------------------------------------------------------------------------
_GRAMMARS: dict[str, Any] = {}  # WeTextProcessing normalisers, loaded once per process


def load_grammars() -> tuple[Any, Any]:
    """(Chinese, English) WeTextProcessing normalisers with the release's options (loaded once per process)."""
    if not _GRAMMARS:
        try:
            found = metadata.version("WeTextProcessing")
        except metadata.PackageNotFoundError:
            found = None
        if found not in WETEXT_VERSIONS:
            raise IndexTextError(
                f"IndexTTS2's text normaliser needs WeTextProcessing {' or '.join(WETEXT_VERSIONS)} "
                f"(the released normaliser), found {found or 'none'}"
            )
        from rollouts.text import load_en_normalizer, load_zh_normalizer

        _GRAMMARS["zh"] = load_zh_normalizer(None, dict(ZH_OPTIONS))
        _GRAMMARS["en"] = load_en_normalizer(None)
    return _GRAMMARS["zh"], _GRAMMARS["en"]


class IndexTextNormalizer:
    """The released TextNormalizer (glossary enabled), on WeTextProcessing's `tn` grammars."""

    def __init__(self, glossary: Glossary | None = None):
        self.glossary: Glossary = dict(glossary or {})
        self._memo: dict[str, str] = {}  # every distinct text is normalised once

    def load(self) -> None:
        load_grammars()

    def normalize(self, text: str) -> str:
        if text not in self._memo:
            protected, annotations = _protect_annotations(text)
            out = self._zh(protected) if uses_chinese_path(protected) else self._en(protected)
            for key, original in annotations.items():
                out = out.replace(key, original)
            self._memo[text] = out
        return self._memo[text]

    def _zh(self, text: str) -> str:
        zh, _ = load_grammars()
        text = apply_glossary(CONTRACTION.sub(r"\1 is", text), self.glossary, "zh")
        text, terms = _set_aside_tech(text.rstrip())
        text, syllables = _set_aside(text, PINYIN, "<pinyin_{}>")
        text, names = _set_aside(text, NAME, "<n_{}>")
        try:
            out = zh.normalize(text)
        except Exception as e:  # the release reads a failed text as empty
            log.warning("Chinese normaliser failed on %r: %s", text, e)
            out = ""
        out = _put_back(out, names, "<n_{}>")
        out = _put_back(out, syllables, "<pinyin_{}>", correct_pinyin)
        return map_punctuation_zh(_put_back_tech(out, terms))

    def _en(self, text: str) -> str:
        _, en = load_grammars()
        text = apply_glossary(CONTRACTION.sub(r"\1 is", text), self.glossary, "en")
        protected, terms = _set_aside_tech(text)
        try:
            out = _put_back_tech(en.normalize(protected), terms)
        except Exception as e:  # the release keeps the text as it was
            log.warning("English normaliser failed on %r: %s", protected, e)
            out = text
        return map_punctuation(out)


# --- segments -------------------------------------------------------------------------------------------------------
def split_segments(tokens: Sequence[str], max_tokens: int = 120, quick_streaming_tokens: int = 0) -> list[list[str]]:
    """The released long-text splitter over `tokens`: segments of at most `max_tokens` pieces, cut after sentence
    marks, else commas, else hyphens, else by length; short neighbours merged. As released, a `'` piece right after
    a sentence mark closes that segment and also opens the next one."""
    return _split(list(tokens), SENTENCE_MARKS, max_tokens, quick_streaming_tokens)


def _split(tokens: list[str], marks: Sequence[str], limit: int, quick: int) -> list[list[str]]:
    if not tokens:
        return []
    segments: list[list[str]] = []
    current: list[str] = []
    for i, token in enumerate(tokens):
        current.append(token)
        if not any(c in marks for c in COMMA_MARKS) and any(c in current for c in COMMA_MARKS):
            parts = _split(current, COMMA_MARKS, limit, quick)
        elif "-" not in marks and "-" in current:
            parts = _split(current, ("-",), limit, quick)
        elif len(current) <= limit:
            if token in marks and len(current) > 2:
                if i + 1 < len(tokens) and tokens[i + 1] in QUOTE_PIECES:
                    current.append(tokens[i + 1])
                segments.append(current)
                current = []
            continue
        else:
            parts = [current[j : j + limit] for j in range(0, len(current), limit)]
            warnings.warn(
                f"The tokens length of segment exceeds limit: {limit}, Tokens in segment: {current}.",
                RuntimeWarning,
                stacklevel=2,
            )
        segments.extend(parts)
        current = []
    if current:
        assert len(current) <= limit
        segments.append(current)
    return _merge(segments, limit, quick)


def _merge(segments: list[list[str]], limit: int, quick: int) -> list[list[str]]:
    """Neighbours merged while they fit `limit` (once `quick` tokens have passed), or half of it."""
    merged: list[list[str]] = []
    total = 0
    for seg in segments:
        total += len(seg)
        if not seg:
            continue
        if merged and len(merged[-1]) + len(seg) <= limit and total > quick:
            merged[-1] = merged[-1] + seg
        elif merged and len(merged[-1]) + len(seg) <= limit / 2:
            merged[-1] = merged[-1] + seg
        else:
            merged.append(seg)
    return merged


# --- the front end --------------------------------------------------------------------------------------------------
def load_bpe(path: Path) -> SentencePieceProcessor:
    """A SentencePiece model; one IndexTextError naming the file when it is missing or not a model."""
    if not path.is_file():
        raise IndexTextError(f"{path}: not found (the IndexTTS2 text tokenizer, a SentencePiece BPE model)")
    try:
        return SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise IndexTextError(f"{path}: not a valid SentencePiece model ({e})") from None


def bpe_file_name(model_dir: Path) -> str:
    """The tokenizer's file name: config.yaml's dataset.bpe_model when given there, else bpe.model."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return BPE_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise IndexTextError(f"{path}: not valid YAML: {e}") from None
    dataset = data.get("dataset") if isinstance(data, dict) else None
    name = dataset.get("bpe_model") if isinstance(dataset, dict) else None
    if name is None:
        return BPE_FILE
    if not isinstance(name, str) or not name:
        raise IndexTextError(f"{path}: dataset.bpe_model: expected a file name, got {name!r}")
    return name


class IndexTextFrontend:
    """Manifest text -> the released IndexTTS2 GPT's text pieces and ids (normaliser + SentencePiece BPE)."""

    def __init__(self, sp: SentencePieceProcessor, normalizer: IndexTextNormalizer, path: Path | None = None):
        self.sp, self.normalizer, self.path = sp, normalizer, path
        self.unk_id: int = sp.unk_id()
        self.vocab_size: int = sp.get_piece_size()

    @classmethod
    def from_dir(cls, model_dir: Path, bpe_model: str | None = None) -> IndexTextFrontend:
        """The front end of a released-layout model directory: its bpe.model (or `bpe_model`, else config.yaml's
        dataset.bpe_model) and its optional glossary.yaml; the normaliser grammars are loaded here."""
        model_dir = Path(model_dir)
        path = model_dir / (bpe_model or bpe_file_name(model_dir))
        sp = load_bpe(path)
        normalizer = IndexTextNormalizer(read_glossary(model_dir / GLOSSARY_FILE))
        normalizer.load()
        return cls(sp, normalizer, path)

    def normalize(self, text: str) -> str:
        return self.normalizer.normalize(text)

    def tokens(self, text: str) -> list[str]:
        """The released tokenizer's pieces: normalised, pre-tokenised and encoded (a one-character text is encoded
        as it is)."""
        if not text:
            return []
        if len(text.strip()) != 1:
            text = pretokenize(self.normalize(text))
        return list(self.sp.encode(text, out_type=str))

    def token_ids(self, tokens: Iterable[str]) -> list[int]:
        """Each piece's id (unknown pieces: unk_id)."""
        return [self.sp.piece_to_id(t) for t in tokens]

    def ids(self, text: str) -> list[int]:
        """The GPT's text ids for `text` (start/stop text tokens not included)."""
        return self.token_ids(self.tokens(text))

    def segments(self, text: str, max_tokens: int = 120, quick_streaming_tokens: int = 0) -> list[list[str]]:
        """The released inference's segments of `text` (token_ids of each is what one GPT call gets)."""
        return split_segments(self.tokens(text), max_tokens, quick_streaming_tokens)


# --- a tiny tokenizer -----------------------------------------------------------------------------------------------
# pieces the released splitter looks for; with them as symbols they are never unknown in a tiny model
SPLIT_PIECES = (*SENTENCE_MARKS, *COMMA_MARKS, "-", *QUOTE_PIECES)
# what the normalisers commonly write that a raw text may lack: Chinese numerals and date words, Latin capitals
COVERAGE = " ".join("零一二三四五六七八九十百千万亿点两负年月日号时分秒之")
COVERAGE += " " + " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + " , . ! ? ' - …"


def write_tiny_bpe(path: Path, texts: list[str], vocab_size: int = 256) -> None:
    """A tiny SentencePiece BPE model in the released tokenizer's layout (<s> 0, </s> 1, <unk> 2, no pad; NFKC),
    trained here on `texts` pre-tokenised as the tokenizer does (punctuation mapped, CJK split, upper-cased) plus
    a coverage line; the splitter's punctuation pieces and the tone-numbered pinyin in `texts` (as the normaliser
    writes it) are single pieces. Deterministic; at most `vocab_size` pieces. ValueError when it cannot be built."""
    lines = [line for line in (pretokenize(map_punctuation_zh(t)) for t in texts) if line] + [COVERAGE]
    syllables = sorted({correct_pinyin(m.group(0)).upper() for t in texts for m in PINYIN.finditer(t)})
    buf = io.BytesIO()
    try:
        SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            bos_id=0,
            eos_id=1,
            unk_id=2,
            pad_id=-1,
            user_defined_symbols=[*SPLIT_PIECES, *(s for s in syllables if s not in SPLIT_PIECES)],
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"write_tiny_bpe: cannot train a {vocab_size}-piece model on these texts: {e}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
