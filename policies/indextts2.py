"""IndexTTS2 as a GRPO policy, `policy.kind: indextts2`: one discrete MaskGCT semantic code per action.

Loads a released-layout IndexTTS2 directory (policies/indextts2_frontend.py ModelFiles: config.yaml, gpt.pth,
s2mel.pth, bpe.model, the stats, feat1/feat2.pt and the auxiliary models under hf_cache/) strictly into this
project's own code, each part equal to the public index-tts code on random weights (tests/test_indextts2_*.py):
the GPT (policies/indextts2_model.py), its sampling distribution (indextts2_sampling.py), the text front end
(rollouts/indextts_text.py), the voice front end and emotion vectors (indextts2_frontend.py), and the frozen decode
stack (s2mel: indextts2_s2mel.py; the semantic codec: indextts2_semantic.py; BigVGAN: indextts2_vocoder.py).

A row's actions are its codes, stop (8193) included as its last action: each sampled from the released distribution
(repetition penalty `policy.indextts2.repetition_penalty` over the history, then `sampling.temperature`, `top_k`,
`top_p`; released 10 / 0.8 / 30 / 0.8) without beams (the released default beam sampling is not a distribution
over one sequence). Teacher forcing recomputes the same processed distribution at the inference position
convention, so before an update the ratio is 1. The conditioning ([32 speaker latents + emotion vector][speed]) is
computed once per prompt by the frozen conditioners and travels with the rows (`extras["cond"]`); the text ids are
the rows' prompt ids. IndexTTS2 reads no prompt text: the voice comes from the audio only.

Trainable: the GPT-2 core, final_norm and mel_head (full), or LoRA (peft) on the core's c_attn / c_proj / c_fc; the
embeddings and conditioners stay frozen. Decode (frozen, per row): the GPT's latents at the released `forward`
convention (computed by the sampling weights with the rollout, `extras["latents"]`), gpt_layer + the codec's
vq2emb, the length regulator (x1.72), the s2mel CFM (25 Euler steps, CFG 0.7) on [prompt | row] from noise seeded
by the row's seed (one per group), BigVGAN at 22.05 kHz.
Export: gpt.pth with the released keys (LoRA merged) next to copies of every other file of the directory.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.base import load_trainable_state, trainable_state
from policies.indextts2_frontend import (
    EmotionMatrices,
    ModelFiles,
    Voice,
    VoiceFrontend,
    conditioning,
    emotion_weights,
)
from policies.indextts2_io import feature_dim, load_gpt_file, read_config, save_gpt, write_tiny_indextts2
from policies.indextts2_model import IndexGPT
from policies.indextts2_sampling import Sampling, sample_rows, teacher_forced_logprobs
from policies.sampling import row_keys
from rollouts.types import PromptRecord, Rollout, SamplingParams, VocodeResult

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's attention and MLP projections
SEGMENT_TOKENS = 120  # the released max_text_tokens_per_segment
CODE_FRAMES = 1.72  # s2mel mel frames per code (released target_lengths = code_lens * 1.72)


@dataclass(frozen=True)
class IndexTTS2Settings:
    """policy.indextts2 (rl/config.py IndexTTS2PolicyConfig), as the policy reads it."""

    repetition_penalty: float = 10.0
    max_codes: int = 1500
    normalize_text: bool = True
    emotion_label: bool = True
    emotion_weight: float = 0.8
    emo_alpha: float = 1.0
    prompt_seconds: float = 15.0
    diffusion_steps: int = 25
    cfg_rate: float = 0.7

    @classmethod
    def from_config(cls, c: Any) -> IndexTTS2Settings:
        import dataclasses

        return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class IndexPromptInput:
    """One manifest record as IndexTTS2 reads it."""

    cond: torch.Tensor  # [C, D] the GPT's conditioning (speaker latents + emotion vector, speed), C = 34
    ids: list[int]  # the target text's BPE ids
    text_len: int
    voice: Voice  # the voice prompt (decoding)
    source: str = ""


class IndexTTS2Policy:
    """The IndexTTS2 policy (module docstring)."""

    actions_are_frames = True  # code t is the row's audio frame t (about 50 per second)
    vllm_sampling = False
    stages = ("lm",)

    def __init__(self, net: IndexGPT, files: ModelFiles, text, settings: IndexTTS2Settings, *, lora=None):
        self.files, self.text, self.settings = files, text, settings
        self.pad_id = int(net.cfg.stop_mel_token)
        net.requires_grad_(False)
        self.lora = bool(lora is not None and lora.enabled)
        self.model: Any
        if self.lora:
            self.model = _apply_lora(net, lora)
            self.net: IndexGPT = self.model.get_base_model()
        else:
            for m in (net.gpt, net.final_norm, net.mel_head):
                m.requires_grad_(True)
            self.model = self.net = net
        self._reference: IndexGPT | None = None
        self._frontend: VoiceFrontend | None = None
        self._emotions: EmotionMatrices | None = None
        self._voices: dict[str, Voice] = {}
        self._emotion_feats: dict[str, torch.Tensor] = {}
        self._conds: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (features, conditioning) by their source
        self._decode: DecodeStack | None = None

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora=None,
        trust_remote_code: bool = False,  # nothing here runs the checkpoint's code
        config: Any = None,  # rl.config.PolicyConfig (its `indextts2` section) or None for the defaults
    ) -> IndexTTS2Policy:
        from rollouts.indextts_text import IndexTextFrontend

        data, gcfg = read_config(ckpt_dir)
        files = ModelFiles.from_dir(ckpt_dir, data)
        net = load_gpt_file(files.gpt, gcfg, feat_dim=feature_dim(files.w2v_stats), device=device)
        if dtype != torch.float32:
            net = net.to(dtype)
        c = getattr(config, "indextts2", None)
        settings = IndexTTS2Settings() if c is None else IndexTTS2Settings.from_config(c)
        text = IndexTextFrontend.from_dir(files.root, bpe_model=str(files.bpe.relative_to(files.root.resolve())))
        return cls(net, files, text, settings, lora=lora)

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        """A tiny random IndexTTS2 directory (every part, the decode stack included) in the released layout."""
        if not (Path(ckpt_dir) / "config.yaml").exists():
            write_tiny_indextts2(ckpt_dir, texts, seed=seed)
            print(f"ttsrl: wrote a tiny random IndexTTS2 to {ckpt_dir}")

    @property
    def device(self) -> torch.device:
        return self.net.mel_head.weight.device

    @property
    def context_length(self) -> int | None:
        return None  # the text and code lengths are bounded separately (prompt_input, sample_groups)

    @property
    def speech_rate(self) -> float:
        """Codes per second of output audio: BigVGAN's 22050 / 256 mel frames per second over 1.72 per code."""
        return 22050 / 256 / CODE_FRAMES

    @property
    def sample_rate(self) -> int:
        return 22050

    def encode_text(self, text: str) -> list[int]:
        """The GPT's text ids as the released tokenizer makes them (normalised unless normalize_text is false)."""
        if self.settings.normalize_text:
            return self.text.ids(text)
        from rollouts.indextts_text import pretokenize

        return self.text.token_ids(self.text.sp.encode(pretokenize(text), out_type=str))

    def text_ids(self, record: PromptRecord) -> list[int]:
        """The target text's ids as one released GPT call gets them: the released inference splits a text into
        segments of at most 120 tokens and synthesises each alone; a training text must be one segment."""
        from rollouts.manifest import ManifestError

        if not self.settings.normalize_text:
            return self.encode_text(record.target_text)
        segments = self.text.segments(record.target_text, SEGMENT_TOKENS)
        if len(segments) > 1:
            raise ManifestError(
                f"{record.source}: field 'syn_text': {len(segments)} segments of the released front end (at most "
                f"{SEGMENT_TOKENS} tokens each); IndexTTS2 synthesises them one by one: give one per line"
            )
        return self.text.token_ids(segments[0]) if segments else []

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        return rollout.codes(0)

    # --- prompts ----------------------------------------------------------------------------------------------
    def frontend(self) -> VoiceFrontend:
        if self._frontend is None:
            self._frontend = VoiceFrontend(self.files, self.device)
        return self._frontend

    def voice(self, record: PromptRecord) -> Voice:
        """The record's voice prompt: its manifest arrays (`ttsrl prepare --policy indextts2`) when it has them all,
        else computed from prompt_speech (once per file)."""
        from rollouts.manifest import ManifestError

        arrays = record.prompt_arrays
        names = ("prompt_semantic", "prompt_semantic_code", "prompt_mel")
        if all(k in arrays for k in names) and record.embedding is not None:
            return Voice.from_record(arrays, record.embedding, self.net.feat_dim, record.source)
        if any(k in arrays for k in names):
            missing = [k for k in names if k not in arrays] + ([] if record.embedding is not None else ["embedding"])
            raise ManifestError(f"{record.source}: IndexTTS2's prompt fields come together; missing {missing}")
        if not record.prompt_wav:
            raise ManifestError(f"{record.source}: field 'prompt_speech' is missing (and no prompt_semantic)")
        if record.prompt_wav not in self._voices:
            where = f"{record.source}: field 'prompt_speech'"
            voice = self.frontend().voice(record.prompt_wav, self.settings.prompt_seconds, where)
            self._voices[record.prompt_wav] = voice
        return self._voices[record.prompt_wav]

    def emotion_matrices(self) -> EmotionMatrices:
        if self._emotions is None:
            self._emotions = EmotionMatrices.load(self.files, self.net.cfg.model_dim)
        return self._emotions

    @torch.no_grad()
    def prompt_input(self, record: PromptRecord) -> IndexPromptInput:
        """The target text's ids and the conditioning: the voice prompt's speaker latents plus its emotion vector,
        from the record's emotion_speech clip (emo_alpha), else its emotion label (policy.indextts2.emotion_label),
        else the voice prompt itself."""
        from rewards.emotion import LABELS
        from rollouts.manifest import ManifestError

        ids = self.text_ids(record)
        if not ids:
            raise ManifestError(f"{record.source}: field 'syn_text': encodes to no tokens")
        if len(ids) > self.net.cfg.max_text_tokens:
            raise ManifestError(
                f"{record.source}: field 'syn_text': {len(ids)} tokens, above the model's max_text_tokens "
                f"{self.net.cfg.max_text_tokens}"
            )
        voice, s = self.voice(record), self.settings
        kw: dict[str, Any] = {}
        emotion_key: tuple = ()
        if record.emotion_wav:
            if record.emotion_wav not in self._emotion_feats:
                where = f"{record.source}: field 'emotion_speech'"
                feats = self.frontend().emotion_features(record.emotion_wav, s.prompt_seconds, where)
                self._emotion_feats[record.emotion_wav] = feats
            kw = {"emotion_feats": self._emotion_feats[record.emotion_wav], "emo_alpha": s.emo_alpha}
            emotion_key = ("clip", record.emotion_wav)
        elif s.emotion_label and record.emotion is not None and 0 <= record.emotion < len(LABELS):
            w = emotion_weights(LABELS[record.emotion], s.emotion_weight, s.emo_alpha)
            if any(w):
                kw = {"emotion": self.emotion_matrices().mix(w, voice.style), "emotion_weight_sum": sum(w)}
                emotion_key = ("label", *w)
        # the lines of one voice prompt share its arrays (rollouts/manifest.py, self.voice): one conditioning each.
        # The entry holds the features, so their memory (the key) cannot be reused by other arrays while it exists
        key = (voice.feats.data_ptr(), tuple(voice.feats.shape), emotion_key)
        if key not in self._conds:
            dtype = self.net.mel_head.weight.dtype
            self._conds[key] = (voice.feats, conditioning(self.net, _to(voice, dtype), **kw).float().cpu())
        return IndexPromptInput(self._conds[key][1], ids, len(ids), voice, record.source)

    # --- sampling ---------------------------------------------------------------------------------------------
    def sampling(self, params: SamplingParams) -> Sampling:
        if params.ras:
            raise ValueError("IndexTTS2 samples as released: repetition penalty, no RAS (sampling.ras false)")
        return Sampling(params.temperature, params.top_k, params.top_p, self.settings.repetition_penalty)

    def max_codes(self, text_len: int, max_ratio: float, max_new_tokens: int) -> int:
        cap = min(self.settings.max_codes, max_new_tokens, self.net.cfg.max_mel_tokens)
        return max(1, min(cap, int(text_len * max_ratio)) if max_ratio > 0 else cap)

    @torch.no_grad()
    def sample_groups(
        self,
        prompts: list[IndexPromptInput],
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float = 0.0,
        max_ratio: float = 0.0,
        max_new_tokens: int = 1500,
        decode: str = "dynamic",
    ) -> Rollout:
        """G rows per prompt in one KV-cache batch; row j of group g from stream (seed, g, j). A row is truncated
        at min(max_codes, max_new_tokens, max_ratio x text tokens) codes. The released sampler has no minimum
        length, so min_ratio does not apply."""
        n = len(prompts) * group_size
        rows = torch.arange(len(prompts)).repeat_interleave(group_size)
        gids = torch.tensor(group_ids, dtype=torch.long).repeat_interleave(group_size)
        members = torch.arange(group_size).repeat(len(prompts))
        dev = self.device
        cond = torch.stack([prompts[int(i)].cond for i in rows]).to(dev, self.net.mel_head.weight.dtype)
        text = [prompts[int(i)].ids for i in rows]
        caps = torch.tensor([self.max_codes(prompts[int(i)].text_len, max_ratio, max_new_tokens) for i in rows])
        was_training = self.model.training
        self.model.eval()
        try:
            out = sample_rows(self.net, cond, text, self.sampling(params), row_keys(seed, gids, members), caps)
            # s2mel's input, under the weights that sampled (the decoder runs after sampling, without the GPT)
            latents = self.net.decode_latents(cond, text, out.codes)
        finally:
            self.model.train(was_training)
        prompt_ids, prompt_mask = _left_pad(text)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            tokens=out.codes.masked_fill(~out.mask, self.pad_id).cpu(),
            token_mask=out.mask.cpu(),
            behaviour_logp=(out.logp * out.mask).float().cpu(),
            group_ids=gids,
            prompt_index=rows,
            finished=out.finished.cpu(),
            truncated=out.truncated.cpu(),
            lengths=out.lengths.cpu(),
            min_lengths=torch.zeros(n, dtype=torch.long),
            text_lengths=torch.tensor([prompts[int(i)].text_len for i in rows]),
            params=params,
            pad_id=self.pad_id,
            extras={"cond": cond.float().cpu(), "latents": latents.float().cpu()},
        )

    # --- teacher forcing --------------------------------------------------------------------------------------
    def _rows(self, rollout: Rollout) -> tuple[torch.Tensor, list[list[int]], torch.Tensor, torch.Tensor]:
        """(cond [N, C, D], text ids per row, codes [N, T], mask [N, T]) on the policy's device."""
        dev, dtype = self.device, self.net.mel_head.weight.dtype
        text = [ids[m].tolist() for ids, m in zip(rollout.prompt_ids, rollout.prompt_mask)]
        mask = rollout.token_mask.to(dev)
        codes = rollout.tokens.to(dev).masked_fill(~mask, self.net.cfg.stop_mel_token)
        return rollout.extras["cond"].to(dev, dtype), text, codes, mask

    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] log-probs of the codes under the sampled distribution (with grad unless reference); NaN
        entropies (the processed distribution's entropy is not computed)."""
        cond, text, codes, mask = self._rows(rollout)
        with self._net_for(reference) as net:
            lp = teacher_forced_logprobs(net, cond, text, codes, mask, self.sampling(rollout.params))
        return lp.float(), torch.full_like(lp, float("nan"), dtype=torch.float32)

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        """indextts2/codes (per row), indextts2/stopped_frac, indextts2/truncated_frac, indextts2/logprob_mean (a
        row's mean action log-prob, averaged over the rows: means over rows average exactly over ranks)."""
        m = rollout.token_mask.float()
        per_row = (rollout.behaviour_logp * m).sum(1) / m.sum(1).clamp(min=1)
        return {
            "indextts2/codes": float(rollout.lengths.float().mean()),
            "indextts2/stopped_frac": float(rollout.finished.float().mean()),
            "indextts2/truncated_frac": float(rollout.truncated.float().mean()),
            "indextts2/logprob_mean": float(per_row.mean()),
        }

    # --- reference --------------------------------------------------------------------------------------------
    def make_reference(self) -> None:
        """A frozen copy of the trainable parts (the GPT core, final_norm, mel_head), sharing the frozen rest; with
        LoRA the base with the adapters disabled."""
        if self.lora:
            return
        ref = copy.copy(self.net)
        ref._modules = dict(self.net._modules)  # a module table of its own: replacing parts leaves self.net intact
        for name in ("gpt", "final_norm", "mel_head"):
            setattr(ref, name, copy.deepcopy(getattr(self.net, name)).requires_grad_(False).eval())
        self._reference = ref

    @contextlib.contextmanager
    def _net_for(self, reference: bool) -> Iterator[IndexGPT]:
        if not reference:
            yield self.net
        elif self.lora:
            with self.model.disable_adapter():
                yield self.net
        else:
            if self._reference is None:
                raise RuntimeError("make_reference() was not called")
            yield self._reference

    # --- decoding and evaluation ------------------------------------------------------------------------------
    def decode_stack(self) -> DecodeStack:
        if self._decode is None:
            self._decode = DecodeStack(self)
        return self._decode

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> IndexTTS2Decoder:
        """s2mel + BigVGAN with each record's voice prompt (vocoder.n_timesteps and dtype do not apply: the s2mel
        steps are policy.indextts2.diffusion_steps)."""
        return IndexTTS2Decoder(self.decode_stack(), [self.voice(r) for r in records])

    @torch.no_grad()
    def synthesize(
        self, prompts: list[IndexPromptInput], *, seed: int, keys: list[int]
    ) -> list[tuple[np.ndarray, bool]]:
        """Evaluation (`ttsrl eval`): one sequence per prompt from the released distribution at the released
        settings (temperature 0.8, top-k 30, top-p 0.8, this policy's penalty; no beams), decoded. Item i draws from
        stream (seed, keys[i], 0) and its s2mel noise from seed + keys[i]. (waveform at 22.05 kHz, truncated)."""
        params = SamplingParams(temperature=0.8, top_k=30, top_p=0.8)
        ro = self.sample_groups(prompts, 1, params, group_ids=keys, seed=seed, max_new_tokens=self.settings.max_codes)
        voices = [p.voice for p in prompts]
        res = IndexTTS2Decoder(self.decode_stack(), voices)(ro, [seed + k for k in keys], batch_size=8)
        out = []
        for i, wav in enumerate(res.audio):
            out.append((wav if wav is not None else np.zeros(0, np.float32), bool(ro.truncated[i])))
        return out

    # --- parameters and persistence ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[torch.nn.Module]:
        """[]: one FSDP2 unit (the sampler runs the core a data-dependent number of times per rank)."""
        return []

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """The trainable tensors: the adapters with LoRA, else the GPT core, final_norm and mel_head."""
        return trainable_state(self.model)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state, "indextts2 policy")

    def export(self, out_dir: Path) -> None:
        """The released directory with the trained gpt.pth (LoRA merged, the released keys): every other file
        (config, s2mel, bpe, stats, emotion matrices, hf_cache/) linked or copied from the loaded directory."""
        out_dir = Path(out_dir)
        root = self.files.root.resolve()
        for src in sorted(root.rglob("*")):
            rel = src.relative_to(root)
            dst = out_dir / rel
            if src.is_dir() or src.resolve() == self.files.gpt.resolve():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        merged = copy.deepcopy(self.model).merge_and_unload() if self.lora else self.net
        out_gpt = out_dir / self.files.gpt.resolve().relative_to(root)
        out_gpt.parent.mkdir(parents=True, exist_ok=True)
        save_gpt(merged.float(), out_gpt)


class DecodeStack:
    """The frozen decode models of a policy's directory: s2mel, the semantic codec (vq2emb) and BigVGAN."""

    def __init__(self, policy: IndexTTS2Policy):
        from policies.indextts2_s2mel import load_s2mel, s2mel_config
        from policies.indextts2_semantic import load_semantic_codec, semantic_codec_config
        from policies.indextts2_vocoder import load_bigvgan

        files, dev = policy.files, policy.device
        where = str(files.root / "config.yaml")
        self.policy = policy
        self.s2mel = load_s2mel(
            files.s2mel, s2mel_config(files.config.get("s2mel"), where), gpt_dim=policy.net.cfg.model_dim, device=dev
        )
        self.codec = load_semantic_codec(
            files.semantic_codec, semantic_codec_config(files.config.get("semantic_codec"), where), device=dev
        )
        self.bigvgan = load_bigvgan(files.bigvgan, device=dev)
        self.settings = policy.settings
        self._prompts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def prompt_condition(self, voice: Voice) -> torch.Tensor:
        """s2mel's condition of a voice prompt: its codes' embeddings regulated to its mel's frames. [1, Tm, C]"""
        key = (voice.codes.data_ptr(), voice.codes.numel(), voice.mel.shape[1])  # shared by a prompt's lines
        if key not in self._prompts:  # (the entry holds the codes: their memory stays theirs)
            dev = self.policy.device
            emb = self.codec.vq2emb(voice.codes[None].to(dev))
            frames = torch.tensor([voice.mel.shape[1]], device=dev)
            self._prompts[key] = (voice.codes, self.s2mel.regulate(emb, frames))
        return self._prompts[key][1]

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, codes: torch.Tensor, voice: Voice, seed: int) -> np.ndarray:
        """One row: latents [L, D] and codes [L] -> waveform [S] float32 in [-1, 1] at 22.05 kHz."""
        dev, s = self.policy.device, self.settings
        x = self.s2mel.gpt_layer(latents[None].float().to(dev)) + self.codec.vq2emb(codes[None].to(dev))
        frames = (torch.tensor([codes.shape[0]]) * CODE_FRAMES).long().to(dev)
        cond = torch.cat([self.prompt_condition(voice), self.s2mel.regulate(x, frames)], 1)
        gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
        noise = torch.randn(1, voice.mel.shape[0], cond.shape[1], generator=gen).to(dev)
        mel = self.s2mel.cfm_inference(
            cond,
            voice.mel[None].to(dev),
            voice.style[None].to(dev),
            n_timesteps=s.diffusion_steps,
            cfg_rate=s.cfg_rate,
            noise=noise,
        )
        wav = self.bigvgan(mel.float()).reshape(-1)
        return wav.clamp(-1.0, 1.0).float().cpu().numpy()


class IndexTTS2Decoder:
    """Each row's codes through the decode stack with its record's voice prompt; `seeds[i]` seeds row i's s2mel
    noise (the trainer gives a group one seed). The GPT latents s2mel reads were computed when the row was sampled
    (`extras["latents"]`, under the weights that sampled it), so decoding needs no GPT pass of its own."""

    def __init__(self, stack: DecodeStack, voices: list[Voice]):
        self.stack, self.voices = stack, voices

    @torch.no_grad()
    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        """Row by row (s2mel runs batch 1, as released; `batch_size` does not apply)."""
        n = rollout.num_rows
        audio: list[np.ndarray | None] = [None] * n
        reasons: list[str | None] = [None] * n
        for i in range(n):
            length = int(rollout.lengths[i])
            if length == 0:
                reasons[i] = "empty generation: no codes"
                continue
            voice = self.voices[int(rollout.prompt_index[i])]
            latents = rollout.extras["latents"][i, :length]
            audio[i] = self.stack(latents, rollout.tokens[i, :length], voice, seeds[i])
        return VocodeResult(audio=audio, reasons=reasons, sample_rate=self.stack.policy.sample_rate)


# --- helpers --------------------------------------------------------------------------------------------------------
def _to(voice: Voice, dtype: torch.dtype) -> Voice:
    return Voice(voice.feats.to(dtype), voice.codes, voice.mel, voice.style)


def _apply_lora(net: IndexGPT, lora) -> torch.nn.Module:
    """peft LoRA on the GPT-2 core's attention and MLP projections (transformers Conv1D: fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=r"^gpt\.h\.\d+\.(attn|mlp)\.(" + "|".join(LORA_TARGETS) + ")$",
        fan_in_fan_out=True,
        bias="none",
    )
    return get_peft_model(net, cfg)


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = True
    return ids, mask
