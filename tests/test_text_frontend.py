"""The GLM-TTS text front end: upstream's normalisation, phoneme input, long-text splitting and the LM prompt ids.

The first test run compiles WeTextProcessing's Chinese grammar with upstream's options into .cache/ (about 80 s and
7 GB once); later runs load it in about a second.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rollouts.text import LMTexts, TextFrontEnd, TextFrontEndError, lm_records, read_custom_replace

REPO = Path(__file__).resolve().parent.parent
MIRROR = "/work/.mirror/zai-org+GLM-TTS/repo"

# (raw, upstream's normalised text), checked by hand against upstream's rules
ZH_CASES = [
    ("今天是2024年5月3日，气温25℃。", "今天是二零二四年五月三日，气温二十五摄氏度。"),
    ("这件衣服打八折，原价$1,299.99！", "这件衣服打八折，原价一千两百九十九点九九美元。"),  # ！ -> 。
    ("增长了12.5%，达到1/3的目标。", "增长了百分之十二点五，达到三分之一的目标。"),
    ("光速约为3×10^8米每秒", "光速约为三乘十的八次方米每秒。"),  # scientific notation, closing mark added
    ("身高180cm，体重75kg。", "身高一百八十厘米，体重七十五千克。"),
    ("会议在下午3点30分开始。", "会议在下午三点三十分开始。"),
    ("温度在-5到10度之间。", "温度在五到十度之间。"),  # a `-` not between digits is dropped
    ("2023-10-01是国庆节。", "两千零二十三减十减零一是国庆节。"),  # digit-digit `-` reads 减, as upstream
    ("①准备材料②开始制作", "一准备材料二开始制作。"),
    ("x>y且y<z", "x大于y且y小于z。"),
    ("α粒子", "阿尔法粒子。"),
    ("哈哈哈，太好笑了😂😂！", "哈哈哈，太好笑了。"),  # emoji removed
    ("我看了《疯狂元素城》，里边水火元素谈恋爱的设定很妙！", "我看了疯狂元素城，里边水火元素谈恋爱的设定很妙。"),
    ("第一行\n\n第二行没有标点", "第一行。第二行没有标点。"),
    ("1. 第一条\n2. 第二条", "一。第一条。二。第二条。"),
]
EN_CASES = [
    ("Hello World!", "hello world."),
    ("I paid $12.50 for 3 books.", "i paid twelve point five dollars for three books."),
    (
        "The meeting is at 3:30 PM on Jan. 5th, 2024.",
        "the meeting is at three thirty pm on the fifth of january, twenty twenty four.",
    ),
    ("It's 25°C outside, isn't it?", "it's twenty five degrees celsius outside, isn't it?"),
    ("Wait... what?!", "wait. what."),
    ("I'm so happy 😊 today!", "i'm so happy today."),
    ("well-known model", "well known model."),
    ('He said "hello" (quietly) [really].', "he said hello quietly really."),
    ("", "."),
]
MIXED_CASES = [
    ("我今天用iPhone 15 Pro拍了100张照片。", "我今天用iphone十五pro拍了一百张照片。"),
    ("Hello，你好！", "hello，你好。"),
]


@pytest.fixture(scope="module")
def front():
    return TextFrontEnd()


@pytest.mark.parametrize("raw,normalised", ZH_CASES + EN_CASES + MIXED_CASES)
@pytest.mark.slow
def test_hand_checked_cases(front, raw, normalised):
    assert front.normalize(raw) == normalised
    assert front.lm_text(raw) == front.normalize(normalised)  # the CLI's second pass


def test_none_passes_through_and_bad_inputs_are_clear(tmp_path):
    assert TextFrontEnd("none").normalize("Hello 12!") == "Hello 12!"
    with pytest.raises(TextFrontEndError, match="upstream, voxcpm or none"):
        TextFrontEnd("wetext")
    bad = tmp_path / "custom.jsonl"
    bad.write_text('{"origin": "噢", "new": "哦"}\n{"from": "x"}\n', encoding="utf-8")
    with pytest.raises(TextFrontEndError, match=r"custom\.jsonl:2"):
        read_custom_replace(bad)


@pytest.mark.slow
def test_custom_replacements_apply_to_zh_only(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"origin": "噢", "new": "哦"}\n', encoding="utf-8")
    fe = TextFrontEnd(custom_replace=path)
    assert fe.normalize("噢，我知道了") == "哦，我知道了。"
    assert TextFrontEnd().normalize("噢，我知道了") == "噢，我知道了。"


@pytest.mark.slow
def test_long_texts_split_as_upstream(front):
    from rollouts.text_split import split_by_len

    text = (
        "每次熬煮小米粥时，奶奶习惯加入一小把西洋参片，淡淡的药香融入粥里，口感温润，特别适合熬夜后调理身体。"
        "老街上的房屋参差错落，黛瓦与砖墙相映，时光仿佛在此刻放慢了脚步。"
    )
    pieces = split_by_len(text)
    assert "".join(pieces) == text  # a piece closes at the first mark after >= 30 characters
    assert pieces == [
        "每次熬煮小米粥时，奶奶习惯加入一小把西洋参片，淡淡的药香融入粥里，",
        "口感温润，特别适合熬夜后调理身体。老街上的房屋参差错落，黛瓦与砖墙相映，",
        "时光仿佛在此刻放慢了脚步。",
    ]
    assert front.chunks(text) == [p[:-1] + "。" for p in pieces]  # each piece gets its closing mark
    assert split_by_len("短句。") == ["短句。"]


@pytest.mark.slow
def test_prompt_ids_are_the_normalised_texts_tokenised(tiny_ckpt, tiny_records):
    from policies.glmtts import GLMTTSPolicy
    from rl.config import DataConfig

    policy = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    front, enc, s = TextFrontEnd(), policy.encode_text, policy.special
    recs = lm_records(tiny_records, DataConfig(manifest="x"), enc)
    changed = 0
    for raw, rec in zip(tiny_records, recs):
        want = (
            enc(front.normalize(raw.prompt_text) + " ")
            + enc(front.lm_text(raw.target_text))
            + [s.boa]
            + [int(c) + s.ats for c in raw.prompt_speech_tokens]
        )
        assert policy.prompt_input(rec).ids == want
        changed += rec.target_text != raw.target_text or rec.prompt_text != raw.prompt_text
        assert rec.uttid == raw.uttid and np.array_equal(rec.prompt_speech_tokens, raw.prompt_speech_tokens)
    assert changed == 22  # 22 of the 40 shipped records (English lower-cased, closing marks)
    off = lm_records(tiny_records[:2], DataConfig(manifest="x", text_normalize="none"))
    assert [r.target_text for r in off] == [r.target_text for r in tiny_records[:2]]


def _phoneme_dicts(tmp_path):
    (tmp_path / "G2P_able_1word.json").write_text(json.dumps(["你", "好"]), encoding="utf-8")
    (tmp_path / "G2P_replace_dict.jsonl").write_text('{"弦": "<|X|><|IAN2|>"}\n', encoding="utf-8")
    return tmp_path


def test_phoneme_input_replaces_characters_outside_the_list(tmp_path):
    from rollouts.phoneme import PhonemeConverter, PhonemeError, check_tags

    g2p = PhonemeConverter(_phoneme_dicts(tmp_path))
    assert g2p("你好") == "你好"
    assert g2p("你吃") == "你<|CH|><|III1|>"  # chi1: i after ch reads iii
    assert g2p("琴弦，hello") == "<|Q|><|IN2|><|X|><|IAN2|>，hello"  # dictionary first, non-Chinese kept
    with pytest.raises(PhonemeError, match=r"<\|CH\|>"):
        check_tags("<|CH|><|III1|>", lambda t: [1, 2, 3], "m.jsonl:1")
    check_tags("<|CH|>", lambda t: [7], "m.jsonl:1")
    with pytest.raises(PhonemeError, match="G2P_able_1word.json"):
        PhonemeConverter(tmp_path / "missing")


def test_phoneme_tags_missing_from_the_tokenizer_are_named(tmp_path, tiny_ckpt, tiny_records):
    from policies.glmtts import GLMTTSPolicy
    from rl.config import DataConfig
    from rl.errors import InputError

    policy = GLMTTSPolicy.from_pretrained(tiny_ckpt)
    data = DataConfig(manifest="x", phoneme=True, phoneme_dicts=str(_phoneme_dicts(tmp_path)))
    zh = [r for r in tiny_records if any("\u4e00" <= c <= "\u9fff" for c in r.target_text)][:1]
    with pytest.raises(InputError, match=r"field 'syn_text': phoneme tag <\|[A-Z0-9]+\|> is not a token"):
        lm_records(zh, data, policy.encode_text)


@pytest.mark.skipif(not Path(MIRROR).is_dir(), reason=f"no zai-org/GLM-TTS git mirror at {MIRROR}")
@pytest.mark.slow
def test_same_texts_as_upstream_code():
    """Upstream's own TextFrontEnd (from the mirror, run in a child process) and ours agree on every text."""
    sys.path.insert(0, str(REPO / "bench"))
    import text_vs_upstream as cmp

    texts = cmp.corpus(MIRROR, extra=False)[::4]  # a quarter, to stay fast; bench/text_vs_upstream.py runs all
    res = cmp.compare(MIRROR, texts=texts)
    assert res["diffs"] == []
    assert res["agree_once"] == res["agree_twice"] == res["agree_phoneme"] == res["agree_split"] == len(texts) >= 40
    assert res["changed_by_upstream"] > len(texts) // 2


def test_lm_texts_are_shared_per_setting():
    from rl.config import DataConfig

    a = LMTexts.from_config(DataConfig(manifest="x"))
    assert LMTexts.from_config(DataConfig(manifest="y")) is a
    assert LMTexts.from_config(DataConfig(manifest="x", text_normalize="none")) is not a
