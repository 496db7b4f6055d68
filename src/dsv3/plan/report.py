"""A :class:`~dsv3.plan.planner.Plan` as a readable table (``dsv3 plan`` without ``--json``)."""

from __future__ import annotations

from .planner import Plan


def _gb(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f} {unit}"
    return f"{n:,.0f} B"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def _flops(n: float) -> str:
    for unit, div in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} FLOP"


def _stages(layers: list[int]) -> str:
    """``4 x15, 1`` for [4]*15 + [1]."""
    runs: list[list[int]] = []
    for n in layers:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ", ".join(f"{n} x{k}" if k > 1 else str(n) for n, k in runs)


def format_table(p: Plan) -> str:
    lay, mem, t, a = p.layout, p.memory, p.timing, p.assumptions
    nodes = max(1, lay.gpus // lay.gpus_per_node)
    recompute = lay.recompute if isinstance(lay.recompute, str) else (", ".join(sorted(lay.recompute)) or "none")
    pipe = f"PP {lay.pp} ({lay.schedule})" if lay.pp > 1 else "no pipeline"
    ep = f"EP {lay.ep} ({lay.ep_nodes} node{'s' * (lay.ep_nodes > 1)}, <= {lay.max_nodes_per_token} per token)" \
        if lay.ep > 1 else "no EP"
    micro = (f"{lay.n_microbatches} micro-batch{'es' * (lay.n_microbatches > 1)} of {lay.micro_batch} "
             f"sequence{'s' * (lay.micro_batch > 1)} per pipeline")
    device_hours = "" if p.mfu is not None else f" (device-hours of the measured {t.source[len('measured on '):]})"
    rows: list[tuple[str, str]] = [
        ("model", f"{p.model} on {lay.gpus:,} x {p.gpu.name} ({nodes} node{'s' * (nodes > 1)} of {lay.gpus_per_node})"),
        ("layout", f"{pipe} x DP {lay.dp}, {ep}, ZeRO-{lay.zero}, {'FP8' if lay.fp8 else 'BF16'}, "
                   f"recompute: {recompute}"),
        ("batch", f"{lay.global_batch:,} sequences x {lay.seq_len:,} tokens = {_count(lay.tokens_per_step)} "
                  f"tokens per step; {micro}"),
        ("blocks per stage", f"{_stages(p.layers_per_stage)} (embedding on the first, head + MTP on the last)"),
        ("", ""),
        ("memory per GPU", f"pipeline rank {mem.rank} of {lay.pp} (the largest), {_count(mem.params)} parameters"),
        ("  weights", _gb(mem.weight_bytes)),
        ("  gradients (FP32)", _gb(mem.gradient_bytes)),
        ("  optimiser states", _gb(mem.optimizer_bytes)),
        ("  activations", f"{_gb(mem.activation_bytes)} ({mem.peak_chunks} stage x micro-batch chunks in flight)"),
        ("  transient", _gb(mem.transient_bytes)),
        ("  runtime buffers", _gb(mem.runtime_bytes)),
        ("  total", f"{_gb(mem.total_bytes)} of {_gb(mem.usable_bytes)} usable ({p.gpu.hbm_bytes / 1e9:.0f} GB HBM): "
                    f"{'fits' if mem.fits else 'DOES NOT FIT'}"),
        ("", ""),
        ("time", t.source),
    ]
    if p.measured_stages is not None:
        for s, m in enumerate(p.measured_stages):
            rows.append((f"  stage {s} measured", f"F {_ms(m.F)} ms, B {_ms(m.B)} ms, W {_ms(m.W)} ms"))
    rows += [
        ("  chunk F / B / W / F&B", f"{_ms(t.F)} / {_ms(t.B)} / {_ms(t.W)} / {_ms(t.FB)} ms (p2p {_ms(t.p2p)} ms)"),
    ]
    if lay.ep > 1 and t.source == "estimated":
        where = "hidden behind the overlapped chunk" if t.all_to_all_hidden else "exposed"
        rows.append(("  MoE layer forward", f"compute {_ms(t.compute_seconds_per_moe_layer)} ms, all-to-all "
                                           f"{_ms(t.all_to_all_seconds_per_moe_layer)} ms: {where}"))
    rows += [
        ("  pipeline", f"makespan {t.makespan_seconds:,.3f} s; bubble {t.bubble_seconds:,.3f} s simulated, "
                       f"{t.table2_bubble_seconds:,.3f} s by Table 2; ranks idle {t.bubble_fraction:.1%}; "
                       f"stage imbalance {t.stage_imbalance:.3f}"),
        ("  step", f"{t.step_seconds:,.3f} s (DP sync {t.dp_sync_seconds:,.3f} s, optimiser "
                   f"{t.optimizer_seconds:,.3f} s)"),
        ("", ""),
        ("tokens/s per GPU", f"{p.tokens_per_second_per_gpu:,.0f}"),
        ("model TFLOP/s per GPU", f"{p.model_tflops_per_gpu:,.3g} ({_flops(p.model_flops_per_token)} per token"
                                  + (f"; MFU {p.mfu:.1%} of dense BF16 peak)" if p.mfu is not None else ")")),
        ("GPU-hours per 1T tokens", f"{p.gpu_hours_per_trillion_tokens:,.0f}{device_hours}"),
        ("", ""),
        ("assumed efficiencies", f"GEMM {a.gemm_efficiency}, attention {a.attention_efficiency}, HBM "
                                 f"{a.hbm_efficiency} x {a.elementwise_passes:g} passes, NVLink {a.nvlink_efficiency}, "
                                 f"network {a.network_efficiency}, {a.comm_sms} SMs for communication "
                                 f"(dsv3.plan.assumptions)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() if k or v else "" for k, v in rows)
