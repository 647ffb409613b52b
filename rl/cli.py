"""The `ttsrl` command line."""

from __future__ import annotations

import argparse
import sys

from rl.configlib import ConfigError, describe


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
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
        print(f"{args.file}: ok ({len(cfg.rewards)} rewards: {', '.join(cfg.rewards)}; "
              f"{derived.rows_per_step} samples per step)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttsrl", description="GRPO alignment for text-to-speech speech language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show, check or list experiment configs")
    csub = p.add_subparsers(dest="action", required=True)
    for action, help_ in (("show", "print the fully resolved config"), ("check", "validate a config file")):
        q = csub.add_parser(action, help=help_)
        q.add_argument("file", help="YAML config file")
        _add_set(q)
    csub.add_parser("keys", help="list every config key with its type and help line")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ttsrl: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
