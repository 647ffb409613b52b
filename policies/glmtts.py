"""The GLM-TTS speech LM as an RL policy.

Loads a local checkpoint directory in the upstream layout:
    llm/                      HF LlamaForCausalLM: config.json + *.safetensors
    vq32k-phoneme-tokenizer/  GLM-4 style tiktoken tokenizer (read by policies/tokenizer.py; no remote code)
    flow/, hift/              the decoder (rollouts/token2wav.py: flow-matching token -> mel, HiFT mel -> 24 kHz)
`export` writes the same layout: the trained llm/ (LoRA merged), every other part of the loaded directory as it was.

Prompt layout (upstream inference): [prompt text + " "][target text][<|begin_of_audio|>][prompt speech codes + ats];
the model continues with speech tokens <|audio_c|> = ats + c and stops with <|user|>.

Sampling is restricted to the speech tokens and the stop token: logits are computed only for those rows of the
LM head (`restricted_logits`), so index c < C is speech code c and index C is stop. See policies/sampling.py for
the distribution (temperature, top-k, top-p, RAS) and the behaviour log-probabilities.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from policies.decoding import DynamicDecoder, StaticDecoder
from policies.sampling import SamplingParams, behaviour_logprob, row_keys, sample_step, step_distribution
from policies.tokenizer import GLMTokenizer, RemoteCodeTokenizer, TokenizerError
from rollouts.types import PromptRecord, Rollout, VocodeResult

LLM_DIR = "llm"
TOKENIZER_DIR = "vq32k-phoneme-tokenizer"
ENTROPY_POSITIONS = 512
CHECK_EVERY = 16  # on a GPU, decode steps between checks that every row is done (each check syncs the host)
SPECIAL_STRINGS = {
    "ats": "<|audio_0|>",
    "ate": "<|audio_32767|>",
    "boa": "<|begin_of_audio|>",
    "eoa": "<|user|>",  # the stop token
    "pad": "<|endoftext|>",
}


class CheckpointError(ValueError):
    """The checkpoint directory does not have the expected layout or content."""


@dataclass(frozen=True)
class SpecialTokens:
    ats: int  # id of <|audio_0|>
    ate: int  # id of <|audio_32767|>
    boa: int  # begin of audio
    eoa: int  # stop
    pad: int

    @property
    def num_codes(self) -> int:
        return self.ate - self.ats + 1

    @property
    def stop_index(self) -> int:
        """Index of the stop token in the restricted vocabulary."""
        return self.num_codes


def find_special_tokens(encode, where: str) -> SpecialTokens:
    """Look the special tokens up by string; each must encode to exactly one id (>= the pad id, as upstream)."""
    ids = {}
    for key, text in SPECIAL_STRINGS.items():
        enc = encode(text)
        if len(enc) != 1:
            raise CheckpointError(f"{where}: special token {text} ({key}) encodes to {len(enc)} ids {enc[:8]}, not 1")
        ids[key] = enc[0]
    special = SpecialTokens(**ids)
    if special.num_codes != 32768:
        raise CheckpointError(
            f"{where}: <|audio_0|>..<|audio_32767|> must be 32768 consecutive ids, got {special.ats}..{special.ate}"
        )
    low = [k for k, v in ids.items() if v < special.pad]
    if low:
        raise CheckpointError(f"{where}: special tokens {low} have ids below <|endoftext|> ({special.pad})")
    return special


def check_vocab(vocab: int, special: SpecialTokens, where: str) -> None:
    top = max(special.ate, special.eoa, special.boa, special.pad)
    if vocab <= top:
        raise CheckpointError(f"{where}: vocab_size {vocab} does not cover the tokenizer's special ids (up to {top})")


@dataclass(frozen=True)
class RowBatch:
    """The rows of a group rollout before sampling: B prompts x G samples, prompts left-padded (N = B x G)."""

    prompt_ids: torch.Tensor  # [N, P] long
    prompt_mask: torch.Tensor  # [N, P] bool
    text_len: torch.Tensor  # [N] long, target-text tokens
    min_len: torch.Tensor  # [N] long, stop is masked before this many generated tokens
    max_len: torch.Tensor  # [N] long, a row is truncated at this many speech tokens

    @property
    def num_rows(self) -> int:
        return self.prompt_ids.shape[0]


@dataclass(frozen=True)
class PromptInput:
    ids: list[int]  # the full prompt layout, LM ids
    text_len: int  # target-text tokens (the length bounds scale with it)


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


class GLMTTSPolicy:
    """Sampling, teacher-forced log-probs, LoRA and the frozen reference for one GLM-TTS speech LM."""

    def __init__(self, model: torch.nn.Module, tokenizer, special: SpecialTokens, *, ckpt_dir: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.special = special
        self.ckpt_dir = ckpt_dir
        self.lora = hasattr(model, "disable_adapter")
        self._reference: torch.nn.Module | None = None
        self._head_rows: torch.Tensor | None = None  # LM-head rows of [speech codes..., stop] (restricted_head)
        self._decode_caches: dict = {}  # decode="compiled": static KV caches kept per shape bucket
        self._share_prompts = True  # teacher forcing runs a group's prompt once (off under FSDP2 units)
        check_vocab(model.config.vocab_size, special, ckpt_dir)

    # --- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora=None,  # rl.config.LoraConfig or None
        trust_remote_code: bool = False,
        config=None,  # rl.config.PolicyConfig: nothing in it beyond the arguments above applies to the LM
    ) -> GLMTTSPolicy:
        from transformers import LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one progress bar per run is ours

        ckpt_dir = Path(ckpt_dir)
        llm_dir, tok_dir = ckpt_dir / LLM_DIR, ckpt_dir / TOKENIZER_DIR
        for d in (llm_dir, tok_dir):
            if not d.is_dir():
                raise CheckpointError(
                    f"{ckpt_dir}: missing {d.name}/ (expected the GLM-TTS layout llm/, {TOKENIZER_DIR}/)"
                )
        if not (llm_dir / "config.json").is_file() or not any(llm_dir.glob("*.safetensors")):
            raise CheckpointError(f"{llm_dir}: expected config.json and *.safetensors weights")
        cfg = json.loads((llm_dir / "config.json").read_text())
        if "llama" not in str(cfg.get("model_type", "")).lower():
            raise CheckpointError(f"{llm_dir}/config.json: model_type {cfg.get('model_type')!r} is not llama")
        try:
            tokenizer = RemoteCodeTokenizer(tok_dir) if trust_remote_code else GLMTokenizer.from_dir(tok_dir)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
        special = find_special_tokens(tokenizer.encode, str(tok_dir))
        check_vocab(int(cfg.get("vocab_size", 0)), special, f"{llm_dir}/config.json")  # before torch's own assert
        model = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, local_files_only=True, use_safetensors=True)
        model.to(device)
        if lora is not None and lora.enabled:
            model = apply_lora(model, lora)
        return cls(model, tokenizer, special, ckpt_dir=str(ckpt_dir))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The LM's context window (prompt + generated tokens must fit)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def pad_id(self) -> int:
        """The id padding a rollout's tokens."""
        return self.special.pad

    speech_rate = 25.0  # speech tokens per second
    stages = ("lm",)  # rl/stages.py: its actions' metrics are lm/loss, lm/ratio/*, ...
    actions_are_frames = True  # action t is the code of frame t (token-level rewards map audio spans onto it)
    vllm_sampling = True  # sampling.backend vllm can serve this LM (policies/vllm_rollout.py)

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        """Per row the generated speech codes 0..32767 (stop and padding removed): what the vocoder reads."""
        return rollout.codes(self.special.ats)

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> GLMTTSDecoder:
        """Token2Wav from flow/ + hift/ of the checkpoint directory; every record needs its voice prompt's mel
        (`prompt_speech_feat`) and speaker embedding, the flow's conditions."""
        from rollouts.manifest import ManifestError
        from rollouts.token2wav import Token2Wav, VoicePrompt

        for r in records:
            if r.prompt_feat is None or r.embedding is None:
                missing = "prompt_speech_feat" if r.prompt_feat is None else "embedding"
                raise ManifestError(
                    f"{r.source}: field '{missing}' is missing; vocoding needs it (or vocoder.enabled=false)"
                )
        token2wav = Token2Wav.from_pretrained(
            Path(self.ckpt_dir), device=self.device, n_timesteps=n_timesteps, dtype=dtype
        )
        voices = [VoicePrompt(r.prompt_speech_tokens, r.prompt_feat, r.embedding) for r in records]
        return GLMTTSDecoder(token2wav, voices, self.special.ats)

    # --- prompts ----------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def prompt_input(self, record: PromptRecord) -> PromptInput:
        """[prompt text + " "][target text][BOA][prompt speech codes + ats]"""
        if record.prompt_speech_tokens is None:
            from rollouts.manifest import ManifestError

            raise ManifestError(f"{record.source}: field 'prompt_speech_token' is missing; GLM-TTS needs it")
        prompt_ids = self.encode_text(record.prompt_text + " ")
        target_ids = self.encode_text(record.target_text)
        if not target_ids:
            raise ValueError(f"{record.source}: field 'syn_text': encodes to no tokens")
        codes = [int(c) + self.special.ats for c in record.prompt_speech_tokens]
        return PromptInput(ids=prompt_ids + target_ids + [self.special.boa] + codes, text_len=len(target_ids))

    # --- the LM on the restricted vocabulary ------------------------------------------------------------------
    def restricted_head(self, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM-head rows of the speech codes and the stop token, stacked: (weight [C + 1, H], bias or None).
        A differentiable copy (gradients flow back into the head); build it once per pass and reuse it."""
        _, head = _backbone_and_head(model if model is not None else self.model)
        w, b = head.weight, getattr(head, "bias", None)
        s = self.special
        if self._head_rows is None or self._head_rows.device != w.device:
            self._head_rows = torch.cat([torch.arange(s.ats, s.ate + 1), torch.tensor([s.eoa])]).to(w.device)
        # one index_select: its backward is one scatter into the head's gradient (two slices would cost two)
        return w.index_select(0, self._head_rows), None if b is None else b.index_select(0, self._head_rows)

    def restricted_logits(
        self,
        hidden: torch.Tensor,
        model: torch.nn.Module | None = None,
        head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """[..., H] -> [..., C + 1] logits of the speech codes and the stop token (only those head rows), in one
        matmul. `head`: a `restricted_head()` built earlier (the sampler builds it once per rollout)."""
        w, b = head if head is not None else self.restricted_head(model)
        return F.linear(hidden, w, b)

    def restricted_to_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """restricted index -> LM id"""
        return torch.where(
            idx == self.special.stop_index, torch.full_like(idx, self.special.eoa), idx + self.special.ats
        )

    def ids_to_restricted(self, ids: torch.Tensor) -> torch.Tensor:
        """LM id -> restricted index (speech code, or C for stop); other ids map to -1."""
        s = self.special
        out = torch.where((ids >= s.ats) & (ids <= s.ate), ids - s.ats, torch.full_like(ids, -1))
        return torch.where(ids == s.eoa, torch.full_like(ids, s.stop_index), out)

    # --- group sampling ---------------------------------------------------------------------------------------
    def row_batch(
        self,
        prompts: list[PromptInput],
        group_size: int,
        *,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        max_new_tokens: int = 1000,
    ) -> RowBatch:
        """The B x G rows of a group rollout: left-padded prompts and each row's length bounds. Stop is masked
        before int(min_ratio * text_len) tokens; a row is truncated at min(int(max_ratio * text_len),
        max_new_tokens) speech tokens."""
        n = len(prompts) * group_size
        rows = [p for p in prompts for _ in range(group_size)]
        p_len = max(len(p.ids) for p in rows)
        prompt_ids = torch.full((n, p_len), self.special.pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, p_len), dtype=torch.bool)
        for i, p in enumerate(rows):
            prompt_ids[i, p_len - len(p.ids) :] = torch.tensor(p.ids)
            prompt_mask[i, p_len - len(p.ids) :] = True
        text_len = torch.tensor([p.text_len for p in rows])
        max_len = torch.clamp((text_len.double() * max_ratio).long(), max=max_new_tokens).clamp(min=1)
        min_len = torch.minimum((text_len.double() * min_ratio).long(), max_len)
        return RowBatch(prompt_ids, prompt_mask, text_len, min_len, max_len)

    @torch.no_grad()
    def sample_groups(
        self,
        prompts: list[PromptInput],
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        max_new_tokens: int = 1000,
        decode: str = "dynamic",
    ) -> Rollout:
        """Sample `group_size` sequences for each prompt, all rows in one left-padded batch with a KV cache (each
        prompt is prefilled once and its cache repeated for its group's rows).

        Row r belongs to prompt r // group_size and carries group_ids[r // group_size]; length bounds as in
        `row_batch`. Row j of group g draws from the random stream (seed, g, j), whatever else is in the batch.
        decode: "dynamic" (growing KV cache), "static" (preallocated cache, fixed shapes) or "compiled" (static,
        compiled once per shape bucket; CUDA graphs on GPU): policies/decoding.py. The sampler's state stays on
        the device; on a GPU the loop checks whether every row is done every CHECK_EVERY steps (one host sync).
        """
        if len(group_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} group ids, got {len(group_ids)}")
        if decode not in ("dynamic", "static", "compiled"):
            raise ValueError(f"decode must be dynamic, static or compiled, got {decode!r}")
        device = self.device
        rows = self.row_batch(
            prompts, group_size, min_ratio=min_ratio, max_ratio=max_ratio, max_new_tokens=max_new_tokens
        )
        n, steps = rows.num_rows, int(rows.max_len.max())
        keys = row_keys(
            seed, torch.tensor(group_ids).repeat_interleave(group_size), torch.arange(group_size).repeat(len(prompts))
        ).to(device)
        tokens = torch.full((n, steps), self.special.pad, dtype=torch.long, device=device)
        logp_b = torch.zeros((n, steps), dtype=torch.float32, device=device)
        tmask = torch.zeros((n, steps), dtype=torch.bool, device=device)
        history = torch.full((n, params.ras_window), -1, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        truncated = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        min_len, max_len = rows.min_len.to(device), rows.max_len.to(device)
        pad = torch.full((n,), self.special.pad, dtype=torch.long, device=device)

        was_training = self.model.training
        self.model.eval()
        backbone, _ = _backbone_and_head(self.model)
        head = self.restricted_head()
        attn = rows.prompt_mask.to(device)
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        # the rows of a group share their prompt: prefill each prompt once, then repeat its KV cache per row
        first = slice(None, None, group_size)
        out = backbone(
            input_ids=rows.prompt_ids[first].to(device),
            attention_mask=attn[first].long(),
            position_ids=pos[first],
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1].repeat_interleave(group_size, dim=0)
        if decode == "dynamic":
            if group_size > 1:
                out.past_key_values.batch_repeat_interleave(group_size)
            decoder = DynamicDecoder(backbone, out.past_key_values, attn)
        else:
            decoder = StaticDecoder(
                backbone,
                self.model.config,
                out.past_key_values,
                attn,
                group_size,
                steps,
                compile=decode == "compiled",
                pool=self._decode_caches if decode == "compiled" else None,
            )
        next_pos = pos[:, -1:] + 1
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
        for t in range(steps):
            active = ~(finished | truncated)
            logits = self.restricted_logits(hidden, head=head)
            dist = step_distribution(logits, min_len <= t, params)
            idx = sample_step(dist, history if params.ras else None, params, keys, t)
            lp = behaviour_logprob(dist, idx, history if params.ras else None, params)
            tokens[:, t] = torch.where(active, self.restricted_to_ids(idx), pad)
            logp_b[:, t] = torch.where(active, lp.float(), torch.zeros_like(logp_b[:, t]))
            tmask[:, t] = active
            stopped = active & (idx == self.special.stop_index)
            finished |= stopped
            speech = active & ~stopped
            lengths += speech.long()
            truncated |= speech & (lengths >= max_len)
            if params.ras:
                history = torch.where(speech[:, None], torch.cat([history[:, 1:], idx[:, None]], 1), history)
            if t == steps - 1 or ((t + 1) % check_every == 0 and bool((finished | truncated).all())):
                break
            hidden = decoder.step(torch.where(speech, tokens[:, t], pad), speech, next_pos, t)
            next_pos = next_pos + 1
        if was_training:
            self.model.train()
        width = int(tmask.sum(-1).max())
        row_group = torch.tensor(group_ids, dtype=torch.long).repeat_interleave(group_size)
        return Rollout(
            prompt_ids=rows.prompt_ids,
            prompt_mask=rows.prompt_mask,
            tokens=tokens[:, :width].cpu(),
            token_mask=tmask[:, :width].cpu(),
            behaviour_logp=logp_b[:, :width].cpu(),
            group_ids=row_group,
            prompt_index=torch.arange(len(prompts)).repeat_interleave(group_size),
            finished=finished.cpu(),
            truncated=truncated.cpu(),
            lengths=lengths.cpu(),
            min_lengths=rows.min_len,
            text_lengths=rows.text_len,
            params=params,
            pad_id=self.special.pad,
        )

    # --- teacher forcing --------------------------------------------------------------------------------------
    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the rollout's tokens under the current policy (or the frozen reference), computed with the
        rollout's sampling distribution. Runs under the caller's grad mode. Returns (logp [N, T], entropy [N, T])
        on the policy's device. logp is 0 outside token_mask; entropy is NaN except on an evenly spaced subset of at
        most ENTROPY_POSITIONS valid positions (it is only logged)."""
        device = self.device
        n, t_full = rollout.tokens.shape
        t_w = int(rollout.token_mask.sum(-1).max()) if n else 0
        keep_p = rollout.prompt_mask.any(0).nonzero()
        p_start = int(keep_p[0]) if keep_p.numel() else 0
        prompt = rollout.prompt_ids[:, p_start:].to(device)
        pmask = rollout.prompt_mask[:, p_start:].to(device)
        toks = rollout.tokens[:, :t_w].to(device)
        tmask = rollout.token_mask[:, :t_w].to(device)
        ids = torch.cat([prompt, toks[:, : max(t_w - 1, 0)]], dim=1)
        attn = torch.cat([pmask, tmask[:, : max(t_w - 1, 0)]], dim=1)
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        with self._model_for(reference) as model:
            backbone, _ = _backbone_and_head(model)
            share = self._share_prompts and not _dropout_active(model)
            hidden = _forced_states(backbone, prompt, pmask, ids, attn, pos, share=share)
            logits = self.restricted_logits(hidden, model)
        v = logits.shape[-1]
        flat = logits.reshape(n * t_w, v)
        steps = torch.arange(t_w, device=device)
        stop_allowed = (steps[None, :] >= rollout.min_lengths.to(device)[:, None]).reshape(-1)
        params = rollout.params
        dist = step_distribution(flat, stop_allowed, params)
        target = self.ids_to_restricted(toks).clamp(min=0).reshape(-1)
        history = None
        if params.ras:
            history = _windows(self.ids_to_restricted(toks), tmask, params.ras_window).reshape(n * t_w, -1)
        lp = behaviour_logprob(dist, target, history, params).reshape(n, t_w)
        lp = torch.where(tmask, lp, torch.zeros_like(lp))
        # entropy is only logged: estimate it on at most ENTROPY_POSITIONS evenly spaced valid positions
        valid_pos = tmask.reshape(-1).nonzero().squeeze(1)
        stride = max(1, -(-valid_pos.numel() // ENTROPY_POSITIONS))
        rows = valid_pos[::stride]
        ent = torch.full((n * t_w,), float("nan"), device=device, dtype=lp.dtype)
        ent[rows] = dist.entropy(rows)
        pad = t_full - t_w
        return F.pad(lp, (0, pad)), F.pad(ent.reshape(n, t_w), (0, pad), value=float("nan"))

    # --- reference model --------------------------------------------------------------------------------------
    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        return {}  # the trainer's own metrics (len/, ratio/, clip/ ...) say all there is about the LM's actions

    def make_reference(self) -> None:
        """Freeze a copy of the current weights as the reference (LoRA: the base model with adapters disabled)."""
        if self.lora:
            return
        ref = copy.deepcopy(self.model)
        ref.requires_grad_(False)
        ref.eval()
        self._reference = ref

    @contextlib.contextmanager
    def _model_for(self, reference: bool) -> Iterator[torch.nn.Module]:
        if not reference:
            yield self.model
        elif self.lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self._reference is None:
                raise RuntimeError("make_reference() was not called")
            yield self._reference

    # --- parameters and persistence ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[torch.nn.Module]:
        """The decoder layers (each an FSDP2 unit: gathered for its own forward / backward only). Teacher forcing
        then runs one pass over every row: sharing a group's prompt pass runs the layers once or twice depending
        on the rows, which ranks holding different rows cannot line up."""
        self._share_prompts = False
        backbone, _ = _backbone_and_head(self.model)
        return list(backbone.layers)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the adapter (and modules_to_save) with LoRA, else every weight."""
        if self.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def export(self, out_dir: Path) -> None:
        """llm/ as HF safetensors + config.json (LoRA merged into the base weights), the tokenizer and every other
        part of the loaded checkpoint directory (flow/, hift/, ...) copied as they are."""
        import shutil

        out_dir = Path(out_dir)
        src = Path(self.ckpt_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for entry in sorted(src.iterdir()):
            if entry.name == LLM_DIR:
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, out_dir / entry.name)
        model = copy.deepcopy(self.model)
        if self.lora:
            model = model.merge_and_unload()
        model.save_pretrained(str(out_dir / LLM_DIR), safe_serialization=True)

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        from policies.tiny import write_tiny_checkpoint
        from rollouts.tiny_vocoder import write_tiny_vocoder

        ckpt_dir = Path(ckpt_dir)
        if not (ckpt_dir / LLM_DIR).exists():
            write_tiny_checkpoint(ckpt_dir, texts, seed=seed)
            print(f"ttsrl: wrote a tiny random GLM-TTS speech LM to {ckpt_dir}")
        if vocoder and not (ckpt_dir / "flow").exists():
            write_tiny_vocoder(ckpt_dir, seed=seed)
            print(f"ttsrl: wrote a tiny random flow + HiFT vocoder to {ckpt_dir}")

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict

            res = set_peft_model_state_dict(self.model, state)
            bad = [k for k in getattr(res, "unexpected_keys", [])]
            if bad:
                raise CheckpointError(f"adapter state has unexpected keys: {bad[:5]}")
            return
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise CheckpointError(f"policy state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


class GLMTTSDecoder:
    """Token2Wav over a rollout's speech codes, each row with its record's voice prompt (mel + speaker)."""

    def __init__(self, token2wav, voices: list, ats: int):
        self.token2wav, self.voices, self.ats = token2wav, voices, ats

    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        return self.token2wav(
            rollout.codes(self.ats), [self.voices[int(k)] for k in rollout.prompt_index], seeds, batch_size=batch_size
        )


def _forced_states(
    backbone: torch.nn.Module,
    prompt: torch.Tensor,  # [N, P] left-padded prompt ids
    pmask: torch.Tensor,  # [N, P] bool
    ids: torch.Tensor,  # [N, P + L] prompt + the generated tokens fed back
    attn: torch.Tensor,  # [N, P + L] bool
    pos: torch.Tensor,  # [N, P + L] position ids
    *,
    share: bool = True,
) -> torch.Tensor:
    """Teacher-forced hidden states that predict the generated tokens: [N, L + 1, H] (position P - 1 onwards).

    Rows of one group share their prompt, so each distinct prompt runs through the backbone once and its KV cache
    is gathered per row (index_select: the rows' gradients add up into the shared prompt pass); the generated
    tokens then run on top of that cache. Same states as one pass over [prompt, tokens] for every row, with the
    prompt's cost paid once per prompt instead of once per row. share=False (active dropout, whose noise must stay
    independent per row) runs one pass over every row."""
    n, p = prompt.shape
    uniq, inverse = torch.unique(torch.cat([prompt, pmask.long()], dim=1), dim=0, return_inverse=True)
    if not share or uniq.shape[0] == n or ids.shape[1] == p:  # nothing shared, or nothing generated to feed back
        out = backbone(input_ids=ids, attention_mask=attn.long(), position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, p - 1 :]
    u_mask = uniq[:, p:]
    u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=uniq[:, :p], attention_mask=u_mask, position_ids=u_pos, use_cache=True)
    cache = out.past_key_values
    cache.reorder_cache(inverse)
    rest = backbone(
        input_ids=ids[:, p:], attention_mask=attn.long(), position_ids=pos[:, p:], past_key_values=cache, use_cache=True
    ).last_hidden_state
    return torch.cat([out.last_hidden_state[:, -1:].index_select(0, inverse), rest], dim=1)


def _dropout_active(model: torch.nn.Module) -> bool:
    """Whether a forward pass of `model` would draw dropout noise (training mode and some dropout p > 0)."""
    if not model.training:
        return False
    config = getattr(model, "config", None)
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "hidden_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())


def _windows(idx: torch.Tensor, mask: torch.Tensor, w: int) -> torch.Tensor:
    """For every position t, the previous w generated speech tokens (restricted ids, -1 where none). [N, T, w]"""
    n, t = idx.shape
    speech = torch.where(mask & (idx >= 0), idx, torch.full_like(idx, -1))
    padded = F.pad(speech, (w, 0), value=-1)  # [N, w + T]
    return padded.unfold(1, w, 1)[:, :t]  # window ending just before t


def apply_lora(model: torch.nn.Module, lora) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    if "lm_head" in lora.target_modules:
        raise ValueError("policy.lora.target_modules must not include lm_head (use modules_to_save)")
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        init_lora_weights="gaussian",
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, cfg)
