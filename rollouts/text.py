"""The GLM-TTS text front end: text normalisation as upstream GLM-TTS runs it before tokenising.

A GLM-TTS LM was trained on normalised text, so the prompt text and the target text go through the same
normalisation here before they become LM ids (upstream `TextFrontEnd.text_normalize`, reimplemented):

    raw text
      -> markdown / multi-line / emoji clean-up, `a-b` between letters -> `a b`
      -> zh (any CJK ideograph):  pre-replacements (scientific notation, `1-2` -> 减, other `-` dropped,
                                  咯 + punctuation -> 喽, the user's custom_replace.jsonl), WeTextProcessing's
                                  Chinese normaliser (remove_erhua=False, full_to_half=True,
                                  remove_interjections=False), edge-case replacements, post-replacements
                                  (brackets, punctuation, ², ³, /, ~, ①..⑩, Greek letters, math symbols),
                                  lower-case
         en (otherwise):          WeTextProcessing's English normaliser, brackets and `*`, inflect number
                                  spelling, punctuation filtering, lower-case, punctuation spacing
      -> punctuation normalisation (runs of marks, `！` -> `。`, `!` -> `.`) and a closing mark

WeTextProcessing must be 1.0.3 (upstream's pin): later releases normalise some inputs differently. Its Chinese
grammar is built with upstream's options, which are not the ones the package ships prebuilt, so it is compiled
once (tens of seconds, several GB of memory) into `<cache>/wetext/WeTextProcessing-<version>/<options>/` and
loaded from there afterwards. The English grammar is the one shipped inside the package (upstream's defaults).
`ttsfrd`, the other backend upstream can use, is not available (the PyPI package of that name is unrelated).

`TextFrontEnd.lm_text(text)` is what reaches the tokenizer: upstream's CLI normalises a target text, splits it
(`split_by_len`) and normalises each piece again; for the whole text that is normalise(normalise(text)).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WETEXT_VERSION = "1.0.3"
# upstream TextFrontEnd's Chinese normaliser; every other option at WeTextProcessing 1.0.3's default
ZH_OPTIONS = {
    "remove_interjections": False,
    "remove_erhua": False,
    "traditional_to_simple": True,
    "remove_puncts": False,
    "full_to_half": True,
    "tag_oov": False,
}
PUNCTUATION = "。？！；：、.?!;:，,"
_P = re.escape(PUNCTUATION)
_HAN = re.compile(r"[\u4e00-\u9fff]")
LINE_ENDS = {".", "!", "?", ";", ":", "：", "。", "！", "？", "；", "，"}


class TextFrontEndError(RuntimeError):
    """The text front end cannot run as upstream's (missing or wrong package version, bad dictionary file)."""


def cache_root() -> Path:
    """The project's cache directory: $TTSRL_CACHE, else <repo>/.cache."""
    return Path(os.environ.get("TTSRL_CACHE") or REPO_ROOT / ".cache")


def contains_chinese(text: str) -> bool:
    return bool(_HAN.search(text))


# --- shared clean-up -------------------------------------------------------------------------------------------
def markdown_norm(text: str) -> str:
    """A leading ordered-list number `1. ` becomes `1。`; literal backslash-n becomes a line break."""
    return re.sub(r"^(\d+)\. ", r"\1。", text).replace("\\n", "\n")


def multi_line_process(text: str) -> str:
    """Drop empty lines, close every line with a mark, join the lines (with spaces unless the text is zh)."""
    lines = []
    for line in (ln.strip() for ln in text.split("\n")):
        if not line:
            continue
        if line[-1] not in LINE_ENDS:
            line = line + "。" if contains_chinese(line) else line + ". "
        lines.append(line)
    return "".join(lines) if contains_chinese("".join(lines)) else " ".join(lines)


def emoji_norm(text: str) -> str:
    import emoji

    return emoji.replace_emoji(text, replace="")


def remove_bracket(text: str, lang: str = "zh") -> str:
    pairs = ["()", "（）", "【】", "「」", "``", "《》", "『』", "{}", "[]"] + ([] if lang == "en" else ["‘’"])
    for left, right in pairs:
        text = text.replace(left, "").replace(right, "")
    return text


def replace_asterisk(text: str, lang: str = "zh") -> str:
    """`*` between two operands (digits / letters, optionally across a bracket) becomes the word for times;
    every other `*` is dropped."""
    word, digits = ("multiply", "0-9") if lang == "en" else ("乘", "一二三四五六七八九十百千万亿")
    operand = rf"[{digits}a-zA-Z]"
    pattern = "|".join(
        [
            rf"(?<={operand})\s*\*\s*(?={operand})",
            rf"(?<={operand}\))\s*\*\s*(?={operand})",
            rf"(?<={operand})\s*\*\s*(?=\({operand})",
            rf"(?<={operand}\))\s*\*\s*(?=\({operand})",
        ]
    )
    return re.sub(pattern, word, text).replace("*", "")


# --- zh ----------------------------------------------------------------------------------------------------------
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_UNITS = ["", "十", "百", "千", "万", "十万", "百万", "千万", "亿", "十亿", "百亿", "千亿"]


def _zh_integer(number: int) -> str:
    """Upstream's digit-by-digit reading of an integer (its quirks kept: 120000 -> 十万二万)."""
    if number == 0:
        return "零"
    if number < 0:
        return "负" + _zh_integer(-number)
    out: list[str] = []
    pos, zero_run, last_unit = 0, False, ""
    while number > 0:
        digit, unit = number % 10, (_ZH_UNITS[pos] if pos < len(_ZH_UNITS) else "")
        if digit == 0:
            if not zero_run and out and last_unit not in ("万", "亿"):
                out.append(_ZH_DIGITS[0])
                zero_run = True
        else:
            out += [unit, _ZH_DIGITS[digit]] if unit else [_ZH_DIGITS[digit]]
            zero_run, last_unit = False, unit
        pos, number = pos + 1, number // 10
    text = "".join(reversed(out))
    return re.sub(r"零$", "", re.sub(r"零+", "零", re.sub(r"^一十", "十", text)))


def zh_number(number: str) -> str:
    """A decimal string (`-3`, `1.5`) read in Chinese, as upstream's scientific-notation rule reads it."""
    as_float = str(float(number))
    if "." not in as_float:  # e.g. 1e+20: upstream fails here too
        raise ValueError(f"cannot read {number!r} in Chinese")
    whole, frac = as_float.split(".")
    if frac.strip("0") == "":
        return _zh_integer(int(whole))
    head = _zh_integer(int(whole)) if int(whole) != 0 else "零"
    return head + "点" + "".join(_ZH_DIGITS[int(d)] for d in frac)


_SCI = re.compile(r"(.*?)(-?\d+(?:\.\d+)?)[*x×](\d+(?:\.\d+)?)\^(-?\d+(?:\.\d+)?)(.*?)$")


def scientific_notation(text: str) -> str:
    """The first `a*b^c` (or x / ×) becomes `a乘b的c次方`."""
    m = _SCI.match(text)
    if not m:
        return text
    prefix, base, mult, exp, suffix = m.groups()
    return f"{prefix}{zh_number(base)}乘{zh_number(mult)}的{zh_number(exp)}次方{suffix}"


def zh_pre_replace(text: str, custom: list[tuple[str, str]]) -> str:
    text = scientific_notation(text)
    text = re.sub(r"(?<=\d)\s*-\s*(?=\d)", "减", text).replace("-", "")
    text = re.sub(r"咯([" + _P + r"])", r"喽\1", text)
    for old, new in custom:
        text = text.replace(old, new)
    return text


def zh_special_replace(text: str) -> str:
    text = " " + text.replace("\\", "") + " "
    text = re.sub(r"(?<=\W)额(?=\W)", "呃", text)
    text = re.sub(r"[~～]+", "。", text)
    return replace_asterisk(text, "zh").strip()


_ZH_SYMBOLS = [("†", "，"), ("²", "平方"), ("³", "立方"), ("/", "每"), ("~", "到"), ("～", "到")]
_ZH_CIRCLED = list(zip("①②③④⑤⑥⑦⑧⑨⑩", "一二三四五六七八九十"))
_ZH_GREEK = [
    ("α", "阿尔法"),
    ("β", "贝塔"),
    ("γ", "伽玛"),
    ("Γ", "伽玛"),
    ("δ", "德尔塔"),
    ("Δ", "德尔塔"),
    ("△", "德尔塔"),
    ("ε", "艾普西龙"),
    ("ζ", "捷塔"),
    ("η", "依塔"),
    ("θ", "西塔"),
    ("Θ", "西塔"),
    ("ι", "艾欧塔"),
    ("κ", "喀帕"),
    ("λ", "拉姆达"),
    ("Λ", "拉姆达"),
    ("μ", "缪"),
    ("ν", "拗"),
    ("ξ", "克西"),
    ("Ξ", "克西"),
    ("ο", "欧米克伦"),
    ("π", "派"),
    ("Π", "派"),
    ("ρ", "肉"),
    ("ς", "西格玛"),
    ("Σ", "西格玛"),
    ("σ", "西格玛"),
    ("τ", "套"),
    ("υ", "宇普西龙"),
    ("φ", "服艾"),
    ("Φ", "服艾"),
    ("χ", "器"),
    ("ψ", "普赛"),
    ("Ψ", "普赛"),
    ("ω", "欧米伽"),
    ("Ω", "欧米伽"),
    ("□", "方框"),
]
_ZH_MATH = [
    (">", "大于"),
    ("<", "小于"),
    ("∈", "属于"),
    ("∉", "不属于"),
    ("∪", "并"),
    ("∩", "交"),
    ("⊥", "垂直"),
    ("∥", "平行"),
    ("≠", "不等于"),
    ("∵", "因为"),
    ("∴", "所以"),
    ("∅", "空集"),
    ("⊂", "真包含于"),
    ("⊃", "包含"),
    ("⊆", "包含于"),
    ("⊇", "真包含"),
    ("⊄", "不属于"),
    ("⊅", "非超集"),
    ("⊈", "不属于"),
    ("⊉", "非超集"),
]


def zh_post_replace(text: str) -> str:
    text = remove_bracket(text).replace(" - ", "，").replace("——", "，")
    text = re.sub(r"[,:：;；、]+", "，", text)
    text = re.sub(r"[.…]+", "。", text)
    text = re.sub(r"[_·]+", "", text)
    text = re.sub(r"""['"‘’“”|]+""", "", text)
    for old, new in _ZH_SYMBOLS + _ZH_CIRCLED + _ZH_GREEK + _ZH_MATH:
        text = text.replace(old, new)
    return text


# --- en ----------------------------------------------------------------------------------------------------------
def spell_out_numbers(text: str, number_to_words: Callable[[str], str]) -> str:
    """Every run of digits (by str.isdigit, which also takes superscripts) becomes its English words."""
    out, start = [], None
    for i, c in enumerate(text):
        if c.isdigit():
            start = i if start is None else start
            continue
        if start is not None:
            out.append(number_to_words(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(number_to_words(text[start:]))
    return "".join(out)


def en_post_process(text: str, number_to_words: Callable[[str], str]) -> str:
    """Upstream's English steps after WeTextProcessing."""
    text = remove_bracket(text, "en")
    text = replace_asterisk(text, "en").replace("—", " ").replace("’", "'")
    text = spell_out_numbers(text, number_to_words)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"[^\w\s.,!?':;]", "", text).lower()
    for mark in ".,!?':;":
        text = re.sub(re.escape(mark) + "+", mark, text)
    return re.sub(r"\s*([.,?!':;])\s*", r"\1 ", text).strip()


# --- punctuation and the closing mark ---------------------------------------------------------------------------
_ALNUM = re.compile(r"[a-zA-Z0-9]")
_EN_MARK = re.compile(r"[.,!?;:]")


def replace_space(text: str) -> str:
    """Collapse runs of spaces; keep a space only between two alphanumerics or after an ASCII mark before one."""
    text = re.sub(r" +", " ", text)
    out = []
    for i, c in enumerate(text):
        if c != " ":
            out.append(c)
            continue
        prev, nxt = text[i - 1] if i > 0 else "", text[i + 1] if i + 1 < len(text) else ""
        if _ALNUM.match(nxt or "\0") and (_ALNUM.match(prev or "\0") or _EN_MARK.match(prev or "\0")):
            out.append(" ")
    return "".join(out)


def normalize_punctuation(text: str) -> str:
    text = replace_space(text)
    text = re.sub(rf"([{_P}])\1+", r"\1", text)
    text = re.sub(rf"([{_P}])(?=[{_P}])", "", text)  # of a run of different marks the last one stays
    return text.replace("#", "").replace("！", "。").replace("!", ".")


def ensure_ending(text: str) -> str:
    if text and text[-1] in "？?":
        return text
    end = "。" if contains_chinese(text) else "."
    return text[:-1] + end if text and text[-1] in PUNCTUATION else text + end


# --- WeTextProcessing ----------------------------------------------------------------------------------------
def _check_wetext(version: str | None) -> str:
    try:
        found = metadata.version("WeTextProcessing")
    except metadata.PackageNotFoundError:
        raise TextFrontEndError(
            f"data.text_normalize=upstream needs WeTextProcessing=={WETEXT_VERSION} (pip install "
            f"WeTextProcessing=={WETEXT_VERSION} pynini==2.1.5), which is not installed"
        ) from None
    if version is not None and found != version:
        raise TextFrontEndError(
            f"data.text_normalize=upstream needs WeTextProcessing=={version} (upstream "
            f"GLM-TTS's pin; other versions normalise differently), found {found}"
        )
    return found


def zh_grammar_dir(version: str, options: dict[str, bool] = ZH_OPTIONS, root: Path | None = None) -> Path:
    """Where the Chinese grammar compiled with `options` is cached."""
    key = "-".join(f"{k}={int(v)}" for k, v in sorted(options.items()))
    return (root or cache_root()) / "wetext" / f"WeTextProcessing-{version}" / key


def _quiet(name: str) -> None:
    logging.getLogger(f"wetext-{name}").disabled = True  # WeTextProcessing logs every load at INFO


def load_zh_normalizer(
    version: str | None = WETEXT_VERSION, options: dict[str, bool] = ZH_OPTIONS, root: Path | None = None
):
    """WeTextProcessing's Chinese normaliser with `options`: compiled once into the cache, loaded afterwards."""
    found = _check_wetext(version)
    from tn.chinese.normalizer import Normalizer

    _quiet("zh_normalizer")
    target = zh_grammar_dir(found, options, root)
    names = ("zh_tn_tagger.fst", "zh_tn_verbalizer.fst")
    if not all((target / n).is_file() for n in names):
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".lock", "w") as lock:  # one builder at a time; the others wait, then load
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all((target / n).is_file() for n in names):
                _build_zh(Normalizer, target, names, options)
    return Normalizer(cache_dir=str(target), overwrite_cache=False, **options)


def _build_zh(normalizer_cls, target: Path, names: tuple[str, ...], options: dict[str, bool]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        normalizer_cls(cache_dir=str(tmp), overwrite_cache=True, **options)
        target.mkdir(exist_ok=True)
        for n in names:  # each file lands whole
            os.replace(tmp / n, target / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_en_normalizer(version: str | None = WETEXT_VERSION):
    """WeTextProcessing's English normaliser with its shipped grammar (upstream's defaults)."""
    _check_wetext(version)
    from tn.english.normalizer import Normalizer

    _quiet("en_normalizer")
    return Normalizer()


def read_custom_replace(path: str | Path | None) -> list[tuple[str, str]]:
    """custom_replace.jsonl: one {"origin": str, "new": str} per line, applied in order to zh text."""
    if not path:
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                out.append((str(obj["origin"]), str(obj["new"])))
            except (ValueError, KeyError, TypeError) as e:
                raise TextFrontEndError(f'{path}:{n}: expected {{"origin": ..., "new": ...}} ({e})') from None
    return out


_GRAMMARS: dict[tuple, object] = {}  # loaded WeTextProcessing normalisers, shared by every TextFrontEnd


def released_voxcpm_normalizer():
    """VoxCPM's own text normaliser (`voxcpm.utils.text_normalize.TextNormalizer`: wetext's zh / en FSTs, shipped in
    the `wetext` wheel, plus its clean-ups), loaded from the installed `voxcpm` package's file alone: the package's
    __init__ imports torchaudio, which this project does not install. TextFrontEndError when it cannot load."""
    import importlib.util

    spec = importlib.util.find_spec("voxcpm")
    if spec is None or spec.origin is None:
        raise TextFrontEndError("data.text_normalize voxcpm needs the voxcpm package (installed --no-deps by make)")
    path = Path(spec.origin).parent / "utils" / "text_normalize.py"
    module_spec = importlib.util.spec_from_file_location("ttsrl_voxcpm_text_normalize", path)
    if module_spec is None or module_spec.loader is None:
        raise TextFrontEndError(f"data.text_normalize voxcpm: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.TextNormalizer()
    except (ImportError, OSError) as e:
        raise TextFrontEndError(f"data.text_normalize voxcpm: {path}: {e} (pip install wetext)") from None


class TextFrontEnd:
    """Upstream's text normalisation, with every distinct text normalised once (a per-instance cache).

    mode "upstream" normalises as GLM-TTS; "voxcpm" as VoxCPM's `generate(normalize=True)` (the released
    `voxcpm.utils.text_normalize.TextNormalizer`, wetext FSTs; the target text only, once, never split); "none"
    passes texts through unchanged (for manifests already normalised). Grammars load on the first text that needs
    them.
    """

    def __init__(
        self,
        mode: str = "upstream",
        *,
        custom_replace: str | Path | None = None,
        wetext_version: str | None = WETEXT_VERSION,
        cache_dir: Path | None = None,
    ):
        if mode not in ("upstream", "voxcpm", "none"):
            raise TextFrontEndError(f"data.text_normalize: expected upstream, voxcpm or none, got {mode!r}")
        self.mode = mode
        self.custom = read_custom_replace(custom_replace)
        self.wetext_version, self.cache_dir = wetext_version, cache_dir
        self._zh = self._en = self._inflect = None
        self._memo: dict[str, str] = {}
        self._voxcpm = released_voxcpm_normalizer() if mode == "voxcpm" else None  # fails at start-up if missing
        if mode == "upstream":
            _check_wetext(wetext_version)  # fail at start-up, not on the first text

    # grammars, loaded lazily, once per process
    def _zh_normalize(self, text: str) -> str:
        if self._zh is None:
            key = ("zh", self.wetext_version, str(self.cache_dir))
            if key not in _GRAMMARS:
                _GRAMMARS[key] = load_zh_normalizer(self.wetext_version, ZH_OPTIONS, self.cache_dir)
            self._zh = _GRAMMARS[key]
        return self._zh.normalize(text)

    def _en_normalize(self, text: str) -> str:
        if self._en is None:
            key = ("en", self.wetext_version)
            if key not in _GRAMMARS:
                _GRAMMARS[key] = load_en_normalizer(self.wetext_version)
            self._en = _GRAMMARS[key]
        return self._en.normalize(text)

    def _number_to_words(self, digits: str) -> str:
        if self._inflect is None:
            import inflect

            self._inflect = inflect.engine()
        return self._inflect.number_to_words(digits)

    def normalize(self, text: str) -> str:
        """One pass of upstream's text_normalize (cached per distinct text)."""
        if self.mode == "none":
            return text
        if text not in self._memo:
            self._memo[text] = self._normalize(text)
        return self._memo[text]

    def _normalize(self, text: str) -> str:
        if self._voxcpm is not None:
            return self._voxcpm.normalize(text)
        text = emoji_norm(multi_line_process(markdown_norm(text)))
        text = re.sub(r"(?<=[a-zA-Z])-(?=[a-zA-Z])", " ", text)
        if contains_chinese(text):
            text = zh_pre_replace(text, self.custom)
            text = zh_post_replace(zh_special_replace(self._zh_normalize(text))).lower()
        else:
            text = en_post_process(self._en_normalize(text.replace("'", "’")), self._number_to_words)
        return ensure_ending(normalize_punctuation(text))

    def lm_text(self, text: str) -> str:
        """The text as upstream's inference CLI feeds it to the tokenizer: normalised, then normalised again
        (the CLI normalises before and after splitting long texts; its RL loader normalises once). VoxCPM
        normalises once."""
        if self.mode == "voxcpm":
            return self.normalize(text)
        return self.normalize(self.normalize(text))

    def chunks(self, text: str, min_len: int = 30, max_len: int = 60) -> list[str]:
        """upstream generate_long's target pieces: normalise, split_by_len, normalise each piece."""
        from rollouts.text_split import split_by_len

        if self.mode == "voxcpm":  # VoxCPM synthesises a long text in one go
            return [self.normalize(text)]
        text = self.normalize(text)
        try:
            pieces = split_by_len(text, min_len, max_len)
        except IndexError:  # upstream's hard split fails on a long run of many-syllable words: keep it whole
            pieces = [text]
        return [self.normalize(c) for c in pieces]


class LMTexts:
    """What the LM reads for a record: the prompt text normalised once (upstream's CLI then tokenises it + " "),
    the target text normalised twice and, with phonemes on, converted to hybrid phoneme input (target only, as
    upstream). Rewards keep the raw texts."""

    def __init__(
        self,
        mode: str = "upstream",
        *,
        custom_replace: str | Path | None = None,
        phoneme_dicts: str | Path | None = None,
    ):
        self.front = TextFrontEnd(mode, custom_replace=custom_replace)
        self.g2p = None
        if phoneme_dicts:
            from rollouts.phoneme import PhonemeConverter

            self.g2p = PhonemeConverter(phoneme_dicts)

    @classmethod
    def from_config(cls, data) -> LMTexts:
        """From rl.config.DataConfig (text_normalize, custom_replace, phoneme, phoneme_dicts); one per process and
        setting, so grammars and normalised texts are shared by every run in it."""
        key = (data.text_normalize, data.custom_replace or "", data.phoneme_dicts if data.phoneme else "")
        if key not in _SHARED:
            _SHARED[key] = cls(key[0], custom_replace=key[1] or None, phoneme_dicts=key[2] or None)
        return _SHARED[key]

    def prompt(self, text: str) -> str:
        """The prompt text as the model reads it (VoxCPM leaves it as given)."""
        return text if self.front.mode == "voxcpm" else self.front.normalize(text)

    def target(self, text: str) -> str:
        text = self.front.lm_text(text)
        return self.g2p(text) if self.g2p is not None else text

    def target_chunks(self, text: str, min_len: int = 30, max_len: int = 60) -> list[str]:
        """upstream generate_long's pieces of a long target (normalised, split, normalised again, phonemes)."""
        pieces = self.front.chunks(text, min_len, max_len)
        return [self.g2p(c) for c in pieces] if self.g2p is not None else pieces

    def record(self, rec, encode=None):
        """rollouts.types.PromptRecord with its LM texts; with `encode`, every phoneme tag must be one token."""
        import dataclasses

        target = self.target(rec.target_text)
        if encode is not None and self.g2p is not None:
            from rollouts.phoneme import check_tags

            check_tags(target, encode, f"{rec.source}: field 'syn_text'")
        return dataclasses.replace(rec, prompt_text=self.prompt(rec.prompt_text), target_text=target)


_SHARED: dict[tuple, LMTexts] = {}


def lm_records(records: list, data, encode=None) -> list:
    """PromptRecords with the texts the LM reads (see LMTexts), under rl.config.DataConfig `data`. A front end that
    cannot run or a phoneme tag the tokenizer lacks is an rl.errors.InputError (one line, no traceback)."""
    from rl.errors import InputError
    from rollouts.phoneme import PhonemeError

    try:
        texts = LMTexts.from_config(data)
        return [texts.record(r, encode) for r in records]
    except (TextFrontEndError, PhonemeError) as e:
        raise InputError(str(e)) from None


__all__ = [
    "WETEXT_VERSION",
    "ZH_OPTIONS",
    "LMTexts",
    "TextFrontEnd",
    "TextFrontEndError",
    "cache_root",
    "contains_chinese",
    "lm_records",
    "load_en_normalizer",
    "load_zh_normalizer",
    "zh_grammar_dir",
]
