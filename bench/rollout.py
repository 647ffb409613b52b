"""Group rollout: our batched KV-cache sampler vs a per-sample loop vs transformers' `generate`, side by side.

    python bench/rollout.py                  # the tiny speech LM (the embedded default's sizes)
    python bench/rollout.py --size mid       # a ~110 M-parameter random Llama (768 x 12) in the same layout
    python bench/rollout.py --device cuda --dtype bfloat16 --compiled --bandwidth-gbs 4800   # on an H200

Random-weight GLM-TTS speech LMs in the upstream layout (policies/tiny.py), written to a temporary directory and
loaded with GLMTTSPolicy.from_pretrained. `--prompts` shipped prompts (text + voice-prompt codes) x `--group`
samples each, every row restricted to the speech tokens + stop, temperature / top-k / top-p as given. Three ways:

  batched     GLMTTSPolicy.sample_groups: all B x G rows in one left-padded batch with a KV cache (each prompt
              prefilled once, its cache repeated for the G rows of its group), logits of the speech + stop rows of
              the LM head only, behaviour log-probs recorded on the fly
  compiled    (--compiled) the batched sampler with decode="compiled": a static KV cache and torch.compile of
              the decode step (CUDA graphs on GPU); compiled during the warm-up, which is not timed
  per-sample  the same sampler, one row at a time (B x G calls of sample_groups with one row)
  generate    LlamaForCausalLM.generate on the same left-padded batch, a LogitsProcessor restricting to speech +
              stop, the same temperature / top-k / top-p, output_scores=True, and the behaviour log-probs of the
              sampled tokens computed from the processed scores (what GRPO needs, so the work is comparable)

Equal work: every row generates exactly `--new-tokens` tokens. The stop token is masked for the whole length
(ours: min = max length; generate: min_new_tokens = max_new_tokens), so no row ends early and tokens/s compare
the same number of decode steps over the same batch. RAS is off (generate has no RAS).
The variants alternate `--repeats` times; figures are medians, ratios are medians of per-repeat ratios.
With --bandwidth-gbs B (the device's memory bandwidth), the batched and compiled rows also print the fraction of
the memory-bandwidth bound reached: a decode step must read every weight once and each row's KV cache, so it takes
at least (weight bytes + KV bytes at the mean context length) / B; rows / that is the bound in tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.glmtts import GLMTTSPolicy  # noqa: E402
from policies.sampling import SamplingParams  # noqa: E402
from policies.tiny import write_tiny_checkpoint  # noqa: E402
from rollouts.manifest import read_manifest  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny" / "manifest.jsonl"
SIZES = {
    "tiny": {},  # policies/tiny.py defaults: hidden 64, 2 layers
    "mid": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4},
}


def write_checkpoint(directory: Path, size: str, records) -> Path:
    texts = [t for r in records for t in (r.prompt_text, r.target_text)]
    return write_tiny_checkpoint(directory, texts, seed=0, **SIZES[size])


class SpeechOnly:
    """LogitsProcessor: every id outside the speech tokens and the stop token gets -inf."""

    def __init__(self, vocab: int, ats: int, ate: int, stop: int, device):
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        allowed[ats : ate + 1] = True
        allowed[stop] = True
        self.blocked = ~allowed

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.blocked, float("-inf"))


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(policy: GLMTTSPolicy, prompts, group: int, params: SamplingParams, new_tokens: int, processor):
    """model.generate on the same rows; returns (tokens [N, L], behaviour log-probs [N, L])."""
    from transformers import LogitsProcessorList

    s = policy.special
    ids, mask = left_pad([p.ids for p in prompts for _ in range(group)], s.pad, policy.device)
    with torch.no_grad():
        out = policy.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k or None,
            top_p=params.top_p,
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([processor]),
            eos_token_id=s.eoa,
            pad_token_id=s.pad,
            bos_token_id=None,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[:, ids.shape[1] :]
        # processed scores (restricted, scaled, truncated): log-softmax at the sampled token = log q(y), as ours
        logp = torch.stack(
            [
                torch.log_softmax(sc.float(), -1).gather(1, tokens[:, t : t + 1]).squeeze(1)
                for t, sc in enumerate(out.scores)
            ],
            dim=1,
        )
    return tokens, logp


def run(args) -> dict:
    records = read_manifest(MANIFEST)[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt", args.size, read_manifest(MANIFEST))
        policy = GLMTTSPolicy.from_pretrained(ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in policy.model.parameters())
    policy.model.eval()
    prompts = [policy.prompt_input(r) for r in records]
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    s = policy.special
    processor = SpeechOnly(policy.model.config.vocab_size, s.ats, s.ate, s.eoa, policy.device)
    n_rows, length = len(prompts) * args.group, args.new_tokens
    big = 1e9  # min = max length: stop masked throughout, every row generates exactly `length` tokens

    def batched(seed=0, decode="dynamic"):
        ro = policy.sample_groups(
            prompts,
            args.group,
            params,
            group_ids=list(range(len(prompts))),
            seed=seed,
            min_ratio=big,
            max_ratio=big,
            max_new_tokens=length,
            decode=decode,
        )
        assert ro.tokens.shape == (n_rows, length) and bool(ro.token_mask.all())
        return ro

    def compiled(seed=0):
        return batched(seed, decode="compiled")

    def per_sample(seed=0):
        out = []
        for i, p in enumerate(prompts):
            for j in range(args.group):
                ro = policy.sample_groups(
                    [p],
                    1,
                    params,
                    group_ids=[i * args.group + j],
                    seed=seed,
                    min_ratio=big,
                    max_ratio=big,
                    max_new_tokens=length,
                )
                assert ro.tokens.shape == (1, length)
                out.append(ro)
        return out

    def generate(seed=0):
        torch.manual_seed(seed)
        tokens, logp = hf_generate(policy, prompts, args.group, params, length, processor)
        assert tokens.shape == (n_rows, length) and bool(((tokens >= s.ats) & (tokens <= s.ate)).all())
        return tokens, logp

    def sync():
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    variants = {
        "batched": batched,
        **({"compiled": compiled} if args.compiled else {}),
        "per-sample": per_sample,
        "generate": generate,
    }
    for fn in variants.values():  # warm-up
        fn(seed=10_000)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn(seed=rep)
            sync()
            times[name].append(time.perf_counter() - t0)
    tokens = n_rows * length
    ratios = {k: statistics.median(t / b for t, b in zip(times[k], times["batched"])) for k in variants}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"group rollout, {args.size} ({n_params / 1e6:.1f} M params, vocab {policy.model.config.vocab_size}) on "
        f"{args.device} ({torch.get_num_threads()} threads): {len(prompts)} prompts x {args.group} = {n_rows} rows, "
        f"T={args.temperature} top-k={args.top_k} top-p={args.top_p}, no RAS"
    )
    print(
        f"  equal lengths: stop masked for the whole length, every row generates exactly {length} tokens "
        f"({tokens} tokens per rollout)"
    )
    for k in variants:
        print(
            f"  {k:<11} {med[k]:8.3f} s  {tokens / med[k]:9.1f} tokens/s   batched speed-up over it: {ratios[k]:.2f}x"
        )
    print(f"  (median of {args.repeats} alternating repeats; ratios are medians of per-repeat ratios)")
    bound = None
    if args.bandwidth_gbs:
        cfg = policy.model.config
        elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
        weight_bytes = n_params * elem
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        context = statistics.mean(len(p.ids) for p in prompts) + length / 2
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem * context * n_rows
        bound = n_rows * args.bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes)
        print(
            f"  memory-bandwidth bound at {args.bandwidth_gbs:g} GB/s: {bound:.0f} tokens/s "
            f"(weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.3f} GB per step)"
        )
        for k in ("batched", "compiled"):
            if k in med:
                print(f"  {k}: {tokens / med[k] / bound:.1%} of the bound (prefill included)")
    return {"seconds": med, "ratios": ratios, "tokens": tokens, "bound_tokens_s": bound}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--prompts", type=int, default=4, help="B: prompts per rollout")
    ap.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default: tiny 100, mid 50)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=25)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the LM's weights")
    ap.add_argument("--compiled", action="store_true", help="also time decode='compiled' (torch.compile)")
    ap.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=0.0,
        help="the device's memory bandwidth in GB/s: report the fraction of the decode bound reached",
    )
    args = ap.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 100 if args.size == "tiny" else 50
    return run(args)


if __name__ == "__main__":
    main()
