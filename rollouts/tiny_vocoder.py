"""A tiny random flow + HiFT in exactly the upstream layout (flow/config.yaml, flow/flow.pt, hift/hift.pt), loaded
by the same `Token2Wav.from_pretrained` users point at a real GLM-TTS checkpoint.

The flow config uses upstream's Flow arguments (25 Hz tokens, 50 Hz mel, AdaLN speaker conditioning, no token
CFG) plus small DiT sizes; HiFT keeps upstream's architecture (480 samples per mel frame) with narrow channels,
so CPU runs stay fast. The F0 predictor's output bias is set near 150 Hz so the source is voiced.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rollouts.flow import FlowModel
from rollouts.hift import HiFTGenerator

TINY_FLOW = {
    "spkr_emb_adaLN": True,
    "speech_token_cfg": False,
    "remove_spkr_concat_condition": True,
    "mel_dim": 80,
    "mel_framerate": 50,
    "input_frame_rate": 25,
    "vocab_size": 32768,
    "speech_token_dim": 32,
    "trans_dim": 64,
    "depth": 2,
    "heads": 2,
    "dim_head": 32,
    "conv_layers": 1,
}


# weight-norm gains (original0) of a tiny HiFT whose level and spectrum follow its mel (`mel_sensitive`): with the
# default init the random vocoder's output is its f0 source alone, the same whatever the mel, which a flow policy
# (policies/glmtts_flow.py) could never be rewarded through
MEL_SENSITIVE_GAINS = {"conv_pre": 1.0, "ups": 1.0, "resblocks": 1.0, "conv_post": 0.1}


def write_tiny_vocoder(
    ckpt_dir: str | Path, *, seed: int = 0, hift_channels: int = 16, mel_sensitive: bool = False
) -> Path:
    ckpt_dir = Path(ckpt_dir)
    torch.manual_seed(seed)
    flow = FlowModel(**TINY_FLOW)
    with torch.no_grad():
        for p in flow.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    (ckpt_dir / "flow").mkdir(parents=True, exist_ok=True)
    lines = ["flow: !new:flow.flow.Flow"] + [f"    {k}: {v}" for k, v in TINY_FLOW.items()]
    (ckpt_dir / "flow" / "config.yaml").write_text("\n".join(lines) + "\n")
    torch.save(flow.state_dict(), ckpt_dir / "flow" / "flow.pt")

    hift = HiFTGenerator(base_channels=hift_channels, cond_channels=hift_channels)
    with torch.no_grad():
        for name, p in hift.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
            elif p.dim() > 1:
                p.normal_(0.0, 0.1)
        if mel_sensitive:
            for name, p in hift.named_parameters():
                if name.endswith("original0") and name.split(".")[0] in MEL_SENSITIVE_GAINS:
                    p.fill_(MEL_SENSITIVE_GAINS[name.split(".")[0]])
        hift.f0_predictor.classifier.weight.normal_(0.0, 0.01)
        hift.f0_predictor.classifier.bias.fill_(150.0)
    (ckpt_dir / "hift").mkdir(parents=True, exist_ok=True)
    torch.save(hift.state_dict(), ckpt_dir / "hift" / "hift.pt")
    return ckpt_dir
