"""The ``dsv3`` command line. Each sub-command has ``--help``."""

from __future__ import annotations

import argparse
import sys


def _config_from_args(args: argparse.Namespace):
    from .config import ModelConfig, preset

    if getattr(args, "config", None):
        return ModelConfig.from_json(args.config), str(args.config)
    return preset(args.preset), args.preset


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_stats, model_stats

    config, name = _config_from_args(args)
    print(format_stats(config, model_stats(config, seq_len=args.seq_len), name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameter counts, FLOPs and KV-cache size of a configuration",
                       description="Sizes of a model configuration, computed on the meta device.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="v3-671b", choices=sorted(PRESETS), help="named configuration")
    src.add_argument("--config", help="path to a config.json (or a checkpoint directory holding one)")
    p.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .checkpoint import CheckpointError
        from .config import ConfigError

        if isinstance(e, (ConfigError, CheckpointError, FileNotFoundError)):
            print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
