"""IndexTTS2's model directory, its voice-prompt front end and its emotion vectors.

The released layout (IndexTeam/IndexTTS-2, plus the auxiliary models the released `ensure_models_available` keeps
in hf_cache/), every file named by config.yaml read from inside the directory:

    config.yaml                gpt / semantic_codec / s2mel sections; gpt_checkpoint, s2mel_checkpoint, w2v_stat,
                               emo_matrix, spk_matrix (file names), emo_num, dataset.bpe_model
    gpt.pth  s2mel.pth  bpe.model  wav2vec2bert_stats.pt
    feat1.pt                   spk_matrix [sum(emo_num), 192]: CAMPPlus styles of the emotion examples
    feat2.pt                   emo_matrix [sum(emo_num), D]: their emotion vectors (D = gpt.model_dim)
    hf_cache/w2v-bert-2.0/                        facebook/w2v-bert-2.0 (transformers layout)
    hf_cache/semantic_codec_model.safetensors     amphion/MaskGCT semantic_codec
    hf_cache/campplus_cn_common.bin               funasr/campplus
    hf_cache/bigvgan/                             nvidia/bigvgan_v2_22khz_80band_256x (config.json, generator)

A voice prompt, as the released inference reads it (`infer_v2.py`): the audio at 22.05 kHz cut to 15 s, its
16 kHz copy through w2v-BERT 2.0 (layer 17, normalised by the stats: the GPT's speaker input, and its emotion input
when there is no other), the semantic codec's codes of those features (s2mel's prompt condition), the 22.05 kHz
log-mel (s2mel's prompt) and the CAMPPlus style of the 16 kHz fbank. The released code resamples with torchaudio;
here librosa loads at 22.05 kHz (as released) and the 16 kHz copy is rollouts/audio.py's polyphase resampler
(torchaudio is not used by this project), so features of the same file differ from the released ones by that
resampler only.

Emotion, as released: a manifest emotion label becomes the 8-dim vector [happy, angry, sad, afraid, disgusted,
melancholic, surprised, calm] (one entry of weight policy.indextts2.emotion_weight, scaled by emo_alpha), mixed from
feat2.pt's rows picked by the speaker style's nearest feat1.pt row per emotion: emovec = sum_i w_i row_i +
(1 - sum_i w_i) emotion(speaker). An emotion reference clip instead: merge_emovec(speaker, clip, emo_alpha).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from policies.indextts2_model import IndexGPT, IndexTTS2ConfigError
from rollouts.paths import inside
from rollouts.token2wav import load_weights_only

HF_CACHE = "hf_cache"
STYLE_DIM = 192
MEL_BINS = 80
CODEBOOK = 8192
# emotion2vec+ labels (rewards/emotion.py LABELS) -> IndexTTS2's 8 emotions
# [happy, angry, sad, afraid, disgusted, melancholic, surprised, calm]; other / <unk> have none
EMOTION_INDEX = {"angry": 1, "disgusted": 4, "fearful": 3, "happy": 0, "neutral": 7, "sad": 2, "surprised": 6}
EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")


def _inside(root: Path, value: Any, key: str, where: str) -> Path:
    """A file named by config.yaml: a relative path that stays inside the model directory."""
    if not isinstance(value, str) or not value.strip():
        raise IndexTTS2ConfigError(f"{where}: {key} must be a file name")
    try:
        return inside(root, value.strip())
    except ValueError:
        raise IndexTTS2ConfigError(f"{where}: {key} {value!r} points outside the model directory") from None


@dataclass(frozen=True)
class ModelFiles:
    """Every file of a released-layout IndexTTS2 directory (module docstring); existence is checked by the loaders
    that read them."""

    root: Path
    config: dict[str, Any]
    gpt: Path
    s2mel: Path
    bpe: Path
    w2v_stats: Path
    spk_matrix: Path
    emo_matrix: Path
    emo_num: tuple[int, ...]
    w2v_bert: Path
    semantic_codec: Path
    campplus: Path
    bigvgan: Path

    @classmethod
    def from_dir(cls, directory: str | Path, config: dict[str, Any]) -> ModelFiles:
        root = Path(directory)
        where = str(root / "config.yaml")
        dataset = config.get("dataset") or {}
        bpe = dataset.get("bpe_model") if isinstance(dataset, dict) else None
        emo_num = config.get("emo_num")
        if not isinstance(emo_num, list) or not emo_num or not all(isinstance(k, int) and k > 0 for k in emo_num):
            raise IndexTTS2ConfigError(f"{where}: emo_num must be a list of 8 positive counts")
        if len(emo_num) != len(EMOTIONS):
            raise IndexTTS2ConfigError(f"{where}: emo_num has {len(emo_num)} counts, IndexTTS2 has 8 emotions")
        cache = root / HF_CACHE
        return cls(
            root=root,
            config=config,
            gpt=_inside(root, config.get("gpt_checkpoint", "gpt.pth"), "gpt_checkpoint", where),
            s2mel=_inside(root, config.get("s2mel_checkpoint"), "s2mel_checkpoint", where),
            bpe=_inside(root, bpe, "dataset.bpe_model", where),
            w2v_stats=_inside(root, config.get("w2v_stat"), "w2v_stat", where),
            spk_matrix=_inside(root, config.get("spk_matrix"), "spk_matrix", where),
            emo_matrix=_inside(root, config.get("emo_matrix"), "emo_matrix", where),
            emo_num=tuple(emo_num),
            w2v_bert=cache / "w2v-bert-2.0",
            semantic_codec=cache / "semantic_codec_model.safetensors",
            campplus=cache / "campplus_cn_common.bin",
            bigvgan=cache / "bigvgan",
        )


def _tensor_file(path: Path) -> torch.Tensor:
    obj = load_weights_only(path, IndexTTS2ConfigError, "a weights-only torch file")
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or not torch.isfinite(obj).all():
        raise IndexTTS2ConfigError(f"{path}: expected a finite 2-D tensor")
    return obj.float()


@dataclass(frozen=True)
class EmotionMatrices:
    """feat1.pt / feat2.pt split by emo_num: per emotion its example styles [n_i, 192] and vectors [n_i, D]."""

    styles: tuple[torch.Tensor, ...]
    vectors: tuple[torch.Tensor, ...]

    @classmethod
    def load(cls, files: ModelFiles, model_dim: int) -> EmotionMatrices:
        spk, emo = _tensor_file(files.spk_matrix), _tensor_file(files.emo_matrix)
        total = sum(files.emo_num)
        if spk.shape != (total, STYLE_DIM):
            raise IndexTTS2ConfigError(f"{files.spk_matrix}: shape {tuple(spk.shape)}, expected ({total}, 192)")
        if emo.shape != (total, model_dim):
            raise IndexTTS2ConfigError(f"{files.emo_matrix}: shape {tuple(emo.shape)}, expected ({total}, {model_dim})")
        return cls(tuple(spk.split(list(files.emo_num))), tuple(emo.split(list(files.emo_num))))

    def mix(self, weights: list[float], style: torch.Tensor) -> torch.Tensor:
        """sum_i w_i emo_i[argmax_j cos(style, spk_i[j])]: [D] (the released emovec_mat)."""
        rows = []
        for s, v in zip(self.styles, self.vectors):
            j = int(torch.argmax(F.cosine_similarity(style.float().view(1, -1), s, dim=1)))
            rows.append(v[j])
        return (torch.tensor(weights).view(-1, 1) * torch.stack(rows)).sum(0)


def emotion_weights(label: str, weight: float, alpha: float) -> list[float]:
    """An emotion2vec label -> the released 8-dim vector (one entry), scaled by alpha as released (clamped to
    [0, 1], truncated to 4 decimals). An unmapped label (other, <unk>) gives all zeros."""
    w = [0.0] * len(EMOTIONS)
    if label in EMOTION_INDEX:
        w[EMOTION_INDEX[label]] = weight
    scale = max(0.0, min(1.0, alpha))
    return w if scale == 1.0 else [int(x * scale * 10000) / 10000 for x in w]


@dataclass(frozen=True)
class Voice:
    """One voice prompt as IndexTTS2 reads it."""

    feats: torch.Tensor  # [T, D] normalised w2v-BERT layer-17 features
    codes: torch.Tensor  # [T] long semantic codes of those features
    mel: torch.Tensor  # [80, Tm] 22.05 kHz log-mel
    style: torch.Tensor  # [192] CAMPPlus style

    def arrays(self) -> dict[str, np.ndarray]:
        """The manifest's fields (`ttsrl prepare --policy indextts2`)."""
        return {
            "prompt_semantic": self.feats.float().numpy(),
            "prompt_semantic_code": self.codes.long().numpy(),
            "prompt_mel": self.mel.float().T.contiguous().numpy(),
            "embedding": self.style.float().numpy(),
        }

    @classmethod
    def from_record(cls, arrays: dict[str, np.ndarray], style: np.ndarray, feat_dim: int, where: str) -> Voice:
        from rollouts.manifest import ManifestError

        feats = arrays["prompt_semantic"]
        if feats.shape[1] != feat_dim:
            raise ManifestError(f"{where}: field 'prompt_semantic': width {feats.shape[1]}, the model's is {feat_dim}")
        return cls(
            torch.from_numpy(feats),
            torch.from_numpy(arrays["prompt_semantic_code"]),
            torch.from_numpy(arrays["prompt_mel"]).T.contiguous(),
            torch.from_numpy(style),
        )


class VoiceFrontend:
    """Voice prompts from audio files (module docstring): w2v-BERT, the semantic codec, CAMPPlus and the mel."""

    def __init__(self, files: ModelFiles, device: str | torch.device = "cpu"):
        from policies.indextts2_semantic import W2VBertFeatures, load_semantic_codec, semantic_codec_config
        from policies.indextts2_vocoder import load_campplus

        self.files, self.device = files, torch.device(device)
        self.w2v = W2VBertFeatures.from_dirs(files.w2v_bert, files.w2v_stats, device=device)
        codec_cfg = semantic_codec_config(files.config.get("semantic_codec"), str(files.root / "config.yaml"))
        self.codec = load_semantic_codec(files.semantic_codec, codec_cfg, device=device)
        self.campplus = load_campplus(files.campplus, device=device)
        s2 = files.config.get("s2mel")
        if not isinstance(s2, dict) or not isinstance(s2.get("preprocess_params"), dict):
            raise IndexTTS2ConfigError(f"{files.root / 'config.yaml'}: no s2mel.preprocess_params")
        self.mel_params: dict[str, Any] = s2["preprocess_params"]

    @property
    def feat_dim(self) -> int:
        return int(self.w2v.dim)

    def load(self, path: str | Path, sr: int, seconds: float, where: str) -> np.ndarray:
        """librosa at `sr`, mono, cut to `seconds` (the released _load_and_cut_audio)."""
        import librosa

        from rollouts.manifest import ManifestError

        try:
            wav, _ = librosa.load(str(path), sr=sr, mono=True)
        except Exception as e:  # noqa: BLE001 - librosa raises several kinds for unreadable audio
            raise ManifestError(f"{where}: cannot read {path} as audio: {e}") from None
        if wav.size < sr // 10:
            raise ManifestError(f"{where}: {path} holds less than 0.1 s of audio")
        return wav[: int(seconds * sr)].astype(np.float32)

    @torch.no_grad()
    def voice(self, path: str | Path, seconds: float = 15.0, where: str = "") -> Voice:
        from policies.indextts2_vocoder import prompt_mel, speaker_style
        from rollouts.audio import resample

        wav22 = self.load(path, 22050, seconds, where)
        wav16 = resample(wav22, 22050, 16000)
        feats = self.w2v(wav16)  # [1, T, D]
        codes, _ = self.codec.quantize(feats)
        mel = prompt_mel(wav22, self.mel_params)  # [1, 80, Tm]
        style = speaker_style(self.campplus, wav16)  # [1, 192]
        return Voice(feats[0].float().cpu(), codes.reshape(-1).long().cpu(), mel[0].float().cpu(), style[0].cpu())

    @torch.no_grad()
    def emotion_features(self, path: str | Path, seconds: float = 15.0, where: str = "") -> torch.Tensor:
        """An emotion reference clip's features [T, D] (the released reads it at 16 kHz, cut to 15 s)."""
        return self.w2v(self.load(path, 16000, seconds, where))[0].float().cpu()


class IndexTTS2PromptFrontend:
    """`ttsrl prepare --policy indextts2 --model DIR`: each voice prompt's prompt_semantic, prompt_semantic_code,
    prompt_mel and embedding (CAMPPlus), computed once so that training does not run w2v-BERT again."""

    def __init__(self, frontend: VoiceFrontend):
        self.frontend = frontend

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu") -> IndexTTS2PromptFrontend:
        from policies.indextts2_io import read_config

        config, _ = read_config(model_dir)
        return cls(VoiceFrontend(ModelFiles.from_dir(model_dir, config), device))

    def features(self, prompt: str | Path) -> dict[str, np.ndarray]:
        return self.frontend.voice(prompt, where=str(prompt)).arrays()

    def codes(self, path: str | Path) -> np.ndarray:
        raise ValueError("target_wav gives GLM-TTS speech tokens; IndexTTS2 trains on its own codes (leave it out)")


def conditioning(
    gpt: IndexGPT,
    voice: Voice,
    *,
    emotion: torch.Tensor | None = None,  # [D] a fixed emotion vector mix (emotion label), or None
    emotion_weight_sum: float = 0.0,  # sum of the label vector's weights
    emotion_feats: torch.Tensor | None = None,  # [Te, D_feat] an emotion clip's features, or None
    emo_alpha: float = 1.0,
) -> torch.Tensor:
    """The GPT's conditioning of one prompt: [32 speaker latents + emotion vector][speed 1][speed 0] -> [34, D].
    The released code passes the feature width as every prompt's length (its prompts are shorter than that: all
    frames count); here each prompt's frame count is passed, which is the same for the released sizes."""
    dev = gpt.speed_emb.weight.device
    spk = voice.feats[None].to(dev)
    spk_len = torch.tensor([spk.shape[1]], device=dev)
    latents = gpt.speaker_latents(spk, spk_len)
    if emotion_feats is not None:
        emo = emotion_feats[None].to(dev)
        emovec = gpt.merge_emovec(spk, emo, spk_len, torch.tensor([emo.shape[1]], device=dev), alpha=emo_alpha)
    else:
        emovec = gpt.emotion_vector(spk, spk_len)
    if emotion is not None:
        emovec = emotion.to(dev)[None] + (1 - emotion_weight_sum) * emovec
    return gpt.conditioning(latents, emovec)[0]
