"""`ttsrl eval`: meta parsing, the seed-tts-eval figures, failed items, ttsrl checkpoints and --compare."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from rewards.cer import edit_counts, error_rate
from rl.evaluate import MetaError, compare_table, markdown_report, read_meta
from tests.conftest import REPO, run_config

TINY_META = REPO / "configs" / "data" / "tiny" / "meta_zh.lst"


def _meta(tmp_path, lines, wav=True):
    if wav:
        shutil.copy(REPO / "configs" / "data" / "tiny" / "voices" / "zh_a.wav", tmp_path / "p.wav")
    p = tmp_path / "meta.lst"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_meta_parsing_and_errors_name_line_and_field(tmp_path):
    items = read_meta(
        _meta(tmp_path, ["# comment", "a|你好|p.wav|今天很好", "", "b|你好|p.wav|哈哈哈|happy", "c|hi|p.wav|x|4"])
    )
    assert [i.utt for i in items] == ["a", "b", "c"]
    assert items[0].prompt_wav == tmp_path / "p.wav" and items[0].emotion is None
    assert items[1].emotion == 3 and items[2].emotion == 4
    # seed-tts-eval's own 5-field lines end with the ground-truth wav; an emotion may follow it
    items = read_meta(_meta(tmp_path, ["d|hi|p.wav|x|wavs/d.wav", "e|hi|p.wav|x|gt/e.flac|sad"]))
    assert (items[0].gt_wav, items[0].emotion) == ("wavs/d.wav", None)
    assert (items[1].gt_wav, items[1].emotion) == ("gt/e.flac", 6)
    cases = [
        (["a|你好|p.wav"], ":1: expected utt|prompt_text"),
        (["a|你好|missing.wav|好"], ":1: field 'prompt_wav': file not found"),
        (["a||p.wav|好"], ":1: field 'prompt_text' is empty"),
        (["a|你|p.wav|好", "a|你|p.wav|好"], ":2: field 'utt': 'a' is already used on line 1"),
        (["a|你|p.wav|好|joyful"], ":1: field 'emotion': unknown label 'joyful'"),
        (["a|你|p.wav|好|9"], ":1: field 'emotion': label index 9"),
        (["a|你|p.wav|好|happy|sad"], ":1: field 'gt_wav': a 6-field line"),
        (["a|你|p.wav|好|x.wav|sad|1"], ":1: expected utt|prompt_text"),
    ]
    for lines, msg in cases:
        with pytest.raises(MetaError, match=msg.replace("|", r"\|")):
            read_meta(_meta(tmp_path, lines))


def test_corpus_rate_sums_edits_while_the_mean_averages_items():
    # item 1: 4 chars, 1 substitution -> 0.25; item 2: 2 chars, both wrong + 1 insertion -> 1.5
    e1, n1 = edit_counts("今天很好", "今天很差", "zh")
    e2, n2 = edit_counts("你好", "他们呢", "zh")
    assert (e1, n1, e2, n2) == (1, 4, 3, 2)
    assert error_rate("你好", "他们呢", "zh") == 1.5
    assert math.isclose(np.mean([e1 / n1, e2 / n2]), 0.875) and math.isclose((e1 + e2) / (n1 + n2), 4 / 6)
    assert edit_counts("Hello, World!", "hello world", "en") == (0, 2)
    assert edit_counts("你好", "", "zh") == (2, 2)


def _report(ckpt, cer, sims, items):
    return {
        "ckpt": ckpt,
        "meta": "/m.lst",
        "lang": "zh",
        "seed": 0,
        "flow_steps": 10,
        "measured": {"cer": True, "sim": True, "emotion": False},
        "metrics": {
            "items": 3,
            "synthesised": 3,
            "truncated": 0,
            "failed": 0,
            "cer": cer,
            "cer_corpus": cer,
            "cer_n": 3,
            "sim": float(np.mean(sims)),
            "sim_n": 3,
            "emotion_acc": None,
            "emotion_n": 0,
            "audio_seconds": 3.0,
            "wall_seconds": 1.0,
        },
        "failed": [],
        "items": [{"utt": u, "error_rate": e} for u, e in items],
    }


def test_compare_table_side_by_side():
    a = _report("A", 10.0, [0.5, 0.6, 0.7], [("u1", 0.1), ("u2", 0.2), ("u3", 0.0)])
    b = _report("B", 7.5, [0.6, 0.7, 0.8], [("u1", 0.05), ("u2", 0.2), ("u3", 0.1)])
    table = compare_table(a, b)
    assert "| CER (%, mean of items) (n = 3 / 3) | 10.00 | 7.50 | -2.50 |" in table
    assert "| SIM (cosine) (n = 3 / 3) | 0.600 | 0.700 | 0.100 |" in table
    assert "| emotion accuracy (n = 0 / 0) | - | - | - |" in table
    assert "1 better, 1 worse, 1 equal" in table
    with pytest.raises(ValueError, match="different test sets"):
        compare_table(a, {**b, "lang": "en"})
    assert "Not measured (no model given, or no item with a target): emotion" in markdown_report(a)


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    from rl.evaluate import tiny_models

    return tiny_models("zh", read_meta(TINY_META), root=tmp_path_factory.mktemp("eval_models"))


def test_eval_end_to_end_reports_every_metric_and_lists_failures(tmp_path, tiny_ckpt, eval_models):
    from rl.evaluate import evaluate
    from rollouts.audio import write_wav
    from rollouts.tiny_vocoder import write_tiny_vocoder

    if not (tiny_ckpt / "flow").exists():
        write_tiny_vocoder(tiny_ckpt, seed=0)
    lines = TINY_META.read_text(encoding="utf-8").splitlines()
    lines = lines[:4] + [line for line in lines if line.endswith("|happy")]
    voices = REPO / "configs" / "data" / "tiny" / "voices"
    lines = [line.replace("voices/", f"{voices}/") for line in lines]
    write_wav(tmp_path / "short.wav", np.zeros(100, np.float32), 24000)  # 4 ms: too short for the front end
    lines.append(f"bad|你好|{tmp_path / 'short.wav'}|今天很好")
    meta = tmp_path / "meta.lst"
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    report = evaluate(tiny_ckpt, meta, "zh", out, eval_models, flow_steps=2, batch_size=4)
    m = report["metrics"]
    assert m["items"] == 6 and m["synthesised"] == 5 and m["failed"] == 1
    assert [f["utt"] for f in report["failed"]] == ["bad"] and report["failed"][0]["stage"] == "frontend"
    assert m["cer_n"] == 5 and m["cer"] >= 0 and m["cer_corpus"] >= 0 and m["sim_n"] == 5 and -1 <= m["sim"] <= 1
    assert m["emotion_n"] == 1 and m["emotion_acc"] in (0.0, 1.0)  # one laughing line asks for "happy"
    items = {r["utt"]: r for r in report["items"]}
    rates = [items[u]["error_rate"] for u in items if u != "bad"]
    assert math.isclose(m["cer"], 100 * np.mean(rates))
    edits = sum(items[u]["edits"] for u in items if u != "bad")
    refs = sum(items[u]["ref_tokens"] for u in items if u != "bad")
    assert math.isclose(m["cer_corpus"], 100 * edits / refs)
    assert all((out / "wavs" / f"{u}.wav").is_file() for u in items if u != "bad")
    assert json.loads((out / "eval.json").read_text())["metrics"] == m
    md = (out / "eval.md").read_text()
    assert "| bad | frontend |" in md and "CER (%, mean of items)" in md
    # the same seed gives the same audio and figures, whatever the batching (to float rounding)
    again = evaluate(tiny_ckpt, meta, "zh", tmp_path / "again", eval_models, flow_steps=2, batch_size=2)
    assert again["metrics"]["cer"] == m["cer"] and math.isclose(again["metrics"]["sim"], m["sim"], rel_tol=1e-5)


def test_eval_loads_a_ttsrl_checkpoint_and_compares_from_the_cli(tmp_path, tiny_ckpt, eval_models, capsys):
    from rl.cli import main
    from rl.config import load_config
    from rl.trainer import train
    from rollouts.tiny_vocoder import write_tiny_vocoder

    if not (tiny_ckpt / "flow").exists():
        write_tiny_vocoder(tiny_ckpt, seed=0)
    cfg, derived = load_config(
        REPO / "configs" / "tiny.yaml",
        run_config(
            tmp_path, tiny_ckpt, "train.steps=2", "train.save_every=2", "optim.lr=1e-2", "policy.build_tiny=false"
        ),
    )
    train(cfg, derived, progress=False)
    meta = tmp_path / "meta.lst"
    voices = REPO / "configs" / "data" / "tiny" / "voices"
    meta.write_text(
        "\n".join(
            line.replace("voices/", f"{voices}/") for line in TINY_META.read_text(encoding="utf-8").splitlines()[:3]
        )
        + "\n"
    )
    base_args = [
        "--meta",
        str(meta),
        "--lang",
        "zh",
        "--frontend",
        eval_models.frontend_dir,
        "--asr",
        eval_models.asr_dir,
        "--flow-steps",
        "2",
    ]
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "A"), *base_args]) == 0
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "B"), *base_args]) == 0
    b = json.loads((tmp_path / "B" / "eval.json").read_text())
    assert b["ckpt"].endswith("step-000002") and b["measured"] == {"cer": True, "sim": False, "emotion": False}
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 0
    table = capsys.readouterr().out
    assert "| metric | A | B | B - A |" in table and "CER (%, corpus)" in table
    # lr 1e-2 for two steps moved the weights: the trained policy does not produce the base policy's audio
    a = json.loads((tmp_path / "A" / "eval.json").read_text())
    assert [r["seconds"] for r in a["items"]] != [r["seconds"] for r in b["items"]] or [
        r["hyp"] for r in a["items"]
    ] != [r["hyp"] for r in b["items"]]


def test_a_batch_that_fails_to_synthesise_is_listed_and_the_rest_go_on(tmp_path, tiny_ckpt, eval_models, monkeypatch):
    from policies.glmtts import GLMTTSPolicy
    from rl.evaluate import EvalModels, evaluate
    from rollouts.tiny_vocoder import write_tiny_vocoder

    if not (tiny_ckpt / "flow").exists():
        write_tiny_vocoder(tiny_ckpt, seed=0)
    voices = REPO / "configs" / "data" / "tiny" / "voices"
    meta = tmp_path / "meta.lst"
    meta.write_text(
        "\n".join(
            line.replace("voices/", f"{voices}/") for line in TINY_META.read_text(encoding="utf-8").splitlines()[:3]
        )
        + "\n"
    )
    real = GLMTTSPolicy.sample_groups

    def flaky(self, prompts, group_size, params, *, group_ids, **kw):
        if 1 in group_ids:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, prompts, group_size, params, group_ids=group_ids, **kw)

    monkeypatch.setattr(GLMTTSPolicy, "sample_groups", flaky)
    report = evaluate(
        tiny_ckpt,
        meta,
        "zh",
        tmp_path / "out",
        EvalModels(frontend_dir=eval_models.frontend_dir),
        flow_steps=2,
        batch_size=1,
    )
    second = read_meta(meta)[1].utt
    assert report["metrics"]["synthesised"] == 2 and report["metrics"]["failed"] == 1
    assert report["failed"] == [
        {
            "utt": second,
            "stage": "synthesis",
            "reason": "RuntimeError: CUDA error: an illegal memory access was encountered",
        }
    ]


def test_cli_errors_are_clear(tmp_path, tiny_ckpt, capsys):
    from rl.cli import main

    assert (
        main(
            [
                "eval",
                "--ckpt",
                str(tmp_path),
                "--meta",
                str(tmp_path / "none.lst"),
                "--lang",
                "zh",
                "--frontend",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "meta file not found" in capsys.readouterr().err
    meta = _meta(tmp_path, ["a|你好|p.wav|今天很好"])
    assert main(["eval", "--ckpt", str(tmp_path), "--meta", str(meta), "--lang", "zh"]) == 2  # not a checkpoint
    assert "neither a GLM-TTS checkpoint" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tiny_ckpt), "--meta", str(meta), "--lang", "zh"]) == 2  # GLM-TTS: --frontend
    assert "needs --frontend DIR" in capsys.readouterr().err
