"""Tiny random reward models in the real on-disk formats, for tests (loaded by the same loaders as real ones).

    write_tiny_paraformer(dir)   FunASR Paraformer directory: config.yaml, tokens.json, am.mvn, model.pt
    write_tiny_whisper(dir)      transformers Whisper directory: config, weights, tokenizer, feature extractor,
                                 generation config (with the language and task tokens)
    write_tiny_emotion2vec(dir)  FunASR emotion2vec directory: config.yaml, tokens.txt (the 9 labels), model.pt
    write_tiny_ast(dir)          transformers AST AudioSet classifier with 527 classes, "Laughter" at index 16
    write_tiny_sv(path)          a wavlm_large_finetune.pth-format file ({"model": ...}: WavLM under
                                 feature_extract.model., the ECAPA-TDNN head, a training-only classifier) plus
                                 the WavLM config it needs (returned)

The weights are random: the models run and give deterministic outputs, not meaningful ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from rewards.asr import keep_torch_state

PARAFORMER_CONFIG = {
    "model": "Paraformer",
    "model_conf": {
        "ctc_weight": 0.0,
        "lsm_weight": 0.1,
        "length_normalized_loss": True,
        "predictor_weight": 1.0,
        "predictor_bias": 1,
        "sampling_ratio": 0.75,
    },
    "encoder": "SANMEncoder",
    "encoder_conf": {
        "output_size": 32,
        "attention_heads": 2,
        "linear_units": 64,
        "num_blocks": 2,
        "dropout_rate": 0.0,
        "positional_dropout_rate": 0.0,
        "attention_dropout_rate": 0.0,
        "input_layer": "pe",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
    },
    "decoder": "ParaformerSANMDecoder",
    "decoder_conf": {
        "attention_heads": 2,
        "linear_units": 64,
        "num_blocks": 2,
        "dropout_rate": 0.0,
        "positional_dropout_rate": 0.0,
        "self_attention_dropout_rate": 0.0,
        "src_attention_dropout_rate": 0.0,
        "att_layer_num": 2,
        "kernel_size": 11,
        "sanm_shfit": 0,
    },
    "predictor": "CifPredictorV2",
    "predictor_conf": {"idim": 32, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
    "frontend": "WavFrontend",
    "frontend_conf": {
        "fs": 16000,
        "window": "hamming",
        "n_mels": 80,
        "frame_length": 25,
        "frame_shift": 10,
        "lfr_m": 7,
        "lfr_n": 6,
    },
    "tokenizer": "CharTokenizer",
    "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
}

EMOTION2VEC_CONFIG = {
    "model": "Emotion2vec",
    "model_conf": {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "norm_eps": 1e-5,
        "norm_affine": True,
        "encoder_dropout": 0.0,
        "post_mlp_drop": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "dropout_input": 0.0,
        "layerdrop": 0.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "layer_norm_first": False,
        "end_of_block_targets": False,
        "average_top_k_layers": 2,
        "normalize": True,
        "modalities": {
            "audio": {
                "type": "AUDIO",
                "feature_encoder_spec": "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] + [(16,2,2)]",
                "extractor_mode": "layer_norm",
                "conv_pos_width": 9,
                "conv_pos_groups": 2,
                "conv_pos_depth": 1,
                "conv_pos_pre_ln": False,
                "prenet_depth": 1,
                "prenet_layerdrop": 0.0,
                "prenet_dropout": 0.0,
                "start_drop_path_rate": 0.0,
                "end_drop_path_rate": 0.0,
                "num_extra_tokens": 2,
                "init_extra_token_zero": True,
                "use_alibi_encoder": True,
                "alibi_scale": 1.0,
                "learned_alibi": False,
                "alibi_max_pos": None,
                "learned_alibi_scale": True,
                "learned_alibi_scale_per_head": True,
                "learned_alibi_scale_per_layer": False,
                "num_alibi_heads": 2,
                "model_depth": 2,
                "local_grad_mult": 1.0,
                "decoder": None,
            }
        },
    },
    "tokenizer": "CharTokenizer",
    "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
}
EMOTION_LABELS = [
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
]
TINY_WAVLM = dict(
    extractor_mode="layer_norm",
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=2,
    activation_fn="gelu",
    layer_norm_first=True,
    conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
    conv_bias=False,
    feature_grad_mult=0.0,
    normalize=True,
    conv_pos=16,
    conv_pos_groups=4,
    relative_position_embedding=True,
    num_buckets=32,
    max_distance=64,
    gru_rel_pos=True,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    encoder_layerdrop=0.0,
    dropout_input=0.0,
    dropout_features=0.0,
)


def _randomise(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)


def write_tiny_paraformer(directory: str | Path, tokens: list[str] | None = None, seed: int = 0) -> Path:
    """tokens: output vocabulary (Han characters, words); the default covers a few common characters."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = (
        ["<blank>", "<s>", "</s>"] + list(tokens or list("今天天气很好我们你是的了哈嘿")) + ["hello", "world", "<unk>"]
    )
    vocab = list(dict.fromkeys(vocab))  # FunASR refuses duplicates
    (d / "config.yaml").write_text(yaml.safe_dump(PARAFORMER_CONFIG, allow_unicode=True))
    (d / "tokens.json").write_text(json.dumps(vocab, ensure_ascii=False))
    dim = 80 * 7
    (d / "am.mvn").write_text(
        "<Nnet>\n<Splice> 560 560\n[ 0 ]\n<AddShift> 560 560\n<LearnRateCoef> 0 [ "
        + " ".join(["-8.0"] * dim)
        + " ]\n<Rescale> 560 560\n<LearnRateCoef> 0 [ "
        + " ".join(["0.25"] * dim)
        + " ]\n</Nnet>\n"
    )
    with keep_torch_state():
        import funasr.models.paraformer.model  # noqa: F401 - registers the class
        from funasr.register import tables

        conf = dict(PARAFORMER_CONFIG["model_conf"])
        for k in ("encoder", "encoder_conf", "decoder", "decoder_conf", "predictor", "predictor_conf"):
            conf[k] = PARAFORMER_CONFIG[k]
        torch.manual_seed(seed)
        model = tables.model_classes.get("Paraformer")(input_size=dim, vocab_size=len(vocab), **conf)
        with torch.no_grad():
            model.predictor.cif_output.bias.fill_(1.0)  # the CIF predictor fires: transcripts are not empty
        torch.save(model.state_dict(), d / "model.pt")
    return d


def write_tiny_emotion2vec(directory: str | Path, seed: int = 0) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(EMOTION2VEC_CONFIG, allow_unicode=True))
    (d / "tokens.txt").write_text("\n".join(EMOTION_LABELS) + "\n", encoding="utf-8")
    with keep_torch_state():
        import funasr.models.emotion2vec.model  # noqa: F401
        from funasr.register import tables

        torch.manual_seed(seed)
        model = tables.model_classes.get("Emotion2vec")(
            model_conf=EMOTION2VEC_CONFIG["model_conf"], vocab_size=len(EMOTION_LABELS)
        )
        _randomise(model, 0.2)
        torch.save(model.state_dict(), d / "model.pt")
    return d


def write_tiny_whisper(directory: str | Path, seed: int = 0) -> Path:
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|en|>",
        "<|zh|>",
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]
    for s in specials:
        vocab[s] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(
        vocab_file=str(d / "vocab.json"),
        merges_file=str(d / "merges.txt"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
    cfg = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        max_length=32,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    model.save_pretrained(str(d))
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(str(d))
    return d


def write_tiny_ast(directory: str | Path, seed: int = 0) -> Path:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    d = Path(directory)
    labels = [f"class_{i}" for i in range(527)]
    labels[16] = "Laughter"  # AudioSet /m/01j3sz
    cfg = ASTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_mel_bins=128,
        max_length=1024,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = ASTForAudioClassification(cfg)
    model.save_pretrained(str(d))
    ASTFeatureExtractor(sampling_rate=16000, num_mel_bins=128, max_length=1024).save_pretrained(str(d))
    return d


def write_tiny_sv(path: str | Path, seed: int = 0, channels: int = 32, emb_dim: int = 16) -> tuple[Path, dict]:
    """A speaker-verification checkpoint in wavlm_large_finetune.pth's format. Returns (path, wavlm_cfg)."""
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    from rewards.sim import WAVLM_PREFIX, ECAPAHead

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    wavlm = WavLM(WavLMConfig(TINY_WAVLM))
    head = ECAPAHead(
        num_states=TINY_WAVLM["encoder_layers"] + 1,
        feat_dim=TINY_WAVLM["encoder_embed_dim"],
        channels=channels,
        emb_dim=emb_dim,
        se_bottleneck=8,
        attention=8,
    )
    _randomise(head, 0.2)
    with torch.no_grad():
        for name, buf in head.named_buffers():  # BatchNorm running stats as a trained model would have them
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0.0, 0.1)
    state = dict(head.state_dict())
    state.update({WAVLM_PREFIX + k: v for k, v in wavlm.state_dict().items()})
    state["loss_calculator.projection.weight"] = torch.randn(10, emb_dim)  # training-only speaker classifier
    torch.save({"model": state, "best_valid_eer": 0.0}, path)
    return path, dict(TINY_WAVLM)


def write_all(root: str | Path, paraformer_tokens: list[str] | None = None) -> dict:
    """Every tiny reward model under `root`; returns the paths and kwargs the scorers take."""
    root = Path(root)
    sv, wavlm_cfg = write_tiny_sv(root / "sv" / "wavlm_large_finetune.pth")
    return {
        "paraformer_dir": str(write_tiny_paraformer(root / "paraformer", paraformer_tokens)),
        "whisper_dir": str(write_tiny_whisper(root / "whisper")),
        "emotion_dir": str(write_tiny_emotion2vec(root / "emotion2vec")),
        "ast_dir": str(write_tiny_ast(root / "ast")),
        "sv_checkpoint": str(sv),
        "wavlm_cfg": wavlm_cfg,
    }


__all__ = [
    "write_all",
    "write_tiny_ast",
    "write_tiny_emotion2vec",
    "write_tiny_paraformer",
    "write_tiny_sv",
    "write_tiny_whisper",
    "np",
]
