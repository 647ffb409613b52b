"""A toy policy, the whole of what a new policy implements (policies/base.py `Policy`): C codes + a stop action,
logits = a learned [L, C + 1] table indexed by position (unconditional). CONTRIBUTING.md walks through it;
tests/test_policy_contract.py registers it as `policy.kind: toy` and trains it.

Its checkpoint layout: `<ckpt_dir>/toy.safetensors` holding one tensor `logits` [max_len, codes + 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rollouts.types import PromptRecord, Rollout, SamplingParams, VocodeResult


@dataclass(frozen=True)
class ToyPrompt:
    ids: list[int]  # the target text's characters (the toy ignores them, except for their number)
    text_len: int


class ToyModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(table.clone())  # [L, C + 1]; the last column is the stop action


def write_toy_checkpoint(ckpt_dir: Path, *, max_len: int = 64, codes: int = 8, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    table = torch.randn(max_len, codes + 1, generator=g) * 0.1
    table[:, -1] += 2.0  # stop at about every other step at first: short outputs
    save_file({"logits": table}, str(ckpt_dir / "toy.safetensors"))
    return ckpt_dir


class ToyPolicy:
    context_length = None  # no context window to check prompts against

    def __init__(self, table: torch.Tensor):
        self.model = ToyModel(table)
        self.reference: torch.Tensor | None = None
        self.codes = table.shape[1] - 1
        self.stop = self.codes  # action id of the stop
        self.pad_id = self.codes + 1

    @classmethod
    def from_pretrained(
        cls, ckpt_dir, *, dtype=torch.float32, device="cpu", lora=None, trust_remote_code=False, config=None
    ):
        path = Path(ckpt_dir) / "toy.safetensors"
        if not path.is_file():
            raise ValueError(f"{ckpt_dir}: missing toy.safetensors")
        weights = load_file(str(path))
        if set(weights) != {"logits"} or weights["logits"].dim() != 2:
            raise ValueError(f"{path}: expected exactly one 2-d tensor 'logits', got {sorted(weights)}")
        if lora is not None and lora.enabled:
            raise ValueError("the toy policy has no LoRA")
        return cls(weights["logits"].to(dtype)).to(device)

    def to(self, device) -> ToyPolicy:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logits.device

    def encode_text(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def prompt_input(self, record: PromptRecord) -> ToyPrompt:
        ids = self.encode_text(record.target_text)
        return ToyPrompt(ids=ids, text_len=len(ids))

    def _log_probs(self, table: torch.Tensor, t: int, min_len: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """[N, C + 1] log-probs at step t (stop masked before min_len), at the sampling temperature."""
        logits = table[t].expand(min_len.shape[0], -1) / params.temperature
        stop_off = (t < min_len)[:, None] & (torch.arange(logits.shape[1], device=logits.device) == self.stop)
        return torch.log_softmax(logits.masked_fill(stop_off, -math.inf), -1)

    def sample_groups(
        self,
        prompts,
        group_size,
        params,
        *,
        group_ids,
        seed,
        min_ratio=1.0,
        max_ratio=4.0,
        max_new_tokens=64,
        decode="dynamic",
    ) -> Rollout:
        if params.top_k or params.top_p < 1.0 or params.ras:
            raise ValueError("the toy policy samples plain softmax: set sampling.top_k 0, top_p 1, ras false")
        n = len(prompts) * group_size
        text = torch.tensor([p.text_len for p in prompts]).repeat_interleave(group_size)
        limit = min(max_new_tokens, self.model.logits.shape[0])
        max_len = (text * max_ratio).long().clamp(1, limit)
        min_len = torch.minimum((text * min_ratio).long(), max_len)
        gens = [
            torch.Generator().manual_seed(seed * 1_000_003 + g * 1_009 + j)
            for g in group_ids
            for j in range(group_size)
        ]  # each row from its own seed only
        tokens = torch.full((n, limit + 1), self.pad_id)
        logp = torch.zeros(n, limit + 1)
        lengths, finished = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        with torch.no_grad():
            for t in range(limit + 1):
                lp = self._log_probs(self.model.logits.float(), min(t, limit - 1), min_len, params)
                for i in range(n):
                    if finished[i] or lengths[i] >= max_len[i]:
                        continue
                    a = int(torch.multinomial(lp[i].exp(), 1, generator=gens[i]))
                    tokens[i, t], logp[i, t] = a, lp[i, a]
                    if a == self.stop:
                        finished[i] = True
                    else:
                        lengths[i] += 1
        mask = tokens != self.pad_id
        return Rollout(
            prompt_ids=torch.zeros(n, 1, dtype=torch.long),
            prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            tokens=tokens,
            token_mask=mask,
            behaviour_logp=logp,
            group_ids=torch.tensor(group_ids).repeat_interleave(group_size),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(group_size),
            finished=finished,
            truncated=~finished,
            lengths=lengths,
            min_lengths=min_len,
            text_lengths=text,
            params=params,
            pad_id=self.pad_id,
        )

    def token_logprobs(self, rollout: Rollout, *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.reference if reference else self.model.logits
        n, t_w = rollout.tokens.shape
        rows = [
            self._log_probs(table, min(t, table.shape[0] - 1), rollout.min_lengths, rollout.params) for t in range(t_w)
        ]
        lp = torch.stack(rows, 1)  # [N, T, C + 1]
        taken = lp.gather(-1, rollout.tokens.clamp(max=self.stop)[..., None]).squeeze(-1)
        mask = rollout.token_mask
        ent = -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1).detach()  # only logged
        return torch.where(mask, taken, 0.0), torch.where(mask, ent, float("nan"))

    def rollout_metrics(self, rollout) -> dict[str, float]:
        return {}

    def make_reference(self) -> None:
        self.reference = self.model.logits.detach().clone()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.model.logits]

    def fsdp_units(self) -> list[torch.nn.Module]:
        return []  # one table: FSDP2 shards it with the whole

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return {"logits": self.model.logits.detach().clone()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.logits.copy_(state["logits"])

    speech_rate = 25.0  # actions per second of its audio
    actions_are_frames = True  # one tone per action
    vllm_sampling = False

    def speech_codes(self, rollout: Rollout) -> list[torch.Tensor]:
        return [rollout.tokens[i, : int(rollout.lengths[i])] for i in range(rollout.num_rows)]

    def load_decoder(self, records: list[PromptRecord], *, n_timesteps: int, dtype: str) -> ToyDecoder:
        return ToyDecoder(self)

    def export(self, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({"logits": self.model.logits.detach().cpu().contiguous()}, str(Path(out_dir) / "toy.safetensors"))

    @classmethod
    def write_tiny(cls, ckpt_dir: Path, texts: list[str], *, seed: int, vocoder: bool) -> None:
        if not (Path(ckpt_dir) / "toy.safetensors").exists():
            write_toy_checkpoint(Path(ckpt_dir), seed=seed)


class ToyDecoder:
    """Each action is 40 ms of a sine tone whose pitch is the code (16 kHz): audio for the trainer to pass on."""

    rate = 16000

    def __init__(self, policy: ToyPolicy):
        self.policy = policy

    def __call__(self, rollout: Rollout, seeds: list[int], *, batch_size: int) -> VocodeResult:
        t = torch.arange(self.rate // 25) / self.rate
        audio = [
            torch.cat([torch.sin(2 * math.pi * (100 + 50 * int(c)) * t) for c in codes]).numpy() if len(codes) else None
            for codes in self.policy.speech_codes(rollout)
        ]
        return VocodeResult(
            audio=audio, reasons=[None if a is not None else "no speech" for a in audio], sample_rate=self.rate
        )
