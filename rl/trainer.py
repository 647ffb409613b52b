"""The GRPO training loop for a speech-LM policy: `train()` reads top to bottom, one short loop over the steps
calling the named stages below (setup once; then per step collect -> advantages -> update -> metrics -> write).

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

import collections
import dataclasses
import math
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from policies.base import Decoder, Policy, policy_class
from rewards.runner import build_scorers, cat_scores, samples_from_rollout, score, select_scores
from rl.advantages import fused_reward_mean, normalize_fuse_normalize, span_frames, token_level_advantages
from rl.checkpoint import clean_partial, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rl.config import Config, Derived, dump
from rl.configlib import ConfigError, to_dict
from rl.distributed import Dist
from rl.dynamic_sampling import DynamicSampling, GroupResult, informative_groups
from rl.engine import Engine, padding_rows
from rl.errors import RunError
from rl.guards import (
    RewardHealth,
    UpdateGuard,
    check_finite,
    check_prompt_audio,
    check_prompt_lengths,
    check_text_size,
    clear_run,
    refuse_other_run,
)
from rl.losses import LossDenominators, LossOutput, staged_loss
from rl.metrics import MetricsLogger
from rl.monitor import monitor_metrics, push
from rl.samples import pick_samples, truncate_samples, write_samples
from rl.stages import Stage, combined_norm, param_groups, plan_stages, stage_masks
from rollouts.audio import read_wav
from rollouts.manifest import PromptStream, read_manifest
from rollouts.types import PromptRecord, Rollout, SamplingParams

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
    monitor: list = dataclasses.field(default_factory=list)  # the reward means of the monitor's window (rl/monitor.py)


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
        super().__init__(
            f"reward '{name}': {frac:.0%} of step {step}'s samples are invalid, above its limit "
            f"rewards.{name}.max_invalid_frac={limit:g}. Most common reasons: {why}"
        )


_ROLLOUT_TENSORS = (
    "prompt_ids",
    "prompt_mask",
    "tokens",
    "token_mask",
    "behaviour_logp",
    "group_ids",
    "prompt_index",
    "finished",
    "truncated",
    "lengths",
    "min_lengths",
    "text_lengths",
)


def rollout_tensors(ro: Rollout) -> dict[str, torch.Tensor]:
    """Every tensor of a rollout (its extras as `extra/<name>`), for pending.safetensors."""
    return {k: getattr(ro, k).contiguous() for k in _ROLLOUT_TENSORS} | {
        f"extra/{k}": v.contiguous() for k, v in ro.extras.items()
    }


def rollout_from_state(tensors: dict[str, torch.Tensor], meta: dict, pad_id: int) -> Rollout:
    extras = {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}
    return Rollout(
        **{k: tensors[k] for k in _ROLLOUT_TENSORS},
        params=SamplingParams(**meta["params"]),
        pad_id=pad_id,
        extras=extras,
    )


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for one random draw of a step, independent of everything that ran before it."""
    return (seed * 1_000_003 + step) * 1_009 + salt


@dataclass
class Run:
    """What `setup` builds once; the stages read it. `state` is the only part that changes (step by step)."""

    cfg: Config
    derived: Derived
    out: Path  # the run directory
    accelerator: object  # accelerate.Accelerator
    dist: Dist
    engine: Engine  # DDP / FSDP2 around the policy's module (rl/engine.py)
    records: list[PromptRecord]  # the manifest, raw texts
    policy: Policy
    generator: Generator
    scorers: dict
    prompt_audio: PromptAudio
    optimizer: torch.optim.Optimizer
    stream: PromptStream
    state: TrainState
    health: RewardHealth
    guard: UpdateGuard
    config_yaml: str
    stages: list[Stage]  # the policy's action stages, each with its loss weight, lr and clip range (rl/stages.py)
    logger: MetricsLogger | None = None  # rank 0
    bar: object = None  # tqdm, rank 0 with progress

    def say(self, line: str, file=None) -> None:
        if self.dist.main:
            (self.bar.write if self.bar is not None else print)(line, file=file)


class Generator:
    """One generation round: sample a group per prompt (built-in sampler or vLLM), then vocode it."""

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        vllm,
        decoder: Decoder | None,
        prompts: list,
        dist: Dist,
        engine: Engine,
        accelerator,
    ):
        self.cfg, self.policy, self.vllm, self.decoder = cfg, policy, vllm, decoder
        self.prompts, self.dist, self.engine, self.accelerator = prompts, dist, engine, accelerator

    def params(self, step: int) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(
            temperature=s.temperature(step),
            top_k=s.top_k,
            top_p=s.top_p,
            ras=s.ras,
            ras_window=s.ras_window,
            ras_tau=s.ras_tau,
        )

    def vocode(self, ro: Rollout):
        if self.decoder is None:
            return None
        # one noise seed per group: decoder noise is shared inside a group and cannot leak into the advantages
        seeds = [step_seed(self.cfg.train.seed, 0, int(g)) for g in ro.group_ids]
        return self.decoder(ro, seeds, batch_size=self.cfg.vocoder.batch_size)

    def __call__(self, prompt_idx: list[int], gids: list[int], params: SamplingParams, seed: int) -> Generated | None:
        """This rank's share of a round: one group per prompt (manifest indices), sampled and vocoded. None when the
        round has no slot for this rank."""
        mine = self.dist.shard(len(gids))
        if not mine:
            with self.engine.gathered():  # a collective under FSDP2: joined without a slot too
                return None
        s = self.cfg.sampling
        t0 = time.perf_counter()
        kw = dict(
            group_ids=[gids[i] for i in mine],
            seed=seed,
            min_ratio=s.min_token_text_ratio,
            max_ratio=s.max_token_text_ratio,
            max_new_tokens=s.max_new_tokens,
        )
        prompts = [self.prompts[prompt_idx[i]] for i in mine]
        gap = math.nan
        if self.vllm is not None:  # the engine syncs the policy's weights first when they changed
            ro, gap = self._trainer_logprobs(self.vllm.sample_groups(prompts, s.group_size, params, **kw))
        else:  # the precision of the update's forward passes (autocast is per thread), with the whole weights
            with self.accelerator.autocast(), self.engine.gathered():
                ro = self.policy.sample_groups(
                    prompts, s.group_size, params, **kw, decode="compiled" if s.compile_decode else "dynamic"
                )
        ro = dataclasses.replace(ro, prompt_index=torch.tensor([prompt_idx[mine[int(i)]] for i in ro.prompt_index]))
        t1 = time.perf_counter()
        vocoded = self.vocode(ro)
        return Generated(ro, vocoded, t1 - t0, time.perf_counter() - t1, vllm_gap=gap)

    def _trainer_logprobs(self, ro: Rollout) -> tuple[Rollout, float]:
        """vLLM's log-probs match the trainer's only to kernel precision, so the ratio is anchored on the trainer's
        own log-probs of the same tokens, under the weights vLLM sampled with (now, before any update)."""
        model = self.policy.model
        was_training = model.training
        model.eval()
        micro = self.cfg.optim.micro_batch_size or ro.num_rows
        with torch.no_grad(), self.accelerator.autocast():
            own = torch.cat(
                [
                    self.policy.token_logprobs(ro.select(m))[0].float().cpu()
                    for m in torch.split(torch.arange(ro.num_rows), micro)
                ]
            )
        model.train(was_training)
        return dataclasses.replace(ro, behaviour_logp=own), float((own - ro.behaviour_logp)[ro.token_mask].abs().mean())


class Prefetch:
    """train.pipeline: the next step's first round, sampled on a worker thread while this round is scored (one step
    off-policy). `submit` starts it, `join` waits for it, `take` hands it to the next step; the pending round is part
    of every checkpoint (`state` + `tensors`), so a resumed pipelined run repeats the uninterrupted one."""

    def __init__(self, enabled: bool, pending: PendingRound | None = None):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if enabled else None
        self.pending = pending
        self._future = None

    @staticmethod
    def restore(
        run_state: TrainState, ckpt: dict | None, dist: Dist, generator: Generator, pad_id: int, resume: str | None
    ) -> PendingRound | None:
        if ckpt is None or run_state.pending is None:
            return None
        if run_state.pending["world"] != dist.world:
            raise RuntimeError(
                f"{resume}: this pipelined run was saved by {run_state.pending['world']} processes; "
                f"resume it with as many (got {dist.world})"
            )
        prefix = f"rank{dist.rank}."
        part = {k[len(prefix) :]: v for k, v in ckpt["pending"].items() if k.startswith(prefix)}
        gen = None
        if part:
            ro = rollout_from_state(part, run_state.pending, pad_id)
            gen = Generated(ro, generator.vocode(ro), 0.0, lag=1)
        return PendingRound(run_state.pending["prompt_idx"], run_state.pending["gids"], gen)

    def take(self) -> PendingRound | None:
        pending, self.pending = self.pending, None
        return pending

    def submit(
        self, generator: Generator, prompt_idx: list[int], gids: list[int], params: SamplingParams, seed: int
    ) -> None:
        self._future = (prompt_idx, gids, self.executor.submit(generator, prompt_idx, gids, params, seed))

    def join(self) -> float:
        """Wait for the submitted round; returns the seconds of it that were hidden behind this round's scoring."""
        if self._future is None:
            return 0.0
        prompt_idx, gids, future = self._future
        self._future = None
        t = time.perf_counter()
        ahead = future.result()
        self.pending = PendingRound(prompt_idx, gids, dataclasses.replace(ahead, lag=1) if ahead else None)
        if ahead is None:
            return 0.0
        return max(0.0, ahead.seconds + ahead.vocode_seconds - (time.perf_counter() - t))

    def tensors(self, dist: Dist) -> dict[str, torch.Tensor] | None:
        """Every rank's pending rollout (a collective), for the checkpoint."""
        mine = None if self.pending is None or self.pending.gen is None else rollout_tensors(self.pending.gen.rollout)
        every = dist.gather(mine)
        tensors = {f"rank{r}.{k}": v for r, t in enumerate(every) if t is not None for k, v in t.items()}
        return tensors or None

    def state(self, world: int, params: SamplingParams) -> dict | None:
        if self.pending is None:
            return None
        return {
            "prompt_idx": self.pending.prompt_idx,
            "gids": self.pending.gids,
            "world": world,
            "params": dataclasses.asdict(params),
        }  # sampled with the next step's parameters

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()


# ---- setup --------------------------------------------------------------------------------------------------------


def setup(cfg: Config, derived: Derived, resume: str | None, overwrite: bool, progress: bool) -> tuple[Run, Prefetch]:
    """Data, policy, vocoder, scorers, optimizer and the resumed state, all checked before anything is written;
    then the run directory is opened (rank 0)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise RuntimeError(
            f"launched with {accelerator.distributed_type.value}: ttsrl sets up DDP / FSDP2 itself (rl/engine.py); "
            f"use `accelerate launch --multi_gpu`, with optim.zero_stage=2 or 3 for FSDP2 sharding"
        )
    dist = Dist(accelerator)
    other_run = [] if resume else refuse_other_run(out, overwrite)
    records = read_manifest(cfg.data.manifest, cfg.data.root or None)
    check_text_size(records, cfg.data.max_text_tokens)
    policy, vllm = _load_policy(cfg, derived, records, dist, accelerator)
    stages = plan_stages(cfg, policy)
    from rollouts.text import lm_records  # the texts as the LM reads them (data.text_normalize, data.phoneme)

    prompts = [policy.prompt_input(r) for r in lm_records(records, cfg.data, policy.encode_text)]
    check_prompt_lengths(
        records,
        prompts,
        max_text_tokens=cfg.data.max_text_tokens,
        context=policy.context_length,
        max_new_tokens=cfg.sampling.max_new_tokens,
    )
    decoder = _load_decoder(cfg, policy, records)
    ckpt = load_checkpoint(found := find_checkpoint(resume)) if resume else None
    if ckpt is not None:  # into the whole module, before an engine shards it
        policy.load_checkpoint_state(ckpt["policy"])
    engine = _engine(cfg, policy, dist, vllm)
    generator = Generator(cfg, policy, vllm, decoder, prompts, dist, engine, accelerator)
    scorers = build_scorers(cfg.rewards)
    for sc in scorers.values():  # remote services: fail fast, before the first step, naming the url
        if callable(getattr(sc, "check", None)):
            sc.check()
    check_prompt_audio(records, [k for k, sc in scorers.items() if getattr(sc, "needs_prompt_audio", False)])
    run = Run(
        cfg,
        derived,
        out,
        accelerator,
        dist,
        engine,
        records,
        policy,
        generator,
        scorers,
        PromptAudio(records),
        _optimizer(cfg, policy, engine, accelerator, stages),
        PromptStream(len(records), seed=cfg.train.seed, shuffle=cfg.data.shuffle),
        TrainState(run_id=uuid.uuid4().hex),
        RewardHealth(derived.weights, cfg.train.max_dead_reward_steps),
        UpdateGuard(cfg.train.max_skipped_updates),
        dump(cfg),
        stages,
    )
    if ckpt is not None:
        _resume(run, ckpt, found)
    prefetch = Prefetch(cfg.train.pipeline, Prefetch.restore(run.state, ckpt, dist, generator, policy.pad_id, resume))
    if dist.main:  # every input is checked: from here on the run writes
        _open_run_dir(run, other_run, bool(resume), progress)
    return run, prefetch


def _load_policy(cfg: Config, derived: Derived, records: list[PromptRecord], dist: Dist, accelerator):
    ckpt_dir = Path(cfg.policy.ckpt_dir)
    cls = policy_class(cfg.policy.kind)
    if cfg.policy.build_tiny and dist.main:
        texts = [t for r in records for t in (r.prompt_text, r.target_text)]
        cls.write_tiny(ckpt_dir, texts, seed=cfg.train.seed, vocoder=cfg.vocoder.enabled)
    dist.barrier()
    policy = cls.from_pretrained(
        ckpt_dir,
        dtype=DTYPES[cfg.policy.dtype],
        device=accelerator.device,
        lora=cfg.policy.lora,
        trust_remote_code=cfg.policy.trust_remote_code,
        config=cfg.policy,
    )
    _check_policy_fits(cfg, policy)
    if derived.needs_reference:
        policy.make_reference()
    vllm = None  # sampling.backend vllm: the rollouts come from a vLLM engine that holds a copy of the weights
    if cfg.sampling.backend == "vllm":
        from policies.vllm_rollout import VLLMSampler

        vllm = VLLMSampler(
            policy,
            gpu_memory_utilization=cfg.sampling.vllm_gpu_memory_utilization,
            dtype="bfloat16" if cfg.train.mixed_precision == "bf16" else "float32",
            seed=cfg.train.seed,
        )
    return policy, vllm


def _check_policy_fits(cfg: Config, policy: Policy) -> None:
    """Settings that need what only some policies have: vLLM sampling (an LM vLLM can serve) and token-level
    rewards (actions that are the audio's frames, at `speech_rate` per second)."""
    kind = cfg.policy.kind
    if cfg.sampling.backend == "vllm" and not getattr(policy, "vllm_sampling", False):
        raise ConfigError(f"sampling.backend vllm: policy.kind {kind} is not sampled by vLLM (use backend torch)")
    spans = [k for k, r in cfg.rewards.items() if r.weight != 0 and r.kwargs.get("token_level")]
    if spans and not getattr(policy, "actions_are_frames", False):
        raise ConfigError(
            f"rewards.{spans[0]}.kwargs.token_level: policy.kind {kind}'s actions are not audio frames, so wrong "
            "spans cannot be mapped onto them; use the sequence-level reward (token_level: false)"
        )


def _load_decoder(cfg: Config, policy: Policy, records: list[PromptRecord]) -> Decoder | None:
    if not cfg.vocoder.enabled:
        return None
    return policy.load_decoder(records, n_timesteps=cfg.vocoder.n_timesteps, dtype=cfg.vocoder.dtype)


def _engine(cfg: Config, policy: Policy, dist: Dist, vllm) -> Engine:
    if dist.world > 1 and cfg.optim.zero_stage and (vllm is not None or cfg.train.pipeline):
        what = "sampling.backend=vllm" if vllm is not None else "train.pipeline=true"
        raise ConfigError(
            f"optim.zero_stage={cfg.optim.zero_stage} (FSDP2) cannot run with {what}: that samples outside the "
            f"sharded module; use optim.zero_stage=0 (DDP)"
        )
    return Engine(policy, dist, cfg.optim.zero_stage)


def _optimizer(cfg: Config, policy: Policy, engine: Engine, accelerator, stages: list[Stage]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (FSDP2: their shards), built after the engine wrapped the module; one
    parameter group per stage of the policy, with the stage's learning rate (rl/stages.py)."""
    fused = accelerator.device.type in ("cpu", "cuda") and engine.kind != "fsdp"  # one kernel over all parameters
    return torch.optim.AdamW(
        param_groups(policy, stages),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        fused=fused or None,
    )


def _resume(run: Run, ckpt: dict, found) -> None:
    """The rest of a loaded checkpoint (the policy's weights are in already): optimizer, stream and guards."""
    if run.generator.vllm is not None:
        run.generator.vllm.mark_stale()  # the engine still holds the initial weights
    run.engine.load_optimizer_state(run.optimizer, ckpt["optimizer"])  # no rng to restore: steps seed their draws
    run.state = TrainState(**ckpt["trainer_state"])
    run.stream.load_state(run.state.stream)
    run.health.load_state_dict(run.state.guards.get("rewards", {}))
    run.guard.load_state_dict(run.state.guards.get("updates", {}))
    if run.dist.main:
        print(f"ttsrl: resumed from {found} at step {run.state.step}")


def _open_run_dir(run: Run, other_run: list, resumed: bool, progress: bool) -> None:
    out, state = run.out, run.state
    clear_run(out, other_run, print)
    out.mkdir(parents=True, exist_ok=True)
    clean_partial(out)
    if resumed:
        for warning in truncate_samples(out, state.step):
            print(f"ttsrl: warning: {warning}", file=sys.stderr)
    (out / "config.yaml").write_text(run.config_yaml)
    run.logger = MetricsLogger(
        out,
        config=to_dict(run.cfg),
        wandb_cfg=run.cfg.wandb,
        resume_step=state.step if resumed else None,
        wandb_id=state.wandb_id,
    )
    state.wandb_id = run.logger.wandb_id
    print(
        f"ttsrl: metrics -> {run.logger.path}"
        + (f" and wandb run {run.logger.wandb_id}" if run.logger.wandb else "")
        + (f"; {run.dist.world} processes" if run.dist.world > 1 else "")
    )
    if progress:
        from tqdm import tqdm

        run.bar = tqdm(total=run.cfg.train.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)


# ---- the loop -----------------------------------------------------------------------------------------------------


def train(
    cfg: Config, derived: Derived, *, resume: str | None = None, progress: bool = True, overwrite: bool = False
) -> dict:
    """Run the configured training (one process, or one rank of `accelerate launch`). Returns the last metrics.

    Every input is checked before anything is written to the output directory; a directory that holds another run
    is refused unless `overwrite` (which then deletes that run's files). Raises InputError / ManifestError / ...
    for bad input and RunError when the run cannot go on (rl/guards.py)."""
    run, prefetch = setup(cfg, derived, resume, overwrite, progress)
    start_step, trained_rows, metrics = run.state.step, 0, {}
    for step in range(run.state.step, cfg.train.steps):
        torch.manual_seed(step_seed(cfg.train.seed, step))  # dropout and anything else drawing globally
        collected = collect(run, prefetch, step)
        batch = gather_step(run, collected, step)
        trained_rows += _rows_with_a_reward(batch.all_scores.values, derived.weights)
        adv, advantages, train_mask = compute_advantages(run, batch)
        upd = update(run, batch, token_advantages(run, batch, adv, advantages, train_mask), train_mask, step)
        run.state.step, run.state.stream = step + 1, run.stream.state()
        metrics = step_metrics(run, step, collected, batch, adv, upd)
        metrics.update(watch_rewards(run, metrics))
        write_step(run, prefetch, metrics, batch, advantages)
    prefetch.shutdown()
    if run.bar is not None:
        run.bar.close()
    if run.logger is not None:
        run.logger.close()
    state, out = run.state, run.out
    if state.step > start_step and trained_rows == 0:
        raise RunError(
            f"the run trained on nothing: in steps {start_step + 1}..{state.step} no sample had a valid "
            f"value of any weighted reward ({', '.join(k for k, w in derived.weights.items() if w)}); "
            f"see reward/<name>/invalid_frac in {out / 'metrics.jsonl'}"
        )
    if run.dist.main:
        print(f"ttsrl: done; metrics in {out / 'metrics.jsonl'}, checkpoints in {out / 'checkpoints'}")
    return metrics


# ---- 1. collect: rollouts, vocoding, scoring, dynamic resampling --------------------------------------------------


@dataclass
class Collected:
    """This rank's rounds of one step (every rank runs the same resampling plan on its share of each round)."""

    plan: DynamicSampling  # which groups were kept (`plan.selected()`), tries, discarded groups
    parts: list[Rollout]  # one per round this rank generated in
    scores: list  # [Scores] per part
    lag: list[torch.Tensor]  # [rows] per part: optimizer steps between the sampling policy and this one
    audio: list  # one waveform (or None) per row of the parts, in order
    vllm_gaps: list[float]
    seconds: dict[str, float]  # rollout, vocode, score, prefetch_hidden
    sample_rate: int = 0  # of the audio (the policy's decoder; 0 = not decoded)


def collect(run: Run, prefetch: Prefetch, step: int) -> Collected:
    cfg = run.cfg
    plan = DynamicSampling(
        cfg.dynamic_sampling.mode,
        cfg.data.prompts_per_step,
        max_tries=cfg.dynamic_sampling.max_tries,
        max_gen_batches=cfg.dynamic_sampling.max_gen_batches,
        on_exhausted=cfg.dynamic_sampling.on_exhausted,
    )
    c = Collected(plan, [], [], [], [], [], dict.fromkeys(("rollout", "vocode", "score", "prefetch_hidden"), 0.0))
    params = run.generator.params(step)
    slot_prompt: dict[int, int] = {}
    while (req := plan.next_request()) is not None:
        pending = prefetch.take() if plan.generations == 0 else None  # sampled during the previous step
        if pending is not None:
            prompt_idx, gids, gen = pending.prompt_idx, pending.gids, pending.gen
        else:
            if req.fresh:
                for slot, k in zip(req.slots, run.stream.take(len(req.slots))):
                    slot_prompt[slot] = k
            prompt_idx, gids = [slot_prompt[s] for s in req.slots], _new_group_ids(run.state, len(req.slots))
            gen = run.generator(prompt_idx, gids, params, step_seed(cfg.train.seed, step, plan.generations + 1))
            if gen is not None:
                c.seconds["rollout"] += gen.seconds
                c.seconds["vocode"] += gen.vocode_seconds
        slot_prompt.update(zip(req.slots, prompt_idx))
        if prefetch.executor is not None and plan.generations == 0:
            # overlap this round's scoring with the next step's first round (one step off-policy); the last step
            # prefetches too, into the final checkpoint, so that a run extended by --resume is exact
            nxt = run.stream.take(cfg.data.prompts_per_step)
            ngids = _new_group_ids(run.state, cfg.data.prompts_per_step)
            prefetch.submit(
                run.generator, nxt, ngids, run.generator.params(step + 1), step_seed(cfg.train.seed, step + 1, 1)
            )
        results = _score_round(run, c, gen, req.slots, gids) if gen is not None else []
        c.seconds["prefetch_hidden"] += prefetch.join()  # joined before the model is used again
        plan.record([r for rank_results in run.dist.gather(results) for r in rank_results])
    return c


def _score_round(run: Run, c: Collected, gen: Generated, slots: list[int], gids: list[int]) -> list[GroupResult]:
    ro = gen.rollout
    t = time.perf_counter()
    samples = samples_from_rollout(
        ro,
        run.records,
        run.policy.speech_codes(ro),
        run.policy.speech_rate,
        gen.vocoded,
        run.prompt_audio.get(ro.prompt_index) if gen.vocoded else None,
    )
    sc = score(run.scorers, samples, gen.vocoded.reasons if gen.vocoded else None)
    c.seconds["score"] += time.perf_counter() - t
    ds = run.cfg.dynamic_sampling
    info = informative_groups(
        sc.values,
        ro.group_ids,
        run.derived.weights,
        run.derived.dynamic_sampling_keys,
        min_std=ds.min_std,
        std_ddof=run.cfg.advantage.std_ddof,
    )
    c.parts.append(ro)
    c.scores.append(sc)
    c.lag.append(torch.full((ro.num_rows,), gen.lag))
    c.vllm_gaps.append(gen.vllm_gap)
    c.audio += gen.vocoded.audio if gen.vocoded else [None] * ro.num_rows
    c.sample_rate = gen.vocoded.sample_rate if gen.vocoded else c.sample_rate
    return [GroupResult(slot=slots[i], group_id=gids[i], informative=info[gids[i]]) for i in run.dist.shard(len(gids))]


def _new_group_ids(state: TrainState, n: int) -> list[int]:
    state.next_group_id += n
    return list(range(state.next_group_id - n, state.next_group_id))


@dataclass
class StepBatch:
    """The step's training batch: this rank's rows of the kept groups (slot order) + the whole step's statistics."""

    rollout: Rollout | None  # this rank's rows (None: no rows on this rank)
    scores: object  # Scores of those rows (None without rows)
    audio: list  # their waveforms
    sample_rate: int  # of the waveforms
    offset: int  # where this rank's rows start in the whole step's rows (ranks in order)
    group_ids: torch.Tensor  # [N] every rank's rows
    lengths: torch.Tensor  # [N]
    truncated: torch.Tensor  # [N]
    lag: torch.Tensor  # [N]
    all_scores: object  # Scores of all N rows

    @property
    def num_rows(self) -> int:  # this rank's
        return 0 if self.rollout is None else self.rollout.num_rows

    @property
    def total_rows(self) -> int:  # every rank's
        return self.group_ids.shape[0]


def gather_step(run: Run, c: Collected, step: int) -> StepBatch:
    """The kept groups' rows, gathered over the ranks; stops the run when a reward mostly fails."""
    slot_of = {r.group_id: r.slot for r in c.plan.selected()}
    all_rows = Rollout.cat(c.parts) if c.parts else None
    row_gids = all_rows.group_ids.tolist() if all_rows is not None else []
    rows = sorted((i for i, g in enumerate(row_gids) if g in slot_of), key=lambda i: (slot_of[row_gids[i]], i))
    batch = all_rows.select(rows) if rows else None
    scores = select_scores(cat_scores(c.scores), rows) if rows else None
    lag = torch.cat(c.lag)[rows] if rows else torch.zeros(0, dtype=torch.long)
    dist = run.dist
    everyone = dist.gather(None if batch is None else (batch.group_ids, batch.lengths, batch.truncated, lag, scores))
    offset = sum(x[0].shape[0] for x in everyone[: dist.rank] if x is not None)
    shared = [x for x in everyone if x is not None]
    g_gids, g_lengths, g_trunc, g_lag = (torch.cat([x[i] for x in shared]) for i in range(4))
    sb = StepBatch(
        batch,
        scores,
        [c.audio[i] for i in rows],
        c.sample_rate,
        offset,
        g_gids,
        g_lengths,
        g_trunc,
        g_lag,
        cat_scores([x[4] for x in shared]),
    )
    n_all = sb.total_rows
    for k, r in run.cfg.rewards.items():  # a reward that mostly fails stops the run (configurable per reward)
        frac = float((~sb.all_scores.results[k].valid).mean()) if n_all else 0.0
        if frac > r.max_invalid_frac:
            raise RewardFailure(k, frac, r.max_invalid_frac, sb.all_scores.results[k].reasons, step + 1)
    for line in run.health.observe(step + 1, sb.all_scores.results, n_all):
        run.say(line, file=sys.stderr)
    if (why := run.health.stop_reason(step + 1)) is not None:  # a weighted reward dead for several steps
        raise RunError(why)
    return sb


# ---- 2. advantages ------------------------------------------------------------------------------------------------


def compute_advantages(run: Run, sb: StepBatch):
    """normalize -> weighted fuse -> normalize over the whole step; returns (AdvantageResult, this rank's [n]
    advantages on the policy's device, [n, T] train mask: samples without any valid weighted reward do not train)."""
    cfg, weights = run.cfg, run.derived.weights
    adv = normalize_fuse_normalize(
        sb.all_scores.values,
        sb.group_ids,
        weights,
        std_ddof=cfg.advantage.std_ddof,
        eps=cfg.advantage.eps,
        min_std=cfg.advantage.min_std,
        second_norm=cfg.advantage.second_norm,
    )
    n = sb.num_rows
    advantages = adv.advantages[sb.offset : sb.offset + n].to(run.policy.device)
    if n:
        scored = torch.stack([~torch.isnan(sb.scores.values[k]) for k in weights if weights[k] != 0]).any(0)  # [n]
        train_mask = sb.rollout.token_mask & scored[:, None]
    else:
        train_mask = torch.zeros(0, 1, dtype=torch.bool)
    return adv, advantages, train_mask


def token_advantages(run: Run, sb: StepBatch, adv, advantages: torch.Tensor, train_mask: torch.Tensor) -> torch.Tensor:
    """The advantages the loss sees: this rank's [n] sequence advantages, or [n, T] when a weighted reward gives
    token-level spans (`A_i,t = A_i - advantage.token_coef * sum_k w_k e_k,i,t`, rl/advantages.py). Logs into
    adv.stats `adv/token_penalized_frac` (the trained tokens inside a wrong span, all ranks)."""
    weights = run.derived.weights
    keys = [k for k, w in weights.items() if w != 0 and sb.all_scores.results[k].spans]  # the same on every rank
    if not keys:
        return advantages
    if not getattr(run.policy, "actions_are_frames", False):
        raise RuntimeError(
            f"reward '{keys[0]}' returns token-level spans, but policy.kind {run.cfg.policy.kind}'s actions are not "
            "audio frames: give it a sequence-level reward"
        )
    n = sb.num_rows
    if n:
        t = sb.rollout.tokens.shape[1]
        penalties = {}
        for k in keys:
            spans = sb.scores.results[k].spans or [None] * n
            penalties[k] = span_frames(spans, sb.rollout.lengths.cpu(), run.policy.speech_rate, t)[0]
        per_token = token_level_advantages(advantages.cpu(), penalties, weights, run.cfg.advantage.token_coef)
        hit = torch.stack(list(penalties.values())).any(0) & train_mask.cpu()
        counts = (float(hit.sum()), float(train_mask.sum()))
    else:
        per_token, counts = advantages[:, None], (0.0, 0.0)
    adv.stats["adv/token_penalized_frac"] = run.dist.sum(counts[0]) / max(run.dist.sum(counts[1]), 1.0)
    return per_token.to(advantages.device)


# ---- 3. update ----------------------------------------------------------------------------------------------------


# the loss terms and token-weighted clip metrics summed over micro-batches (then over ranks), overall and per stage
_SUMMED = ("loss", "pg_loss", "kl", "clip/low_frac", "clip/high_frac", "ratio/mean")


@dataclass
class UpdateStats:
    """Per optimizer step (that was taken) of one training step, summed over ranks: `per_step[key]` lists the values
    of `loss`, `pg_loss`, `kl`, `clip/*`, `ratio/*`, `grad_norm` and, for a policy that names its stages, the same
    per stage as `<stage>/<key>`."""

    per_step: dict[str, list[float]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    entropy_sum: float = 0.0  # over the first epoch's valid tokens
    entropy_tokens: float = 0.0
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    seconds: float = 0.0


def update(run: Run, sb: StepBatch, advantages: torch.Tensor, train_mask: torch.Tensor, step: int) -> UpdateStats:
    """`optim.ppo_epochs` passes of `optim.minibatches` optimizer steps. Minibatches partition the whole step's rows
    (every rank draws the same permutation of all N rows); each rank trains on the rows of each minibatch it holds.
    Loss denominators are over all ranks; gradients are summed over ranks."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    run.policy.model.train()
    stats = UpdateStats()
    n, n_all = sb.num_rows, sb.total_rows
    pad_row = padding_rows(dist, sb.rollout) if dist.world > 1 else None  # for ranks with fewer micro-batches
    masks = stage_masks(run.policy, sb.rollout, train_mask, run.stages) if n else [train_mask] * len(run.stages)
    for epoch in range(cfg.optim.ppo_epochs):
        g = torch.Generator().manual_seed(step_seed(cfg.train.seed, step, 1000 + epoch))
        shuffled = cfg.optim.ppo_epochs * cfg.optim.minibatches > 1
        order = torch.randperm(n_all, generator=g) if shuffled else torch.arange(n_all)
        for global_mb in torch.tensor_split(order, cfg.optim.minibatches):
            mb = global_mb[(global_mb >= sb.offset) & (global_mb < sb.offset + n)] - sb.offset
            acc = _accumulate(
                run, sb, advantages, train_mask, masks, mb, len(global_mb), step, pad_row, stats, epoch == 0
            )
            stepped, norms = _optimizer_step(run, dist.sum(acc.sums["loss"]), step)
            if stepped:
                if run.generator.vllm is not None:
                    run.generator.vllm.mark_stale()  # the engine samples the next rollout with the new weights
                _record_step(run, acc, norms, stats)
            else:
                stats.skipped += 1
    stats.seconds = time.perf_counter() - t0
    stats.entropy_sum, stats.entropy_tokens = dist.sum(stats.entropy_sum), dist.sum(stats.entropy_tokens)
    return stats


def _record_step(run: Run, acc: LossSums, norms: list[float], stats: UpdateStats) -> None:
    """One optimizer step's values, summed (min / max) over the ranks, into `stats.per_step`."""
    dist = run.dist
    for k, v in acc.sums.items():
        stats.per_step[k].append(dist.sum(v))
    for prefix in ("", *(s.key("") for s in run.stages if s.name)):  # every rank joins each collective
        low = dist.min(acc.extremes.get(prefix + "ratio/min", math.inf))
        high = dist.max(acc.extremes.get(prefix + "ratio/max", -math.inf))
        if math.isfinite(low):  # some rank trained actions of this stage
            stats.per_step[prefix + "ratio/min"].append(low)
            stats.per_step[prefix + "ratio/max"].append(high)
    stats.per_step["grad_norm"].append(combined_norm(norms))
    if len(norms) == len(run.stages):  # a gradient norm per stage (one group each; else the stages share one)
        for s, norm in zip(run.stages, norms):
            if s.name:
                stats.per_step[s.key("grad_norm")].append(norm)


@dataclass
class LossSums:
    """One minibatch's loss terms and token-weighted clip metrics, summed over this rank's micro-batches: overall
    (`_SUMMED` keys) and, for named stages, per stage (`<stage>/<key>`). `extremes` holds the ratio's min / max."""

    sums: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(_SUMMED, 0.0))
    extremes: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"ratio/min": math.inf, "ratio/max": -math.inf}
    )

    @classmethod
    def for_stages(cls, stages: list[Stage]) -> LossSums:
        """Every key zeroed, the named stages' too: each rank then sums the same keys over the ranks, in order."""
        acc = cls()
        for s in stages:
            if s.name:
                acc.sums.update({s.key(k): 0.0 for k in _SUMMED})
        return acc

    def add(self, prefix: str, res, share: float) -> None:
        """A stage's (or the whole loss's) clip metrics of one micro-batch, weighted by its share of the tokens."""
        for k in ("clip/low_frac", "clip/high_frac", "ratio/mean"):
            self.sums[prefix + k] += res.metrics[k] * share
        low, high = prefix + "ratio/min", prefix + "ratio/max"
        self.extremes[low] = min(self.extremes.get(low, math.inf), res.metrics["ratio/min"])
        self.extremes[high] = max(self.extremes.get(high, -math.inf), res.metrics["ratio/max"])


def _accumulate(
    run: Run,
    sb: StepBatch,
    advantages: torch.Tensor,
    train_mask: torch.Tensor,
    masks: list[torch.Tensor],
    mb: torch.Tensor,
    mb_rows: int,
    step: int,
    pad_row: Rollout | None,
    stats: UpdateStats,
    first_epoch: bool,
) -> LossSums:
    """Forward + backward of one minibatch (this rank's rows `mb`), micro-batch by micro-batch; each stage's loss
    divides by that stage's global denominators over the minibatch (rl/losses.py, `masks`: [n, T] per stage), so the
    summed gradient is the whole minibatch's. Every rank runs as many micro-batches as the rank with the most
    (zero-weight padding), so that the engine's collectives line up (rl/engine.py)."""
    dist, engine, device = run.dist, run.engine, run.policy.device
    n = sb.num_rows
    denoms = []
    for m in masks:  # the minibatch's, all ranks
        tokens = dist.sum(float(m[mb].sum()) if n else 0.0)
        seqs = dist.sum(float(m[mb].any(-1).sum()) if n else 0.0)
        denoms.append(LossDenominators(tokens=tokens, seqs=seqs, rows=float(mb_rows)))
    micro = run.cfg.optim.micro_batch_size or max(len(mb), 1)
    real = [m for m in torch.split(mb, micro) if bool(train_mask[m].any())]  # the micro-batches with tokens
    count = int(dist.max(len(real)))
    run.optimizer.zero_grad(set_to_none=True)
    acc = LossSums.for_stages(run.stages)
    for j in range(count):
        with engine.micro_batch(last=j == count - 1):
            if j < len(real):
                sub, rows = sb.rollout.select(real[j]), real[j]
                own = [m[rows].to(device) for m in masks]
                _micro_step(run, sub, advantages[rows.to(device)], own, denoms, step, acc, stats, first_epoch)
            else:  # padding: a forward + backward of weight 0
                with run.accelerator.autocast():
                    logp, _ = engine.logprobs(pad_row)
                run.accelerator.backward(engine.padding_loss(logp))
    return acc


def _micro_step(
    run: Run,
    sub: Rollout,
    adv: torch.Tensor,  # [n_micro]
    masks: list[torch.Tensor],  # per stage, [n_micro, T] its actions to train
    denoms: list[LossDenominators],  # per stage, the minibatch's
    step: int,
    acc: LossSums,
    stats: UpdateStats,
    first_epoch: bool,
) -> None:
    """One micro-batch: the reference (no grad) and policy forwards, each stage's clipped loss (this micro-batch's
    share of the minibatch's), the backward of their weighted sum; adds to `acc` (and to the entropy in `stats` in
    the first epoch)."""
    cfg, engine = run.cfg, run.engine
    kl_on = cfg.loss.kl_coef > 0
    with run.accelerator.autocast():
        ref_logp = None
        if cfg.loss.ratio_anchor == "ref" or (kl_on and not all(s.closed_kl for s in run.stages)):
            with torch.no_grad():
                ref_logp, _ = engine.logprobs(sub, reference=True)
        logp, ent = engine.logprobs(sub)
        # e.g. the flow's Gaussian actions: the closed form, in place of k3 on ref_logp
        kl_tokens = engine.reference_kl(sub) if kl_on and any(s.closed_kl for s in run.stages) else None
    anchor = sub.behaviour_logp.to(logp.device) if cfg.loss.ratio_anchor == "old" else ref_logp
    total, results = staged_loss(
        logp,
        anchor,
        adv,
        masks,
        denoms,
        eps=[(s.eps_low(step), s.eps_high(step)) for s in run.stages],
        weights=[s.loss_weight for s in run.stages],
        kl_coef=cfg.loss.kl_coef,
        ref_logp=ref_logp,
        kl_tokens=kl_tokens,
        closed=[s.closed_kl for s in run.stages],
        ratio_level=cfg.loss.ratio_level,
        agg=cfg.loss.agg,
        norm_len=cfg.sampling.max_new_tokens,
    )
    all_tokens = max(sum(d.tokens for d in denoms), 1.0)
    for s, res, mask, denom in zip(run.stages, results, masks, denoms):
        _add_stage(acc, s, res, float(mask.sum()), denom.tokens, all_tokens)
    run.accelerator.backward(total)
    if first_epoch:
        seen = torch.stack(masks).any(0) & ~torch.isnan(ent)
        stats.entropy_sum += float(ent[seen].sum())
        stats.entropy_tokens += float(seen.sum())


def _add_stage(acc: LossSums, s: Stage, res: LossOutput, tokens: float, stage_tokens: float, all_tokens: float) -> None:
    """One stage's loss terms of a micro-batch into the overall sums (weighted by the stage's loss_weight; clip
    metrics by the token share) and, for a named stage, its own `<stage>/...` sums. A stage without actions in the
    micro-batch adds its (zero) loss but no clip or ratio values."""
    w = s.loss_weight
    acc.sums["loss"] += w * float(res.loss.detach())
    acc.sums["pg_loss"] += w * float(res.pg.detach())
    acc.sums["kl"] += w * float(res.kl.detach())
    if s.name:
        for k, v in (("loss", res.loss), ("pg_loss", res.pg), ("kl", res.kl)):
            acc.sums[s.key(k)] += float(v.detach())
    if tokens == 0:
        return
    acc.add("", res, tokens / all_tokens)  # the metrics are local: averaged by token share
    if s.name:
        acc.add(s.key(""), res, tokens / max(stage_tokens, 1.0))


def _optimizer_step(run: Run, mb_loss: float, step: int) -> tuple[bool, list[float]]:
    """Clip (the engine has summed the gradients over ranks) and step; returns (stepped, gradient norm per stage).
    Not stepped (gradients dropped) when the loss or the gradient norm is not finite (both are global, so every rank
    skips together). grad_clip 0 = no clipping (the norm is still reported). With a parameter group per stage,
    each is clipped on its own (rl/stages.py)."""
    cfg, optimizer = run.cfg, run.optimizer
    limit = cfg.optim.grad_clip or math.inf
    if len(optimizer.param_groups) == 1:
        norms = [run.engine.clip_grad_norm(run.accelerator, run.policy.trainable_parameters(), limit)]
    else:
        norms = [run.engine.clip_grad_norm(run.accelerator, g["params"], limit) for g in optimizer.param_groups]
    stepped = run.guard.allow(mb_loss, combined_norm(norms), step + 1)
    if stepped:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return stepped, norms


# ---- 4. metrics, samples and checkpoints --------------------------------------------------------------------------


def step_metrics(run: Run, step: int, c: Collected, sb: StepBatch, adv, upd: UpdateStats) -> dict:
    """The step's metrics row: the one place that names the logged keys."""
    cfg, weights = run.cfg, run.derived.weights
    u = upd.per_step
    metrics = {
        "loss": _mean(u["loss"]),
        "pg_loss": _mean(u["pg_loss"]),
        "kl": _mean(u["kl"]),
        "entropy": upd.entropy_sum / upd.entropy_tokens if upd.entropy_tokens else float("nan"),
        "clip/low_frac": _mean(u["clip/low_frac"]),
        "clip/high_frac": _mean(u["clip/high_frac"]),
        "clip/eps_low": cfg.loss.eps_low(step),
        "clip/eps_high": cfg.loss.eps_high(step),
        "sampling/temperature": cfg.sampling.temperature(step),
        "ratio/mean": _mean(u["ratio/mean"]),
        "ratio/min": min(u["ratio/min"], default=float("nan")),
        "ratio/max": max(u["ratio/max"], default=float("nan")),
        "grad_norm": _mean(u["grad_norm"]),
        "lr": run.optimizer.param_groups[0]["lr"],
        "len/mean": float(sb.lengths.float().mean()),
        "len/truncated_frac": float(sb.truncated.float().mean()),
        "resample/tries": c.plan.generations,
        "resample/discarded_groups": c.plan.discarded,
        "adv/frac_uninformative": adv.stats["adv/frac_uninformative"],
        "adv/mean": adv.stats["adv/mean"],
        "adv/std": adv.stats["adv/std"],
        **{k: v for k, v in adv.stats.items() if k.startswith("adv/token_")},
        "reward/fused/mean": fused_reward_mean(adv.stats, weights),
        "time/rollout_s": c.seconds["rollout"],
        "time/vocode_s": c.seconds["vocode"],
        "time/score_s": c.seconds["score"],
        "time/update_s": upd.seconds,
        "time/prefetch_hidden_s": c.seconds["prefetch_hidden"],
        "pipeline/offpolicy_frac": float((sb.lag > 0).float().mean()),
        "pipeline/lag_steps": int(sb.lag.max()),
        "update/skipped_nonfinite": upd.skipped,
    }
    metrics.update(stage_metrics(run, step, upd))
    if run.generator.vllm is not None:  # mean |log-prob of vLLM - the trainer's|, the largest over rounds and ranks
        metrics["vllm/logp_abs_diff"] = run.dist.max(max([g for g in c.vllm_gaps if g == g], default=0.0))
    metrics.update(policy_metrics(run, sb))
    n_all = sb.total_rows
    for k, res in sb.all_scores.results.items():
        metrics[f"reward/{k}/mean"] = adv.stats[f"reward/{k}/mean"]
        metrics[f"reward/{k}/std"] = adv.stats[f"reward/{k}/std"]
        metrics[f"reward/{k}/invalid_frac"] = adv.stats[f"reward/{k}/invalid"] / max(n_all, 1)
        metrics[f"reward/{k}/errors"] = sb.all_scores.errors.get(k, 0)
        if f"reward/{k}/norm_mean" in adv.stats:
            metrics[f"reward/{k}/norm_mean"] = adv.stats[f"reward/{k}/norm_mean"]
            metrics[f"reward/{k}/norm_std"] = adv.stats[f"reward/{k}/norm_std"]
        for sub, v in res.sub_scores.items():
            ok = res.valid & ~torch.isnan(torch.from_numpy(v)).numpy()
            metrics[f"reward/{k}/{sub}"] = float(v[ok].mean()) if ok.any() else float("nan")
        for key, v in sb.all_scores.service.get(k, {}).items():
            metrics[f"service/{k}/{key}"] = v
    return metrics


def stage_metrics(run: Run, step: int, upd: UpdateStats) -> dict:
    """`<stage>/...` for a policy that names its stages (rl/stages.py STAGE_METRICS): each stage's loss, pg_loss
    and kl (unweighted), clip fractions and ratio over its own actions, gradient norm, learning rate and clip range."""
    u, out = upd.per_step, {}
    groups = run.optimizer.param_groups
    own = len(groups) == len(run.stages)  # a parameter group per stage (else they share one: no own norm or lr)
    for i, s in enumerate(run.stages):
        if not s.name:
            continue
        for k in ("loss", "pg_loss", "kl", "clip/low_frac", "clip/high_frac", "ratio/mean"):
            out[s.key(k)] = _mean(u[s.key(k)])
        out[s.key("ratio/min")] = min(u[s.key("ratio/min")], default=float("nan"))
        out[s.key("ratio/max")] = max(u[s.key("ratio/max")], default=float("nan"))
        out[s.key("clip/eps_low")] = s.eps_low(step)
        out[s.key("clip/eps_high")] = s.eps_high(step)
        if own:
            out[s.key("grad_norm")] = _mean(u[s.key("grad_norm")])
            out[s.key("lr")] = groups[i]["lr"]
    return out


def policy_metrics(run: Run, sb: StepBatch) -> dict:
    """The policy's own values for the step (`Policy.rollout_metrics`: means over this rank's rows, e.g. the flow
    policy's flow/eta, flow/sde_steps, flow/logprob_mean), averaged over the ranks weighted by their rows."""
    own = run.policy.rollout_metrics(sb.rollout) if sb.num_rows else {}
    every = run.dist.gather((sb.num_rows, own))
    rows = sum(n for n, _ in every)
    keys = sorted({k for _, m in every for k in m})
    return {k: sum(n * m[k] for n, m in every if k in m) / max(rows, 1) for k in keys}


def watch_rewards(run: Run, metrics: dict) -> dict:
    """The reward-hacking monitor's monitor/* keys (rl/monitor.py): this step's reward means join the sliding window
    of the last `monitor.window` steps, kept in the TrainState (so in every checkpoint: a resumed run goes on with
    the window the uninterrupted run had). Empty with monitor.window 0."""
    mon, weights = run.cfg.monitor, run.derived.weights
    if not mon.window:
        return {}
    means = {k: metrics.get(f"reward/{k}/mean", float("nan")) for k in weights}
    run.state.monitor = push(run.state.monitor, run.state.step, means, mon.window)
    return monitor_metrics(run.state.monitor, weights, mon.min_corr)


def write_step(run: Run, prefetch: Prefetch, metrics: dict, sb: StepBatch, advantages: torch.Tensor) -> None:
    """Log the metrics row (and some samples with audio), then write the checkpoint when due (rank 0 writes;
    the gathers are collectives every rank joins)."""
    cfg, state, dist = run.cfg, run.state, run.dist
    pending = prefetch.tensors(dist)
    save = state.step == cfg.train.steps or bool(cfg.train.save_every and state.step % cfg.train.save_every == 0)
    state.guards = {"rewards": run.health.state_dict(), "updates": run.guard.state_dict()}
    if save:
        check_finite(run.engine.all_finite(run.policy.trainable_parameters()), state.step, _last_checkpoint(run.out))
    # full tensors on rank 0 (under FSDP2 gathered from every rank's shards)
    policy_state = run.engine.policy_state() if save else None
    optimizer_state = run.engine.optimizer_state(run.optimizer) if save else None
    if dist.main:
        run.logger.log(state.step, metrics)
        if cfg.train.samples_every and state.step % cfg.train.samples_every == 0 and sb.num_rows:
            _write_samples(run, sb, advantages)
        if run.bar is not None:
            run.bar.update(1)
            run.bar.set_postfix(
                reward=f"{metrics['reward/fused/mean']:.3f}",
                loss=f"{metrics['loss']:.3f}",
                len=f"{metrics['len/mean']:.0f}",
            )
        if save:
            state.pending = prefetch.state(dist.world, run.generator.params(state.step))
            save_checkpoint(
                run.out,
                state.step,
                policy_state=policy_state,
                optimizer_state=optimizer_state,
                trainer_state=dataclasses.asdict(state),
                config_yaml=run.config_yaml,
                keep_last=cfg.train.keep_last,
                pending=pending,
            )
    dist.barrier()


def _write_samples(run: Run, sb: StepBatch, advantages: torch.Tensor) -> None:
    """The first row of the first train.samples_per_step groups, and the best- and worst-advantage rows of the
    first monitor.sample_groups groups (rl/samples.py pick_samples), to samples.jsonl, wavs and wandb."""
    batch, scores = sb.rollout, sb.scores
    adv = advantages.float().cpu().tolist()
    picks = pick_samples(batch.group_ids.tolist(), adv, run.cfg.train.samples_per_step, run.cfg.monitor.sample_groups)
    recs = []
    for i, how in picks:
        rec = run.records[int(batch.prompt_index[i])]
        recs.append(
            {
                "uttid": rec.uttid,
                "group_id": int(batch.group_ids[i]),
                "pick": how,
                "target_text": rec.target_text,
                "prompt_text": rec.prompt_text,
                "finished": bool(batch.finished[i]),
                "advantage": adv[i],
                "rewards": {k: float(r.values[i]) for k, r in scores.results.items()},
                "invalid": {k: r.reasons[i] for k, r in scores.results.items() if r.reasons and r.reasons[i]},
            }
        )
    audio = [sb.audio[i] for i, _ in picks]
    written = write_samples(run.out, run.state.step, recs, audio, sb.sample_rate)
    run.logger.log_samples(run.state.step, written, audio, sb.sample_rate)


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
