"""IndexTTS2's speech-conditioning modules (policies/indextts2_conditioning.py) against the public index-tts code.

The public `ConformerEncoder` and `PerceiverResampler` are imported from a local git mirror of index-tts/index-tts
(files extracted into a temporary `indextts` package; torchaudio is stubbed only while importing), built on random
weights drawn at a scale where the nonlinearities matter, and their state dicts loaded into ours with strict=True.
Outputs are compared in float32 on a padded batch of two different lengths, including the padded frames.
Skipped when the mirror is absent (CI has none).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import INDEXTTS_MIRROR
from torch import nn

from policies.indextts2_conditioning import ConformerEncoder, PerceiverResampler

if not INDEXTTS_MIRROR.is_dir():
    pytest.skip(
        f"no index-tts git mirror at {INDEXTTS_MIRROR} (these tests compare with the public code)",
        allow_module_level=True,
    )

PUBLIC_FILES = (
    "indextts/gpt/conformer_encoder.py",
    "indextts/gpt/conformer/attention.py",
    "indextts/gpt/conformer/embedding.py",
    "indextts/gpt/conformer/subsampling.py",
    "indextts/gpt/perceiver.py",
    "indextts/utils/common.py",
)
PACKAGES = ("indextts", "indextts/gpt", "indextts/gpt/conformer", "indextts/utils")
FEAT = 1024  # UnifiedVoice's conditioning input size (w2v-bert hidden states)
TOL = 1e-5

# UnifiedVoice's condition_module / emo_condition_module, shrunk (released: 512 / 2048|1024 / 8|4 / 6|4, conv2d2, 2)
SPEAKER = dict(output_size=64, linear_units=128, attention_heads=4, num_blocks=2, input_layer="conv2d2")
EMOTION = dict(output_size=64, linear_units=96, attention_heads=4, num_blocks=2, input_layer="conv2d2")
MODEL_DIM, PERCEIVER_MULT, NUM_LATENTS = 64, 2, 32


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """(ConformerEncoder, PerceiverResampler) of the public code; its modules are removed from sys.modules after."""
    from conftest import indextts_sources

    root = tmp_path_factory.mktemp("indextts_public")
    with indextts_sources(root, PUBLIC_FILES, PACKAGES, {"torchaudio": types.ModuleType("torchaudio")}):
        conformer = importlib.import_module("indextts.gpt.conformer_encoder")
        perceiver = importlib.import_module("indextts.gpt.perceiver")
        yield conformer.ConformerEncoder, perceiver.PerceiverResampler


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter at an order-one activation scale (default inits leave GELU/softmax nearly linear),
    and round the sinusoid tables through bfloat16 as the released gpt.pth has them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:  # norm weights / RMSNorm gamma
                p.copy_(1.0 + 0.3 * noise)
        for name, b in module.named_buffers():
            if name.endswith("pos_enc.pe"):
                b.copy_(b.bfloat16().float())
    return module.eval()


def _load_strict(ours: nn.Module, ref: nn.Module) -> None:
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    ours.eval()


def _inputs(batch_lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded features [B, T, 1024] (zeros past each length, as a padded batch would be) and lengths [B]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(batch_lengths)
    xs = torch.randn(len(batch_lengths), int(lengths.max()), FEAT, generator=gen)
    xs = xs * (torch.arange(xs.size(1))[None, :, None] < lengths[:, None, None])
    return xs, lengths


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(SPEAKER, id="speaker-conv2d2-rel_pos"),
        pytest.param(EMOTION, id="emotion-conv2d2-rel_pos"),
        pytest.param({**SPEAKER, "input_layer": "conv2d"}, id="conv2d"),
        pytest.param({**SPEAKER, "input_layer": "linear"}, id="linear"),
        pytest.param({**SPEAKER, "pos_enc_layer_type": "abs_pos"}, id="abs_pos"),
        pytest.param({**SPEAKER, "macaron_style": True, "use_cnn_module": False}, id="macaron-no_cnn"),
    ],
)
def test_conformer_matches_public(public, config):
    torch.manual_seed(0)
    pub_cls, _ = public
    ref = _randomize(pub_cls(input_size=FEAT, **config), seed=1)
    ours = ConformerEncoder(input_size=FEAT, **config)
    _load_strict(ours, ref)
    xs, lengths = _inputs((41, 24), seed=2)
    with torch.no_grad():
        ref_out, ref_mask = ref(xs, lengths)
        out, mask = ours(xs, lengths)
    assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    assert not bool(mask[1].all()) and bool(mask[0].all())  # the shorter item is really padded
    diff = _max_diff(out, ref_out)
    print(f"conformer {config}: max |diff| {diff:.3g}")
    assert diff < TOL


@pytest.mark.parametrize(
    "dim, num_latents",
    [pytest.param(MODEL_DIM, NUM_LATENTS, id="speaker"), pytest.param(1024, 1, id="emotion")],
)
def test_perceiver_matches_public(public, dim, num_latents):
    torch.manual_seed(0)
    _, pub_cls = public
    kwargs = dict(dim_context=EMOTION["output_size"], ff_mult=PERCEIVER_MULT, heads=4, num_latents=num_latents)
    ref = _randomize(pub_cls(dim, **kwargs), seed=3)
    ours = PerceiverResampler(dim, **kwargs)
    _load_strict(ours, ref)
    gen = torch.Generator().manual_seed(4)
    context = torch.randn(2, 19, EMOTION["output_size"], generator=gen)
    mask = F.pad(torch.arange(19)[None, :] < torch.tensor([[19], [11]]), (num_latents, 0), value=True)
    with torch.no_grad():
        for m in (mask, None):
            diff = _max_diff(ours(context, m), ref(context, m))
            print(f"perceiver dim {dim} latents {num_latents} mask {m is not None}: max |diff| {diff:.3g}")
            assert diff < TOL
        # the mask matters: the padded frames of item 1 must not leak into its latents
        assert _max_diff(ours(context, mask)[1], ours(context, None)[1]) > 1e-3


def _public_conditioning(encoder: nn.Module, perceiver: nn.Module, num_latents: int, feats, lengths):
    """UnifiedVoice.get_conditioning / get_emo_conditioning (conformer_perceiver), as model_v2.py writes them."""
    hidden, mask = encoder(feats.transpose(1, 2), lengths)
    return perceiver(hidden, nn.ConstantPad1d((num_latents, 0), True)(mask.squeeze(1)))


def _our_conditioning(encoder: ConformerEncoder, perceiver: PerceiverResampler, num_latents: int, feats, lengths):
    hidden, mask = encoder(feats.transpose(1, 2), lengths)
    return perceiver(hidden, F.pad(mask.squeeze(1), (num_latents, 0), value=True))


@pytest.mark.parametrize(
    "config, dim, num_latents",
    [
        pytest.param(SPEAKER, MODEL_DIM, NUM_LATENTS, id="get_conditioning"),
        pytest.param(EMOTION, 1024, 1, id="get_emo_conditioning"),
    ],
)
@pytest.mark.parametrize(
    "batch_lengths, given_lengths",
    [
        pytest.param((41, 24), None, id="padded"),
        pytest.param((41, 2), None, id="all-padded-after-subsampling"),  # conv2d2 leaves item 1 no valid frame
        pytest.param((41,), (FEAT,), id="infer_v2-lengths"),  # infer_v2 passes the feature dim as the length
    ],
)
def test_conditioning_pipeline_matches_public(public, config, dim, num_latents, batch_lengths, given_lengths):
    torch.manual_seed(0)
    pub_enc_cls, pub_perc_cls = public
    perc_kwargs = dict(
        dim_context=config["output_size"],
        ff_mult=PERCEIVER_MULT,
        heads=config["attention_heads"],
        num_latents=num_latents,
    )
    ref_enc = _randomize(pub_enc_cls(input_size=FEAT, **config), seed=5)
    ref_perc = _randomize(pub_perc_cls(dim, **perc_kwargs), seed=6)
    ours_enc, ours_perc = ConformerEncoder(input_size=FEAT, **config), PerceiverResampler(dim, **perc_kwargs)
    _load_strict(ours_enc, ref_enc)
    _load_strict(ours_perc, ref_perc)
    xs, lengths = _inputs(batch_lengths, seed=7)
    if given_lengths is not None:
        lengths = torch.tensor(given_lengths)
    feats = xs.transpose(1, 2)  # [B, 1024, T] as UnifiedVoice receives them
    with torch.no_grad():
        ref = _public_conditioning(ref_enc, ref_perc, num_latents, feats, lengths)
        out = _our_conditioning(ours_enc, ours_perc, num_latents, feats, lengths)
    assert out.shape == (len(batch_lengths), num_latents, dim)
    assert torch.isfinite(out).all()
    diff = _max_diff(out, ref)
    print(f"pipeline dim {dim} lengths {batch_lengths} given {given_lengths}: max |diff| {diff:.3g}")
    assert diff < TOL


def test_strict_load_fails_loudly(public):
    pub_enc_cls, pub_perc_cls = public
    enc_sd = pub_enc_cls(input_size=FEAT, **SPEAKER).state_dict()
    perc_sd = pub_perc_cls(1024, dim_context=64, ff_mult=2, heads=4, num_latents=1).state_dict()
    ours_enc = ConformerEncoder(input_size=FEAT, **SPEAKER)
    ours_perc = PerceiverResampler(1024, dim_context=64, ff_mult=2, heads=4, num_latents=1)

    missing = dict(enc_sd)
    missing.pop("encoders.1.self_attn.pos_bias_u")
    with pytest.raises(RuntimeError, match="Missing key"):
        ours_enc.load_state_dict(missing, strict=True)

    renamed = dict(enc_sd)
    renamed["encoders.0.conv_module.batch_norm.weight"] = renamed.pop("encoders.0.conv_module.norm.weight")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ours_enc.load_state_dict(renamed, strict=True)

    no_pe = {k: v for k, v in enc_sd.items() if k != "embed.pos_enc.pe"}  # the table is part of the checkpoint
    with pytest.raises(RuntimeError, match="Missing key"):
        ours_enc.load_state_dict(no_pe, strict=True)

    with pytest.raises(RuntimeError, match="size mismatch"):  # another heads count changes the perceiver's shapes
        PerceiverResampler(1024, dim_context=64, ff_mult=2, heads=8, num_latents=1).load_state_dict(perc_sd)

    with pytest.raises(RuntimeError, match="size mismatch"):  # conv2d (1/4) vs the checkpoint's conv2d2 (1/2)
        ConformerEncoder(input_size=FEAT, **{**SPEAKER, "input_layer": "conv2d"}).load_state_dict(enc_sd)

    ours_perc.load_state_dict(perc_sd, strict=True)  # and the matching one loads
