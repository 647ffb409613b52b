"""VoxCPM2 group rollout: our batched sampler (all rows of all groups in one batch, KV caches for both LMs) vs the
released batch-1 generation loop of the `voxcpm` package, on the same random model, side by side.

    python bench/voxcpm_rollout.py                     # tiny (the test checkpoint's sizes)
    python bench/voxcpm_rollout.py --size mid          # LM 512 x 8, residual LM 4 layers, LocEnc/LocDiT 256 x 4
    python bench/voxcpm_rollout.py --size mid --device cuda --dtype bfloat16 --prompts 8 --group 8

A random checkpoint in the released layout (policies/voxcpm_io.write_tiny_voxcpm) is loaded by both sides: ours
with load_voxcpm, the released one with VoxCPM2Model.from_local. `--prompts` texts x `--group` rows, each exactly
`--patches` patches long (stop disabled on both sides: min_len = max_len), 10 LocDiT steps with CFG 2.0:

  released   VoxCPM2Model.inference (ODE, argmax stop), one call per row, B x G calls
  ours-ode   sample_groups(stochastic=False): the released evaluation sampler, batched
  ours-sde   sample_groups: Flow-GRPO SDE on steps 1..9 and a sampled stop, recording every action's log-prob

AudioVAE decoding is excluded (the same work either way). Variants alternate `--repeats` times after one warm-up;
figures are medians and ratios medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import alternate, parse, rollout_args
from policies.voxcpm_io import load_voxcpm, write_tiny_voxcpm
from policies.voxcpm_rollout import build_prompt, sample_groups

SIZES = {
    "tiny": {},
    "mid": {
        "hidden": 512,
        "layers": 8,
        "residual_layers": 4,
        "local_hidden": 256,
        "local_layers": 4,
        "feat_dim": 64,
        "head_dim": 64,
    },
}
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "good morning, how are you today",
    "你好世界，今天天气很好",
    "one two three four five six seven",
    "a short one",
    "speech synthesis with continuous tokens",
    "reinforcement learning for text to speech",
    "the end of the list of prompts",
]


def _released_class():
    """The package's VoxCPM2Model; torchaudio (imported by the package, unused here) is a stub during the import."""
    added = "torchaudio" not in sys.modules
    if added:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    try:
        import voxcpm.model.voxcpm2 as released_module
    finally:
        if added:
            sys.modules.pop("torchaudio", None)
    released_module.tqdm = lambda it, *a, **k: it  # its per-patch progress bar: console noise only
    return released_module.VoxCPM2Model


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    released_cls = _released_class()
    with tempfile.TemporaryDirectory() as tmp:
        d = write_tiny_voxcpm(Path(tmp) / "ckpt", TEXTS, seed=0, dtype=args.dtype, **SIZES[args.size])
        ours, tok = load_voxcpm(d, device=args.device)
        ref = released_cls.from_local(str(d), optimize=False, device=args.device)
    n_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("audio_vae."))
    cfg = ours.cfg
    prompts = [build_prompt(tok, TEXTS[i % len(TEXTS)], cfg.patch_size, cfg.feat_dim) for i in range(args.prompts)]
    rows, length = args.prompts * args.group, args.patches

    def released() -> None:
        for p in prompts:
            inp = (
                p.tokens[None].to(args.device),
                p.text_mask[None].int().to(args.device),
                p.feats[None].to(args.device, ref._dtype()),
                p.feat_mask[None].int().to(args.device),
            )
            for _ in range(args.group):
                ref.inference(*inp, min_len=length, max_len=length)

    def ours_ode() -> None:
        sample_groups(ours, prompts, args.group, 0, stochastic=False, min_len=length, max_len=length)

    def ours_sde() -> None:
        ro = sample_groups(ours, prompts, args.group, 0, min_len=length, max_len=length)
        assert int(ro.lengths.min()) == length

    fns = {"released": released, "ours-ode": ours_ode, "ours-sde": ours_sde}
    med, ratios = alternate(fns, args.repeats, args.device, "released")
    patches = rows * length
    print(
        f"VoxCPM2 group rollout, {args.size} ({n_params / 1e6:.2f} M params without the VAE) on {args.device} "
        f"{args.dtype}, {args.prompts} prompts x {args.group} rows x {length} patches, 10 steps, CFG 2.0"
    )
    for k in fns:
        print(f"  {k:<9} {med[k]:8.3f} s  {patches / med[k]:9.1f} patches/s   speed-up over released: {ratios[k]:.2f}x")
    cmd = " ".join(["python bench/voxcpm_rollout.py", *(argv if argv is not None else sys.argv[1:])])
    print(
        f"| {args.size} ({n_params / 1e6:.2f} M) | {args.device} {args.dtype} | {args.prompts}x{args.group} rows x "
        f"{length} patches | released {med['released']:.3f} s | ours-ode {ratios['ours-ode']:.2f}x | ours-sde "
        f"{ratios['ours-sde']:.2f}x | median of {args.repeats} | `{cmd}` |"
    )
    return {"seconds": med, "ratios": ratios, "patches": patches}


def main(argv: list[str] | None = None) -> dict:
    ap = rollout_args(__doc__ or "", list(SIZES))
    ap.add_argument("--patches", type=int, default=24, help="patches per row (stop disabled)")
    return run(parse(ap, argv), argv)


if __name__ == "__main__":
    main()
