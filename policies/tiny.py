"""A tiny random GLM-TTS speech LM checkpoint, in exactly the upstream layout, for tests and the embedded default.

    <dir>/llm/config.json, model.safetensors          a 2-layer LlamaForCausalLM
    <dir>/vq32k-phoneme-tokenizer/tokenizer.model     tiktoken BPE ranks (bytes + merges for the given texts)
    <dir>/vq32k-phoneme-tokenizer/tokenizer_config.json   added tokens: the GLM-4 specials, <|begin_of_audio|>,
                                                      <|end_of_audio|>, <|audio_0|> .. <|audio_32767|>

It is loaded by the same `GLMTTSPolicy.from_pretrained` users point at a real checkpoint.

The random weights are shaped so that sampling behaves like a speech LM rather than uniform noise: every token
embedding shares one constant component, which the stop row of the LM head reads, so the stop probability per
step is moderate (sequences end at varied lengths inside the length bounds), and speech logits are spread
enough that top-k/top-p truncation is meaningful.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

from policies.glmtts import LLM_DIR, TOKENIZER_DIR

GLM4_SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
]
NUM_CODES = 32768


def _bpe_ranks(texts: list[str]) -> list[bytes]:
    """256 single bytes, then merge chains so each non-ASCII character and each word of `texts` is one token."""
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)

    def add_chain(piece: bytes) -> None:
        for end in range(2, len(piece) + 1):
            t = piece[:end]
            if t not in seen:
                seen.add(t)
                tokens.append(t)

    for text in texts:
        word = ""
        for ch in text + " ":
            if not ch.isascii():
                add_chain(ch.encode())
            if ch.isalpha() and ch.isascii():
                word += ch
                continue
            if word:
                add_chain((" " + word).encode())
                add_chain(word.encode())
                word = ""
    return tokens


def write_tokenizer(directory: Path, texts: list[str]) -> dict[str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    ranks = _bpe_ranks(texts)
    with open(directory / "tokenizer.model", "w") as f:
        for rank, tok in enumerate(ranks):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    added = {}
    next_id = len(ranks)
    for s in GLM4_SPECIALS + [f"<|audio_{i}|>" for i in range(NUM_CODES)]:
        added[s] = next_id
        next_id += 1
    decoder = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s, i in added.items()
    }
    cfg = {
        "added_tokens_decoder": decoder,
        "tokenizer_class": "ChatGLM4Tokenizer",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "remove_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return added


# what text normalisation (rollouts/text.py) writes that raw text may lack: zh numerals and marks, English number words
NORMALISED_VOCAB = (
    "零一二三四五六七八九十百千万亿两点负百分之。，？ zero one two three four five six seven eight nine ten eleven "
    "twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million point percent dollars"
)


def normalised_cover(texts: list[str]) -> list[str]:
    """Extra tokenizer texts so that the normalised forms of `texts` (lower case, numbers read out, closing
    marks) get the same realistic token counts as the raw ones."""
    return [t.lower() for t in texts] + [NORMALISED_VOCAB]


def write_tiny_checkpoint(
    directory: str | Path,
    texts: list[str] = (),
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    stop_bias: float = 3.0,
    speech_logit_std: float = 1.5,
) -> Path:
    """Write a tiny random checkpoint to `directory` (created; existing files are overwritten).

    texts: sentences whose characters/words get single tokens (realistic text-token counts); their normalised
    forms are covered too (normalised_cover).
    stop_bias: how far the stop logit sits below the log-sum-exp of the speech logits; the default gives a stop
    probability of about 5% per step once stop is allowed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    added = write_tokenizer(directory / TOKENIZER_DIR, list(texts) + normalised_cover(list(texts)))
    vocab = max(added.values()) + 1
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=added["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=added["<|user|>"],
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 0.02)
        emb[:, 0] = 0.2  # shared component: after the final RMSNorm it is a near-constant "bias" feature
        head = model.lm_head.weight
        ats, ate, stop = added["<|audio_0|>"], added[f"<|audio_{NUM_CODES - 1}|>"], added["<|user|>"]
        # speech rows: spread logits over the varying features only
        head.normal_(0.0, speech_logit_std / (0.63 * hidden_size**0.5))
        head[:, 0] = 0.0
        head[stop] = 0.0
        # stop row: reads the shared feature; calibrated on random speech sequences so that the stop logit sits
        # `stop_bias` below the log-sum-exp of the speech logits (per-step stop probability ~ exp(-stop_bias))
        probe = torch.randint(ats, ate + 1, (4, 64))
        x = model.model(input_ids=probe).last_hidden_state  # final-normed hidden states
        speech_lse = torch.logsumexp(x @ head[ats : ate + 1].T, dim=-1).mean()
        head[stop, 0] = float(speech_lse - stop_bias) / float(x[..., 0].mean())
    llm_dir = directory / LLM_DIR
    model.save_pretrained(str(llm_dir), safe_serialization=True)
    return directory
