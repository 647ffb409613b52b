"""A fake of the public vLLM API that policies/vllm_rollout.py uses, for tests on machines without vLLM or a GPU.

Modelled on vLLM 0.34.0 and checked against 0.10.0 (the first release with `logprobs_mode`): the names, signatures,
defaults, argument checks and return shapes below are vLLM's, and `surface_mismatches(vllm)` lists where they are
not those of an installed vLLM (tests/test_vllm_rollout.py runs it where vLLM is importable). The surface:

    LLM(model, *, skip_tokenizer_init, dtype, seed, gpu_memory_utilization, **engine_args)   (ENGINE_ARGS)
        .generate(prompts, /, sampling_params=None, *, use_tqdm=True) -> list[RequestOutput]
        .apply_model(func) -> [func(model)]      one worker; `model` is vLLM's Llama (`LlamaForCausalLM` below)
        .reset_prefix_cache() -> bool
    SamplingParams(**fields)                     the fields of SAMPLING_FIELDS, with vLLM's defaults and checks
    TokensPrompt(prompt_token_ids=[...])         a TypedDict, as in vLLM
    RequestOutput, CompletionOutput, Logprob     .outputs[i].token_ids / .logprobs / .finish_reason / .stop_reason

and nothing else: any other attribute of an LLM is an AttributeError (`llm.llm_engine` and what hangs off it are
vLLM's internals, laid out differently from one release to the next), and a SamplingParams field or engine
argument outside those lists is a TypeError.

The engine does what vLLM does wherever a wrong caller would show. It loads its own copy of the checkpoint into a
model in vLLM's layout (q/k/v stacked in `self_attn.qkv_proj`, gate/up in `mlp.gate_up_proj`), whose
`load_weights` takes (HF name, tensor) pairs, refuses unknown names and wrong shapes and returns the vLLM names it
loaded; it samples from that model, so weights synced wrong, or not at all, change the samples and their log-probs.
A prompt must be token ids inside the vocabulary (with `skip_tokenizer_init` there is no tokenizer for text).
Each step: allowed_token_ids mask -> stop ids (and the checkpoint's EOS) masked before min_tokens -> temperature
-> top-k -> top-p (vLLM's rule: a share p of the top-k mass, `top_k_top_p`) -> a draw from the request's own
seeded generator. The log-probs returned are those logprobs_mode names ("processed_logprobs": of that processed
distribution; the default "raw_logprobs": of the raw logits). A request stops at a stop id (kept in token_ids,
finish_reason "stop") or at max_tokens / max_model_len ("length"). With prefix caching a prompt seen before reuses
its keys and values (here with its last logits) until `reset_prefix_cache`, so a weight sync that does not reset
the cache samples on stale keys and values.

Not modelled: vLLM's kernels and their rounding (everything runs in float32 whatever `dtype` says;
tests/test_vllm_gpu.py measures the real gap), its scheduler, n > 1, greedy sampling (temperature 0), text
prompts, LoRA requests, tensor parallelism.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import json
import math
import sys
import types
import typing
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

# vLLM's LlamaForCausalLM.packed_modules_mapping: each fused projection and the HF ones stacked in it (along dim 0)
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# the EngineArgs fields that LLM(**engine_args) takes here (vLLM takes many more; any other is a TypeError here)
ENGINE_ARGS = ("max_model_len", "enable_prefix_caching", "logprobs_mode", "distributed_executor_backend")
# vLLM's Literal types of the values checked here (vllm.config: ModelDType, LogprobsMode, DistributedExecutorBackend)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")
MAX_LOGPROBS = 20  # vLLM's default ModelConfig.max_logprobs
_SAMPLING_EPS = 1e-5  # vLLM: a temperature below it is greedy sampling


class VLLMValidationError(ValueError):
    """A request vLLM refuses (a ValueError in vLLM 0.10; vllm.exceptions.VLLMValidationError in later releases)."""


# --- the request and output types ---------------------------------------------------------------------------------


class TokensPrompt(TypedDict):
    """vllm.inputs.TokensPrompt, the one key modelled here."""

    prompt_token_ids: list[int]


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    """vllm.SamplingParams with the fields below (vLLM's names and defaults; keyword arguments only) and vLLM's
    checks of them (`__post_init__` / `_verify_args`)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    detokenize: bool = True
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        if self.seed == -1:
            self.seed = None
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise VLLMValidationError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.temperature < _SAMPLING_EPS:  # vLLM: greedy sampling, top-k and top-p off
            self.top_p, self.top_k = 1.0, 0


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _check_types(sp: SamplingParams) -> None:
    """The declared types, strictly (vLLM's msgspec struct does not check them at construction, but a tensor or
    a numpy integer where an int belongs breaks its engine further on)."""

    def is_int(x):
        return type(x) is int

    def ok(value, hint: str) -> bool:
        if value is None:
            return "None" in hint
        if hint.startswith("int"):
            return is_int(value)
        if hint.startswith("float"):
            return is_int(value) or type(value) is float
        if hint.startswith("bool"):
            return type(value) is bool
        if hint.startswith("list[int]"):
            return type(value) is list and all(is_int(t) for t in value)
        raise AssertionError(hint)

    for f in dataclasses.fields(sp):
        value = getattr(sp, f.name)
        if not ok(value, str(f.type)):
            raise TypeError(f"SamplingParams.{f.name} must be {f.type}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass
class Logprob:
    """vllm.logprobs.Logprob (vllm.sequence.Logprob in older releases)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """vllm.CompletionOutput (the fields that do not depend on LoRA, speculative decoding or routing)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    """vllm.RequestOutput (its required arguments)."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: list | None,
        outputs: list[CompletionOutput],
        finished: bool,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished


# --- the model in vLLM's layout -----------------------------------------------------------------------------------


def _vllm_name(hf_name: str) -> tuple[str, int]:
    """HF parameter name -> (vLLM parameter name, the shard's place in the fused tensor)."""
    for fused, parts in PACKED_MODULES.items():
        for i, part in enumerate(parts):
            if f".{part}." in hf_name:
                return hf_name.replace(f".{part}.", f".{fused}."), i
    return hf_name, 0


class LlamaForCausalLM(nn.Module):
    """vLLM's Llama as `LLM.apply_model` hands it over: its parameters under vLLM's names, the HF q/k/v and gate/up
    projections stacked in `qkv_proj` / `gate_up_proj`, and `load_weights((HF name, tensor), ...)` that maps HF
    names onto them, refuses a name it does not know and a tensor whose shape does not fit (vLLM's messages), and
    returns the vLLM names it loaded. `loaded` collects the HF names `load_weights` took (tests clear it)."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(self, hf_state: dict[str, torch.Tensor], tie_word_embeddings: bool = False):
        super().__init__()
        self.shards: dict[str, tuple[str, int, int]] = {}  # HF name -> (vLLM name, first row, rows)
        groups: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
        for name, t in hf_state.items():
            if tie_word_embeddings and name == "lm_head.weight":
                continue  # the embedding's tensor, below
            vname, place = _vllm_name(name)
            groups.setdefault(vname, []).append((place, name, t))
        for vname, parts in groups.items():
            parts.sort(key=lambda p: p[0])
            row = 0
            for _, name, t in parts:
                self.shards[name] = (vname, row, t.shape[0])
                row += t.shape[0]
            fused = torch.cat([t.detach().float() for _, _, t in parts]) if len(parts) > 1 else parts[0][2].float()
            self._register(vname, nn.Parameter(fused.detach().clone(), requires_grad=False))
        if tie_word_embeddings:
            embed = self.get_parameter("model.embed_tokens.weight")
            self._register("lm_head.weight", embed)
            self.shards["lm_head.weight"] = ("model.embed_tokens.weight", 0, embed.shape[0])
        self.loaded: set[str] = set()

    def _register(self, vname: str, param: nn.Parameter) -> None:
        *path, leaf = vname.split(".")
        module: nn.Module = self
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, param)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:  # vLLM computes these itself
                continue
            if name not in self.shards:
                raise ValueError(f"There is no module or parameter named '{name}' in LlamaForCausalLM")
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name}: a torch.Tensor, got {type(w).__name__}")
            vname, row, rows = self.shards[name]
            dst = params[vname].data[row : row + rows]
            if dst.shape != w.shape:
                raise AssertionError(f"Attempted to load weight ({w.size()}) into parameter ({dst.size()})")
            dst.copy_(w.detach())
            self.loaded.add(name)
            loaded.add(vname)
        return loaded

    def hf_tensor(self, hf_name: str) -> torch.Tensor:
        """The engine's current value of an HF weight (a view into the fused parameter)."""
        vname, row, rows = self.shards[hf_name]
        return self.get_parameter(vname).data[row : row + rows]


# --- the engine -----------------------------------------------------------------------------------------------------


class Engine:
    """What a fake LLM holds (tests reach it through `engine(llm)`, never through the LLM)."""

    def __init__(self, model: str, args: dict[str, Any]):
        from transformers import AutoModelForCausalLM

        path = Path(model)
        if not (path / "config.json").is_file():
            raise OSError(f"{model} is not a HF model directory (no config.json)")
        if not args["skip_tokenizer_init"] and not any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            raise OSError(f"no tokenizer in {model} (skip_tokenizer_init=True serves token ids without one)")
        self.args = {"model": model, **args}
        # the kernels: an HF Llama that the engine's weights are copied into before each generate (float32 always)
        self.hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
        config = self.hf.config
        self.vocab_size = int(config.vocab_size)
        self.max_model_len = args.get("max_model_len") or int(config.max_position_embeddings)
        self.model = LlamaForCausalLM(self.hf.state_dict(), bool(getattr(config, "tie_word_embeddings", False)))
        gen = path / "generation_config.json"
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else config.eos_token_id
        self.eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.logprobs_mode = args.get("logprobs_mode", "raw_logprobs")
        self.prefix_caching = args.get("enable_prefix_caching", True)  # on by default in vLLM's V1 engine
        # the prefix cache: prompt -> the version of the weights its keys and values were computed with; `snapshots`
        # keeps the weights of every older version the cache still refers to
        self.version = 0
        self.prefix_cache: dict[tuple[int, ...], int] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.prefix_resets = 0
        self.requests: list[tuple[list[int], SamplingParams]] = []  # every request served, in order
        self.rng = torch.Generator().manual_seed(args["seed"])  # the draws of requests without a seed
        self.request_ids = itertools.count()

    def prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt):
            if self.args["skip_tokenizer_init"]:
                raise ValueError("Tokenizer not available when `skip_tokenizer_init=True`")
            raise NotImplementedError("text prompts are not modelled")
        if not isinstance(prompt, dict) or set(prompt) != {"prompt_token_ids"}:
            raise TypeError(f"a TokensPrompt(prompt_token_ids=[...]) is modelled here, got {prompt!r}")
        ids = prompt["prompt_token_ids"]
        if type(ids) is not list or not all(type(t) is int for t in ids):
            raise TypeError(f"prompt_token_ids must be a list of int, got {type(ids).__name__}")
        if not ids:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise VLLMValidationError(f"Token id {bad} is out of vocabulary")
        if len(ids) >= self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of "
                f"{self.max_model_len}."
            )
        return ids

    def verify(self, sp: SamplingParams) -> None:
        """vLLM's checks of a request's SamplingParams against the model (`SamplingParams.verify`)."""
        if sp.n != 1:
            raise NotImplementedError("n > 1 is not modelled")
        if sp.temperature < _SAMPLING_EPS:
            raise NotImplementedError("greedy sampling is not modelled")
        n_logprobs = self.vocab_size if sp.logprobs == -1 else sp.logprobs
        if n_logprobs is not None and n_logprobs > MAX_LOGPROBS:
            raise VLLMValidationError(
                f"Requested sample logprobs of {n_logprobs}, which is greater than max allowed: {MAX_LOGPROBS}"
            )
        bad = [t for t in sp.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise VLLMValidationError(f"token_id(s) {bad} in stop_token_ids contain out-of-vocab token ids.")
        if sp.allowed_token_ids is not None:
            if not sp.allowed_token_ids:
                raise VLLMValidationError("allowed_token_ids is not None and empty!")
            if any(not 0 <= t < self.vocab_size for t in sp.allowed_token_ids):
                raise VLLMValidationError("allowed_token_ids contains out-of-vocab token id!")

    def model_access(self) -> None:
        """`apply_model` may change the weights: the cache's keys and values stay those of the weights before."""
        if any(v == self.version for v in self.prefix_cache.values()):
            self.snapshots[self.version] = {n: self.model.hf_tensor(n).clone() for n in self.model.shards}
        self.version += 1

    def reset_prefix_cache(self) -> None:
        self.prefix_cache.clear()
        self.snapshots.clear()
        self.prefix_resets += 1

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        hf = self.hf.state_dict()
        for name in self.model.shards:  # the engine's weights (vLLM's layout) into the HF Llama that runs them
            hf[name].copy_(self.model.hf_tensor(name))
        versions = [self.prefix_cache.get(tuple(ids), self.version) if self.prefix_caching else -1 for ids in prompts]
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for version in sorted(set(versions)):  # one batch per version of the prompts' keys and values
            rows = [i for i, v in enumerate(versions) if v == version]
            prefill = self.hf
            if version in self.snapshots:  # keys and values cached before a weight change and not reset since
                prefill = copy.deepcopy(self.hf)
                state = prefill.state_dict()
                for name, t in self.snapshots[version].items():
                    state[name].copy_(t)
            done = self.run([prompts[i] for i in rows], [params[i] for i in rows], prefill)
            for i, out in zip(rows, done):
                outputs[i] = out
        if self.prefix_caching:
            for ids in prompts:
                self.prefix_cache.setdefault(tuple(ids), self.version)
        return outputs  # type: ignore[return-value]

    def run(self, prompts: list[list[int]], params: list[SamplingParams], prefill: nn.Module) -> list[RequestOutput]:
        """The requests as one left-padded batch: prompts through `prefill` (the weights their cached keys and
        values were computed with), every further step through the current weights."""
        n, width, V = len(prompts), max(len(p) for p in prompts), self.vocab_size
        ids = torch.zeros((n, width), dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = True
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        out = prefill(input_ids=ids, attention_mask=attn.long(), position_ids=pos, use_cache=True)
        past, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), pos[:, -1:] + 1

        gens = [torch.Generator().manual_seed(sp.seed) if sp.seed is not None else self.rng for sp in params]
        allowed = torch.ones((n, V), dtype=torch.bool)
        stops = [set(sp.stop_token_ids) | self.eos_ids for sp in params]  # the EOS ends a request too
        stop_mask = torch.zeros((n, V), dtype=torch.bool)
        for i, sp in enumerate(params):
            if sp.allowed_token_ids is not None:
                allowed[i] = False
                allowed[i, sp.allowed_token_ids] = True
            stop_mask[i, sorted(stops[i])] = True
        min_tokens = torch.tensor([sp.min_tokens for sp in params])
        temperature = torch.tensor([[sp.temperature] for sp in params], dtype=torch.float32)
        top_k = torch.tensor([sp.top_k for sp in params])
        top_p = torch.tensor([sp.top_p for sp in params], dtype=torch.float32)
        limit = [
            min(sp.max_tokens or self.max_model_len, self.max_model_len - len(p)) for sp, p in zip(params, prompts)
        ]
        tokens: list[list[int]] = [[] for _ in range(n)]
        steps: list[list[dict[int, Logprob]]] = [[] for _ in range(n)]
        finish, stop_reason = ["length"] * n, [None] * n
        done = [False] * n
        while True:
            x = logits.masked_fill(~allowed, -math.inf)
            early = torch.tensor([len(t) for t in tokens]) < min_tokens
            x = x.masked_fill(stop_mask & early[:, None], -math.inf)
            x = top_k_top_p(x / temperature, top_k, top_p)
            processed = x.log_softmax(-1)
            probs = processed.exp()
            feed = torch.zeros(n, dtype=torch.long)
            live = torch.zeros(n, dtype=torch.bool)
            for i, sp in enumerate(params):
                if done[i]:
                    continue
                tok = int(torch.multinomial(probs[i], 1, generator=gens[i]))
                if sp.logprobs is not None:
                    steps[i].append(self.step_logprobs(logits[i], x[i], processed[i], tok, sp.logprobs))
                tokens[i].append(tok)
                if tok in stops[i]:  # kept in token_ids, as vLLM does
                    finish[i], stop_reason[i], done[i] = "stop", (tok if tok in sp.stop_token_ids else None), True
                elif len(tokens[i]) >= limit[i]:
                    done[i] = True
                else:
                    feed[i], live[i] = tok, True
            if all(done):
                break
            attn = torch.cat([attn, live[:, None]], dim=1)  # a finished row's filler token is never attended to
            out = self.hf(
                input_ids=feed[:, None],
                attention_mask=attn.long(),
                position_ids=next_pos,
                past_key_values=past,
                use_cache=True,
            )
            past, logits, next_pos = out.past_key_values, out.logits[:, -1].float(), next_pos + 1
        outputs = []
        for i, sp in enumerate(params):
            completion = CompletionOutput(
                index=0,
                text="",  # detokenize=False, or no tokenizer
                token_ids=tokens[i],
                cumulative_logprob=sum(s[t].logprob for s, t in zip(steps[i], tokens[i]))
                if sp.logprobs is not None
                else None,
                logprobs=steps[i] if sp.logprobs is not None else None,
                finish_reason=finish[i],
                stop_reason=stop_reason[i],
            )
            outputs.append(RequestOutput(str(next(self.request_ids)), None, list(prompts[i]), None, [completion], True))
        return outputs

    def step_logprobs(self, raw, processed_logits, processed, tok: int, k: int) -> dict[int, Logprob]:
        """The sampled token and the k most likely, as logprobs_mode says (vLLM's `compute_topk_scores`)."""
        scores = {
            "raw_logprobs": lambda: raw.log_softmax(-1),
            "raw_logits": lambda: raw,
            "processed_logprobs": lambda: processed,
            "processed_logits": lambda: processed_logits,
        }[self.logprobs_mode]()
        rank = int((scores > scores[tok]).sum()) + 1
        out = {tok: Logprob(float(scores[tok]), rank)}
        top = scores.topk(self.vocab_size if k == -1 else k)
        for r, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
            out.setdefault(t, Logprob(float(v), r))
        return out


def top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM's `apply_top_k_top_p_pytorch` (vllm/v1/sample/ops/topk_topp_sampler.py; its Triton kernel does the
    same): per row, sort ascending, mask every logit below the k-th largest, then mask the low tail whose
    cumulative probability **after the top-k cut** is <= 1 - p (the largest always stays). k 0 or -1: no top-k.
    Top-p thus keeps a share p of the top-k mass, not of the whole distribution."""
    V = logits.shape[-1]
    k = torch.where((k <= 0) | (k >= V), torch.full_like(k, V), k)
    if bool((k == V).all()) and bool((p >= 1.0).all()):
        return logits
    vals, idx = logits.sort(dim=-1, descending=False)
    vals = vals.masked_fill(vals < vals.gather(1, (V - k)[:, None]), -math.inf)
    drop = vals.softmax(-1).cumsum(-1) <= 1 - p[:, None]
    drop[:, -1] = False
    vals = vals.masked_fill(drop, -math.inf)
    return torch.empty_like(logits).scatter_(1, idx, vals)


# --- vllm.LLM -------------------------------------------------------------------------------------------------------

_ENGINES: weakref.WeakKeyDictionary[LLM, Engine] = weakref.WeakKeyDictionary()
CREATED: list[Engine] = []  # every engine, in the order the LLMs were made (emptied by `install`)


def engine(llm: LLM) -> Engine:
    return _ENGINES[llm]


class LLM:
    """vllm.LLM: the constructor, `generate`, `apply_model` and `reset_prefix_cache`; no other attribute."""

    __slots__ = ("__weakref__",)

    def __init__(
        self,
        model: str,
        *,
        skip_tokenizer_init: bool = False,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(ENGINE_ARGS))
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r} (as modelled)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: one of {DTYPES}")
        if gpu_memory_utilization is not None and not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kwargs.get("logprobs_mode", "raw_logprobs") not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode {kwargs['logprobs_mode']!r}: one of {LOGPROBS_MODES}")
        if kwargs.get("distributed_executor_backend") not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(f"distributed_executor_backend {kwargs['distributed_executor_backend']!r}")
        if kwargs.get("max_model_len") is not None and (type(kwargs["max_model_len"]) is not int):
            raise TypeError(f"max_model_len must be an int, got {kwargs['max_model_len']!r}")
        args = dict(
            skip_tokenizer_init=skip_tokenizer_init,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            **kwargs,
        )
        eng = Engine(model, args)
        _ENGINES[self] = eng
        CREATED.append(eng)

    def __getattr__(self, name: str):  # only for names the class does not have
        raise AttributeError(
            f"LLM.{name}: not part of the vllm.LLM API modelled here (generate, apply_model, reset_prefix_cache); "
            "what lies behind llm.llm_engine is vLLM's internals, laid out differently from one release to the next"
        )

    def generate(
        self,
        prompts: Any,
        /,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable[..., Any] = True,
    ) -> list[RequestOutput]:
        eng = _ENGINES[self]
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise VLLMValidationError(
                    f"The lengths of prompts ({len(prompts)}) and params ({len(params)}) must be the same."
                )
        for sp in params:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params: SamplingParams, got {type(sp).__name__}")
            eng.verify(sp)
        ids = [eng.prompt_ids(p) for p in prompts]
        outputs = eng.generate(ids, params) if ids else []
        eng.requests.extend(zip(ids, params))
        return outputs

    def apply_model(self, func: Callable[[nn.Module], Any]) -> list[Any]:
        eng = _ENGINES[self]
        eng.model_access()
        return [func(eng.model)]  # one worker: this process

    def reset_prefix_cache(self) -> bool:
        _ENGINES[self].reset_prefix_cache()
        return True


def install(monkeypatch) -> types.ModuleType:
    """Put this fake in sys.modules as `vllm` (with the submodules that hold these names in vLLM); returns it."""
    CREATED.clear()
    modules = {
        "vllm": dict(
            LLM=LLM,
            SamplingParams=SamplingParams,
            TokensPrompt=TokensPrompt,
            RequestOutput=RequestOutput,
            CompletionOutput=CompletionOutput,
        ),
        "vllm.inputs": dict(TokensPrompt=TokensPrompt),
        "vllm.sampling_params": dict(SamplingParams=SamplingParams),
        "vllm.outputs": dict(RequestOutput=RequestOutput, CompletionOutput=CompletionOutput),
        "vllm.logprobs": dict(Logprob=Logprob),
    }
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    root = sys.modules["vllm"]
    for name in modules:
        if name != "vllm":
            setattr(root, name.split(".", 1)[1], sys.modules[name])
    return root


# --- the fake against an installed vLLM -----------------------------------------------------------------------------


def _call_mismatches(what: str, fake: Callable, real: Callable, skip: tuple[str, ...] = ()) -> list[str]:
    """Calls the fake accepts that the real signature would not: each named parameter must exist in the real one,
    be passable the same way (positionally at the same place, or by keyword), and be optional there when it is
    optional here; a parameter the real one requires must be here too."""
    out = []
    fp = [p for p in inspect.signature(fake).parameters.values() if p.name != "self"]
    rp = [p for p in inspect.signature(real).parameters.values() if p.name != "self"]
    real_by_name = {p.name: (i, p) for i, p in enumerate(rp)}
    P = inspect.Parameter
    for i, p in enumerate(fp):
        if p.kind in (P.VAR_KEYWORD, P.VAR_POSITIONAL) or p.name in skip:
            continue
        if p.name not in real_by_name:
            out.append(f"{what}: vLLM has no parameter {p.name!r}")
            continue
        j, q = real_by_name[p.name]
        positional = p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
        if positional and (j != i or q.kind not in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)):
            out.append(f"{what}: {p.name!r} is positional here at {i}, not so in vLLM ({q.kind.description} at {j})")
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and q.kind not in (
            P.POSITIONAL_OR_KEYWORD,
            P.KEYWORD_ONLY,
        ):
            out.append(f"{what}: {p.name!r} is passed by keyword here, vLLM's is {q.kind.description}")
        if p.default is not P.empty and q.default is P.empty:
            out.append(f"{what}: {p.name!r} is optional here, required in vLLM")
    names = {p.name for p in fp}
    for q in rp:
        if q.default is P.empty and q.kind not in (P.VAR_KEYWORD, P.VAR_POSITIONAL) and q.name not in names:
            out.append(f"{what}: vLLM requires {q.name!r}, which the fake does not take")
    return out


def _literal_values(module_names: tuple[str, ...], attr: str) -> tuple | None:
    import importlib

    for name in module_names:
        try:
            value = getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError):
            continue
        return typing.get_args(value)
    return None


def surface_mismatches(vllm: types.ModuleType) -> list[str]:
    """Where this fake's surface is not the installed vLLM's: a name, parameter, field, default or accepted value
    the fake has and vLLM does not (an empty list: every call the fake accepts, vLLM accepts)."""
    out: list[str] = []
    real_llm = vllm.LLM
    out += _call_mismatches("LLM()", LLM.__init__, real_llm.__init__)
    if not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(real_llm.__init__).parameters.values()
    ):
        out.append("LLM(): vLLM takes no **engine_args")
    engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    out += [f"LLM(): EngineArgs has no field {a!r}" for a in ENGINE_ARGS if a not in engine_fields]
    for method in ("generate", "apply_model", "reset_prefix_cache"):
        if not callable(getattr(real_llm, method, None)):
            out.append(f"vllm.LLM has no method {method}")
        else:
            out += _call_mismatches(f"LLM.{method}", getattr(LLM, method), getattr(real_llm, method))
    for attr, values, modules in (
        ("ModelDType", DTYPES, ("vllm.config.model", "vllm.config")),
        ("LogprobsMode", LOGPROBS_MODES, ("vllm.config.model", "vllm.config")),
        ("DistributedExecutorBackend", EXECUTOR_BACKENDS, ("vllm.config.parallel", "vllm.config")),
    ):
        real_values = _literal_values(modules, attr)
        if real_values is None:
            out.append(f"vllm.config has no {attr}")
        else:
            out += [f"{attr}: vLLM has no {v!r}" for v in values if v not in real_values]

    real_sp = vllm.SamplingParams
    real_fields = getattr(real_sp, "__struct_fields__", None) or [
        f.name for f in dataclasses.fields(real_sp)
    ]  # a msgspec struct (a dataclass in older releases)
    default_real, default_fake = real_sp(), SamplingParams()
    for name in SAMPLING_FIELDS:
        if name not in real_fields:
            out.append(f"SamplingParams: vLLM has no field {name!r}")
        elif getattr(default_real, name) != getattr(default_fake, name):
            out.append(
                f"SamplingParams.{name}: default {getattr(default_fake, name)!r} here, vLLM's is "
                f"{getattr(default_real, name)!r}"
            )

    from vllm.inputs import TokensPrompt as RealTokensPrompt

    if "prompt_token_ids" not in getattr(RealTokensPrompt, "__required_keys__", ()):
        out.append("TokensPrompt: prompt_token_ids is not a required key in vLLM")
    if vllm.TokensPrompt is not RealTokensPrompt:
        out.append("vllm.TokensPrompt is not vllm.inputs.TokensPrompt")

    real_completion = {f.name for f in dataclasses.fields(vllm.CompletionOutput)}
    out += [
        f"CompletionOutput: vLLM has no field {f.name!r}"
        for f in dataclasses.fields(CompletionOutput)
        if f.name not in real_completion
    ]
    out += _call_mismatches("RequestOutput()", RequestOutput.__init__, vllm.RequestOutput.__init__)
    try:
        from vllm.logprobs import Logprob as RealLogprob
    except ImportError:
        from vllm.sequence import Logprob as RealLogprob
    real_logprob = {f.name for f in dataclasses.fields(RealLogprob)}
    out += [f"Logprob: vLLM has no field {f.name!r}" for f in dataclasses.fields(Logprob) if f.name not in real_logprob]
    return out


def llama_mismatches(real_llama: type) -> list[str]:
    """Where `LlamaForCausalLM` here is not vLLM's (vllm.model_executor.models.llama.LlamaForCausalLM)."""
    out = []
    if getattr(real_llama, "packed_modules_mapping", None) != PACKED_MODULES:
        out.append(f"packed_modules_mapping: vLLM's is {getattr(real_llama, 'packed_modules_mapping', None)!r}")
    out += _call_mismatches("LlamaForCausalLM.load_weights", LlamaForCausalLM.load_weights, real_llama.load_weights)
    return out
