"""The `ttsrl` command line."""

from __future__ import annotations

import argparse
import sys

from rl.configlib import ConfigError, describe


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-5 (repeatable)",
    )


def cmd_config(args: argparse.Namespace) -> int:
    from rl.config import Config, dump, load_config

    if args.action == "keys":
        for key, tp, help_ in describe(Config):
            print(f"{key:44s} {tp:28s} {help_}")
        return 0
    cfg, derived = load_config(args.file, args.overrides)
    if args.action == "show":
        print(dump(cfg, derived), end="")
    else:
        print(
            f"{args.file}: ok ({len(cfg.rewards)} rewards: {', '.join(cfg.rewards)}; "
            f"{derived.rows_per_step} samples per step)"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from rl.checkpoint import find_checkpoint, load_checkpoint
    from rl.config import DEFAULT_CONFIG, config_from_data, load_config
    from rl.configlib import to_dict
    from rl.trainer import train

    overrides = list(args.overrides)
    if args.resume:
        ckpt = find_checkpoint(args.resume)
        run_dir = ckpt.parent.parent
        saved = yaml.safe_load(load_checkpoint(ckpt)["config_yaml"])
        out = args.output_dir or str(run_dir)
        where = str(ckpt / "config.yaml")
        prev, _ = config_from_data(saved, where, [f"train.output_dir={out}"])
        if args.config:
            cfg, derived = load_config(args.config, overrides + [f"train.output_dir={out}"])
        else:
            cfg, derived = config_from_data(saved, where, overrides + [f"train.output_dir={out}"])
        changed = [k for k in _diff(to_dict(prev), to_dict(cfg)) if not k.startswith(RESUME_FREE)]
        if changed:
            what = args.config or "--set"
            raise ConfigError(
                f"{what} changes {', '.join(changed)} of the run saved in {ckpt}; a resumed run must keep its "
                f"settings (only train.steps, train.save_every, train.keep_last, optim.zero_stage and wandb.* "
                f"may change)"
            )
    else:
        path = args.config or DEFAULT_CONFIG
        if args.output_dir:
            overrides.append(f"train.output_dir={args.output_dir}")
        cfg, derived = load_config(path, overrides)
    check_remote_code(cfg.policy.trust_remote_code, args.trust_remote_code, args.resume or args.config or "the config")
    train(cfg, derived, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    return 0


def check_remote_code(configured: bool, allowed: bool, where: str) -> None:
    """A config (or a saved run) never turns remote code on by itself: the command line has to allow it."""
    if configured and not allowed:
        raise ConfigError(
            f"{where}: policy.trust_remote_code is true, which runs the Python code shipped in the "
            f"checkpoint's tokenizer directory; pass --trust-remote-code to allow it"
        )


# settings a resumed run may change: none changes what is trained (optim.zero_stage picks the engine only)
RESUME_FREE = ("train.steps", "train.save_every", "train.keep_last", "train.output_dir", "wandb.", "optim.zero_stage")


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import json

    from rewards.base import SCORERS, build_scorer

    if args.config:
        from rl.config import load_config

        cfg, _ = load_config(args.config, args.overrides)
        if args.scorer not in cfg.rewards:
            raise ConfigError(f"{args.config} has no reward named '{args.scorer}'; it has: {', '.join(cfg.rewards)}")
        entry = cfg.rewards[args.scorer]
        spec, kwargs = entry.scorer, dict(entry.kwargs)
        if spec == "remote":
            raise ConfigError(f"rewards.{args.scorer} in {args.config} is itself remote; serve a local scorer")
    else:
        spec, kwargs = args.scorer, json.loads(args.kwargs) if args.kwargs else {}
    scorer = build_scorer(spec, kwargs, f"rewards.{args.scorer}")
    token = read_token(args)
    from rewards.server import serve

    print(
        f"ttsrl: serving reward '{args.scorer}' ({SCORERS.get(spec, spec)}) on http://{args.host}:{args.port}"
        + (" with a bearer token" if token else ""),
        flush=True,
    )
    serve(
        scorer,
        args.scorer,
        host=args.host,
        port=args.port,
        token=token,
        describe={"class": SCORERS.get(spec, spec), "kwargs": kwargs},
        max_request_mb=args.max_request_mb,
        max_batch=args.max_batch,
    )
    return 0


def read_token(args: argparse.Namespace) -> str | None:
    """The service's bearer token: --token-file, else $TTSRL_REWARD_TOKEN, else --token (visible in `ps`)."""
    import os

    if args.token_file:
        try:
            token = open(args.token_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
        return token
    if args.token:
        print(
            "ttsrl: warning: --token is visible to every user of this machine in `ps`; prefer "
            "TTSRL_REWARD_TOKEN or --token-file",
            file=sys.stderr,
        )
        return args.token
    return os.environ.get("TTSRL_REWARD_TOKEN") or None


def cmd_eval(args: argparse.Namespace) -> int:
    from rl.evaluate import EvalModels, compare_table, evaluate, load_report, read_meta, tiny_models

    def models() -> EvalModels:
        if args.tiny_models:
            return tiny_models(args.lang, read_meta(args.meta))
        return EvalModels(  # --frontend: GLM-TTS's prompt front end (evaluate() says when it is missing)
            frontend_dir=args.frontend, asr_dir=args.asr, sim_checkpoint=args.sim, emotion_dir=args.emotion
        )

    from pathlib import Path

    def default_out(ckpt: str, suffix: str = "") -> str:
        return str(Path("runs") / "eval" / f"{Path(ckpt).resolve().name}{suffix}-{Path(args.meta or '').stem}")

    def run(ckpt: str, out: str | None) -> dict:
        if not args.meta or not args.lang:
            raise ConfigError("evaluating a checkpoint needs --meta META.lst and --lang zh|en")
        out = out or default_out(ckpt)
        report = evaluate(
            ckpt,
            args.meta,
            args.lang,
            out,
            models(),
            device=args.device,
            seed=args.seed,
            batch_size=args.batch_size,
            flow_steps=args.flow_steps,
            trust_remote_code=args.trust_remote_code,
        )
        print((Path(out) / "eval.md").read_text(), end="")
        print(f"ttsrl: wrote {out}/eval.json, {out}/eval.md and {report['metrics']['synthesised']} wavs")
        return report

    from policies.glmtts import CheckpointError
    from rl.evaluate import MetaError
    from rollouts.prepare import PrepareError

    try:
        if args.compare:
            a, b = args.compare
            same = default_out(a) == default_out(b)  # two checkpoints of the same name: keep their outputs apart
            reports = [
                load_report(path) or run(path, default_out(path, f"-{tag}") if same else None)
                for path, tag in ((a, "A"), (b, "B"))
            ]
            print(compare_table(*reports), end="")
            return 0
        if not args.ckpt:
            raise ConfigError("ttsrl eval needs --ckpt DIR (or --compare A B)")
        report = run(args.ckpt, args.out)
    except (MetaError, PrepareError, CheckpointError, FileNotFoundError, ConfigError) as e:
        print(f"ttsrl eval: {e}", file=sys.stderr)
        return 2
    return 1 if report["metrics"]["synthesised"] == 0 else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rl.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from rollouts.prepare import cmd_prepare

    return cmd_prepare(args, policy_frontend=_policy_frontend)


def _policy_frontend(kind: str, model_dir: str, device: str):
    """A policy's own prompt front end for `ttsrl prepare --policy KIND --model DIR`."""
    if kind == "voxcpm":
        from policies.voxcpm import VoxCPMPromptFrontend

        return VoxCPMPromptFrontend.from_dir(model_dir, device)
    if kind == "indextts2":
        from policies.indextts2_frontend import IndexTTS2PromptFrontend

        return IndexTTS2PromptFrontend.from_dir(model_dir, device)
    raise ConfigError(f"--policy {kind}: no prompt front end of its own")


def cmd_export(args: argparse.Namespace) -> int:
    """The trained policy of a run's latest checkpoint (or a given checkpoint), written in the model's released
    layout: the run's policy loaded from its `policy.ckpt_dir`, the checkpoint's trainable state put in, then
    `Policy.export`."""
    from pathlib import Path

    import yaml

    from policies.base import policy_class
    from rl.checkpoint import find_checkpoint, load_checkpoint
    from rl.config import config_from_data
    from rl.errors import InputError
    from rl.trainer import DTYPES

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory; export writes a new one")
    found = find_checkpoint(args.run)
    ckpt = load_checkpoint(found)
    cfg, _ = config_from_data(yaml.safe_load(ckpt["config_yaml"]), str(found / "config.yaml"), [])
    check_remote_code(cfg.policy.trust_remote_code, args.trust_remote_code, str(found))
    policy = policy_class(cfg.policy.kind).from_pretrained(
        cfg.policy.ckpt_dir,
        dtype=DTYPES[cfg.policy.dtype],
        device="cpu",
        lora=cfg.policy.lora,
        trust_remote_code=cfg.policy.trust_remote_code,
        config=cfg.policy,
    )
    policy.load_checkpoint_state(ckpt["policy"])
    policy.export(out)
    print(f"ttsrl: exported {found} ({cfg.policy.kind}) to {out}")
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's trained policy in the model's released layout")
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("out", help="a new (or empty) directory to write")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the run's policy.trust_remote_code tokenizer code"
    )
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttsrl", description="GRPO alignment for text-to-speech speech language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy (no CONFIG: the embedded default, configs/tiny.yaml)")
    p.add_argument("config", nargs="?", help="YAML experiment config")
    _add_set(p)
    p.add_argument("--output-dir", help="where metrics and checkpoints go (overrides train.output_dir)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue a run from its latest checkpoint (a run or checkpoint dir)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="train into an output dir that holds another run: delete that run's files first",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow policy.trust_remote_code: run the tokenizer code shipped in the checkpoint directory",
    )
    p.set_defaults(func=cmd_train)

    _add_export_parser(sub)

    p = sub.add_parser("serve-reward", help="serve a reward scorer over HTTP (POST /score, GET /health)")
    p.add_argument(
        "--scorer", required=True, help="with --config: a reward name in it; else a scorer name or dotted path"
    )
    p.add_argument("--config", help="experiment config whose rewards.<scorer> entry gives the scorer and its kwargs")
    _add_set(p)
    p.add_argument("--kwargs", help="without --config: the scorer's constructor arguments as JSON")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="require the bearer token held in this file (or set $TTSRL_REWARD_TOKEN)")
    p.add_argument(
        "--token",
        help="require this bearer token (visible in `ps`: prefer --token-file or "
        "$TTSRL_REWARD_TOKEN; none of them: open)",
    )
    p.add_argument("--max-batch", type=int, default=1024, help="samples per request at most")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="request body size limit")
    p.set_defaults(func=cmd_serve_reward)

    from rollouts.prepare import add_prepare_parser

    add_prepare_parser(sub).set_defaults(func=_cmd_prepare)

    p = sub.add_parser("eval", help="synthesise a seed-tts-eval meta file; report CER/WER, SIM, emotion accuracy")
    p.add_argument("--ckpt", help="a GLM-TTS checkpoint dir (llm/, flow/, hift/ ...) or a ttsrl run/checkpoint dir")
    p.add_argument("--meta", help="seed-tts-eval meta file: utt|prompt_text|prompt_wav|target_text[|emotion]")
    p.add_argument("--lang", choices=["zh", "en"], help="zh: CER with Paraformer; en: WER with Whisper")
    p.add_argument("--out", help="output dir (default runs/eval/<ckpt name>-<meta name>)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="side-by-side table of two evaluations (eval output dirs, or checkpoints evaluated first)",
    )
    p.add_argument("--frontend", help="dir with speech_tokenizer/ and frontend/campplus.onnx (upstream layout)")
    p.add_argument("--asr", help="local Paraformer (zh) or Whisper (en) model dir; without it no CER/WER")
    p.add_argument("--sim", help="local wavlm_large_finetune.pth; without it no SIM")
    p.add_argument("--emotion", help="local emotion2vec+ dir; without it no emotion accuracy")
    p.add_argument(
        "--tiny-models",
        action="store_true",
        help="tiny random front end and scorers (built on first use in .cache/): tries the pipeline",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a run saved with policy.trust_remote_code to run its tokenizer's own code",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling and flow-noise seed")
    p.add_argument("--batch-size", type=int, default=16, help="items synthesised per batch")
    p.add_argument("--flow-steps", type=int, default=10, help="flow-matching Euler steps (upstream 10)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="write PNG reward/length/clip/loss curves of a run (RUN_DIR/plots/)")
    p.add_argument("run_dir", help="a training run's output directory (holds metrics.jsonl)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("config", help="show, check or list experiment configs")
    csub = p.add_subparsers(dest="action", required=True)
    for action, help_ in (("show", "print the fully resolved config"), ("check", "validate a config file")):
        q = csub.add_parser(action, help=help_)
        q.add_argument("file", help="YAML config file")
        _add_set(q)
    csub.add_parser("keys", help="list every config key with its type and help line")
    p.set_defaults(func=cmd_config)
    return parser


def _input_errors() -> tuple[type, ...]:
    """Errors about what the user gave (found before anything is written): one line, exit status 2."""
    from policies.glmtts import CheckpointError
    from policies.indextts2_model import IndexTTS2ConfigError
    from policies.indextts2_s2mel import S2MelConfigError
    from policies.indextts2_semantic import SemanticConfigError
    from policies.voxcpm_config import VoxCPMConfigError
    from policies.voxcpm_io import VoxCPMCheckpointError
    from rewards.asr import ModelDirError
    from rewards.base import ScorerConfigError
    from rewards.remote import RewardServiceError
    from rl.errors import InputError
    from rl.evaluate import MetaError
    from rollouts.indextts_text import IndexTextError
    from rollouts.manifest import ManifestError
    from rollouts.prepare import PrepareError
    from rollouts.token2wav import VocoderCheckpointError

    return (
        InputError,
        ManifestError,
        CheckpointError,
        VocoderCheckpointError,
        PrepareError,
        MetaError,
        ScorerConfigError,
        RewardServiceError,
        ModelDirError,
        VoxCPMConfigError,  # a model directory's config or weights: the policies' own loaders
        VoxCPMCheckpointError,
        IndexTTS2ConfigError,
        S2MelConfigError,
        SemanticConfigError,
        IndexTextError,
    )


def _run_errors() -> tuple[type, ...]:
    """Errors that stop a started run for a stated reason: one line, exit status 1."""
    from rl.dynamic_sampling import DynamicSamplingExhausted
    from rl.errors import RunError

    return (RunError, DynamicSamplingExhausted)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ttsrl: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if isinstance(e, _input_errors()):
            print(f"ttsrl: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, _run_errors()):
            print(f"ttsrl: stopped: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
