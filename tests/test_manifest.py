import json

import numpy as np
import pytest

from rollouts.manifest import ManifestError, PromptStream, read_manifest


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "tok").mkdir(parents=True)
    np.save(d / "tok" / "a.npy", np.array([1, 2, 32767], dtype=np.int64))
    np.save(d / "feat.npy", np.zeros((5, 80), dtype=np.float32))
    np.save(d / "emb.npy", np.ones(192, dtype=np.float32))
    np.save(d / "bad_codes.npy", np.array([1, 40000]))
    np.save(d / "bad_feat.npy", np.zeros((5, 81), dtype=np.float32))
    return d


def line(**kw):
    base = {
        "uttid": "u1",
        "prompt_text": "你好",
        "prompt_speech": "p.wav",
        "prompt_speech_token": "tok/a.npy",
        "prompt_speech_feat": "feat.npy",
        "embedding": "emb.npy",
        "syn_text": "今天天气很好",
        "emotion": 3,
    }
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...}, ensure_ascii=False)


def write(d, *lines):
    p = d / "m.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_reads_upstream_grpo_jsonl_with_relative_paths(data_dir):
    recs = read_manifest(write(data_dir, line(), "", line(uttid="u2", emotion=-1)))
    r = recs[0]
    assert r.uttid == "u1" and r.target_text == "今天天气很好" and r.emotion == 3
    assert r.prompt_speech_tokens.tolist() == [1, 2, 32767] and r.prompt_feat.shape == (5, 80)
    assert r.embedding.shape == (192,) and r.prompt_wav == str(data_dir / "p.wav")
    assert recs[1].emotion is None
    assert r.source.endswith("m.jsonl:1")


def test_root_overrides_the_base_directory(data_dir, tmp_path):
    m = tmp_path / "elsewhere.jsonl"
    m.write_text(line() + "\n", encoding="utf-8")
    assert read_manifest(m, root=data_dir)[0].prompt_feat.shape == (5, 80)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"m.jsonl:2: not valid JSON"),
        (line(syn_text=...), r"m.jsonl:2: field 'syn_text' is missing"),
        (line(syn_text="  "), r"m.jsonl:2: field 'syn_text' is empty"),
        (line(prompt_text=5), r"m.jsonl:2: field 'prompt_text' must be a string"),
        (line(prompt_speech_token="nope.npy"), r"m.jsonl:2: field 'prompt_speech_token': file not found"),
        (line(prompt_speech_token="bad_codes.npy"), r"field 'prompt_speech_token': codes must be in \[0, 32768\)"),
        (line(syn_speech_token="bad_codes.npy"), r"m.jsonl:2: field 'syn_speech_token': codes must be in \[0, 32768\)"),
        (line(syn_speech_token="feat.npy"), r"field 'syn_speech_token': expected a non-empty 1-D integer array"),
        (line(prompt_speech_feat="bad_feat.npy"), r"field 'prompt_speech_feat': expected \[frames, 80\]"),
        (line(embedding="feat.npy"), r"field 'embedding': expected 192 finite values"),
        (line(emotion="happy"), r"field 'emotion' must be an integer"),
        (line(uttid="u0"), r"m.jsonl:2: field 'uttid': 'u0' already used at .*m.jsonl:1"),
        ("[1, 2]", r"m.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(data_dir, bad, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(data_dir, line(uttid="u0"), bad))


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "x.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no prompts"):
        read_manifest(tmp_path / "e.jsonl")


def test_prompt_stream_is_seeded_covers_every_epoch_and_resumes():
    s = PromptStream(5, seed=3)
    first = s.take(5)
    assert sorted(first) == list(range(5))
    second = s.take(5)
    assert sorted(second) == list(range(5)) and second != first  # reshuffled each epoch
    a = PromptStream(5, seed=3)
    a.take(7)
    b = PromptStream(5, seed=3)
    b.load_state(a.state())
    assert a.take(6) == b.take(6)
    assert PromptStream(4, seed=0, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]
