"""IndexTTS2's s2mel stage (policies/indextts2_s2mel.py): the config read strictly, the released file format, and
equality with the public index-tts code (`MyModel(cfg.s2mel, use_gpt_latent=True)`, loaded by its own
`load_checkpoint2`) on random weights: gpt_layer, length_regulator and the flow's sampler given the same noise.

The public code is read from a git mirror of index-tts/index-tts (not installable from a package index); without the
mirror the comparisons skip and the self-contained checks still run."""

from __future__ import annotations

import copy
import importlib
import types
from pathlib import Path

import pytest
import torch

from policies.indextts2_s2mel import (
    TINY_S2MEL,
    S2Mel,
    S2MelConfigError,
    load_s2mel,
    s2mel_config,
    save_s2mel,
    write_tiny_s2mel,
)
from rollouts.token2wav import VocoderCheckpointError

PUBLIC_FILES = [
    "indextts/s2mel/modules/commons.py",
    "indextts/s2mel/modules/flow_matching.py",
    "indextts/s2mel/modules/diffusion_transformer.py",
    "indextts/s2mel/modules/gpt_fast/model.py",
    "indextts/s2mel/modules/wavenet.py",
    "indextts/s2mel/modules/encodec.py",
    "indextts/s2mel/modules/length_regulator.py",
    "indextts/s2mel/dac/nn/quantize.py",
    "indextts/s2mel/dac/nn/layers.py",
]
PACKAGES = ["indextts", "indextts/s2mel", "indextts/s2mel/modules", "indextts/s2mel/modules/gpt_fast"]
PACKAGES += ["indextts/s2mel/dac", "indextts/s2mel/dac/nn"]  # empty: the real dac/__init__ imports audiotools


def _variant(**changes: dict | None) -> dict:
    section = copy.deepcopy(TINY_S2MEL)
    for name, values in changes.items():
        if values is None:
            del section[name]
        else:
            section[name].update(values)
    return section


RELEASED_S2MEL = {  # the s2mel section of IndexTTS-2's released config.yaml
    "preprocess_params": {
        "sr": 22050,
        "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80, "fmin": 0, "fmax": "None"},
    },
    "dit_type": "DiT",
    "reg_loss_type": "l1",
    "style_encoder": {"dim": 192},
    "length_regulator": {
        **TINY_S2MEL["length_regulator"],
        "channels": 512,
        "in_channels": 1024,
        "content_codebook_size": 2048,
        "sampling_ratios": [1, 1, 1, 1],
        "n_f0_bins": 512,
    },
    "DiT": {
        **TINY_S2MEL["DiT"],
        "hidden_dim": 512,
        "num_heads": 8,
        "depth": 13,
        "content_dim": 512,
        "content_codebook_size": 1024,
        "n_f0_bins": 512,
    },
    "wavenet": {**TINY_S2MEL["wavenet"], "hidden_dim": 512, "num_layers": 8},
}
PUBLIC_IN = {"in_channels": 1024}  # the public gpt_layer's output width is hard-coded 1024
VARIANTS = {  # the released switches at tiny widths, and the other switches the implementation has
    "released": _variant(length_regulator=PUBLIC_IN),
    "ablations": _variant(
        length_regulator={**PUBLIC_IN, "sampling_ratios": [1], "n_codebooks": 2, "f0_condition": True},
        DiT={"style_condition": False, "long_skip_connection": False, "uvit_skip_connection": False, "depth": 2},
        wavenet={"style_condition": False, "num_layers": 3, "dilation_rate": 2},
    ),
    "mlp_tail": _variant(length_regulator=PUBLIC_IN, DiT={"final_layer_type": "mlp", "depth": 5}, wavenet=None),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models are op-overhead bound (conftest one_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("s2mel") / "s2mel.pth"
    write_tiny_s2mel(path, seed=0)
    return path, load_s2mel(path, s2mel_config(TINY_S2MEL, "tiny"), gpt_dim=64)


def _inputs(model: S2Mel, prompt: int = 9, target: int = 14, seed: int = 1, rows: int = 1):
    """(cond [rows, Tp + T, C], prompt_mel, style, noise) from regulated random codec embeddings."""
    g = torch.Generator().manual_seed(seed)
    width = model.cfg.regulator.in_channels
    with torch.no_grad():
        p = model.regulate(torch.randn(rows, 5, width, generator=g), torch.full((rows,), prompt))
        c = model.regulate(torch.randn(rows, 8, width, generator=g), torch.full((rows,), target))
    mel = torch.randn(rows, 80, prompt, generator=g)
    style = torch.randn(rows, 192, generator=g)
    noise = torch.randn(rows, 80, prompt + target, generator=g)
    return torch.cat([p, c], dim=1), mel, style, noise


# --------------------------------------------------------------------------------------------------------------------
# self-contained


def test_the_config_is_read_strictly():
    cfg = s2mel_config(TINY_S2MEL, "config.yaml")
    assert cfg.dit.depth == 3 and cfg.regulator.in_channels == 32 and cfg.mel is not None and cfg.mel.fmax is None
    spect = {**TINY_S2MEL["preprocess_params"]["spect_params"], "fmax": 7600}
    bad = {
        "unknown key s2mel.DiT.n_layers": _variant(DiT={"n_layers": 3}),
        "unknown key s2mel.speed": {**TINY_S2MEL, "speed": 1},
        "missing key s2mel.length_regulator.in_channels": _variant(length_regulator={}),
        "s2mel.DiT.depth must be an integer": _variant(DiT={"depth": "3"}),
        "s2mel.DiT.is_causal must be False": _variant(DiT={"is_causal": True}),
        "s2mel.length_regulator.is_discrete must be False": _variant(length_regulator={"is_discrete": True}),
        "s2mel.DiT.final_layer_type must be 'wavenet' or 'mlp'": _variant(DiT={"final_layer_type": "conv"}),
        "s2mel.length_regulator.channels must equal s2mel.DiT.content_dim": _variant(length_regulator={"channels": 48}),
        "missing key s2mel.wavenet": _variant(wavenet=None),
        "s2mel.preprocess_params.spect_params.fmax must be": _variant(preprocess_params={"spect_params": spect}),
    }
    del bad["missing key s2mel.length_regulator.in_channels"]["length_regulator"]["in_channels"]
    for message, section in bad.items():
        with pytest.raises(S2MelConfigError, match="^config.yaml: " + message.replace(".", r"\.")):
            s2mel_config(section, "config.yaml")
    # keys of the released file that inference does not read are accepted; fmax 8000 is the released other case
    s2mel_config(_variant(DiT={"class_dropout_prob": 0.5, "block_size": 1}, wavenet={"p_dropout": 0.0}), "x")
    spect["fmax"] = 8000
    assert s2mel_config(_variant(preprocess_params={"spect_params": spect}), "x").mel.fmax == 8000.0


def test_the_released_section_builds_the_released_shapes():
    """Shapes of s2mel.pth tensors as published by third-party converters of the released file."""
    with torch.device("meta"):
        state = S2Mel(s2mel_config(RELEASED_S2MEL, "config.yaml")).state_dict()
    shapes = {
        "cfm.estimator.transformer.layers.12.attention.wqkv.weight": (1536, 512),
        "cfm.estimator.transformer.layers.12.feed_forward.w2.weight": (512, 1536),
        "cfm.estimator.transformer.layers.12.skip_in_linear.weight": (512, 1024),
        "cfm.estimator.cond_x_merge_linear.weight": (512, 864),
        "cfm.estimator.skip_linear.weight": (512, 592),
        "cfm.estimator.conv2.weight": (80, 512, 1),
        "cfm.estimator.t_embedder2.mlp.0.weight": (512, 256),
        "cfm.estimator.final_layer.linear.weight_g": (512, 1),
        "cfm.estimator.wavenet.cond_layer.conv.conv.weight_v": (8192, 512, 1),
        "cfm.estimator.wavenet.in_layers.7.conv.conv.weight_v": (1024, 512, 5),
        "cfm.estimator.wavenet.res_skip_layers.7.conv.conv.weight_v": (512, 512, 1),
        "cfm.estimator.input_pos": (16384,),
        "cfm.estimator.x_embedder.weight_v": (512, 80),
        "cfm.estimator.cond_embedder.weight": (1024, 512),
        "length_regulator.content_in_proj.weight": (512, 1024),
        "length_regulator.model.12.weight": (512, 512, 1),
        "length_regulator.embedding.weight": (2048, 512),
        "gpt_layer.0.weight": (256, 1280),
        "gpt_layer.2.weight": (1024, 128),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_tiny_file_round_trip(tiny, tmp_path):
    path, model = tiny
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"net"} and set(raw["net"]) == {"cfm", "length_regulator", "gpt_layer"}
    assert "estimator.input_pos" in raw["net"]["cfm"] and "0.weight" in raw["net"]["gpt_layer"]
    assert "estimator.wavenet.in_layers.0.conv.conv.weight_g" in raw["net"]["cfm"]
    assert raw["net"]["gpt_layer"]["0.weight"].shape == (256, 64)
    for name, p in model.named_parameters():  # random, non-trivial weights everywhere
        assert p.std() > 0.01 if p.numel() > 1 else p.abs() > 0, name
    save_s2mel(model, tmp_path / "again.pth")
    again = load_s2mel(tmp_path / "again.pth", model.cfg, gpt_dim=64)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    assert not (tmp_path / "again.pth.partial").exists()


def test_loading_is_strict(tiny, tmp_path):
    path, model = tiny
    raw = torch.load(path, weights_only=True)
    net = raw["net"]
    del net["cfm"]["estimator.skip_linear.bias"]
    net["length_regulator"]["extra.weight"] = torch.zeros(2)
    net["gpt_layer"]["2.weight"] = torch.zeros(32, 64)
    net["emo_layer"] = {"weight": torch.zeros(3)}  # other modules: not read, as by the released loader
    torch.save(raw, tmp_path / "bad.pth")
    with pytest.raises(VocoderCheckpointError) as err:
        load_s2mel(tmp_path / "bad.pth", model.cfg, gpt_dim=64)
    text = str(err.value)
    assert text.startswith(str(tmp_path / "bad.pth"))
    assert "missing keys (1): cfm.estimator.skip_linear.bias" in text
    assert "unexpected keys (1): length_regulator.extra.weight" in text
    assert "gpt_layer.2.weight: checkpoint (32, 64) != model (32, 128)" in text
    # a DDP "module." prefix is dropped and modules inference does not use are ignored (both as released)
    raw = torch.load(path, weights_only=True)
    raw["net"]["cfm"] = {f"module.{k}": v for k, v in raw["net"]["cfm"].items()}
    raw["net"]["emo_layer"], raw["epoch"] = {"weight": torch.zeros(3)}, 3
    torch.save(raw, tmp_path / "ddp.pth")
    load_s2mel(tmp_path / "ddp.pth", model.cfg, gpt_dim=64)
    del raw["net"]["gpt_layer"]
    torch.save(raw, tmp_path / "partial.pth")
    with pytest.raises(VocoderCheckpointError, match="net has no gpt_layer"):
        load_s2mel(tmp_path / "partial.pth", model.cfg, gpt_dim=64)


def test_shapes_determinism_and_prompt_frames(tiny):
    _, model = tiny
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lat = model.gpt_layer(torch.randn(2, 6, 64, generator=g))
        reg = model.regulate(torch.randn(2, 6, 32, generator=g) + lat, torch.tensor([11, 7]))
        assert lat.shape == (2, 6, 32) and reg.shape == (2, 11, 32)
        assert reg[1, 7:].abs().sum() == 0 and reg[1, :7].abs().sum() > 0
        cond, mel, style, noise = _inputs(model)
        kept = noise.clone()
        run = lambda z: model.cfm_inference(cond, mel, style, n_timesteps=4, cfg_rate=0.7, noise=z)  # noqa: E731
        out = run(noise)
        assert out.shape == (1, 80, 14) and out.std() > 0.1 and torch.equal(noise, kept)
        assert torch.equal(run(noise), out)  # deterministic given the noise
        assert not torch.allclose(run(torch.randn_like(noise)), out)
        full = model.cfm.solve(noise, cond, mel, style, 4, 0.7)
        assert torch.equal(full[:, :, 9:], out) and full[:, :, :9].abs().sum() == 0  # prompt frames dropped
        moved = noise.clone()
        moved[:, :, :9] = 5.0  # the noise under the prompt is never used
        assert torch.equal(run(moved), out)
        with pytest.raises(ValueError, match="noise must be"):
            run(noise[:, :, 1:])


def test_batched_rows_equal_single_rows(tiny):
    _, model = tiny
    cond, mel, style, noise = _inputs(model, rows=2)
    with torch.no_grad():
        both = model.cfm_inference(cond, mel, style, n_timesteps=3, cfg_rate=0.7, noise=noise)
        for i in range(2):
            one = model.cfm_inference(
                cond[i : i + 1], mel[i : i + 1], style[i : i + 1], n_timesteps=3, cfg_rate=0.7, noise=noise[i : i + 1]
            )
            torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# the public code


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public `indextts.s2mel.modules.commons` (MyModel, load_checkpoint2) imported from the mirror's files, with
    a stand-in for `munch` (not installed here) and empty package files (the real dac package imports audiotools)."""
    from conftest import indextts_sources

    munch = types.ModuleType("munch")
    munch.Munch = dict  # only named by helpers inference does not call
    root = tmp_path_factory.mktemp("indextts_s2mel_public")
    with indextts_sources(root, PUBLIC_FILES, PACKAGES, {"munch": munch}):
        commons = importlib.import_module("indextts.s2mel.modules.commons")
        importlib.import_module("indextts.s2mel.modules.flow_matching")
        importlib.import_module("indextts.s2mel.modules.length_regulator")
        yield commons


def _namespace(value):
    """A config section as the attribute tree the public constructors read (hasattr for optional keys)."""
    if isinstance(value, dict):
        return types.SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _pair(public, section: dict, tmp_path: Path):
    """(public MyModel, ours) with the same random weights, carried by our s2mel.pth and the public loader."""
    path = tmp_path / "s2mel.pth"
    write_tiny_s2mel(path, section, gpt_dim=1280, seed=3)
    ours = load_s2mel(path, s2mel_config(section, "tiny"), gpt_dim=1280)
    theirs = public.MyModel(_namespace(section), use_gpt_latent=True)
    theirs, *_ = public.load_checkpoint2(theirs, None, str(path), load_only_params=True, ignore_modules=[])
    theirs.models["cfm"].estimator.setup_caches(max_batch_size=1, max_seq_length=8192)  # as infer_v2 does
    want = {f"{m}.{k}": v for m in theirs.models for k, v in theirs.models[m].state_dict().items()}
    got = ours.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}  # the released keys
    assert all(torch.equal(got[k], want[k]) for k in want)  # the public loader took every tensor
    return theirs.eval(), ours


def _public_cfm(theirs, cond, mel, style, noise, steps: int, rate: float, monkeypatch):
    """The released decode call, its torch.randn returning `noise`, prompt frames dropped as infer_v2 does."""
    with monkeypatch.context() as m:
        m.setattr(torch, "randn", lambda *a, **k: noise.clone())
        lens = torch.LongTensor([cond.size(1)])
        out = theirs.models["cfm"].inference(cond, lens, mel, style, None, steps, inference_cfg_rate=rate)
    return out[:, :, mel.size(-1) :]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_the_released_section_has_the_public_keys(public):
    with torch.device("meta"):
        ours = S2Mel(s2mel_config(RELEASED_S2MEL, "config.yaml")).state_dict()
        theirs = public.MyModel(_namespace(RELEASED_S2MEL), use_gpt_latent=True).models
    want = {f"{m}.{k}": tuple(v.shape) for m in theirs for k, v in theirs[m].state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_equals_the_public_s2mel(public, variant, tmp_path, monkeypatch):
    theirs, ours = _pair(public, VARIANTS[variant], tmp_path)
    g = torch.Generator().manual_seed(5)
    diffs = {}
    with torch.no_grad():
        latent = torch.randn(1, 12, 1280, generator=g)
        diffs["gpt_layer"] = _max_diff(ours.gpt_layer(latent), theirs.models["gpt_layer"](latent))
        # the released decode: S + gpt_layer(latent) regulated to int(codes * 1.72) frames, after the prompt's
        s_ref, s_infer = torch.randn(1, 10, 1024, generator=g), torch.randn(1, 12, 1024, generator=g)
        s_infer = s_infer + theirs.models["gpt_layer"](latent)
        public_reg = theirs.models["length_regulator"]
        want_p = public_reg(s_ref, ylens=torch.LongTensor([17]), n_quantizers=3, f0=None)[0]
        want_c = public_reg(s_infer, ylens=torch.LongTensor([20]), n_quantizers=3, f0=None)[0]
        got_p, got_c = ours.regulate(s_ref, torch.LongTensor([17])), ours.regulate(s_infer, torch.LongTensor([20]))
        diffs["length_regulator"] = max(_max_diff(got_p, want_p), _max_diff(got_c, want_c))
        lens = torch.LongTensor([9, 6])  # a padded batch, rows past their length zeroed
        two = torch.randn(2, 5, 1024, generator=g)
        want = public_reg(two, ylens=lens, n_quantizers=3, f0=None)[0]
        diffs["length_regulator"] = max(diffs["length_regulator"], _max_diff(ours.regulate(two, lens), want))
    cond = torch.cat([want_p, want_c], dim=1)
    mel, style = torch.randn(1, 80, 17, generator=g), torch.randn(1, 192, generator=g)
    noise = torch.randn(1, 80, 37, generator=g)
    for steps, rate in ((25, 0.7), (3, 0.0)):  # the released call, and the unguided branch
        want = _public_cfm(theirs, cond, mel, style, noise, steps, rate, monkeypatch)
        with torch.no_grad():
            got = ours.cfm_inference(cond, mel, style, n_timesteps=steps, cfg_rate=rate, noise=noise)
        assert want.abs().max() > 0.1
        diffs[f"cfm steps={steps} cfg={rate}"] = _max_diff(got, want)
    print(f"{variant}: max |ours - public| {diffs}")
    assert max(diffs.values()) < 1e-5, diffs
