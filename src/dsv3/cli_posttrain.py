"""``dsv3 sft`` and ``dsv3 grpo``: their flags are generated from :class:`~dsv3.posttrain.sft.SFTConfig` and
:class:`~dsv3.posttrain.grpo.GRPOConfig` (one docstring per field)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_COMMON = ("out", "steps", "lr", "seq_len", "micro_batch_size", "device", "seed", "save_every", "keep_last",
           "stop_after", "mtp", "fp8", "compile", "task_digits", "task_ops", "eval_problems", "eval_every",
           "grad_clip", "weight_decay", "ep", "dp_shard")
SFT_FLAGS = _COMMON + ("data", "epochs", "batch_size", "min_lr_ratio", "warmup", "loss_on", "overflow",
                       "val_fraction", "builtin_arithmetic")
GRPO_FLAGS = tuple(n for n in _COMMON if n not in ("mtp", "dp_shard")) + (
    "reward", "prompts_per_step", "group_size", "temperature", "top_p", "max_new_tokens", "eps", "eps_high",
    "beta", "loss_norm", "advantage_scale", "mini_batches", "ref_reset_every")
_LAUNCH_ONLY = ("stop_after", "ep", "dp_shard", "device")


def _config(cls, names, args: argparse.Namespace):
    """The run's configuration: the saved one when resuming (this invocation's flags that differ from their
    defaults win), else the flags."""
    from .config_flags import values

    given = values(args, cls, names)
    defaults = {n: getattr(cls, n, None) for n in names}
    base = {}
    saved = Path(args.out or "") / "train_config.json"
    if args.resume and args.out and saved.is_file():
        base = {k: v for k, v in json.loads(saved.read_text()).items() if k not in _LAUNCH_ONLY}
        given = {k: v for k, v in given.items() if k in _LAUNCH_ONLY or v != defaults.get(k)}
    return cls(**{**base, **given, "checkpoint": args.checkpoint})


def _report(result, command: str) -> int:
    from .train.parallel import world_from_env

    if result.interrupted:
        return 130
    if world_from_env()[0] != 0:
        return 0
    print(f"\nrun directory: {result.run_dir}")
    print(f"steps {result.step}")
    if result.val_loss is not None and result.val_loss == result.val_loss:
        print(f"validation loss {result.val_loss:.4f}")
    print(f"exported (Hugging Face layout, chat template): {result.run_dir / 'export'}"
          f" -- try: dsv3 chat {result.run_dir / 'export'}")
    if result.sample:
        print(f"held-out task: {result.sample}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .data import DataError
    from .posttrain.sft import SFTConfig, sft
    from .train.parallel import close_distributed

    cfg = _config(SFTConfig, SFT_FLAGS, args)
    try:
        result = sft(cfg, resume=args.resume)
    except DataError as e:
        print(f"dsv3 sft: error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed()
    return _report(result, "sft")


def cmd_grpo(args: argparse.Namespace) -> int:
    from .posttrain.grpo import GRPOConfig, grpo

    if args.task != "arithmetic":
        print(f"dsv3 grpo: error: unknown task {args.task!r} (built in: arithmetic)", file=sys.stderr)
        return 2
    return _report(grpo(_config(GRPOConfig, GRPO_FLAGS, args), resume=args.resume), "grpo")


def add_parsers(sub) -> None:
    from .config_flags import add_arguments
    from .posttrain.grpo import GRPOConfig
    from .posttrain.sft import SFTConfig

    p = sub.add_parser(
        "sft", help="supervised fine-tuning on packed, isolated conversations (report §5.1)",
        description="Fine-tune a checkpoint on chat conversations: rendered with its chat template, loss on the "
                    "assistant's tokens, samples packed into sequences and kept mutually invisible, cosine "
                    "schedule from the report's 5e-6 -> 1e-6 scaled to the model, 2 epochs. Without --data: a "
                    "built-in set (Python standard library questions and the arithmetic task). Exports RUN/export "
                    "with the chat template.")
    p.add_argument("checkpoint", help="a `dsv3 train` run directory or a Hugging Face layout directory")
    add_arguments(p, SFTConfig, SFT_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser(
        "grpo", help="GRPO reinforcement learning with rollouts on dsv3's engine (report §5.2.2)",
        description="Group Relative Policy Optimization: per step, G completions of each question sampled by the "
                    "inference engine from the current policy, rewards, group-normalised advantages, the clipped "
                    "objective with the k3 KL penalty (report eq. 26-28). Default task: arithmetic with the answer "
                    "in \\boxed{}. Writes metrics.jsonl (reward, accuracy, kl, clip_fraction, ...) and RUN/export.")
    p.add_argument("checkpoint", help="the policy to start from (usually an SFT run's export)")
    p.add_argument("--task", default="arithmetic", help="the built-in task (default arithmetic)")
    add_arguments(p, GRPOConfig, GRPO_FLAGS)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.set_defaults(func=cmd_grpo)
