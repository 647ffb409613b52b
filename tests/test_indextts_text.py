"""IndexTTS2's text front end: normalisation, the SentencePiece tokenizer, the long-text splitter, a tiny bpe.model.

The normaliser needs WeTextProcessing's Chinese grammar compiled with the released options; it is the GLM-TTS
front end's grammar (the same options), compiled once into .cache/ (about 80 s) and loaded in about a second later;
the tests that need it count as slow only while it is not compiled yet. The equivalence tests import the released
`indextts/utils/front.py` from the index-tts git mirror and are skipped without it.
"""

from __future__ import annotations

import importlib
import inspect
import types
import warnings
from importlib import metadata

import pytest
import sentencepiece as spm
import yaml

from rollouts.indextts_text import (
    SPLIT_PIECES,
    ZH_OPTIONS,
    IndexTextError,
    IndexTextFrontend,
    correct_pinyin,
    map_punctuation_zh,
    pretokenize,
    split_segments,
    uses_chinese_path,
    write_tiny_bpe,
)
from rollouts.text import zh_grammar_dir

PUBLIC_FILES = ("indextts/utils/front.py", "indextts/utils/common.py")
GRAMMAR_FILES = ("zh_tn_tagger.fst", "zh_tn_verbalizer.fst")
GLOSSARY = {"M.2": {"en": "M dot two", "zh": "M 二"}, "C++": {"en": "C plus plus", "zh": "C 加加"}, "NVMe": "N V M E"}

# (raw, normalised): the release's own examples (its front.py self-test, README, tests/cases.jsonl) and edge cases
NORMALISED = [
    ("where's the money?", "where is the money?"),
    ("今天是个好日子 it's a good day", "今天是个好日子 it is a good day"),
    ("GPT-5-Nano 是 GPT-5 模型家族中最小且速度最快的变体", "GPT-五-Nano 是 GPT-五 模型家族中最小且速度最快的变体"),
    (
        "GPT-5-Nano is the smallest and fastest variant in the GPT-5 model family.",
        "GPT-five-Nano is the smallest and fastest variant in the GPT-five model family.",
    ),
    ("2025/09/08 IndexTTS-2 全球发布", "二零二五年九月八日 IndexTTS-二 全球发布"),
    ("IndexTTS 正式发布1.0版本了，效果666", "IndexTTS 正式发布一点零版本了,效果六六六"),
    ("现在是北京时间2025年01月11日 20:00", "现在是北京时间二零二五年零一月十一日 二十点"),
    ("速度是10km/h", "速度是每小时十公里"),
    (
        "This sales for 2.5% off, only $12.5.",
        "This sales for two point five percent off, only twelve point five dollars.",
    ),
    ("See you at 8:00 AM", "See you at eight AM"),
    ("晕XUAN4是一种GAN3觉", "晕XVAN4是一种GAN3觉"),  # pinyin kept; j/q/x + u -> v, upper-cased
    ("不要jue2望，去qu4学xue2", "不要JVE2望,去QV4学XVE2"),
    ("最zhong4要的是：不要chong2蹈覆辙", "最zhong4要的是,不要chong2蹈覆辙"),
    ("“衣裳”不读衣chang2，而是读衣shang5", "'衣裳'不读衣chang2,而是读衣shang5"),
    ("ni3 hao3", "ni3 hao3"),  # pinyin alone takes the zh path
    ("babala2是什么？", "babala二是什么?"),  # not pinyin
    ("用beta1测试", "用beta一测试"),
    ("have you ever been to beta2?", "have you ever been to beta two?"),
    ("这酒...里...有毒...", "这酒…里…有毒…"),
    ("只有,,,才是最好的", "只有…才是最好的"),
    ("《盗梦空间》是一部电影。", "'盗梦空间'是一部电影."),
    (
        "约瑟夫·高登-莱维特（Joseph Gordon-Levitt is an American actor）",
        "约瑟夫-高登-莱维特'Joseph Gordon-Levitt is an American actor'",
    ),
    ("他在银<行|XING2>里<行|HANG2>走了半天", "他在银<行|XING2>里<行|HANG2>走了半天"),  # annotations untouched
    ("哎呀，这儿好玩儿", "哎呀,这儿好玩儿"),  # interjections and erhua kept
    ("abc@def.com", "abc@def.com"),
]
GLOSSED = [
    ("M.2 接口和 C++ 的 NVMe", "M 二 接口和 C 加加 的 N V M E"),
    ("An m.2 slot, C++ and nvme.", "An M dot two slot, C plus plus and N V M E."),  # case-insensitive terms
]
# texts whose normalisation, pieces, ids and segments must equal the released front end's
EQUIVALENCE = [
    *(raw for raw, _ in NORMALISED + GLOSSED),
    "I love you!",
    "Couting down 3, 2, 1, go!",
    "数到3就开始：1、2、3",
    "电话：135-4567-8900",
    "苹果于2030/1/2发布新 iPhone 2X 系列手机，最低售价仅 ¥12999",
    "such as XTTS, CosyVoice2, Fish-Speech, and F5-TTS",
    "ni3 dao4 di3 xing2 bu5 xing2 a5？gei3 wo3 chong2 zuo4 yi5 bian4！",
    "大家好，我现在正在bilibili 体验 ai 科技，说实话，来之前我绝对想不到！AI技术已经发展到这样匪夷所思的地步了！",
    "He said: 'hi'. Then he left! Really? Yes... It's 5 o'clock.",
    "这是第一句。'这是引号'。然后呢？",
    "He had a <minute|M IH1 . N AH0 T> to examine the details.",
    "《盗梦空间》（英语：Inception）由克里斯托弗·诺兰执导，2010年7月16日在美国上映。豆瓣评分：9.4，IMDB 8.8。",
    "第一行\n第二行 line two\n",
    "這是繁體中文，測試一下。ＡＢＣ全角１２３",
    "Dr. Smith paid $1,299 on Jan. 5th, 2024 (see p. 7) — really!",
    "C-3PO and R2-D2 met at 10:30.",
    "ju4 u4 和 xu3",  # `u4` inside `ju4`: the result follows set order (the hash seed), the same in both
    "好",
    " a ",
    "",
]


def _grammar_compiled() -> bool:
    try:
        target = zh_grammar_dir(metadata.version("WeTextProcessing"), ZH_OPTIONS)
    except metadata.PackageNotFoundError:
        return False
    return all((target / n).is_file() for n in GRAMMAR_FILES)


def needs_grammar(test):
    """Slow while the Chinese grammar is not compiled yet (its first load compiles it)."""
    return test if _grammar_compiled() else pytest.mark.slow(test)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("indextts_text")
    write_tiny_bpe(d / "bpe.model", EQUIVALENCE + [n for _, n in NORMALISED], vocab_size=600)
    (d / "glossary.yaml").write_text(yaml.safe_dump(GLOSSARY, allow_unicode=True), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def ours(model_dir):
    return IndexTextFrontend.from_dir(model_dir)


# --- no normaliser needed -------------------------------------------------------------------------------------------
def test_tiny_bpe_is_deterministic_and_in_the_released_layout(tmp_path):
    texts = ["今天天气很好，我们一起去公园散步吧。", "Hello world, this is a test.", "晕XUAN4是一种GAN3觉，不要jue2望"]
    write_tiny_bpe(tmp_path / "a.model", texts)
    write_tiny_bpe(tmp_path / "b.model", texts)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<s>", "</s>", "<unk>"] and sp.unk_id() == 2
    assert sp.pad_id() == -1 and sp.get_piece_size() <= 256
    for piece in (*SPLIT_PIECES, "XVAN4", "GAN3", "JVE2"):  # the splitter's marks and the pinyin: whole pieces
        assert sp.id_to_piece(sp.piece_to_id(piece)) == piece and sp.piece_to_id(piece) != sp.unk_id()
    for text in texts:  # what the tokenizer feeds SentencePiece round-trips, with no unknown piece
        line = pretokenize(map_punctuation_zh(text))
        ids = sp.encode(line)
        assert sp.unk_id() not in ids and sp.decode(ids) == line


def test_tiny_bpe_fits_the_tiny_manifest_and_refuses_an_impossible_size(tmp_path, tiny_records):
    texts = [t for r in tiny_records for t in (r.prompt_text, r.target_text)]
    write_tiny_bpe(tmp_path / "bpe.model", texts, vocab_size=256)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    assert sp.get_piece_size() <= 256
    with pytest.raises(ValueError, match="cannot train a 20-piece model"):
        write_tiny_bpe(tmp_path / "small.model", texts, vocab_size=20)


def test_a_missing_or_corrupt_bpe_model_is_one_clear_error(tmp_path):
    with pytest.raises(IndexTextError, match=rf"{tmp_path / 'bpe.model'}: not found"):
        IndexTextFrontend.from_dir(tmp_path)
    (tmp_path / "bpe.model").write_bytes(b"\x00not a sentencepiece model\xff")
    with pytest.raises(IndexTextError, match=rf"{tmp_path / 'bpe.model'}: not a valid SentencePiece model"):
        IndexTextFrontend.from_dir(tmp_path)
    # config.yaml's dataset.bpe_model names the file
    (tmp_path / "config.yaml").write_text("dataset:\n  bpe_model: text.model\n", encoding="utf-8")
    (tmp_path / "text.model").write_bytes(b"")
    with pytest.raises(IndexTextError, match=rf"{tmp_path / 'text.model'}: not a valid SentencePiece model"):
        IndexTextFrontend.from_dir(tmp_path)


def test_a_malformed_glossary_is_one_clear_error(tmp_path):
    write_tiny_bpe(tmp_path / "bpe.model", ["你好"])
    for body in ("M.2: [1, 2]\n", "2025: two\n", "a: {zh: null}\n", "x: '\\2'\n", "[unclosed\n"):
        (tmp_path / "glossary.yaml").write_text(body, encoding="utf-8")
        with pytest.raises(IndexTextError, match=rf"{tmp_path / 'glossary.yaml'}"):
            IndexTextFrontend.from_dir(tmp_path)


def test_pretokenize_pinyin_and_path_choice():
    assert pretokenize(" 你好世界是 hello world 的中文 ") == "你 好 世 界 是 HELLO WORLD 的 中 文"
    fixed = {"ju4": "JV4", "que4": "QVE4", "xün2": "XVN2", "lü4": "lü4", "zhong4": "zhong4"}
    assert {p: correct_pinyin(p) for p in fixed} == fixed
    assert uses_chinese_path("用beta1测试") and uses_chinese_path("xuan4 wo3") and uses_chinese_path("1, 2, 3")
    assert uses_chinese_path("abc@def.com") and not uses_chinese_path("beta2 voice1 better1")


def test_segments_split_as_released():
    toks = ["▁A", "▁B", "▁.", "▁'", "▁C", "▁D", "▁E", "?", "▁F"]
    # a quote piece after a sentence mark closes that segment and opens the next one too
    with pytest.warns(RuntimeWarning, match="exceeds limit: 4"):  # released: over-long parts are cut, with a warning
        assert split_segments(toks, 4) == [["▁A", "▁B", "▁.", "▁'"], ["▁'", "▁C", "▁D", "▁E"], ["?", "▁F"]]
    assert split_segments(toks, 120) == [["▁A", "▁B", "▁.", "▁'", "▁'", "▁C", "▁D", "▁E", "?", "▁F"]]
    commas = ["▁A", "▁B", "▁C", ",", "▁D", "▁E", "▁F", "▁,", "▁G"]
    assert split_segments(commas, 4) == [["▁A", "▁B", "▁C", ","], ["▁D", "▁E", "▁F", "▁,"], ["▁G"]]
    with pytest.warns(RuntimeWarning, match="exceeds limit: 3"):
        assert split_segments([f"▁{c}" for c in "ABCDEFG"], 3) == [["▁A", "▁B", "▁C"], ["▁D"], ["▁E", "▁F", "▁G"]]
    assert split_segments([], 10) == []


# --- with the normaliser --------------------------------------------------------------------------------------------
@needs_grammar
@pytest.mark.parametrize("raw,normalised", NORMALISED)
def test_normalisation(ours, raw, normalised):
    assert ours.normalize(raw) == normalised


@needs_grammar
@pytest.mark.parametrize("raw,normalised", GLOSSED)
def test_the_glossary_reads_terms_per_language(ours, raw, normalised):
    assert ours.normalize(raw) == normalised


@needs_grammar
def test_tokens_and_ids(ours):
    sp = ours.sp
    text = "晕XUAN4是一种GAN3觉，“I love you”！"
    toks = ours.tokens(text)
    assert toks == sp.encode(pretokenize(ours.normalize(text)), out_type=str)
    assert "XVAN4" in toks and "GAN3" in toks
    assert ours.ids(text) == ours.token_ids(toks) == sp.encode(pretokenize(ours.normalize(text)))
    assert ours.tokens(" a ") == sp.encode(" a ", out_type=str)  # one character: SentencePiece alone, no upper-casing
    assert ours.tokens("") == [] and ours.ids("") == []
    assert ours.unk_id == 2 and ours.token_ids(["▁没有这个"]) == [ours.unk_id]
    text = "这是第一句。这是第二句！然后呢？"
    assert ours.segments(text) == [ours.tokens(text)]  # short enough for one segment
    with pytest.warns(RuntimeWarning):
        assert [t for s in ours.segments(text, max_tokens=4) for t in s] == ours.tokens(text)


# --- the released front end -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def public(tmp_path_factory, model_dir):
    """The released TextNormalizer / TextTokenizer (glossary on, as released inference builds them), imported from
    the mirror's files with a torchaudio stand-in; its Chinese grammar cache holds the compiled grammar its options
    produce (the options it passes are recorded and checked)."""
    from conftest import indextts_sources

    root = tmp_path_factory.mktemp("indextts_front")
    stubs = {"torchaudio": types.ModuleType("torchaudio")}
    with indextts_sources(root, PUBLIC_FILES, ("indextts", "indextts/utils"), stubs):
        cache = root / "indextts" / "utils" / "tagger_cache"
        cache.mkdir()
        compiled = zh_grammar_dir(metadata.version("WeTextProcessing"), ZH_OPTIONS)
        IndexTextFrontend.from_dir(model_dir)  # compiles the grammar when the cache lacks it
        for n in GRAMMAR_FILES:
            (cache / n).symlink_to(compiled / n)
        front = importlib.import_module("indextts.utils.front")
        import tn.chinese.normalizer as zh_module

        calls: list[dict] = []

        class Recording(zh_module.Normalizer):
            def __init__(self, *args, **kwargs):
                calls.append(kwargs)
                super().__init__(*args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(zh_module, "Normalizer", Recording)
            normalizer = front.TextNormalizer(enable_glossary=True)
            normalizer.load()
        assert normalizer.load_glossary_from_yaml(str(model_dir / "glossary.yaml"))
        tokenizer = front.TextTokenizer(str(model_dir / "bpe.model"), normalizer)
        yield types.SimpleNamespace(normalizer=normalizer, tokenizer=tokenizer, zh_calls=calls, zh_cls=Recording)


@needs_grammar
def test_the_released_normaliser_options_are_ours(public):
    assert len(public.zh_calls) == 1
    params = inspect.signature(public.zh_cls.__mro__[1].__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k not in ("self", "cache_dir", "overwrite_cache")}
    assert {**defaults, **{k: v for k, v in public.zh_calls[0].items() if k in defaults}} == ZH_OPTIONS
    assert public.zh_calls[0]["overwrite_cache"] is False  # the cache holds what these options compile to


@needs_grammar
def test_same_normalisation_tokens_ids_and_segments_as_released(ours, public):
    differ = []
    for text in EQUIVALENCE:
        theirs_tokens = public.tokenizer.tokenize(text)
        ours_tokens = ours.tokens(text)
        mine = (ours.normalize(text), ours_tokens, ours.token_ids(ours_tokens))
        theirs_ids = public.tokenizer.convert_tokens_to_ids(theirs_tokens)
        theirs = (public.normalizer.normalize(text), theirs_tokens, theirs_ids)
        if mine != theirs:
            differ.append((text, mine, theirs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # over-long segments are cut with a warning
            for limit, quick in ((120, 0), (16, 0), (6, 4), (3, 0)):
                released = public.tokenizer.split_segments(theirs_tokens, limit, quick)
                if split_segments(ours_tokens, limit, quick) != released:
                    differ.append((text, f"segments {limit} {quick}", released))
    assert not differ
    assert ours.ids(EQUIVALENCE[0]) == public.tokenizer.convert_tokens_to_ids(public.tokenizer.tokenize(EQUIVALENCE[0]))
