"""Every path that builds LM input reads the same normalised texts: `ttsrl prepare`, training and `ttsrl eval`;
long texts in `ttsrl eval` go piece by piece as upstream's generate_long."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config

pytestmark = pytest.mark.slow  # prepares and trains through WeTextProcessing's compiled grammars

REPO = Path(__file__).resolve().parent.parent
VOICES = REPO / "configs" / "data" / "tiny" / "voices"
ITEMS = [
    ("zh_a", "你好，很高兴认识你！", "会议在下午3点30分开始，请准时到场！"),
    ("en_a", "Hello, it is nice to meet you.", "I paid $12.50 for 3 books"),
]


class ShippedFeatures:
    """A front end returning the shipped tiny voice features (no speech tokenizer needed)."""

    def __call__(self, wav):
        from rollouts.prepare import PromptFeatures

        stem = Path(wav).stem
        return PromptFeatures(
            np.load(VOICES / f"{stem}_tokens.npy"),
            np.load(VOICES / f"{stem}_feat.npy"),
            np.load(VOICES / f"{stem}_emb.npy"),
        )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from rollouts.prepare import prepare

    d = tmp_path_factory.mktemp("prep")
    items = d / "items.jsonl"
    items.write_text(
        "\n".join(
            json.dumps({"prompt_wav": str(VOICES / f"{v}.wav"), "prompt_text": p, "target_text": t}, ensure_ascii=False)
            for v, p, t in ITEMS
        )
        + "\n",
        encoding="utf-8",
    )
    return prepare(items, None, d / "out", frontend=ShippedFeatures()).manifest


def test_prepare_stores_raw_and_normalised_texts(prepared):
    lines = [json.loads(x) for x in prepared.read_text(encoding="utf-8").splitlines()]
    assert [(x["prompt_text"], x["syn_text"]) for x in lines] == [(p, t) for _, p, t in ITEMS]
    assert lines[0]["syn_text_tn"] == "会议在下午三点三十分开始，请准时到场。"
    assert lines[0]["prompt_text_tn"] == "你好，很高兴认识你。"
    assert lines[1]["syn_text_tn"] == "i paid twelve point five dollars for three books."


def test_a_prepared_manifest_trains_and_evaluates_with_the_same_text(prepared, tiny_ckpt, tmp_path, monkeypatch):
    import rl.long_text
    from policies.glmtts import GLMTTSPolicy
    from rl.config import load_config
    from rl.evaluate import EvalModels, evaluate
    from rl.trainer import train
    from rollouts.tiny_frontend import write_tiny_frontend
    from rollouts.tiny_vocoder import write_tiny_vocoder

    if not (tiny_ckpt / "flow").exists():
        write_tiny_vocoder(tiny_ckpt, seed=0)
    lines = [json.loads(x) for x in prepared.read_text(encoding="utf-8").splitlines()]
    trained, evaluated = {}, {}
    real_prompt_input, real_long = GLMTTSPolicy.prompt_input, rl.long_text.synthesize_long

    def spy_prompt_input(self, rec):
        trained[rec.uttid] = (rec.prompt_text, rec.target_text)
        return real_prompt_input(self, rec)

    def spy_long(policy, token2wav, jobs, params, *, seed):
        for j in jobs:
            evaluated[j.key] = (j.prompt_ids, j.piece_ids)
        return real_long(policy, token2wav, jobs, params, seed=seed)

    monkeypatch.setattr(GLMTTSPolicy, "prompt_input", spy_prompt_input)
    monkeypatch.setattr(rl.long_text, "synthesize_long", spy_long)
    cfg, derived = load_config(
        REPO / "configs" / "tiny.yaml",
        run_config(tmp_path, tiny_ckpt, "train.steps=1", "policy.build_tiny=false", f"data.manifest={prepared}"),
    )
    train(cfg, derived, progress=False)
    assert trained == {x["uttid"]: (x["prompt_text_tn"], x["syn_text_tn"]) for x in lines}

    meta = tmp_path / "meta.lst"
    meta.write_text(
        "".join(f"u{k}|{p}|{VOICES / (v + '.wav')}|{t}\n" for k, (v, p, t) in enumerate(ITEMS)), encoding="utf-8"
    )
    models = EvalModels(frontend_dir=str(write_tiny_frontend(tmp_path / "fe")))
    report = evaluate(tiny_ckpt, meta, "zh", tmp_path / "eval", models, flow_steps=2)
    assert report["metrics"]["synthesised"] == 2
    enc = GLMTTSPolicy.from_pretrained(tiny_ckpt).encode_text
    for k, x in enumerate(lines):  # short texts: one piece, the training text
        assert evaluated[k] == (enc(x["prompt_text_tn"] + " "), [enc(x["syn_text_tn"])])


def test_cached_prompt_prunes_the_oldest_pieces_first():
    from rl.long_text import LongJob, cached_prompt

    job = LongJob(0, [1, 2], [], voice=None)
    job.cache_text, job.cache_codes = [[1, 2], [3], [4]], [[0] * 300, [0] * 300, [0] * 200]
    text, codes = cached_prompt(job, [5])  # 800 cached + 1 x 200 estimated > 750: drop piece 1 (500 + 200 fit)
    assert text == [1, 2, 4] and len(codes) == 500
    job.cache_text, job.cache_codes = [[1, 2], [3], [4]], [[0] * 300, [0] * 300, [0] * 100]
    text, codes = cached_prompt(job, [5, 6, 7])  # 700 + 3 x 175: drop piece 1, then piece 2
    assert text == [1, 2] and len(codes) == 300 and len(job.cache_text) == 1
    job.cache_text, job.cache_codes = [[1, 2]], [[0] * 900]
    assert cached_prompt(job, [5] * 10) == ([1, 2], [0] * 900)  # the voice prompt always stays


def test_a_long_text_is_generated_piece_by_piece(tiny_ckpt, tiny_records, monkeypatch):
    from policies.glmtts import GLMTTSPolicy
    from policies.sampling import SamplingParams
    from rl.long_text import LongJob, synthesize_long
    from rollouts.text import LMTexts
    from rollouts.tiny_vocoder import write_tiny_vocoder
    from rollouts.token2wav import Token2Wav, VoicePrompt

    if not (tiny_ckpt / "flow").exists():
        write_tiny_vocoder(tiny_ckpt, seed=0)
    policy, t2w = GLMTTSPolicy.from_pretrained(tiny_ckpt), Token2Wav.from_pretrained(tiny_ckpt, n_timesteps=2)
    text = (
        "每次熬煮小米粥时，奶奶习惯加入一小把西洋参片，淡淡的药香融入粥里，口感温润，特别适合熬夜后调理身体。"
        "老街上的房屋参差错落，黛瓦与砖墙相映，时光仿佛在此刻放慢了脚步。"
    )
    lm = LMTexts()
    pieces = lm.target_chunks(text)
    assert len(pieces) == 3 and all(p.endswith("。") for p in pieces)
    rec = tiny_records[0]
    enc, s = policy.encode_text, policy.special
    job = LongJob(
        0,
        enc(lm.prompt(rec.prompt_text) + " "),
        [enc(p) for p in pieces],
        VoicePrompt(rec.prompt_speech_tokens, rec.prompt_feat, rec.embedding),
    )
    seen = []
    real = GLMTTSPolicy.sample_groups

    def spy(self, prompts, *a, **kw):
        seen.append(prompts[0].ids)
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(GLMTTSPolicy, "sample_groups", spy)
    monkeypatch.setattr("rl.long_text.MAX_LLM_SEQ_INP_LEN", 10**6)  # no pruning: every piece stays in the prompt
    synthesize_long(policy, t2w, [job], SamplingParams(), seed=0)
    assert not job.failed and len(job.audio) == 3 and len(seen) == 3
    codes1 = job.cache_codes[1]
    voice = [int(c) + s.ats for c in rec.prompt_speech_tokens]
    assert seen[0] == job.prompt_ids + job.piece_ids[0] + [s.boa] + voice
    # piece 2: the voice prompt plus piece 1 (its text and its generated codes)
    assert seen[1] == (
        job.prompt_ids + job.piece_ids[0] + job.piece_ids[1] + [s.boa] + voice + [c + s.ats for c in codes1]
    )
    assert len(seen[2]) == len(seen[1]) - len(job.piece_ids[1]) + sum(len(p) for p in job.piece_ids[1:]) + len(
        job.cache_codes[2]
    )
