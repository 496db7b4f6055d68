"""The ``dsv3 plan`` sub-command: :func:`add_plan_parser` registers it, :func:`cmd_plan` runs it."""

from __future__ import annotations

import argparse
import json
import sys

from .gpus import GPUS

DESCRIPTION = """\
What a training layout costs before anyone rents it: memory per GPU (weights, FP32 gradients and optimiser states by
ZeRO stage, activations at the pipeline schedule's peak) against HBM, and time (F, B, W and F&B chunks from FLOPs at
stated efficiencies, the MoE all-to-all over NVLink and InfiniBand with node-limited routing, the schedule replayed
by dsv3.pipeline.simulate) as tokens/s per GPU, MFU and GPU-hours per trillion tokens. DP = gpus / PP; EP borrows
its ranks from DP. The efficiencies assumed are in dsv3/plan/assumptions.py; docs/planner.md compares the
estimates with DeepSeek-V3's report (180K H800 GPU-hours per trillion tokens) and Megatron-Core.

example (the report's layout):
  dsv3 plan --preset v3-671b --gpu h800 --gpus 2048 --pp 16 --ep 64 --pp-schedule dualpipe \\
            --global-batch 15360 --fp8"""


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    from ..config import PRESETS

    p = subparsers.add_parser("plan", help="memory and time of a cluster layout (PP, EP, ZeRO, schedule) before "
                                           "renting it", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="named configuration")
    src.add_argument("--config", help="path to a config.json (or a checkpoint directory holding one)")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU model (built-in datasheet numbers)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per NVLink node (default 8)")
    p.add_argument("--pp", type=int, required=True, help="pipeline-parallel ranks (DP = gpus / pp)")
    p.add_argument("--ep", type=int, required=True, help="expert-parallel ranks, taken from the DP ranks "
                                                         "(must divide DP and the routed experts)")
    p.add_argument("--pp-schedule", choices=["1f1b", "dualpipev", "dualpipe"], default="1f1b",
                   help="pipeline schedule (default 1f1b; ignored when pp = 1); DualPipe / DualPipeV need an even "
                        "number of >= 2 x pp micro-batches per pipeline and step")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--global-batch", type=int, default=None, metavar="SEQS",
                   help="sequences per optimiser step (default: 4 x pp micro-batches per pipeline)")
    p.add_argument("--micro-batch", type=int, default=1, metavar="SEQS", help="sequences per micro-batch (default 1)")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs, FP8 activation caching and dispatch (report §3.3)")
    p.add_argument("--zero", type=int, choices=[0, 1, 3], default=1,
                   help="ZeRO stage over the data-parallel ranks (default 1, the report's)")
    p.add_argument("--recompute", default="report",
                   help="recomputed in the backward: report (default: RMSNorm, MLA up-projections, SwiGLU output), "
                        "none, full, or a comma list of norm, mla_up, swiglu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--png", metavar="FILE", help="draw the simulated schedule (needs matplotlib)")
    p.add_argument("--measure", action="store_true",
                   help="time F, B, W of each stage on the real model on this machine's device (build the config "
                        "there: a small one, e.g. --preset tiny) and plan with them")
    p.add_argument("--device", default=None, help="device for --measure (default: cuda if present, else cpu)")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    """Run ``dsv3 plan``; 0 on success, 2 (with the reason on stderr) for an impossible layout."""
    from ..config import ConfigError, ModelConfig, preset
    from ..pipeline.stages import split_layers
    from .layout import PlanError, make_layout, parse_recompute
    from .planner import plan
    from .report import format_table

    try:
        if args.config:
            config, name = ModelConfig.from_json(args.config), str(args.config)
        else:
            config, name = preset(args.preset), args.preset
        recompute = parse_recompute(args.recompute)
        options = dict(gpus=args.gpus, pp=args.pp, ep=args.ep, gpus_per_node=args.gpus_per_node,
                       schedule=args.pp_schedule, seq_len=args.seq_len, global_batch=args.global_batch,
                       micro_batch=args.micro_batch, fp8=args.fp8, zero=args.zero, recompute=recompute)
        measured, device = None, "cpu"
        if args.measure:
            from .measure import measure_stages

            layout = make_layout(config, **options)
            splits = split_layers(config, layout.n_model_stages)
            measured, device = measure_stages(config, splits, layout.micro_batch, layout.seq_len, args.device)
        result = plan(config, gpu=args.gpu, name=name, measured=measured, measured_on=device, **options)
    except (PlanError, ConfigError, FileNotFoundError) as e:
        print(f"dsv3 plan: error: {e}", file=sys.stderr)
        return 2
    if args.png:
        from ..pipeline import plot_timeline

        lay = result.layout
        title = (f"{lay.schedule}: {lay.pp} ranks, {lay.n_microbatches} micro-batches, chunk costs in seconds "
                 f"({result.timing.source})")
        plot_timeline(result.timeline, args.png, title=title)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        print(format_table(result))
        if args.png:
            print(f"\nschedule picture: {args.png}")
    return 0
