"""The GRPO training loop for a speech-LM policy.

Each step:
  1. rollouts     draw prompts, sample a group of `sampling.group_size` sequences per prompt (behaviour log-probs
                  recorded), score every sample with every reward, and resample uninformative groups
                  (`dynamic_sampling`) until the step's batch is complete;
  2. advantages   normalize -> weighted fuse -> normalize over the batch (`advantage`);
  3. update       `optim.ppo_epochs` passes of `optim.minibatches` optimizer steps each; the clipped loss uses the
                  scheduled eps_low / eps_high and the ratio against the behaviour policy (`loss.ratio_anchor: old`)
                  or the frozen initial model (`ref`); samples without any valid reward are masked out;
  4. bookkeeping  one metrics row per step (metrics.jsonl, wandb) and atomic checkpoints.

Every random draw of a step is seeded from (train.seed, step), so a resumed run repeats exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from policies.glmtts import GLMTTSPolicy
from policies.sampling import SamplingParams
from rewards.runner import build_scorers, cat_scores, samples_from_rollout, score, select_scores
from rl.advantages import fused_reward_mean, normalize_fuse_normalize
from rl.checkpoint import clean_partial, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rl.config import Config, Derived, dump
from rl.configlib import to_dict
from rl.distributed import Dist
from rl.dynamic_sampling import DynamicSampling, GroupResult, informative_groups
from rl.errors import RunError
from rl.guards import (RewardHealth, UpdateGuard, check_finite, check_prompt_audio, check_prompt_lengths,
                       check_text_size, clear_run, refuse_other_run)
from rl.losses import policy_loss
from rl.metrics import MetricsLogger
from rl.samples import pick_rows, truncate_samples, write_samples
from rl.zero import ShardedAdamW
from rollouts.audio import read_wav
from rollouts.manifest import ManifestError, PromptStream, read_manifest
from rollouts.token2wav import Token2Wav, VoicePrompt
from rollouts.types import PromptRecord, Rollout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainState:
    run_id: str = ""  # this run's id: checkpoint pruning only ever deletes checkpoints carrying it
    step: int = 0  # completed steps
    next_group_id: int = 0  # group ids are unique over the whole run
    stream: dict = dataclasses.field(default_factory=dict)  # PromptStream cursor
    wandb_id: str | None = None
    pending: dict | None = None  # with train.pipeline: what the prefetched rollout (pending.safetensors) was
    guards: dict = dataclasses.field(default_factory=dict)  # RewardHealth / UpdateGuard streaks (rl/guards.py)


@dataclass
class Generated:
    rollout: Rollout
    vocoded: object  # VocodeResult | None
    seconds: float  # sampling
    vocode_seconds: float = 0.0
    lag: int = 0  # optimizer steps between the policy that sampled it and the one it trains
    vllm_gap: float = float("nan")  # sampling.backend vllm: mean |vLLM's log-prob - the trainer's| of its tokens


@dataclass
class PendingRound:
    """train.pipeline: the next step's first round, sampled ahead (global prompts and group ids, this rank's part)."""

    prompt_idx: list[int]
    gids: list[int]
    gen: Generated | None


class RewardFailure(RunError):
    """Too many samples of a step have no valid value for one reward (rewards.<name>.max_invalid_frac)."""

    def __init__(self, name: str, frac: float, limit: float, reasons: list, step: int):
        from collections import Counter

        common = Counter(r for r in reasons if r).most_common(3)
        why = "; ".join(f"{n} x {r}" for r, n in common)
        super().__init__(f"reward '{name}': {frac:.0%} of step {step}'s samples are invalid, above its limit "
                         f"rewards.{name}.max_invalid_frac={limit:g}. Most common reasons: {why}")


_ROLLOUT_TENSORS = ("prompt_ids", "prompt_mask", "tokens", "token_mask", "behaviour_logp", "group_ids",
                    "prompt_index", "finished", "truncated", "lengths", "min_lengths", "text_lengths")


def rollout_tensors(ro: Rollout) -> dict[str, torch.Tensor]:
    return {k: getattr(ro, k).contiguous() for k in _ROLLOUT_TENSORS}


def rollout_from_state(tensors: dict[str, torch.Tensor], meta: dict, pad_id: int) -> Rollout:
    return Rollout(**{k: tensors[k] for k in _ROLLOUT_TENSORS}, params=SamplingParams(**meta["params"]), pad_id=pad_id)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for one random draw of a step, independent of everything that ran before it."""
    return (seed * 1_000_003 + step) * 1_009 + salt


def train(cfg: Config, derived: Derived, *, resume: str | None = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Run the configured training (one process, or one rank of `accelerate launch`). Returns the last metrics.

    Every input is checked before anything is written to the output directory; a directory that holds another run
    is refused unless `overwrite` (which then deletes that run's files). Raises InputError / ManifestError / ...
    for bad input and RunError when the run cannot go on (rl/guards.py)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise RuntimeError(f"launched with {accelerator.distributed_type.value}: ttsrl does its own data parallelism; "
                           f"use `accelerate launch --multi_gpu` and optim.zero_stage=2 for ZeRO-2 sharding")
    dist = Dist(accelerator)
    say = print if dist.main else (lambda *a, **k: None)
    other_run = [] if resume else refuse_other_run(out, overwrite)

    # ---- setup: data, policy, vocoder, scorers, optimizer (all checked before anything is written) ------------
    records = read_manifest(cfg.data.manifest, cfg.data.root or None)
    check_text_size(records, cfg.data.max_text_tokens)
    ckpt_dir = Path(cfg.policy.ckpt_dir)
    if cfg.policy.build_tiny and dist.main:
        from policies.tiny import write_tiny_checkpoint
        from rollouts.tiny_vocoder import write_tiny_vocoder

        if not (ckpt_dir / "llm").exists():
            write_tiny_checkpoint(ckpt_dir, [t for r in records for t in (r.prompt_text, r.target_text)],
                                  seed=cfg.train.seed)
            say(f"ttsrl: wrote a tiny random GLM-TTS speech LM to {ckpt_dir}")
        if cfg.vocoder.enabled and not (ckpt_dir / "flow").exists():
            write_tiny_vocoder(ckpt_dir, seed=cfg.train.seed)
            say(f"ttsrl: wrote a tiny random flow + HiFT vocoder to {ckpt_dir}")
    dist.barrier()
    policy = GLMTTSPolicy.from_pretrained(
        ckpt_dir, dtype=DTYPES[cfg.policy.dtype], device=accelerator.device,
        lora=cfg.policy.lora, trust_remote_code=cfg.policy.trust_remote_code,
    )
    if derived.needs_reference:
        policy.make_reference()
    from rollouts.text import lm_records  # the texts as the LM reads them (data.text_normalize, data.phoneme)

    prompts = [policy.prompt_input(r) for r in lm_records(records, cfg.data, policy.encode_text)]
    check_prompt_lengths(records, prompts, max_text_tokens=cfg.data.max_text_tokens,
                         context=getattr(policy.model.config, "max_position_embeddings", None),
                         max_new_tokens=cfg.sampling.max_new_tokens)
    vllm = None  # sampling.backend vllm: the rollouts come from a vLLM engine that holds a copy of the weights
    if cfg.sampling.backend == "vllm":
        from policies.vllm_rollout import VLLMSampler

        vllm = VLLMSampler(policy, gpu_memory_utilization=cfg.sampling.vllm_gpu_memory_utilization,
                           dtype="bfloat16" if cfg.train.mixed_precision == "bf16" else "float32", seed=cfg.train.seed)
    vllm_stale = vllm is not None and bool(resume)  # resumed weights are loaded below: sync before sampling
    token2wav = None
    if cfg.vocoder.enabled:
        for r in records:
            if r.prompt_feat is None or r.embedding is None:
                missing = "prompt_speech_feat" if r.prompt_feat is None else "embedding"
                raise ManifestError(f"{r.source}: field '{missing}' is missing; vocoding needs it (or vocoder.enabled=false)")
        token2wav = Token2Wav.from_pretrained(ckpt_dir, device=accelerator.device, n_timesteps=cfg.vocoder.n_timesteps,
                                              dtype=cfg.vocoder.dtype)
    voices = [VoicePrompt(r.prompt_speech_tokens, r.prompt_feat, r.embedding) for r in records]
    prompt_audio = PromptAudio(records)
    scorers = build_scorers(cfg.rewards)
    for sc in scorers.values():  # remote services: fail fast, before the first step, naming the url
        if callable(getattr(sc, "check", None)):
            sc.check()
    check_prompt_audio(records, [k for k, sc in scorers.items() if getattr(sc, "needs_prompt_audio", False)])
    adamw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                 fused=accelerator.device.type in ("cpu", "cuda") or None)  # one kernel over all parameters
    if cfg.optim.zero_stage == 2:  # AdamW state and reduced gradients partitioned across ranks (rl/zero.py)
        optimizer = ShardedAdamW(policy.trainable_parameters(), dist.rank, dist.world, **adamw)
    else:
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), **adamw)
    stream = PromptStream(len(records), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    state = TrainState(run_id=uuid.uuid4().hex)
    health = RewardHealth(derived.weights, cfg.train.max_dead_reward_steps)
    guard = UpdateGuard(cfg.train.max_skipped_updates)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(find_checkpoint(resume))
        policy.load_checkpoint_state(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(ckpt["rng"]["cuda"]))
        state = TrainState(**ckpt["trainer_state"])
        stream.load_state(state.stream)
        health.load_state_dict(state.guards.get("rewards", {}))
        guard.load_state_dict(state.guards.get("updates", {}))
        say(f"ttsrl: resumed from {find_checkpoint(resume)} at step {state.step}")
    config_yaml = dump(cfg)
    logger = None
    if dist.main:  # every input is checked: from here on the run writes
        clear_run(out, other_run, say)
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        if resume:
            for warning in truncate_samples(out, state.step):
                print(f"ttsrl: warning: {warning}", file=sys.stderr)
        (out / "config.yaml").write_text(config_yaml)
        logger = MetricsLogger(out, config=to_dict(cfg), wandb_cfg=cfg.wandb,
                               resume_step=state.step if resume else None, wandb_id=state.wandb_id)
        state.wandb_id = logger.wandb_id
        say(f"ttsrl: metrics -> {logger.path}" + (f" and wandb run {logger.wandb_id}" if logger.wandb else "")
            + (f"; {dist.world} processes" if dist.world > 1 else ""))

    weights = derived.weights
    group_size = cfg.sampling.group_size
    metrics: dict = {}
    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    def sampling_params(step: int) -> SamplingParams:
        return SamplingParams(
            temperature=cfg.sampling.temperature(step), top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p,
            ras=cfg.sampling.ras, ras_window=cfg.sampling.ras_window, ras_tau=cfg.sampling.ras_tau,
        )

    def vocode(ro: Rollout):
        if token2wav is None:
            return None
        # one noise seed per group: decoder noise is shared inside a group and cannot leak into the advantages
        return token2wav(ro.codes(policy.special.ats), [voices[int(k)] for k in ro.prompt_index],
                         [step_seed(cfg.train.seed, 0, int(g)) for g in ro.group_ids], batch_size=cfg.vocoder.batch_size)

    def generate(prompt_idx: list[int], gids: list[int], params: SamplingParams, seed: int) -> Generated | None:
        """This rank's share of a generation round: one group per prompt (manifest indices), sampled and vocoded.
        None when the round has no slot for this rank."""
        nonlocal vllm_stale
        mine = dist.shard(len(gids))
        if not mine:
            return None
        t0 = time.perf_counter()
        kw = dict(group_ids=[gids[i] for i in mine], seed=seed, min_ratio=cfg.sampling.min_token_text_ratio,
                  max_ratio=cfg.sampling.max_token_text_ratio, max_new_tokens=cfg.sampling.max_new_tokens)
        gap = math.nan
        if vllm is not None:
            if vllm_stale:  # the policy was updated since the engine last got its weights
                vllm.sync_weights()
                vllm_stale = False
            ro = vllm.sample_groups([prompts[prompt_idx[i]] for i in mine], group_size, params, **kw)
            ro, gap = trainer_logprobs(ro)
        else:
            with accelerator.autocast():  # the precision of the update's forward passes (autocast is per thread)
                ro = policy.sample_groups([prompts[prompt_idx[i]] for i in mine], group_size, params, **kw,
                                          decode="compiled" if cfg.sampling.compile_decode else "dynamic")
        ro = dataclasses.replace(ro, prompt_index=torch.tensor([prompt_idx[mine[int(i)]] for i in ro.prompt_index]))
        t1 = time.perf_counter()
        vocoded = vocode(ro)
        return Generated(ro, vocoded, t1 - t0, time.perf_counter() - t1, vllm_gap=gap)

    def trainer_logprobs(ro: Rollout) -> tuple[Rollout, float]:
        """vLLM's log-probs match the trainer's only to kernel precision, so the ratio is anchored on the trainer's
        own log-probs of the same tokens, under the weights vLLM sampled with (now, before any update)."""
        was_training = policy.model.training
        policy.model.eval()
        with torch.no_grad(), accelerator.autocast():
            own = torch.cat([policy.token_logprobs(ro.select(m))[0].float().cpu()
                             for m in torch.split(torch.arange(ro.num_rows), cfg.optim.micro_batch_size or ro.num_rows)])
        policy.model.train(was_training)
        return dataclasses.replace(ro, behaviour_logp=own), float((own - ro.behaviour_logp)[ro.token_mask].abs().mean())

    def new_group_ids(n: int) -> list[int]:
        state.next_group_id += n
        return list(range(state.next_group_id - n, state.next_group_id))

    # with train.pipeline: the next step's first round (its prompts, group ids and this rank's rollouts)
    pending: PendingRound | None = None
    if ckpt is not None and state.pending is not None:
        if state.pending["world"] != dist.world:
            raise RuntimeError(f"{resume}: this pipelined run was saved by {state.pending['world']} processes; "
                               f"resume it with as many (got {dist.world})")
        part = {k[len(f"rank{dist.rank}."):]: v for k, v in ckpt["pending"].items() if k.startswith(f"rank{dist.rank}.")}
        gen = None
        if part:
            ro = rollout_from_state(part, state.pending, policy.special.pad)
            gen = Generated(ro, vocode(ro), 0.0, lag=1)
        pending = PendingRound(state.pending["prompt_idx"], state.pending["gids"], gen)
    prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if cfg.train.pipeline else None
    start_step, trained_rows = state.step, 0

    for step in range(state.step, cfg.train.steps):
        torch.manual_seed(step_seed(cfg.train.seed, step))  # dropout and anything else drawing globally
        temperature = cfg.sampling.temperature(step)
        eps_low, eps_high = cfg.loss.eps_low(step), cfg.loss.eps_high(step)
        params = sampling_params(step)

        # ---- 1. rollouts, scoring and dynamic resampling (every rank runs the same plan on its share) --------------
        t_rollout = t_vocode = t_score = t_prefetch = 0.0
        plan = DynamicSampling(
            cfg.dynamic_sampling.mode, cfg.data.prompts_per_step, max_tries=cfg.dynamic_sampling.max_tries,
            max_gen_batches=cfg.dynamic_sampling.max_gen_batches, on_exhausted=cfg.dynamic_sampling.on_exhausted,
        )
        slot_prompt: dict[int, int] = {}
        parts: list[Rollout] = []
        part_scores, part_lag, part_audio, vllm_gaps = [], [], [], []
        while (req := plan.next_request()) is not None:
            if plan.generations == 0 and pending is not None:  # sampled during the previous step
                prompt_idx, gids, gen = pending.prompt_idx, pending.gids, pending.gen
                pending = None
            else:
                if req.fresh:
                    for slot, k in zip(req.slots, stream.take(len(req.slots))):
                        slot_prompt[slot] = k
                prompt_idx, gids = [slot_prompt[s] for s in req.slots], new_group_ids(len(req.slots))
                gen = generate(prompt_idx, gids, params, step_seed(cfg.train.seed, step, plan.generations + 1))
                if gen is not None:
                    t_rollout, t_vocode = t_rollout + gen.seconds, t_vocode + gen.vocode_seconds
            slot_prompt.update(zip(req.slots, prompt_idx))
            prefetch = None
            if prefetcher is not None and plan.generations == 0:
                # overlap this round's scoring with the next step's first round (one step off-policy); the last
                # step prefetches too, into the final checkpoint, so that a run extended by --resume is exact
                nxt, ngids = stream.take(cfg.data.prompts_per_step), new_group_ids(cfg.data.prompts_per_step)
                prefetch = (nxt, ngids, prefetcher.submit(generate, nxt, ngids, sampling_params(step + 1),
                                                          step_seed(cfg.train.seed, step + 1, 1)))
            results = []
            if gen is not None:
                ro = gen.rollout
                t2 = time.perf_counter()
                samples = samples_from_rollout(ro, records, policy.special.ats, gen.vocoded,
                                               prompt_audio.get(ro.prompt_index) if gen.vocoded else None)
                sc = score(scorers, samples, gen.vocoded.reasons if gen.vocoded else None)
                t_score += time.perf_counter() - t2
                info = informative_groups(sc.values, ro.group_ids, weights, derived.dynamic_sampling_keys,
                                          min_std=cfg.dynamic_sampling.min_std, std_ddof=cfg.advantage.std_ddof)
                mine = dist.shard(len(gids))
                results = [GroupResult(slot=req.slots[i], group_id=gids[i], informative=info[gids[i]]) for i in mine]
                parts.append(ro)
                part_scores.append(sc)
                part_lag.append(torch.full((ro.num_rows,), gen.lag))
                vllm_gaps.append(gen.vllm_gap)
                part_audio += gen.vocoded.audio if gen.vocoded else [None] * ro.num_rows
            if prefetch is not None:
                t3 = time.perf_counter()
                ahead = prefetch[2].result()  # joined before the model is used again
                pending = PendingRound(prefetch[0], prefetch[1], dataclasses.replace(ahead, lag=1) if ahead else None)
                if ahead is not None:  # the part of the next round's generation hidden behind this round's scoring
                    t_prefetch += max(0.0, ahead.seconds + ahead.vocode_seconds - (time.perf_counter() - t3))
            plan.record([r for rank_results in dist.gather(results) for r in rank_results])

        # this rank's rows of the chosen groups, in slot order
        slot_of = {r.group_id: r.slot for r in plan.selected()}
        all_rows = Rollout.cat(parts) if parts else None
        row_gids = all_rows.group_ids.tolist() if all_rows is not None else []
        rows = sorted((i for i, g in enumerate(row_gids) if g in slot_of), key=lambda i: (slot_of[row_gids[i]], i))
        batch = all_rows.select(rows) if rows else None
        scores = select_scores(cat_scores(part_scores), rows) if rows else None
        lag = torch.cat(part_lag)[rows] if rows else torch.zeros(0, dtype=torch.long)
        audio = [part_audio[i] for i in rows]
        # the whole step's rows (every rank's, in rank order) for the advantages and the statistics
        everyone = dist.gather(None if batch is None else (batch.group_ids, batch.lengths, batch.truncated, lag, scores))
        offset = sum(x[0].shape[0] for x in everyone[: dist.rank] if x is not None)  # where this rank's rows start
        shared = [x for x in everyone if x is not None]
        g_gids, g_lengths, g_trunc, g_lag = (torch.cat([x[i] for x in shared]) for i in range(4))
        g_scores = cat_scores([x[4] for x in shared])
        n_all = g_gids.shape[0]
        for k, r in cfg.rewards.items():  # a reward that mostly fails stops the run (configurable per reward)
            frac = float((~g_scores.results[k].valid).mean()) if n_all else 0.0
            if frac > r.max_invalid_frac:
                raise RewardFailure(k, frac, r.max_invalid_frac, g_scores.results[k].reasons, step + 1)
        for line in health.observe(step + 1, g_scores.results, n_all):
            if dist.main:
                (bar.write if bar is not None else print)(line, file=sys.stderr)
        if (why := health.stop_reason(step + 1)) is not None:  # a weighted reward dead for several steps
            raise RunError(why)
        trained_rows += _rows_with_a_reward(g_scores.values, weights)

        # ---- 2. advantages, over the whole step --------------------------------------------------------------------
        adv = normalize_fuse_normalize(
            g_scores.values, g_gids, weights, std_ddof=cfg.advantage.std_ddof, eps=cfg.advantage.eps,
            min_std=cfg.advantage.min_std, second_norm=cfg.advantage.second_norm,
        )
        n = 0 if batch is None else batch.num_rows
        device = policy.device
        advantages = adv.advantages[offset: offset + n].to(device)
        if n:
            scored = torch.stack([~torch.isnan(scores.values[k]) for k in weights if weights[k] != 0]).any(0)  # [n]
            train_mask = batch.token_mask & scored[:, None]  # samples without any valid reward do not train
        else:
            train_mask = torch.zeros(0, 1, dtype=torch.bool)

        # ---- 3. update (loss denominators over all ranks; gradients summed over ranks) ---------------------------
        t0 = time.perf_counter()
        policy.model.train()
        upd = {"loss": [], "pg_loss": [], "kl": [], "clip/low_frac": [], "clip/high_frac": [], "grad_norm": [],
               "ratio/mean": [], "ratio/min": [], "ratio/max": []}
        entropy_sum = entropy_tokens = 0.0
        skipped = 0
        for epoch in range(cfg.optim.ppo_epochs):
            # minibatches partition the whole step's rows (every rank draws the same permutation of all n_all
            # rows); each rank trains on the rows of each minibatch that it holds
            g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1000 + epoch))
            shuffled = cfg.optim.ppo_epochs * cfg.optim.minibatches > 1
            order = torch.randperm(n_all, generator=g) if shuffled else torch.arange(n_all)
            for global_mb in torch.tensor_split(order, cfg.optim.minibatches):
                mb = global_mb[(global_mb >= offset) & (global_mb < offset + n)] - offset
                mb_tokens = dist.sum(float(train_mask[mb].sum()) if n else 0.0)
                mb_seqs = dist.sum(float(train_mask[mb].any(-1).sum()) if n else 0.0)
                mb_rows = len(global_mb)
                micro = cfg.optim.micro_batch_size or max(len(mb), 1)
                optimizer.zero_grad(set_to_none=True)
                sums = {k: 0.0 for k in ("loss", "pg_loss", "kl", "clip/low_frac", "clip/high_frac", "ratio/mean")}
                rmin, rmax = math.inf, -math.inf
                for mic in torch.split(mb, micro):
                    sub = batch.select(mic)
                    mask = train_mask[mic].to(device)
                    m_tokens, m_seqs = float(mask.sum()), float(mask.any(-1).sum())
                    if m_tokens == 0:
                        continue
                    with accelerator.autocast():
                        logp, ent = policy.token_logprobs(sub)
                        ref_logp = None
                        if derived.needs_reference:
                            with torch.no_grad():
                                ref_logp, _ = policy.token_logprobs(sub, reference=True)
                    anchor = sub.behaviour_logp.to(device) if cfg.loss.ratio_anchor == "old" else ref_logp
                    res = policy_loss(
                        logp, anchor, advantages[mic.to(device)], mask, eps_low=eps_low, eps_high=eps_high,
                        ratio_level=cfg.loss.ratio_level, agg=cfg.loss.agg, norm_len=cfg.sampling.max_new_tokens,
                        kl_coef=cfg.loss.kl_coef, ref_logp=ref_logp if cfg.loss.kl_coef > 0 else None,
                    )
                    # weight each micro-batch by its share of the minibatch's denominator (exact accumulation)
                    w_tok = m_tokens / max(mb_tokens, 1.0)
                    w_pg = {"token_mean": w_tok, "seq_mean": m_seqs / max(mb_seqs, 1.0),
                            "seq_sum_const": len(mic) / max(mb_rows, 1.0)}[cfg.loss.agg]
                    total = res.pg * w_pg + cfg.loss.kl_coef * res.kl * w_tok
                    accelerator.backward(total)
                    sums["loss"] += float(total.detach())
                    sums["pg_loss"] += float(res.pg.detach()) * w_pg
                    sums["kl"] += float(res.kl.detach()) * w_tok
                    for k in ("clip/low_frac", "clip/high_frac", "ratio/mean"):
                        sums[k] += res.metrics[k] * w_tok
                    rmin, rmax = min(rmin, res.metrics["ratio/min"]), max(rmax, res.metrics["ratio/max"])
                    if epoch == 0:
                        seen = mask & ~torch.isnan(ent)
                        entropy_sum += float(ent[seen].sum())
                        entropy_tokens += float(seen.sum())
                # grad_clip 0 = no clipping (an infinite bound still reports the norm); a non-finite loss or norm
                # skips the step on every rank (both are global), so the weights never see it
                mb_loss = dist.sum(sums["loss"])
                if cfg.optim.zero_stage == 2:  # each gradient summed onto its owner rank, which steps its parameters
                    grad_norm = optimizer.reduce_clip_step(cfg.optim.grad_clip or math.inf,
                                                           allow=lambda norm: guard.allow(mb_loss, norm, step + 1))
                    stepped = guard.in_a_row == 0
                else:  # every rank sums every gradient and steps the whole model
                    dist.sum_grads(policy.trainable_parameters())
                    grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(),
                                                            cfg.optim.grad_clip or math.inf)
                    stepped = guard.allow(mb_loss, float(grad_norm), step + 1)
                    if stepped:
                        optimizer.step()
                if not stepped:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                vllm_stale = vllm is not None  # the engine samples the next rollout with the new weights
                for k, v in sums.items():
                    upd[k].append(dist.sum(v))
                upd["ratio/min"].append(dist.min(rmin))
                upd["ratio/max"].append(dist.max(rmax))
                upd["grad_norm"].append(float(grad_norm))
        t_update = time.perf_counter() - t0
        entropy_sum, entropy_tokens = dist.sum(entropy_sum), dist.sum(entropy_tokens)

        # ---- 4. metrics, samples and checkpoints (rank 0) -----------------------------------------------------------
        state.step = step + 1
        state.stream = stream.state()
        metrics = {
            "loss": _mean(upd["loss"]), "pg_loss": _mean(upd["pg_loss"]), "kl": _mean(upd["kl"]),
            "entropy": entropy_sum / entropy_tokens if entropy_tokens else float("nan"),
            "clip/low_frac": _mean(upd["clip/low_frac"]), "clip/high_frac": _mean(upd["clip/high_frac"]),
            "clip/eps_low": eps_low, "clip/eps_high": eps_high, "sampling/temperature": temperature,
            "ratio/mean": _mean(upd["ratio/mean"]), "ratio/min": min(upd["ratio/min"], default=float("nan")),
            "ratio/max": max(upd["ratio/max"], default=float("nan")),
            "grad_norm": _mean(upd["grad_norm"]), "lr": optimizer.param_groups[0]["lr"],
            "len/mean": float(g_lengths.float().mean()), "len/truncated_frac": float(g_trunc.float().mean()),
            "resample/tries": plan.generations, "resample/discarded_groups": plan.discarded,
            "adv/frac_uninformative": adv.stats["adv/frac_uninformative"],
            "adv/mean": adv.stats["adv/mean"], "adv/std": adv.stats["adv/std"],
            "reward/fused/mean": fused_reward_mean(adv.stats, weights),
            "time/rollout_s": t_rollout, "time/vocode_s": t_vocode, "time/score_s": t_score,
            "time/update_s": t_update, "time/prefetch_hidden_s": t_prefetch,
            "pipeline/offpolicy_frac": float((g_lag > 0).float().mean()), "pipeline/lag_steps": int(g_lag.max()),
            "update/skipped_nonfinite": skipped,
        }
        if vllm is not None:  # mean |log-prob of vLLM - the trainer's|, the largest over rounds and ranks
            metrics["vllm/logp_abs_diff"] = dist.max(max([g for g in vllm_gaps if g == g], default=0.0))
        for k, res in g_scores.results.items():
            metrics[f"reward/{k}/mean"] = adv.stats[f"reward/{k}/mean"]
            metrics[f"reward/{k}/std"] = adv.stats[f"reward/{k}/std"]
            metrics[f"reward/{k}/invalid_frac"] = adv.stats[f"reward/{k}/invalid"] / max(n_all, 1)
            metrics[f"reward/{k}/errors"] = g_scores.errors.get(k, 0)
            if f"reward/{k}/norm_mean" in adv.stats:
                metrics[f"reward/{k}/norm_mean"] = adv.stats[f"reward/{k}/norm_mean"]
                metrics[f"reward/{k}/norm_std"] = adv.stats[f"reward/{k}/norm_std"]
            for sub, v in res.sub_scores.items():
                ok = res.valid & ~torch.isnan(torch.from_numpy(v)).numpy()
                metrics[f"reward/{k}/{sub}"] = float(v[ok].mean()) if ok.any() else float("nan")
            for key, v in g_scores.service.get(k, {}).items():
                metrics[f"service/{k}/{key}"] = v
        pend = dist.gather(None if pending is None or pending.gen is None else rollout_tensors(pending.gen.rollout))
        save = state.step == cfg.train.steps or bool(cfg.train.save_every and state.step % cfg.train.save_every == 0)
        state.guards = {"rewards": health.state_dict(), "updates": guard.state_dict()}
        if save:
            check_finite(policy.trainable_parameters(), state.step, _last_checkpoint(out))
        optimizer_state = optimizer.state_dict() if save else None  # with zero_stage 2: gathered onto rank 0
        if dist.main:
            logger.log(state.step, metrics)
            if cfg.train.samples_every and state.step % cfg.train.samples_every == 0 and n:
                pick = pick_rows(batch.group_ids.tolist(), cfg.train.samples_per_step)
                recs = []
                for i in pick:
                    rec = records[int(batch.prompt_index[i])]
                    recs.append({
                        "uttid": rec.uttid, "group_id": int(batch.group_ids[i]), "target_text": rec.target_text,
                        "prompt_text": rec.prompt_text, "finished": bool(batch.finished[i]),
                        "advantage": float(advantages[i]),
                        "rewards": {k: float(r.values[i]) for k, r in scores.results.items()},
                        "invalid": {k: r.reasons[i] for k, r in scores.results.items() if r.reasons and r.reasons[i]},
                    })
                written = write_samples(out, state.step, recs, [audio[i] for i in pick], 24000)
                logger.log_samples(state.step, written, [audio[i] for i in pick], 24000)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/fused/mean']:.3f}", loss=f"{metrics['loss']:.3f}",
                                len=f"{metrics['len/mean']:.0f}")
            if save:
                state.pending = None if pending is None else {  # sampled with the next step's parameters
                    "prompt_idx": pending.prompt_idx, "gids": pending.gids, "world": dist.world,
                    "params": dataclasses.asdict(sampling_params(state.step)),
                }
                tensors = {f"rank{r}.{k}": v for r, t in enumerate(pend) if t is not None for k, v in t.items()}
                save_checkpoint(
                    out, state.step, policy_state=policy.state_for_checkpoint(),
                    optimizer_state=optimizer_state, trainer_state=dataclasses.asdict(state),
                    config_yaml=config_yaml, keep_last=cfg.train.keep_last, pending=tensors or None,
                )
        dist.barrier()
    if prefetcher is not None:
        prefetcher.shutdown()
    if bar is not None:
        bar.close()
    if logger is not None:
        logger.close()
    if state.step > start_step and trained_rows == 0:
        raise RunError(f"the run trained on nothing: in steps {start_step + 1}..{state.step} no sample had a valid "
                       f"value of any weighted reward ({', '.join(k for k, w in weights.items() if w)}); see "
                       f"reward/<name>/invalid_frac in {out / 'metrics.jsonl'}")
    say(f"ttsrl: done; metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}")
    return metrics


def _rows_with_a_reward(values: dict[str, torch.Tensor], weights: dict[str, float]) -> int:
    """Rows that have a valid value of at least one weighted reward (the rows the loss can learn from)."""
    weighted = [~torch.isnan(values[k]) for k in weights if weights[k] != 0]
    return int(torch.stack(weighted).any(0).sum()) if weighted else 0


def _last_checkpoint(out: Path) -> str | None:
    found = list_checkpoints(out)
    return str(found[-1]) if found else None


class PromptAudio:
    """Voice-prompt waveforms (speaker-similarity references), read on first use and kept."""

    def __init__(self, records: list[PromptRecord]):
        self.records = records
        self.cache: dict[str, tuple | None] = {}

    def get(self, prompt_index: torch.Tensor) -> dict[str, tuple | None]:
        out = {}
        for k in {int(i) for i in prompt_index}:
            rec = self.records[k]
            if rec.uttid not in self.cache:
                path = rec.prompt_wav
                self.cache[rec.uttid] = read_wav(path) if path and Path(path).is_file() else None
            out[rec.uttid] = self.cache[rec.uttid]
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def read_saved_config(checkpoint: str | Path) -> dict:
    return yaml.safe_load(load_checkpoint(find_checkpoint(checkpoint))["config_yaml"])
