"""IndexTTS2 group rollout: the policy's batched KV-cache sampler (every row of every group in one batch) vs the same
sampler one row at a time (the released inference generates one sequence per call: autoregressive_batch_size 1),
and the teacher-forced pass that re-scores the batch, side by side on the same random GPT.

    python bench/indextts2_rollout.py                  # tiny (the test checkpoint's GPT)
    python bench/indextts2_rollout.py --size mid       # 512 wide, 8 layers, 8 heads
    python bench/indextts2_rollout.py --size released --device cuda --prompts 8 --group 8

A random GPT in the released layout (policies/indextts2_io.write_tiny_gpt) with the real 8194-code head, every row
exactly `--codes` codes long (the stop code's logit pushed down so no row stops), the released sampling distribution
(repetition penalty 10, temperature 0.8, top-k 30, top-p 0.8); random conditioning and text ids (their cost is
per prompt, not per code). Decoding to audio is excluded. Variants alternate `--repeats` times after one warm-up;
figures are medians and ratios medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import alternate, parse, rollout_args
from policies.indextts2_io import load_gpt, write_tiny_gpt
from policies.indextts2_sampling import Sampling, sample_rows, teacher_forced_logprobs
from policies.sampling import row_keys

SIZES = {
    "tiny": {},
    "mid": {"model_dim": 512, "layers": 8, "heads": 8},
    "released": {"model_dim": 1280, "layers": 24, "heads": 20},
}


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = write_tiny_gpt(Path(tmp) / "ckpt", seed=0, stop_bias=-1e4, **SIZES[args.size])
        model, _ = load_gpt(d, device=args.device)
    model = model.to(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    n_params = sum(p.numel() for p in model.gpt.parameters()) + model.mel_head.weight.numel()
    g = torch.Generator().manual_seed(0)
    n, length, dim = args.prompts * args.group, args.codes, model.cfg.model_dim
    cond = (0.1 * torch.randn(args.prompts, 34, dim, generator=g)).repeat_interleave(args.group, 0)
    cond = cond.to(args.device, model.mel_head.weight.dtype)
    texts = [torch.randint(2, model.cfg.number_text_tokens, (args.text,), generator=g).tolist()] * n
    groups = torch.arange(args.prompts).repeat_interleave(args.group)
    keys = row_keys(0, groups, torch.arange(args.group).repeat(args.prompts))
    caps = torch.full((n,), length)
    s = Sampling()
    out: dict = {}

    def batched() -> None:
        out["ro"] = sample_rows(model, cond, texts, s, keys, caps)
        assert int(out["ro"].lengths.min()) == length

    def one_by_one() -> None:
        for i in range(n):
            sample_rows(model, cond[i : i + 1], texts[i : i + 1], s, keys[i : i + 1], caps[i : i + 1])

    def teacher_forced() -> None:
        ro = out["ro"]
        teacher_forced_logprobs(model, cond, texts, ro.codes, ro.mask, s)

    fns = {"one-by-one": one_by_one, "batched": batched, "teacher-forced": teacher_forced}
    med, ratios = alternate(fns, args.repeats, args.device, "one-by-one")
    codes = n * length
    print(
        f"IndexTTS2 group rollout, {args.size} GPT ({n_params / 1e6:.2f} M params in the core and head) on "
        f"{args.device} {args.dtype}, {args.prompts} prompts x {args.group} rows x {length} codes"
    )
    for k in fns:
        print(f"  {k:<15} {med[k]:8.3f} s  {codes / med[k]:9.1f} codes/s   one-by-one / this: {ratios[k]:.2f}x")
    cmd = " ".join(["python bench/indextts2_rollout.py", *(argv if argv is not None else sys.argv[1:])])
    print(
        f"| {args.size} ({n_params / 1e6:.2f} M) | {args.device} {args.dtype} | {args.prompts}x{args.group} rows x "
        f"{length} codes | one-by-one {med['one-by-one']:.3f} s | batched {ratios['batched']:.2f}x | teacher-forced "
        f"{ratios['teacher-forced']:.2f}x | median of {args.repeats} | `{cmd}` |"
    )
    return {"seconds": med, "ratios": ratios, "codes": codes}


def main(argv: list[str] | None = None) -> dict:
    ap = rollout_args(__doc__ or "", list(SIZES))
    ap.add_argument("--codes", type=int, default=100, help="codes per row (the stop code is never drawn)")
    ap.add_argument("--text", type=int, default=20, help="text tokens per prompt")
    return run(parse(ap, argv), argv)


if __name__ == "__main__":
    main()
