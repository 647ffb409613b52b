"""Group rollouts with vLLM (`sampling.backend: vllm`; GPU, optional: needs `pip install vllm`, 0.10 or newer).

The GLM-TTS LM is a plain HF Llama, so vLLM serves `<ckpt>/llm/` as it is, inside each training process
(`distributed_executor_backend="external_launcher"`, no tokenizer). Every row is one request (a `TokensPrompt`)
with its own seed, derived from (seed, group id, member) like the built-in sampler's streams; the rows of a group
share their prompt through vLLM's prefix cache. Per row:

    allowed_token_ids  the 32768 speech tokens + stop        (the built-in sampler's restricted vocabulary)
    min_tokens         int(min_ratio x target-text tokens)   (stop masked before it)
    max_tokens         min(int(max_ratio x text tokens), max_new_tokens)
    temperature, top_k (0 = off), top_p as configured; logprobs_mode "processed_logprobs" (vLLM >= 0.10), so each
    sampled token's log-prob is taken after the allowed-token and min-tokens masks, temperature, top-k and top-p

With top-k alone or top-p alone that is log q(y) of policies/sampling.py. With both, it is not: vLLM cuts to the
top k first and then keeps a share top_p of the *renormalised* top-k mass (vllm/v1/sample/ops/topk_topp_sampler.py),
while policies/sampling.py keeps the tokens whose preceding mass under the *whole* distribution is < top_p
(upstream's rule), capped at k. vLLM then samples from a narrower distribution than the trainer's q: its log-probs
are higher than the trainer's and the rollouts are off-policy for the ratio's anchor; `vllm/logp_abs_diff` shows
the gap, and `sample_groups` warns once.

RAS is not one of vLLM's samplers: `sampling.ras` must be false with this backend. vLLM's kernels round differently
from the trainer's, so its log-probs match the trainer's only to bf16/fp32 kernel precision; the trainer therefore
recomputes the anchor log-probs with its own model (`vllm/logp_abs_diff` logs the gap). After every optimizer
step, `sync_weights` loads the policy's current weights into vLLM (LoRA adapters merged) and clears its prefix
cache. Only vLLM's public API is used: `LLM(...)`, `LLM.generate`, `SamplingParams`, `TokensPrompt`, the returned
`RequestOutput`s, `LLM.apply_model` (to call the engine model's own `load_weights` with (HF name, tensor) pairs)
and `LLM.reset_prefix_cache`; never the engine's internals (`llm.llm_engine...`), whose layout changes between
releases.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from policies.sampling import SamplingParams, row_keys
from rollouts.types import Rollout


class VLLMRolloutError(RuntimeError):
    """vLLM returned something the rollout record cannot hold (the message names the row)."""


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's current weights under their HF Llama names (what vLLM's Llama `load_weights` takes). With LoRA
    each adapted weight is yielded as base + B A x scaling (the model itself is not touched: merging into it and
    unmerging again would round the base weights a little at every sync)."""
    if not hasattr(model, "get_base_model"):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    adapted = {
        f"{name}.weight": m
        for name, m in base.named_modules()
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")
    }
    for name, t in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        hf = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if hf in adapted:
            m = adapted[hf]
            t = t + sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
        yield hf, t


def row_seeds(seed: int, group_ids: list[int], group_size: int) -> list[int]:
    """One non-negative 63-bit seed per row: row j of group g gets the stream (seed, g, j)."""
    keys = row_keys(
        seed, torch.tensor(group_ids).repeat_interleave(group_size), torch.arange(group_size).repeat(len(group_ids))
    )
    return [int(k) & ((1 << 63) - 1) for k in keys]


class VLLMSampler:
    """`sample_groups` with the built-in sampler's signature and Rollout record, on a vLLM engine."""

    def __init__(
        self,
        policy,
        *,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("sampling.backend: vllm needs the vllm package (pip install vllm), on a GPU") from e
        self.policy = policy
        llm_dir = Path(policy.ckpt_dir) / "llm"
        self.llm = LLM(
            model=str(llm_dir),
            skip_tokenizer_init=True,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher",
        )
        s = policy.special
        self.allowed = list(range(s.ats, s.ate + 1)) + [s.eoa]
        self.stale = False  # the policy changed since the engine got its weights: synced before the next sample
        self._warned_top_k_top_p = False

    def mark_stale(self) -> None:
        """The policy's weights changed (an optimizer step, a loaded checkpoint): sync before sampling again."""
        self.stale = True

    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine (done by `sample_groups` when `stale`).

        `LLM.apply_model(func)` calls `func` on the engine's model in each worker; with the external launcher that
        worker is this process, so `func` reads the policy's tensors directly. vLLM's Llama `load_weights` takes
        (HF name, tensor) pairs and maps them onto its own layout (q/k/v and gate/up fused); it refuses a name it
        does not know (unexpected biases aside) and a tensor of the wrong shape. The weights stream one tensor at a
        time (a LoRA-merged weight is built only when it is loaded). The prefix cache holds keys and values computed
        with the old weights: it is dropped."""
        policy_model = self.policy.model

        def load(model) -> None:
            with torch.no_grad():
                model.load_weights(hf_weights(policy_model))

        self.llm.apply_model(load)
        if self.llm.reset_prefix_cache() is False:  # vLLM refuses while requests run (none do between generates)
            raise VLLMRolloutError("vLLM did not reset its prefix cache after the weight sync")
        self.stale = False

    def sample_groups(
        self,
        prompts,
        group_size: int,
        params: SamplingParams,
        *,
        group_ids: list[int],
        seed: int,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        max_new_tokens: int = 1000,
    ) -> Rollout:
        from vllm import SamplingParams as VParams
        from vllm import TokensPrompt

        if params.ras:
            raise ValueError("sampling.backend vllm has no repetition-aware sampling: set sampling.ras false")
        if params.top_k > 0 and params.top_p < 1.0 and not self._warned_top_k_top_p:
            self._warned_top_k_top_p = True
            warnings.warn(
                "sampling.backend vllm with both top_k and top_p: vLLM applies top-p to the renormalised top-k "
                "distribution, the trainer to the whole one, so vLLM samples a narrower distribution than the "
                "trainer's (vllm/logp_abs_diff shows the gap); set one of them off for on-policy rollouts",
                stacklevel=2,
            )
        if len(group_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} group ids, got {len(group_ids)}")
        if self.stale:
            self.sync_weights()
        rows = self.policy.row_batch(
            prompts, group_size, min_ratio=min_ratio, max_ratio=max_ratio, max_new_tokens=max_new_tokens
        )
        seeds = row_seeds(seed, group_ids, group_size)
        requests, sampling = [], []
        for r in range(rows.num_rows):
            requests.append(TokensPrompt(prompt_token_ids=list(prompts[r // group_size].ids)))
            sampling.append(
                VParams(
                    n=1,
                    temperature=params.temperature,
                    top_k=params.top_k,  # 0: off, as in ours
                    top_p=params.top_p,
                    min_tokens=int(rows.min_len[r]),
                    max_tokens=int(rows.max_len[r]),
                    stop_token_ids=[self.policy.special.eoa],
                    allowed_token_ids=self.allowed,
                    logprobs=0,
                    seed=seeds[r],
                    detokenize=False,
                )
            )
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return rollout_from_outputs(self.policy.special, rows, outputs, group_ids, group_size, params)


def rollout_from_outputs(
    special, rows, outputs, group_ids: list[int], group_size: int, params: SamplingParams
) -> Rollout:
    """vLLM RequestOutputs (one per row, in row order) -> a Rollout with the built-in sampler's conventions: speech
    tokens, then the stop token for a finished row (trained on); a row that reached max_tokens without stopping is
    truncated."""
    n = rows.num_rows
    if len(outputs) != n:
        raise VLLMRolloutError(f"vLLM returned {len(outputs)} outputs for {n} rows")
    seqs, lps = [], []
    for r, out in enumerate(outputs):
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        if comp.logprobs is None or len(comp.logprobs) != len(ids):
            raise VLLMRolloutError(f"row {r}: vLLM returned no log-prob for every token (logprobs=0 was asked)")
        lp = [float(step[tok].logprob) for step, tok in zip(comp.logprobs, ids)]
        bad = [
            t
            for i, t in enumerate(ids)  # speech tokens, and the stop token only as the last one
            if not (special.ats <= t <= special.ate or (t == special.eoa and i == len(ids) - 1))
        ]
        if bad:
            raise VLLMRolloutError(f"row {r}: tokens outside the speech tokens + stop: {bad[:5]}")
        if comp.finish_reason == "stop" and (not ids or ids[-1] != special.eoa):
            raise VLLMRolloutError(f"row {r}: vLLM stopped without returning the stop token {special.eoa}")
        seqs.append(ids)
        lps.append(lp)
    width = max((len(s) for s in seqs), default=0)
    tokens = torch.full((n, max(width, 1)), special.pad, dtype=torch.long)
    logp = torch.zeros((n, max(width, 1)), dtype=torch.float32)
    mask = torch.zeros((n, max(width, 1)), dtype=torch.bool)
    finished = torch.zeros(n, dtype=torch.bool)
    for r, (ids, lp) in enumerate(zip(seqs, lps)):
        tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logp[r, : len(ids)] = torch.tensor(lp, dtype=torch.float32)
        mask[r, : len(ids)] = True
        finished[r] = bool(ids) and ids[-1] == special.eoa
    lengths = mask.sum(-1) - finished.long()
    return Rollout(
        prompt_ids=rows.prompt_ids,
        prompt_mask=rows.prompt_mask,
        tokens=tokens[:, :width],
        token_mask=mask[:, :width],
        behaviour_logp=logp[:, :width],
        group_ids=torch.tensor(group_ids, dtype=torch.long).repeat_interleave(group_size),
        prompt_index=torch.arange(len(group_ids)).repeat_interleave(group_size),
        finished=finished,
        truncated=~finished,
        lengths=lengths,
        min_lengths=rows.min_len,
        text_lengths=rows.text_len,
        params=params,
        pad_id=special.pad,
    )
