"""A stand-in for the parts of vLLM's API that policies/vllm_rollout.py uses, for tests on machines without a GPU.

`LLM` loads its own copy of the HF Llama in `model` (as vLLM does) and samples each request with ttsrl's built-in
sampler on that copy: the restricted vocabulary, min/max tokens, temperature/top-k/top-p and the seed come from
the request's SamplingParams, and the returned log-probs are the processed ones. `load_weights` copies tensors by
HF name into the copy, so a run whose weight sync is wrong samples from stale weights. It checks what real vLLM
would refuse or treat differently (unknown weight names, unsupported arguments).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_tokens: int = 0
    max_tokens: int = 16
    stop_token_ids: list = field(default_factory=list)
    allowed_token_ids: list | None = None
    logprobs: int | None = None
    seed: int | None = None
    detokenize: bool = True


@dataclass
class Logprob:
    logprob: float
    rank: int = 1


@dataclass
class CompletionOutput:
    token_ids: list
    logprobs: list
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list


class _Model:
    def __init__(self, hf_model):
        self.hf = hf_model
        self.loaded: list[str] = []

    def load_weights(self, weights):
        params = dict(self.hf.state_dict())
        for name, t in weights:
            if name not in params:
                raise KeyError(f"vLLM Llama has no weight {name!r}")
            params[name].copy_(t)
            self.loaded.append(name)


class LLM:
    instances: list[LLM] = []

    def __init__(self, model: str, **kwargs):
        from policies.glmtts import GLMTTSPolicy

        assert kwargs.get("skip_tokenizer_init") and kwargs.get("logprobs_mode") == "processed_logprobs", kwargs
        self.kwargs = kwargs
        self.engine_policy = GLMTTSPolicy.from_pretrained(Path(model).parent)  # its own copy of the weights
        runner = types.SimpleNamespace(model=_Model(self.engine_policy.model))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )
        self.prefix_resets = 0
        LLM.instances.append(self)

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def generate(self, requests, sampling_params, use_tqdm=True):
        from policies.glmtts import PromptInput
        from policies.sampling import SamplingParams as Ours

        pol = self.engine_policy
        s = pol.special
        outs = []
        for req, sp in zip(requests, sampling_params):
            assert sp.n == 1 and sp.logprobs == 0 and sp.stop_token_ids == [s.eoa] and not sp.detokenize
            assert sp.allowed_token_ids == list(range(s.ats, s.ate + 1)) + [s.eoa]
            ours = Ours(temperature=sp.temperature, top_k=max(sp.top_k, 0), top_p=sp.top_p)
            prompt = PromptInput(ids=list(req["prompt_token_ids"]), text_len=1)
            ro = pol.sample_groups(
                [prompt],
                1,
                ours,
                group_ids=[0],
                seed=sp.seed,
                min_ratio=sp.min_tokens,
                max_ratio=sp.max_tokens,
                max_new_tokens=sp.max_tokens,
            )
            m = ro.token_mask[0]
            ids = ro.tokens[0][m].tolist()
            lps = [{t: Logprob(float(lp))} for t, lp in zip(ids, ro.behaviour_logp[0][m].tolist())]
            outs.append(
                RequestOutput(
                    list(req["prompt_token_ids"]),
                    [CompletionOutput(ids, lps, "stop" if bool(ro.finished[0]) else "length")],
                )
            )
        return outs


def install(monkeypatch) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    LLM.instances = []
    monkeypatch.setitem(__import__("sys").modules, "vllm", mod)
    return mod
