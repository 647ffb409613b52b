"""The error of vocoding with the flow under bf16 autocast (`vocoder.dtype: bfloat16`) against float32 (upstream).

    python bench/vocode_bf16.py --device cuda               # tiny random flow + HiFT
    python bench/vocode_bf16.py --device cuda --size mid

Same rollouts, same seeds, both ways: the largest and the mean absolute mel difference (log-mel units) and
waveform difference, with the float32 output's scale next to them. bf16 autocast exists only on the GPU path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vocode import MANIFEST, write_mid
from rollouts.manifest import read_manifest
from rollouts.tiny_vocoder import write_tiny_vocoder
from rollouts.token2wav import Token2Wav, VoicePrompt


def mels(t2w: Token2Wav, codes, prompts, seeds, amp: bool) -> list[np.ndarray]:
    tokens = [torch.from_numpy(np.concatenate([p.tokens.astype(np.int64), c])) for c, p in zip(codes, prompts)]
    feats = [torch.from_numpy(np.asarray(p.feat, dtype=np.float32)) for p in prompts]
    emb = torch.from_numpy(np.stack([np.asarray(p.embedding, dtype=np.float32) for p in prompts])).to(t2w.device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad(), torch.autocast(device_type=t2w.device.type, dtype=torch.bfloat16, enabled=amp):
        out = t2w.flow.sample(tokens, feats, emb, gens, n_timesteps=t2w.n_timesteps)
    return [m.float().cpu().numpy() for m in out]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--n-timesteps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        write_mid(ckpt) if args.size == "mid" else write_tiny_vocoder(ckpt)
        fp32 = Token2Wav.from_pretrained(ckpt, device=args.device, n_timesteps=args.n_timesteps)
        bf16 = Token2Wav.from_pretrained(ckpt, device=args.device, n_timesteps=args.n_timesteps, dtype="bfloat16")
    records = read_manifest(MANIFEST)
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 32768, int(rng.integers(50, 151))) for _ in range(args.rows)]
    prompts = [VoicePrompt(r.prompt_speech_tokens, r.prompt_feat, r.embedding) for r in records[: args.rows]]
    seeds = list(range(args.rows))
    m32, m16 = mels(fp32, codes, prompts, seeds, False), mels(fp32, codes, prompts, seeds, True)
    w32, w16 = fp32(codes, prompts, seeds).audio, bf16(codes, prompts, seeds).audio
    res = {
        "amp_on": bf16.amp,
        "mel_max": max(float(np.abs(a - b).max()) for a, b in zip(m32, m16)),
        "mel_mean": float(np.mean([np.abs(a - b).mean() for a, b in zip(m32, m16)])),
        "mel_scale": float(np.mean([np.abs(a).mean() for a in m32])),
        "wav_max": max(float(np.abs(a - b).max()) for a, b in zip(w32, w16)),
        "wav_mean": float(np.mean([np.abs(a - b).mean() for a, b in zip(w32, w16)])),
        "wav_scale": float(np.mean([np.abs(a).mean() for a in w32])),
    }
    print(
        f"bf16 autocast vs float32, {args.size} on {args.device}, {args.rows} rollouts (autocast on: {res['amp_on']})"
    )
    print(f"  mel |diff| max {res['mel_max']:.3e} mean {res['mel_mean']:.3e} (mean |mel| {res['mel_scale']:.3f})")
    print(f"  wav |diff| max {res['wav_max']:.3e} mean {res['wav_mean']:.3e} (mean |wav| {res['wav_scale']:.3e})")
    return res


if __name__ == "__main__":
    main()
