"""The experiment config: typed sections, one help line per field.

Relative paths written in a YAML file are relative to that file's directory; paths given with --set are relative
to the current directory. A file may start from another one: `base: other.yaml` (its values first, then this file's).

`load_config(path, overrides)` reads a YAML file over the defaults, applies `--set section.key=value`
overrides, validates, and computes the derived values in one place (`Derived`). `ttsrl config keys` lists
every key with its help line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from policies.base import POLICIES
from rl.configlib import ConfigError, opt, overlay, read_yaml, resolve_paths, set_override, to_dict
from rl.schedules import Schedule
from rollouts.types import SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = opt(False, "train LoRA adapters through peft instead of all weights")
    r: int = opt(8, "LoRA rank (upstream GLM-TTS adapter: 8)")
    alpha: int = opt(16, "LoRA alpha (upstream: 16)")
    dropout: float = opt(0.1, "LoRA dropout (upstream: 0.1); adds noise to the policy ratio, 0 keeps it exact")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], "Llama modules that get adapters"
    )
    modules_to_save: list[str] = opt(
        ["embed_tokens", "lm_head"], "modules trained in full next to the adapters (upstream: embed_tokens, lm_head)"
    )


@dataclass(frozen=True)
class FlowPolicyConfig:
    eta: float = opt(0.7, "policy.kind glmtts_flow: the SDE's noise level (Flow-GRPO 0.7; > 0 to train)")
    sde_steps: list[int] = opt(
        [1, 2], "the denoising steps (0-based, of n_timesteps) that take the SDE and are actions; the rest ODE"
    )
    noise: Literal["flow_grpo", "constant"] = opt(
        "flow_grpo", "g(t): flow_grpo eta sqrt(n / (1 - n)) (n = noise fraction) or constant eta (DanceGRPO)"
    )
    n_timesteps: int = opt(10, "Euler steps of the flow's sampler (upstream 10)")
    logprob: Literal["mean", "sum"] = opt(
        "mean", "an action's Gaussian log-prob: mean over its mel elements (Flow-GRPO) or their sum (exact)"
    )
    lora_target_modules: list[str] = opt(
        ["to_q", "to_k", "to_v", "to_out.0", "ff.ff.0.0", "ff.ff.2"], "DiT linear layers that get LoRA adapters"
    )
    codes: Literal["lm", "manifest"] = opt(
        "lm",
        "glmtts_flow: a group's codes are sampled once by the frozen LM (lm) or are the manifest's fixed "
        "syn_speech_token (manifest: every line needs it)",
    )


@dataclass(frozen=True)
class VoxCPMPolicyConfig:
    eta: float = opt(0.7, "policy.kind voxcpm: the LocDiT SDE's noise level (Flow-GRPO 0.7; > 0 to train)")
    sde_steps: list[int] = opt(
        [1, 2],
        "LocDiT steps (0-based, of n_timesteps) that take the SDE and are actions; step 0 (zero velocity "
        "under CFG-Zero*) cannot",
    )
    noise: Literal["flow_grpo", "constant"] = opt("flow_grpo", "g(t): flow_grpo eta sqrt(t / (1 - t)) or constant eta")
    n_timesteps: int = opt(10, "LocDiT Euler steps per patch (released inference_timesteps: 10)")
    cfg_value: float = opt(2.0, "classifier-free guidance of the LocDiT, CFG-Zero* (released: 2.0)")
    stop_temperature: float = opt(1.0, "the stop head's sampling temperature (training; evaluation takes the argmax)")
    min_len: int = opt(2, "stop may be taken from patch min_len + 1 on (released min_len: 2)")
    max_len_ratio: float = opt(
        6.0, "a row is truncated at int(target-text tokens x this + 10) patches (released badcase ratio: 6)"
    )
    logprob: Literal["mean", "sum"] = opt(
        "mean", "an SDE action's Gaussian log-prob: mean over its patch's elements (Flow-GRPO) or their sum (exact)"
    )
    prompt_mode: Literal["continuation", "reference", "both"] = opt(
        "continuation",
        "how the voice prompt conditions: continuation (prompt text + its audio latents, as generate(prompt_wav_path, "
        "prompt_text)), reference (VoxCPM2's isolated reference audio) or both",
    )
    lora_lm: bool = opt(True, "with policy.lora.enabled: adapters on both LMs' q/k/v/o_proj (released enable_lm)")
    lora_dit: bool = opt(True, "with policy.lora.enabled: adapters on the LocDiT's q/k/v/o_proj (enable_dit)")
    lora_proj: bool = opt(
        False, "with policy.lora.enabled: adapters on enc_to_lm, lm_to_dit, res_to_dit, fusion_concat (enable_proj)"
    )


@dataclass(frozen=True)
class IndexTTS2PolicyConfig:
    repetition_penalty: float = opt(
        10.0,
        "policy.kind indextts2: the released repetition penalty (10), part of the sampling distribution and of the "
        "teacher-forced log-probs (sampling.temperature / top_k / top_p are the rest; released 0.8 / 30 / 0.8)",
    )
    max_codes: int = opt(1500, "a row is truncated at this many codes (released max_mel_tokens: 1500)")
    normalize_text: bool = opt(
        True, "the released text normalisation (TextNormalizer) before the BPE; false: the texts are tokenised as is"
    )
    emotion_label: bool = opt(
        True,
        "map the manifest's emotion label to the released 8-dim emotion vector (feat1.pt / feat2.pt); false: the "
        "speaker prompt's own emotion",
    )
    emotion_weight: float = opt(0.8, "the label's weight in the 8-dim emotion vector (released total cap: 0.8)")
    emo_alpha: float = opt(
        1.0,
        "emotion strength as released: with an emotion_speech clip, speaker + alpha (clip - speaker); with a label, "
        "the vector scaled by it (clamped to [0, 1])",
    )
    prompt_seconds: float = opt(15.0, "voice and emotion prompts are cut to this many seconds (released: 15)")
    diffusion_steps: int = opt(25, "s2mel CFM Euler steps when decoding (released: 25)")
    cfg_rate: float = opt(0.7, "s2mel classifier-free guidance when decoding (released inference_cfg_rate: 0.7)")


@dataclass(frozen=True)
class PolicyConfig:
    kind: str = opt("glmtts", "the registered policy to train (policies/base.py POLICIES)")
    ckpt_dir: str = opt(
        "", "GLM-TTS checkpoint directory in the upstream layout (llm/, vq32k-phoneme-tokenizer/, ...)", path=True
    )
    build_tiny: bool = opt(False, "write a tiny random checkpoint to ckpt_dir first if it does not exist")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "dtype of the speech LM's weights; trained weights stay float32 (bf16/fp16: a frozen LoRA base only)"
    )
    trust_remote_code: bool = opt(
        False, "load the tokenizer through transformers with its own Python code instead of the built-in reader"
    )
    lora: LoraConfig = opt(LoraConfig(), "LoRA adapter settings")
    flow: FlowPolicyConfig = opt(
        FlowPolicyConfig(), "the flow stage's SDE sampling (kinds glmtts_flow and glmtts_joint)"
    )
    voxcpm: VoxCPMPolicyConfig = opt(VoxCPMPolicyConfig(), "VoxCPM's sampling, stop head and LoRA (kind voxcpm)")
    indextts2: IndexTTS2PolicyConfig = opt(
        IndexTTS2PolicyConfig(), "IndexTTS2's repetition penalty, text, emotion and decoding (kind indextts2)"
    )


@dataclass(frozen=True)
class DataConfig:
    manifest: str = opt(
        "", "upstream GRPO jsonl manifest; relative paths inside it are relative to the file", path=True
    )
    root: str = opt(
        "", "base directory for relative paths in the manifest instead of the manifest's directory", path=True
    )
    prompts_per_step: int = opt(1, "prompts drawn per step (B); each is sampled group_size times")
    shuffle: bool = opt(True, "reshuffle the manifest every epoch (seeded by train.seed)")
    max_text_tokens: int = opt(
        512,
        "a prompt or target text longer than this many LM tokens is an error naming "
        "its manifest line (the prompt must also fit the LM's context)",
    )
    text_normalize: Literal["upstream", "voxcpm", "none"] = opt(
        "upstream",
        "upstream: normalise prompt and target texts as GLM-TTS does before tokenising (WeTextProcessing "
        "1.0.3); voxcpm: the target text as VoxCPM's generate(normalize=True) (wetext); none: already normalised",
    )
    custom_replace: str = opt(
        "",
        "zh substitutions applied before normalising (GLM-TTS configs/custom_replace.jsonl, "
        "as upstream's CLI applies it); empty = none",
        path=True,
    )
    phoneme: bool = opt(
        False,
        "hybrid phoneme input (upstream --use_phoneme): target characters outside "
        "G2P_able_1word.json become phoneme tags (pypinyin + jieba)",
    )
    phoneme_dicts: str = opt(
        "",
        "directory with G2P_able_1word.json and G2P_replace_dict.jsonl (GLM-TTS configs/); needed by data.phoneme",
        path=True,
    )


@dataclass(frozen=True)
class SamplingConfig:
    group_size: int = opt(8, "samples per prompt (G); upstream GLM-TTS: 8")
    temperature: Schedule = opt(Schedule.from_scalar(1.0), "sampling temperature, a schedule over steps")
    top_k: int = opt(25, "keep the k most likely speech tokens (0 = off); upstream RAS: 25")
    top_p: float = opt(0.8, "nucleus mass (1.0 = off); upstream RAS: 0.8")
    ras: bool = opt(True, "repetition-aware sampling: redraw from the full distribution when the draw repeats")
    ras_window: int = opt(10, "RAS: how many previous generated tokens are checked for repeats")
    ras_tau: float = opt(0.1, "RAS: redraw when the token occurs >= ras_window * ras_tau times in the window")
    min_token_text_ratio: float = opt(2.0, "stop is masked before this many speech tokens per target-text token")
    max_token_text_ratio: float = opt(20.0, "generation is truncated at this many speech tokens per text token")
    max_new_tokens: int = opt(1000, "hard cap on generated tokens per sample, whatever the text length")
    backend: Literal["builtin", "vllm"] = opt(
        "builtin", "who samples the rollouts: the built-in KV-cache sampler, or vLLM (GPU, `pip install vllm`, no RAS)"
    )
    compile_decode: bool = opt(
        False, "builtin: static KV cache + torch.compile of the decode step (CUDA graphs on GPU), once per shape bucket"
    )
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm: fraction of the GPU's memory vLLM may take (weights + cache)")


@dataclass(frozen=True)
class VocoderConfig:
    enabled: bool = opt(True, "vocode every rollout (flow/ and hift/ of policy.ckpt_dir) so rewards can score audio")
    n_timesteps: int = opt(10, "Euler steps of the flow-matching ODE (upstream: 10)")
    batch_size: int = opt(0, "rollouts per flow/HiFT batch at most (0 = as many as padding allows)")
    dtype: Literal["float32", "bfloat16"] = opt(
        "float32",
        "flow compute dtype: float32 (upstream) or bfloat16 autocast on GPU (faster, not exact); HiFT float32",
    )


@dataclass(frozen=True)
class RewardConfig:
    scorer: str = opt("", "scorer name (see `ttsrl rewards`) or dotted path module:Class")
    weight: float = opt(1.0, "weight in the fused advantage; 0 = computed and logged but not trained on")
    kwargs: dict[str, Any] = opt({}, "keyword arguments of the scorer's constructor, checked at start-up")
    max_invalid_frac: float = opt(1.0, "stop the run when more of a step's samples than this are invalid (1 = never)")


@dataclass(frozen=True)
class AdvantageConfig:
    std_ddof: int = opt(0, "std estimator: 0 population (upstream GLM-TTS), 1 unbiased (TRL)")
    eps: float = opt(0.0, "added to every std before dividing (upstream 0, TRL 1e-4)")
    min_std: float = opt(1e-2, "a reward (or fused score) whose group std is below this contributes 0")
    second_norm: Literal["group", "batch"] = opt("group", "normalise the fused score per group or over the batch")
    token_coef: float = opt(
        0.5, "token-level rewards (e.g. cer token_level): advantage taken off each frame inside a wrong span, x weight"
    )


@dataclass(frozen=True)
class DynamicSamplingConfig:
    mode: Literal["off", "reroll", "refill"] = opt("reroll", "off | reroll (upstream) | refill (DAPO)")
    keys: list[str] | None = opt(None, "rewards measured for informativeness; null = every weighted key but sim")
    min_std: float = opt(1e-2, "a group whose fused std (over `keys`) is below this is uninformative")
    max_tries: int = opt(3, "reroll: generation attempts per step in all (upstream: 3)")
    max_gen_batches: int = opt(4, "refill: generation rounds per step at most")
    on_exhausted: Literal["keep", "error"] = opt(
        "keep", "refill: after max_gen_batches, train on what there is or stop"
    )


@dataclass(frozen=True)
class LossConfig:
    ratio_anchor: Literal["old", "ref"] = opt(
        "old", "ratio against the behaviour policy (old) or the frozen initial model (ref, upstream GLM-TTS)"
    )
    ratio_level: Literal["token", "sequence"] = opt("token", "token ratios (PPO/GRPO) or one per sequence (GSPO)")
    agg: Literal["token_mean", "seq_mean", "seq_sum_const"] = opt(
        "token_mean", "token_mean (DAPO, upstream) | seq_mean (GRPO) | seq_sum_const (Dr.GRPO)"
    )
    eps_low: Schedule = opt(Schedule.from_scalar(0.2), "lower clip range, a schedule over steps")
    eps_high: Schedule = opt(Schedule.from_scalar(0.3), "upper clip range, a schedule over steps (clip-higher)")
    kl_coef: float = opt(0.0, "weight of the k3 KL to the frozen initial model (0 = no reference forward)")


@dataclass(frozen=True)
class StageConfig:
    loss_weight: float = opt(1.0, "this stage's loss is multiplied by this in the step's loss (a sum over stages)")
    lr: float | None = opt(None, "AdamW learning rate of this stage's parameters (null = optim.lr)")
    eps_low: Schedule | None = opt(None, "lower clip range of this stage's ratios, a schedule (null = loss.eps_low)")
    eps_high: Schedule | None = opt(None, "upper clip range of this stage's ratios, a schedule (null = loss.eps_high)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1e-6, "AdamW learning rate (upstream GLM-TTS: 1e-6)")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas (upstream: 0.9, 0.95)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global grad norm to this (0 = off)")
    ppo_epochs: int = opt(1, "passes over each rollout batch")
    minibatches: int = opt(1, "optimizer steps per pass; > 1 (or ppo_epochs > 1) lets an old-policy clip bind")
    micro_batch_size: int = opt(0, "rows per forward pass inside a minibatch (0 = the whole minibatch)")
    zero_stage: int = opt(
        0,
        "with several processes (rl/engine.py): 0 = DDP, every rank holds the whole model and optimizer; "
        "2 = FSDP2 sharding the AdamW state and gradients (ZeRO-2); 3 = FSDP2 sharding the weights too (ZeRO-3)",
    )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(1000, "training steps (one rollout batch each)")
    seed: int = opt(0, "seed of sampling, shuffling and vocoder noise")
    output_dir: str = opt("runs/default", "metrics, samples and checkpoints go here", path=True)
    save_every: int = opt(100, "write a checkpoint every this many steps (0 = only at the end)")
    keep_last: int = opt(3, "checkpoints kept on disk")
    mixed_precision: Literal["no", "bf16"] = opt("no", "bf16 autocast for forward passes (GPU); fp32 master weights")
    samples_every: int = opt(
        10, "every this many steps, save a few samples (wav, samples.jsonl, wandb audio table); 0 = off"
    )
    samples_per_step: int = opt(4, "samples saved per logged step (one per group)")
    pipeline: bool = opt(False, "sample the next step's first round while this one is scored (one step off-policy)")
    max_dead_reward_steps: int = opt(
        3, "stop the run when a weighted reward is invalid for every sample this many steps in a row (0 = never)"
    )
    max_skipped_updates: int = opt(
        3, "stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient norm"
    )


@dataclass(frozen=True)
class MonitorConfig:
    window: int = opt(
        20, "reward-hacking monitor (rl/monitor.py): steps of reward means in its sliding window (0 = off, else >= 3)"
    )
    min_corr: float = opt(
        -0.5, "monitor/hacking flags a rising weighted reward and a falling one correlated below this, in [-1, 1]"
    )
    sample_groups: int = opt(
        2, "samples: the highest- and lowest-advantage rows of this many groups join each saved step's (0 = off)"
    )


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = opt(False, "log to Weights & Biases as well as metrics.jsonl")
    project: str = opt("ttsrl", "wandb project")
    run_name: str = opt("", "wandb run name (default: the output directory's name)")
    mode: Literal["auto", "online", "offline"] = opt("auto", "auto = online with an API key, offline without")


@dataclass(frozen=True)
class Config:
    policy: PolicyConfig = opt(PolicyConfig(), "the speech LM")
    data: DataConfig = opt(DataConfig(), "prompt data")
    sampling: SamplingConfig = opt(SamplingConfig(), "group rollouts")
    vocoder: VocoderConfig = opt(VocoderConfig(), "speech codes -> 24 kHz audio (flow + HiFT)")
    rewards: dict[str, RewardConfig] = opt({}, "reward name -> scorer, weight and kwargs")
    advantage: AdvantageConfig = opt(AdvantageConfig(), "normalize -> fuse -> normalize")
    dynamic_sampling: DynamicSamplingConfig = opt(DynamicSamplingConfig(), "resampling of uninformative groups")
    loss: LossConfig = opt(LossConfig(), "clipped policy loss")
    stages: dict[str, StageConfig] = opt(
        {},
        "per-stage loss weight, learning rate and clip range of the policy's stages (glmtts: lm; glmtts_flow: "
        "flow; glmtts_joint: lm and flow); a stage not listed takes the loss.* and optim.* values",
    )
    optim: OptimConfig = opt(OptimConfig(), "optimizer and update schedule")
    train: TrainConfig = opt(TrainConfig(), "run length, seed, outputs")
    monitor: MonitorConfig = opt(MonitorConfig(), "reward-hacking monitor: reward correlations and trends")
    wandb: WandbConfig = opt(WandbConfig(), "Weights & Biases")


@dataclass(frozen=True)
class Derived:
    """Values computed from the config, in one place."""

    rows_per_step: int  # prompts_per_step * group_size
    weights: dict[str, float]  # reward name -> weight
    dynamic_sampling_keys: list[str]  # rewards measured for informativeness
    needs_reference: bool  # ratio_anchor == "ref" or kl_coef > 0
    updates_per_step: int  # ppo_epochs * minibatches
    config_file: str  # where the config came from ("" = defaults)


def _validate(cfg: Config) -> None:
    s, o, d, a, ds, lo = cfg.sampling, cfg.optim, cfg.data, cfg.advantage, cfg.dynamic_sampling, cfg.loss
    try:  # top-k / top-p / RAS: the sampler's own checks (the temperature schedule is checked below)
        SamplingParams(top_k=s.top_k, top_p=s.top_p, ras=s.ras, ras_window=s.ras_window, ras_tau=s.ras_tau)
    except ValueError as e:
        raise ConfigError(f"sampling: {e}") from None
    checks = [
        (s.group_size >= 2, "sampling.group_size must be >= 2 (a group of one has no baseline)"),
        (
            0 <= s.min_token_text_ratio <= s.max_token_text_ratio,
            "sampling.min_token_text_ratio must be >= 0 and <= max_token_text_ratio",
        ),
        (s.max_new_tokens >= 1, "sampling.max_new_tokens must be >= 1"),
        (
            s.backend != "vllm" or not s.ras,
            "sampling.backend vllm has no repetition-aware sampling: set sampling.ras "
            "false (or use the builtin sampler)",
        ),
        (s.backend != "vllm" or not s.compile_decode, "sampling.compile_decode is for the builtin sampler, not vllm"),
        (
            s.backend != "vllm" or s.top_k == 0 or s.top_p >= 1.0,
            "sampling.backend vllm applies top_p inside the renormalised top_k, the builtin sampler (as upstream) "
            "over the whole distribution capped at top_k: with both on the rollouts would be off-policy; set "
            "sampling.top_k=0 or sampling.top_p=1.0",
        ),
        (0.0 < s.vllm_gpu_memory_utilization < 1.0, "sampling.vllm_gpu_memory_utilization must be in (0, 1)"),
        (d.prompts_per_step >= 1, "data.prompts_per_step must be >= 1"),
        (bool(d.manifest), "data.manifest is empty: give the prompt manifest (upstream GRPO jsonl)"),
        (
            cfg.policy.kind in POLICIES,
            f"policy.kind {cfg.policy.kind!r} is not a registered policy "
            f"({', '.join(sorted(POLICIES))}; policies/base.py)",
        ),
        (bool(cfg.policy.ckpt_dir), "policy.ckpt_dir is empty: give a GLM-TTS checkpoint directory"),
        (a.std_ddof in (0, 1), "advantage.std_ddof must be 0 or 1"),
        (a.eps >= 0 and a.min_std >= 0, "advantage.eps and advantage.min_std must be >= 0"),
        (a.token_coef >= 0, "advantage.token_coef must be >= 0"),
        (ds.max_tries >= 1 and ds.max_gen_batches >= 1, "dynamic_sampling.max_tries/max_gen_batches must be >= 1"),
        (ds.min_std >= 0, "dynamic_sampling.min_std must be >= 0"),
        (lo.kl_coef >= 0, "loss.kl_coef must be >= 0"),
        (o.lr > 0, "optim.lr must be > 0"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas must be two numbers in [0, 1)"),
        (o.grad_clip >= 0 and o.weight_decay >= 0, "optim.grad_clip and optim.weight_decay must be >= 0"),
        (o.ppo_epochs >= 1 and o.minibatches >= 1, "optim.ppo_epochs and optim.minibatches must be >= 1"),
        (o.micro_batch_size >= 0, "optim.micro_batch_size must be >= 0"),
        (o.zero_stage in (0, 2, 3), "optim.zero_stage must be 0 (DDP), 2 or 3 (FSDP2 sharding)"),
        (
            cfg.policy.dtype == "float32" or (cfg.policy.lora.enabled and not cfg.policy.lora.modules_to_save),
            f"policy.dtype {cfg.policy.dtype} would train {cfg.policy.dtype} weights, where AdamW updates smaller than "
            f"the weights' resolution (lr 1e-6 is) are lost: keep policy.dtype float32 and set "
            f"train.mixed_precision bf16 for bf16 compute, or train LoRA adapters with lora.modules_to_save: []",
        ),
        (cfg.train.steps >= 1, "train.steps must be >= 1"),
        (cfg.vocoder.n_timesteps >= 1 and cfg.vocoder.batch_size >= 0, "vocoder.n_timesteps >= 1, batch_size >= 0"),
        (cfg.train.save_every >= 0 and cfg.train.keep_last >= 1, "train.save_every >= 0 and train.keep_last >= 1"),
        (
            cfg.train.samples_every >= 0 and cfg.train.samples_per_step >= 1,
            "train.samples_every >= 0 and train.samples_per_step >= 1",
        ),
        (cfg.monitor.window == 0 or cfg.monitor.window >= 3, "monitor.window must be 0 (off) or >= 3"),
        (-1.0 <= cfg.monitor.min_corr <= 1.0, "monitor.min_corr must be in [-1, 1]"),
        (cfg.monitor.sample_groups >= 0, "monitor.sample_groups must be >= 0"),
        (not cfg.policy.lora.enabled or cfg.policy.lora.r >= 1, "policy.lora.r must be >= 1"),
        (cfg.policy.flow.eta > 0, "policy.flow.eta must be > 0 (eta 0 is the plain ODE: no action to train)"),
        (cfg.policy.flow.n_timesteps >= 1, "policy.flow.n_timesteps must be >= 1"),
        (
            bool(cfg.policy.flow.sde_steps)
            and len(set(cfg.policy.flow.sde_steps)) == len(cfg.policy.flow.sde_steps)
            and all(0 <= k < cfg.policy.flow.n_timesteps for k in cfg.policy.flow.sde_steps),
            "policy.flow.sde_steps must be distinct steps in [0, policy.flow.n_timesteps)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    rows = d.prompts_per_step * s.group_size
    if o.minibatches > rows:
        raise ConfigError(f"optim.minibatches={o.minibatches} exceeds the {rows} rows of a step")
    _check_schedules(cfg)
    if cfg.train.max_dead_reward_steps < 0 or cfg.train.max_skipped_updates < 1:
        raise ConfigError("train.max_dead_reward_steps must be >= 0 and train.max_skipped_updates >= 1")
    if d.max_text_tokens < 1:
        raise ConfigError("data.max_text_tokens must be >= 1")
    if d.phoneme and not d.phoneme_dicts:
        raise ConfigError(
            "data.phoneme needs data.phoneme_dicts: the directory holding G2P_able_1word.json and "
            "G2P_replace_dict.jsonl (the GLM-TTS repository's configs/)"
        )
    _check_rewards(cfg)
    _check_stages(cfg)
    _check_kind_settings(cfg)
    _check_voxcpm(cfg.policy.voxcpm)
    _check_indextts2(cfg.policy.indextts2)


def _check_stages(cfg: Config) -> None:
    """stages.<name>: weights >= 0 (not all 0), learning rates > 0; the names are checked against the policy's
    own stages when it is loaded (rl/stages.py), before the run writes anything."""
    for name, st in cfg.stages.items():
        if not (math.isfinite(st.loss_weight) and st.loss_weight >= 0):
            raise ConfigError(f"stages.{name}.loss_weight must be a number >= 0, got {st.loss_weight}")
        if st.lr is not None and not (math.isfinite(st.lr) and st.lr > 0):
            raise ConfigError(f"stages.{name}.lr must be > 0 (or null for optim.lr), got {st.lr}")


def _check_kind_settings(cfg: Config) -> None:
    """Settings that belong to some policy kinds only: each kind's text front end, fixed flow codes."""
    kind, tn = cfg.policy.kind, cfg.data.text_normalize
    checks = [
        (
            (tn == "voxcpm") <= (kind == "voxcpm") and (tn != "upstream" or kind != "voxcpm"),
            f"data.text_normalize {tn} does not fit policy.kind {kind}: VoxCPM takes voxcpm (its own normaliser) "
            f"or none, GLM-TTS upstream or none",
        ),
        (
            kind not in ("voxcpm", "indextts2") or not (cfg.data.phoneme or cfg.data.custom_replace),
            f"data.phoneme and data.custom_replace are GLM-TTS's text front end; policy.kind {kind} has neither",
        ),
        (
            kind != "indextts2" or tn == "none",
            "policy.kind indextts2 normalises its texts with its own released front end (policy.indextts2."
            "normalize_text): set data.text_normalize: none",
        ),
        (
            kind != "indextts2" or not cfg.sampling.ras,
            "policy.kind indextts2 samples as released (repetition penalty, no RAS): set sampling.ras: false",
        ),
        (
            cfg.policy.flow.codes == "lm" or kind == "glmtts_flow",
            f"policy.flow.codes manifest is for policy.kind glmtts_flow (the flow on fixed codes); {kind} samples "
            f"its codes",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _check_indextts2(v: IndexTTS2PolicyConfig) -> None:
    """policy.indextts2: a positive penalty, length cap, prompt length and decoding steps; weights in [0, 1]."""
    checks = [
        (v.repetition_penalty > 0, "policy.indextts2.repetition_penalty must be > 0 (1 = off)"),
        (v.max_codes >= 1 and v.prompt_seconds > 0, "policy.indextts2.max_codes >= 1 and prompt_seconds > 0"),
        (v.diffusion_steps >= 1 and v.cfg_rate >= 0, "policy.indextts2.diffusion_steps >= 1 and cfg_rate >= 0"),
        (
            0 <= v.emotion_weight <= 1 and 0 <= v.emo_alpha <= 1,
            "policy.indextts2.emotion_weight and emo_alpha must be in [0, 1]",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _check_voxcpm(v: VoxCPMPolicyConfig) -> None:
    """policy.voxcpm: the SDE steps after CFG-Zero*'s zero-velocity step, positive noise and temperatures."""
    from policies.voxcpm_model import zero_init_steps

    first = zero_init_steps(v.n_timesteps) if v.n_timesteps >= 1 else 1
    checks = [
        (v.eta > 0, "policy.voxcpm.eta must be > 0 (eta 0 is the plain ODE: no action to train)"),
        (v.n_timesteps >= 2, "policy.voxcpm.n_timesteps must be >= 2"),
        (
            bool(v.sde_steps)
            and len(set(v.sde_steps)) == len(v.sde_steps)
            and all(first <= k < v.n_timesteps for k in v.sde_steps),
            f"policy.voxcpm.sde_steps must be distinct steps in [{first}, policy.voxcpm.n_timesteps): the first "
            f"{first} have zero velocity under CFG-Zero*",
        ),
        (v.cfg_value >= 0 and v.stop_temperature > 0, "policy.voxcpm.cfg_value >= 0, stop_temperature > 0"),
        (v.min_len >= 0 and v.max_len_ratio > 0, "policy.voxcpm.min_len >= 0 and max_len_ratio > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _check_rewards(cfg: Config) -> None:
    """Every reward entry: a scorer, its kwargs against its constructor and their ranges, and a weight to train on."""
    if not cfg.rewards:
        raise ConfigError("rewards: at least one reward is needed, e.g. rewards.duration.scorer=duration")
    from rewards.base import ScorerConfigError, check_scorer_kwargs, resolve_scorer_class

    for name, r in cfg.rewards.items():
        if not r.scorer:
            raise ConfigError(f"rewards.{name}.scorer is empty: give a scorer name or a dotted path")
        if not 0.0 <= r.max_invalid_frac <= 1.0:
            raise ConfigError(f"rewards.{name}.max_invalid_frac must be in [0, 1]")
        try:  # the class, its kwargs and their ranges are checked now, before any model is loaded
            check_scorer_kwargs(resolve_scorer_class(r.scorer, f"rewards.{name}"), dict(r.kwargs), f"rewards.{name}")
        except ScorerConfigError as e:
            raise ConfigError(str(e)) from None
    if all(r.weight == 0 for r in cfg.rewards.values()):
        raise ConfigError("rewards: every weight is 0, so there is nothing to train on")


def _check_schedules(cfg: Config) -> None:
    """Every schedule, over every step the run samples or trains at (0..train.steps; a pipelined run samples one
    step ahead), stays in its key's valid range."""
    last = cfg.train.steps
    low_want, high_want = "in [0, 1) (the ratio's lower clip bound 1 - eps_low > 0)", ">= 0"
    ranges = [
        ("sampling.temperature", cfg.sampling.temperature, 0.0, False, math.inf, "> 0"),
        ("loss.eps_low", cfg.loss.eps_low, 0.0, True, 1.0, low_want),
        ("loss.eps_high", cfg.loss.eps_high, 0.0, True, math.inf, high_want),
    ]
    for name, st in cfg.stages.items():
        if st.eps_low is not None:
            ranges.append((f"stages.{name}.eps_low", st.eps_low, 0.0, True, 1.0, low_want))
        if st.eps_high is not None:
            ranges.append((f"stages.{name}.eps_high", st.eps_high, 0.0, True, math.inf, high_want))
    for key, sched, low, low_ok, high, want in ranges:
        try:
            sched.validate(key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        lo_v, hi_v = sched.bounds(last)
        below = lo_v < low or (lo_v == low and not low_ok)
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)) or below or hi_v >= high:
            where = "" if sched.kind == "constant" else f" over steps 0..{last} (it ranges over [{lo_v:g}, {hi_v:g}])"
            raise ConfigError(f"{key} must be {want}{where}, got {sched.describe()}")


def derive(cfg: Config, config_file: str = "") -> Derived:
    from rl.dynamic_sampling import check_keys

    weights = {k: r.weight for k, r in cfg.rewards.items()}
    try:
        keys = check_keys(weights, cfg.dynamic_sampling.keys)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Derived(
        rows_per_step=cfg.data.prompts_per_step * cfg.sampling.group_size,
        weights=weights,
        dynamic_sampling_keys=keys,
        needs_reference=cfg.loss.ratio_anchor == "ref" or cfg.loss.kl_coef > 0,
        updates_per_step=cfg.optim.ppo_epochs * cfg.optim.minibatches,
        config_file=config_file,
    )


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Derived]:
    """Defaults <- YAML file (and its `base:` chain) <- overrides; validated. Returns (config, derived values)."""
    layers = _yaml_layers(Path(path), ()) if path is not None else []
    return _build(layers, str(path) if path is not None else "", overrides)


def _yaml_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[dict, Path]]:
    """A config file may start from another: `base: other.yaml` (relative to the file). Base first."""
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(data, path)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: `base` must be the path of another config file")
    base_path = Path(os.path.normpath(path.parent / base))
    if base_path in chain + (path,):
        raise ConfigError(
            f"{path}: `base: {base}` makes a cycle ({' -> '.join(str(p) for p in chain + (path, base_path))})"
        )
    return _yaml_layers(base_path, chain + (path,)) + [(data, path)]


def config_from_data(data: dict, where: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, Derived]:
    """Like load_config, from an already-read YAML mapping; `where` names it in error messages."""
    return _build([(data, Path(where))] if data else [], where, overrides)


def _build(layers: list[tuple[dict, Path]], where: str, overrides) -> tuple[Config, Derived]:
    cfg = Config()
    for data, path in layers:
        try:
            cfg = overlay(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        cfg = resolve_paths(cfg, data, path.parent)
    for item in overrides:
        try:
            cfg = set_override(cfg, item)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {e}") from None
    try:
        _validate(cfg)
        derived = derive(cfg, where)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    return cfg, derived


def dump(cfg: Config, derived: Derived | None = None) -> str:
    """The fully resolved config as YAML (derived values appended as a comment block)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=None)
    if derived is not None:
        lines = yaml.safe_dump(dataclasses.asdict(derived), sort_keys=False, allow_unicode=True).splitlines()
        text += "# derived (computed, not settable):\n" + "".join(f"#   {line}\n" for line in lines)
    return text
