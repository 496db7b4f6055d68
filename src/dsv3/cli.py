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


# flag -> TrainConfig field, for the flags that map one to one
_TRAIN_FLAGS = {
    "preset": str, "data": str, "tokenizer": str, "steps": int, "save_every": int, "out": str, "device": str,
    "seq_len": int, "batch_size": int, "micro_batch_size": int, "lr": float, "eval_every": int, "seed": int,
    "balance": str, "vocab_size": int, "stop_after": int, "keep_last": int, "fim_rate": float,
    "cache_dir": str,
}
_TRAIN_SWITCHES = ("fp8", "doc_mask", "bf16_moments", "compile")


def _train_config(args: argparse.Namespace):
    import json
    from pathlib import Path

    import yaml

    from .train import TrainConfig

    overrides = {name: getattr(args, name) for name in _TRAIN_FLAGS if getattr(args, name) is not None}
    for name in _TRAIN_SWITCHES:
        if getattr(args, name):
            overrides[name] = True
    if args.no_mtp:
        overrides["mtp"] = False
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        value = yaml.safe_load(value)
        if key.startswith("model."):
            overrides.setdefault("model", {})[key[6:]] = value
        else:
            overrides[key] = value
    base: dict = {}
    if args.config:
        return TrainConfig.from_file(args.config, **overrides)
    if args.resume and args.out and (Path(args.out) / "train_config.json").is_file():
        base = json.loads((Path(args.out) / "train_config.json").read_text())
        base.pop("stop_after", None)
    model = {**base.get("model", {}), **overrides.pop("model", {})}
    return TrainConfig.from_dict({**base, **overrides, "model": model})


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = _train_config(args)
    result = train(cfg, resume=args.resume)
    if result.interrupted:
        return 130
    print(f"\nrun directory: {result.run_dir}")
    print(f"steps {result.step}, tokens {result.tokens:,}")
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f}")
    print(f"exported (Hugging Face layout): {result.run_dir / 'export'}")
    if result.sample is not None:
        print(f"sample for {cfg.sample_prompt!r}:\n{cfg.sample_prompt}{result.sample}")
    return 0


def load_run_or_checkpoint(path: str, device: str = "cpu"):
    """A model and tokenizer from a ``dsv3 train`` run directory (its latest checkpoint) or a Hugging Face
    layout directory (with tokenizer.json beside it)."""
    from pathlib import Path

    import torch

    from . import build_model
    from .checkpoint import load_pretrained
    from .config import ModelConfig
    from .data import Tokenizer
    from .train.state import latest_checkpoint, read_checkpoint

    p = Path(path)
    ckpt = latest_checkpoint(p)
    if ckpt is not None:
        model_t, _, meta = read_checkpoint(ckpt)
        config = ModelConfig.from_hf_dict(meta["model_config"])
        model = build_model(config, device=device, dtype=torch.float32, seed=None)
        model.load_state_dict(model_t)
        return model.eval(), Tokenizer.load(p / "tokenizer")
    model = load_pretrained(p, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    return model.eval(), Tokenizer.load(p)


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.sample import generate

    model, tokenizer = load_run_or_checkpoint(args.checkpoint, args.device)
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import train_tokenizer

    tok = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, max_docs=args.max_docs)
    print(f"trained {tok.vocab_size} tokens -> {args.out}/tokenizer.json")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
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

    p = sub.add_parser(
        "train", help="train a model with the report's recipe (default: tiny preset on the Python stdlib, CPU)",
        description="Train a DeepSeek-V3 model. With no arguments: the tiny preset on the source files of the "
                    "running Python's standard library, on the CPU, in a few minutes; prints validation perplexity "
                    "and a sample. Every TrainConfig field can be set in a YAML/TOML --config or with --set.")
    p.add_argument("--config", help="YAML or TOML file with trainer fields and a 'model' mapping")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default tiny)")
    p.add_argument("--data", help="text/JSONL file or directory (default: the Python standard library)")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer.json or its directory (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE (default 4096)")
    p.add_argument("--steps", type=int, help="token budget in full batches (default 400)")
    p.add_argument("--seq-len", type=int, help="sequence length (default 256)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences (default 16)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--balance", choices=["aux_free", "aux_loss"], help="load balancing (default aux_free)")
    p.add_argument("--no-mtp", action="store_true", help="train without the MTP module(s)")
    p.add_argument("--fim-rate", type=float, help="fraction of documents in fill-in-the-middle form (default 0.1)")
    p.add_argument("--doc-mask", action="store_true", help="mask attention across packed documents")
    p.add_argument("--bf16-moments", action="store_true", help="AdamW moments in BF16")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs for attention and expert Linear layers")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-every", type=int, help="validate every N steps (default 100)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
    p.add_argument("--keep-last", type=int, help="checkpoints to keep (default 3)")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after N steps of this invocation")
    p.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--cache-dir", help="tokenizer and token-file cache (default ~/.cache/dsv3 or $DSV3_CACHE)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other field, e.g. --set gamma=0.002 --set model.num_hidden_layers=6")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="complete a prompt with a trained model (plain decoding)",
                       description="Complete a prompt from a `dsv3 train` run directory or a Hugging Face layout "
                                   "directory (tokenizer.json beside the weights).")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE", description="Train a byte-level BPE tokenizer "
                        "with the `tokenizers` library and save it as tokenizer.json.")
    t.add_argument("--data", default=None, help="text/JSONL file or directory (default: Python stdlib)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("plot", help="plot a run's metrics to PNG files",
                       description="Loss curves, expert-load heatmap and MaxVio of a `dsv3 train` run.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="directory for the PNGs (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
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
