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


# EngineConfig fields offered as flags (generated from its docstrings)
_ONE_SEQUENCE_FLAGS = ("max_seq_len", "prefix_caching", "speculative", "num_speculative_tokens", "compile",
                       "cuda_graph", "decode_experts")
_SERVER_FLAGS = ("max_batch", "max_seq_len", "page_size", "num_pages", "prefix_caching", "max_prefill_tokens",
                 "speculative", "num_speculative_tokens", "compile", "cuda_graph", "decode_experts", "graph_batch_sizes",
                 "max_prefill_graph_tokens")

_DEVICE_FLAGS = ("device", "dtype", "threads", "fp8")  # DeviceOptions: every command that runs a checkpoint
_SERVE_FLAGS = ("host", "port", "model_name", "api_key", "max_pending", "log_level")  # ServerConfig

# flag -> TrainConfig field, for the flags that map one to one
_TRAIN_FLAGS = {
    "preset": str, "data": str, "tokenizer": str, "steps": int, "save_every": int, "out": str, "device": str,
    "seq_len": int, "batch_size": int, "micro_batch_size": int, "lr": float, "eval_every": int, "seed": int,
    "balance": str, "vocab_size": int, "stop_after": int, "keep_last": int, "fim_rate": float,
    "cache_dir": str, "ep": int, "dp_shard": str, "pp": int, "pp_schedule": str,
    "pp_overlap": str, "ranks_per_node": int,
}
_TRAIN_SWITCHES = ("fp8", "fp8_dispatch", "node_limited", "doc_mask", "bf16_moments", "compile")


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
        # this invocation's, not the run's: a sharded run may continue in one process, or on more ranks
        # (fp8_dispatch goes with ep: a run resumed without --ep has no dispatch to quantise)
        for launch_only in ("stop_after", "ep", "fp8_dispatch", "node_limited", "ranks_per_node", "dp_shard", "pp",
                            "pp_schedule", "pp_overlap"):
            base.pop(launch_only, None)
    model = {**base.get("model", {}), **overrides.pop("model", {})}
    return TrainConfig.from_dict({**base, **overrides, "model": model})


def _data_error(command: str, e: Exception) -> int:
    print(f"dsv3 {command}: error: {e}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from .data import DataError
    from .train import train
    from .train.parallel import close_distributed, world_from_env

    cfg = _train_config(args)
    try:
        result = train(cfg, resume=args.resume)
    except DataError as e:
        return _data_error("train", e)
    finally:
        close_distributed()
    if result.interrupted:
        return 130
    if world_from_env()[0] != 0:  # under torchrun rank 0 reports
        return 0
    print(f"\nrun directory: {result.run_dir}")
    print(f"steps {result.step}, tokens {result.tokens:,}")
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.4f}, perplexity {result.val_ppl:.2f}")
    print(f"exported (Hugging Face layout): {result.run_dir / 'export'}")
    if result.sample is not None:
        print(f"sample for {cfg.sample_prompt!r}:\n{cfg.sample_prompt}{result.sample}")
    return 0


def _load(args: argparse.Namespace):
    """Model and tokenizer of ``args.checkpoint`` where ``--device`` / ``--dtype`` say, with ``--threads``
    intra-op threads on a CPU."""
    import torch

    from .config_flags import values
    from .loading import DeviceOptions, load

    opts = DeviceOptions(**values(args, DeviceOptions, _DEVICE_FLAGS))
    model, tokenizer = load(args.checkpoint, opts.device, opts.dtype, fp8=opts.fp8_weights)
    threads = opts.cpu_threads(model)
    if threads is not None:
        torch.set_num_threads(threads)
    return model, tokenizer


def cmd_sample(args: argparse.Namespace) -> int:
    from .train.sample import generate

    model, tokenizer = _load(args)
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    print(args.prompt + text)
    return 0


def _engine_from_args(args: argparse.Namespace):
    """Model, tokenizer and a one-sequence :class:`Engine` for ``generate`` / ``chat``."""
    from .config_flags import values
    from .inference import Engine, EngineConfig

    model, tokenizer = _load(args)
    engine = Engine(model, tokenizer, EngineConfig(max_batch=1, **values(args, EngineConfig, _ONE_SEQUENCE_FLAGS)))
    print(f"engine: {engine.describe()}", file=sys.stderr)
    return engine, tokenizer


def _sampling_from_args(args: argparse.Namespace):
    from .inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop or [])


def _stream_to_stdout(engine, prompt, params) -> tuple[str, str | None, int]:
    """Print a completion as its tokens come; returns (text, finish reason, tokens)."""
    text, reason, n = [], None, 0
    for event in engine.stream([prompt], params):
        if event.token is not None:
            n += 1
        if event.text:
            print(event.text, end="", flush=True)
            text.append(event.text)
        reason = event.finish_reason or reason
    return "".join(text), reason, n


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    engine, _ = _engine_from_args(args)
    params = _sampling_from_args(args)
    if not args.no_echo:
        print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    _, reason, n = _stream_to_stdout(engine, args.prompt, params)
    dt = time.perf_counter() - t0
    print(flush=True)
    spec = engine.speculator
    drafts = ""
    if spec is not None:
        steps = max(spec.drafted // spec.k, 1)
        per_position = " / ".join(f"{a / steps:.0%}" for a in spec.accepted_at)
        drafts = (f", MTP drafts accepted {spec.accepted}/{spec.drafted} ({spec.accepted / max(spec.drafted, 1):.0%}"
                  f"{f'; by position {per_position}' if spec.k > 1 else ''}), {spec.accepted / steps:.2f} accepted "
                  f"per step, {n / (spec.drafted // spec.k + 1):.2f} tokens per forward")
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s{drafts}, finish: {reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference.chat import ChatTemplate

    engine, tokenizer = _engine_from_args(args)
    template = ChatTemplate.load(tokenizer, args.checkpoint)
    params = _sampling_from_args(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        print("dsv3 chat: type a message; /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break  # end of input
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = template.encode(messages)
            reply, _, _ = _stream_to_stdout(engine, ids, params)
        except ValueError as e:  # e.g. the conversation no longer fits max_seq_len
            messages.pop()
            print(f"dsv3 chat: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .server.app import serve
    except ImportError as e:
        print(f"dsv3 serve: needs FastAPI, uvicorn and prometheus_client ({e}): pip install 'dsv3[serve]'",
              file=sys.stderr)
        return 2
    from .config_flags import values
    from .inference import EngineConfig
    from .loading import DeviceOptions
    from .server.config import ServerConfig

    serve(args.checkpoint, ServerConfig(**values(args, ServerConfig, _SERVE_FLAGS)),
          EngineConfig(**values(args, EngineConfig, _SERVER_FLAGS)),
          DeviceOptions(**values(args, DeviceOptions, _DEVICE_FLAGS)))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .data import DataError, train_tokenizer

    try:
        tok = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, max_docs=args.max_docs)
    except DataError as e:
        return _data_error("tokenizer train", e)
    print(f"trained {tok.vocab_size} tokens -> {args.out}/tokenizer.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .runs import export_run

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, dtype=dtype)
    print(f"exported (Hugging Face layout): {out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .config_flags import add_arguments
    from .inference.config import EngineConfig
    from .loading import DeviceOptions
    from .server.config import ServerConfig

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
    p.add_argument("--steps", type=int, help="token budget in full batches (default 300)")
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
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dp-shard", choices=["auto", "fsdp", "zero1"],
                   help="under torchrun: FSDP2 sharding or ZeRO-1 (gradient all-reduce + sharded AdamW states); "
                        "default auto: FSDP2, ZeRO-1 with --pp")
    p.add_argument("--ep", type=int, help="expert parallelism: split each MoE layer's experts over this many ranks")
    p.add_argument("--fp8-dispatch", action="store_true",
                   help="with --ep: send the tokens to the experts in FP8 (1x128 scales, report §3.3.4); the "
                        "outputs come back unquantised")
    p.add_argument("--node-limited", action="store_true",
                   help="with --ep: require each routing group (n_group) on the ranks of one node, so that a token "
                        "reaches at most topk_group nodes (report §2.1.2)")
    p.add_argument("--ranks-per-node", type=int,
                   help="ranks sharing a node, for --node-limited and the nodes-per-token metric (default: "
                        "torchrun's LOCAL_WORLD_SIZE)")
    p.add_argument("--pp", type=int, help="pipeline parallelism: cut the model into stages over this many ranks")
    p.add_argument("--pp-schedule", choices=["1f1b", "dualpipev", "dualpipe"],
                   help="pipeline schedule (default 1f1b; DualPipe / DualPipeV need an even count of >= 2 x pp "
                        "micro-batches per rank and step)")
    p.add_argument("--pp-overlap", choices=["auto", "on", "off"],
                   help="DualPipe: run each overlapped forward-backward pair on two CUDA streams at once "
                        "(default off; auto: on with CUDA)")
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
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=20, help="draw among the k most likely tokens (default 20; 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    add_arguments(p, DeviceOptions, _DEVICE_FLAGS)
    p.set_defaults(func=cmd_sample)

    def engine_args(p: argparse.ArgumentParser, temperature: float, seed: int | None, max_new: int) -> None:
        p.add_argument("checkpoint", help="Hugging Face layout directory (tokenizer.json beside the weights) or "
                                          "`dsv3 train` run directory")
        p.add_argument("--max-new-tokens", type=int, default=max_new)
        p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1 = off)")
        p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
        p.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default {seed})")
        p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
        add_arguments(p, DeviceOptions, _DEVICE_FLAGS)

    p = sub.add_parser("generate", help="complete a prompt with the inference engine, streaming tokens",
                       description="Complete a prompt with the cached inference engine (dsv3.inference), "
                                   "printing tokens as they come; speed on stderr.")
    engine_args(p, temperature=0.0, seed=0, max_new=128)
    add_arguments(p, EngineConfig, _ONE_SEQUENCE_FLAGS, {"compile": False})  # one request: compiling won't pay
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-echo", action="store_true", help="print only the completion, not the prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the DeepSeek-V3 chat format",
                       description="Chat with a model: reads one user message per line from stdin (a terminal "
                                   "or a pipe), keeps the conversation and formats it with the checkpoint's "
                                   "chat template (tokenizer_config.json) or DeepSeek-V3's format. /reset "
                                   "starts over; /exit or end of input quits.")
    engine_args(p, temperature=0.7, seed=None, max_new=512)
    add_arguments(p, EngineConfig, _ONE_SEQUENCE_FLAGS)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)",
                       description="Serve a checkpoint with an OpenAI-compatible API: /v1/completions, "
                                   "/v1/chat/completions (streaming with SSE), /v1/models; /health, /metrics "
                                   "(Prometheus), /version, /tokenize, /detokenize (docs/serving.md). "
                                   "Needs `pip install 'dsv3[serve]'`.")
    p.add_argument("checkpoint", help="Hugging Face layout directory or `dsv3 train` run directory")
    add_arguments(p, ServerConfig, _SERVE_FLAGS)
    add_arguments(p, DeviceOptions, _DEVICE_FLAGS)
    add_arguments(p, EngineConfig, _SERVER_FLAGS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE", description="Train a byte-level BPE tokenizer "
                        "with the `tokenizers` library and save it as tokenizer.json.")
    t.add_argument("--data", default=None, help="text/JSONL file or directory (default: Python stdlib)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    t.set_defaults(func=cmd_tokenizer_train)

    from .plan.cli import add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("export", help="write a run's latest checkpoint in the Hugging Face layout",
                       description="Export a `dsv3 train` run (one-process or sharded torchrun checkpoints) as a "
                                   "Hugging Face layout directory with its tokenizer: loads in transformers and "
                                   "dsv3.load_pretrained. Runs in one process.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory of the run (default: the latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weights' dtype in the files (default: as trained, float32)")
    p.set_defaults(func=cmd_export)

    from .cli_posttrain import add_parsers

    add_parsers(sub)

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
