"""``plan()``: what a cluster layout costs, in memory per GPU and in time per token, before anyone rents it.

The model is cut into stages as ``dsv3 train`` cuts it (:func:`dsv3.pipeline.stages.split_layers`), each stage's
parameters, activations and FLOPs are counted (:mod:`dsv3.plan.model_costs`, :mod:`dsv3.plan.memory`), its chunk
times estimated (:mod:`dsv3.plan.timing`) or measured (:mod:`dsv3.plan.measure`), and the schedule itself is
replayed on a clock (:func:`dsv3.pipeline.simulate`) for the step time and the bubble. Stages differ (the last
one carries the head and the MTP module): the simulator takes one cost per chunk, so the chunks are given the
average cost of the busiest rank, which sets the pace of the pipeline (``stage_imbalance`` says by how much it
exceeds the mean rank).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import ModelConfig, preset
from ..info import model_stats
from ..pipeline import Costs, Schedule, Timeline, simulate, table2_bubble
from ..pipeline.stages import split_layers
from .assumptions import DEFAULT, Assumptions
from .gpus import GPUSpec, gpu as gpu_spec
from .layout import Layout, make_layout, parse_recompute
from .memory import Memory, estimate_memory, head_activations, intermediate_bytes, stage_activation_bytes
from .model_costs import PartCost, model_parts, stage_costs
from .timing import (ChunkTimes, all_to_all_seconds, chunk_compute, dp_sync_seconds,
                     optimizer_seconds, p2p_seconds, zero3_chunk_seconds)


@dataclass(frozen=True)
class Timing:
    """One optimiser step's time on the layout (chunk costs are the busiest rank's averages)."""

    source: str
    """``estimated`` (from FLOPs and bytes) or ``measured on DEVICE`` (``--measure``)."""
    F: float
    """Seconds of a lone forward chunk (one stage, one micro-batch), exposed all-to-all included."""
    B: float
    """Seconds of a lone full backward chunk, exposed all-to-all included."""
    W: float
    """Seconds of its weight-gradient part."""
    FB: float
    """Seconds of an overlapped forward + backward pair (DualPipe's F&B)."""
    p2p: float
    """Seconds to send one micro-batch's activations to the next pipeline rank."""
    compute_seconds_per_moe_layer: float
    """Forward computation of one MoE block for one micro-batch."""
    all_to_all_seconds_per_moe_layer: float
    """Its dispatch + combine (the backward moves as much again)."""
    all_to_all_hidden: bool
    """The all-to-all hides behind the overlapped chunk's computation (always False without overlap: 1F1B)."""
    makespan_seconds: float
    """The simulated pipeline, first forward to last weight gradient."""
    bubble_seconds: float
    """Simulated idle time of the busiest rank (Table 2's "bubble")."""
    table2_bubble_seconds: float
    """The report's Table 2 formula with the same F, B, W, F&B."""
    bubble_fraction: float
    """Mean idle share of the pipeline ranks over the makespan."""
    stage_imbalance: float
    """Work of the busiest pipeline rank over the mean rank's (1 = balanced cut)."""
    dp_sync_seconds: float
    """Data-parallel gradient reduction and weight gather after the pipeline (exposed, an assumption)."""
    optimizer_seconds: float
    """AdamW over this GPU's shard (memory-bound)."""
    step_seconds: float
    """makespan + data-parallel sync + optimiser."""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """The cost of one layout for one model."""

    model: str
    """Preset name or config path."""
    gpu: GPUSpec
    """The GPU planned for."""
    layout: Layout
    """The layout, checked."""
    layers_per_stage: list[int]
    """Decoder blocks of each model stage (the head and MTP sit on the last)."""
    memory: Memory
    """Memory of the GPU that needs the most."""
    timing: Timing
    """Step time and its parts."""
    memory_per_gpu_bytes: float
    """= memory.total_bytes."""
    fits: bool
    """The largest GPU's memory fits its HBM (less the allocator's headroom)."""
    bubble_fraction: float
    """= timing.bubble_fraction."""
    tokens_per_second_per_gpu: float
    """Training tokens per second per GPU."""
    model_flops_per_token: float
    """3 x forward FLOPs of the main model and the MTP modules (recomputation not counted)."""
    model_tflops_per_gpu: float
    """Model FLOPs per second per GPU, in TFLOP/s."""
    mfu: float | None
    """Model FLOPs utilisation against the dense BF16 peak (None for ``--measure`` on another device)."""
    gpu_hours_per_trillion_tokens: float
    """GPU-hours to train on 10^12 tokens (the report: 180K H800 GPU-hours)."""
    assumptions: Assumptions
    """The efficiencies used."""
    measured_stages: list[ChunkTimes] | None = None
    """``--measure``: F, B, W timed for each model stage (seconds), which the timing then uses."""
    timeline: Timeline | None = field(default=None, repr=False)
    """The simulated schedule (for ``--png``)."""

    def to_json(self) -> dict:
        head = {k: getattr(self, k) for k in ("model", "memory_per_gpu_bytes", "fits", "bubble_fraction",
                                               "tokens_per_second_per_gpu", "mfu", "gpu_hours_per_trillion_tokens",
                                               "model_flops_per_token", "model_tflops_per_gpu", "layers_per_stage")}
        out = {**head, "gpu": self.gpu.to_json(), "layout": self.layout.to_json(), "memory": self.memory.to_json(),
               "time": self.timing.to_json(), "assumptions": self.assumptions.to_json()}
        if self.measured_stages is not None:
            out["measured_stages"] = [{"F": t.F, "B": t.B, "W": t.W} for t in self.measured_stages]
        return out


_MAIN_FLOPS: dict[tuple[str, int], float] = {}


def _main_forward_flops(config: ModelConfig, seq_len: int) -> float:
    """:func:`dsv3.info.model_stats`' forward FLOPs per token (it builds the model on the meta device: about a
    second for 671B, so kept per configuration)."""
    key = (repr(config), seq_len)
    if key not in _MAIN_FLOPS:
        _MAIN_FLOPS[key] = model_stats(config, seq_len).forward_flops_per_token
    return _MAIN_FLOPS[key]


def _chunk_counts(schedule: Schedule) -> list[int]:
    """Micro-batches passing through each virtual stage."""
    counts = [0] * len(schedule.rank_of)
    for path in schedule.paths:
        for v in path:
            counts[v] += 1
    return counts


def _busiest_rank(schedule: Schedule, per_stage: list[ChunkTimes]) -> tuple[ChunkTimes, float]:
    """The average chunk of the rank with the most work, and that work over the mean rank's."""
    counts = _chunk_counts(schedule)
    work, average = [], []
    for r in range(schedule.n_ranks):
        mine = [v for v in schedule.stages_of(r) if counts[v]]
        total = ChunkTimes(0.0, 0.0, 0.0, 0.0, 0.0)
        for v in mine:
            total = total + per_stage[schedule.model_stage[v]].scaled(counts[v])
        n = sum(counts[v] for v in mine)
        work.append(total.F + total.B + 2 * total.a2a + total.zero3)
        average.append(total.scaled(1.0 / n))
    r = max(range(schedule.n_ranks), key=work.__getitem__)
    return average[r], work[r] / (sum(work) / len(work))


def _estimated_stages(config: ModelConfig, layout: Layout, spec: GPUSpec, a: Assumptions, splits: list[range],
                      stages: list[PartCost], a2a_per_layer: float) -> list[ChunkTimes]:
    """F, B, W, all-to-all and ZeRO-3 traffic of each model stage from its FLOPs and bytes."""
    out = []
    for s, (layers, cost) in enumerate(zip(splits, stages)):
        traffic = sum(intermediate_bytes(config, config.is_moe_layer(i)) for i in layers)
        if s == len(stages) - 1:
            traffic += head_activations(config, frozenset())
        t = chunk_compute(cost, traffic, layout, spec, a)
        z = zero3_chunk_seconds(cost, layout, spec, a) if layout.zero == 3 else 0.0
        out.append(ChunkTimes(t.F, t.B, t.W, cost.moe_layers * a2a_per_layer, z))
    return out


def plan(model: ModelConfig | str, *, gpu: str | GPUSpec = "h800", gpus: int, pp: int = 1, ep: int = 1,
         gpus_per_node: int = 8, schedule: str = "1f1b", seq_len: int = 4096, global_batch: int | None = None,
         micro_batch: int = 1, fp8: bool = False, zero: int = 1, recompute: str | frozenset[str] | None = None,
         assumptions: Assumptions = DEFAULT, measured: list[ChunkTimes] | None = None,
         measured_on: str = "cpu", name: str | None = None) -> Plan:
    """Plan ``model`` (a preset name or a config) on ``gpus`` GPUs of kind ``gpu``; raises
    :class:`~dsv3.plan.layout.PlanError` for impossible layouts. ``measured``: F, B, W per model stage from
    :func:`dsv3.plan.measure.measure_stages` instead of the FLOP estimate (no communication then)."""
    config = preset(model) if isinstance(model, str) else model
    name = name or (model if isinstance(model, str) else "custom config")
    spec = gpu if isinstance(gpu, GPUSpec) else gpu_spec(gpu)
    if isinstance(recompute, str) or recompute is None:
        recompute = parse_recompute(recompute)
    layout = make_layout(config, gpus=gpus, pp=pp, ep=ep, gpus_per_node=gpus_per_node, schedule=schedule,
                         seq_len=seq_len, global_batch=global_batch, micro_batch=micro_batch, zero=zero, fp8=fp8,
                         recompute=recompute)
    sched = layout.build_schedule()
    splits = split_layers(config, layout.n_model_stages)
    parts = model_parts(config, seq_len)
    stages = stage_costs(parts, splits)
    memory = estimate_memory(config, layout, sched, stages, stage_activation_bytes(config, splits, fp8, recompute),
                             max(parts.blocks, key=lambda b: b.params), spec.hbm_bytes, assumptions)

    dispatch, combine = all_to_all_seconds(config, layout, spec, assumptions)
    if measured is not None:
        if len(measured) != len(stages):
            raise ValueError(f"measured costs for {len(measured)} stages, the layout has {len(stages)}")
        per_stage, source, dispatch, combine = measured, f"measured on {measured_on}", 0.0, 0.0
    else:
        per_stage = _estimated_stages(config, layout, spec, assumptions, splits, stages, dispatch + combine)
        source = "estimated"
    chunk, imbalance = _busiest_rank(sched, per_stage)

    # a lone chunk exposes its all-to-all; ZeRO-3 gathers are prefetched behind computation (1/3 forward, 2/3 back)
    f = max(chunk.F, chunk.zero3 / 3) + chunk.a2a
    b = max(chunk.B, 2 * chunk.zero3 / 3) + chunk.a2a
    fb = max(chunk.F + chunk.B, 2 * chunk.a2a + chunk.zero3)
    p2p = 0.0 if measured is not None else p2p_seconds(config, layout, spec, assumptions)
    costs = Costs(F=f, B=b, W=chunk.W, FB=fb, p2p=p2p)
    timeline = simulate(sched, costs)
    n_stages = layout.n_model_stages
    table2 = table2_bubble(layout.schedule, n_stages, costs) if layout.pp > 1 else 0.0

    moe_block = next((b for b in parts.blocks if b.moe_layers), None)
    if moe_block is not None and measured is None:
        ew = intermediate_bytes(config, True)
        moe_compute = chunk_compute(moe_block, ew, layout, spec, assumptions).F
    else:
        moe_compute = 0.0
    a2a = dispatch + combine
    overlapped = layout.schedule in ("dualpipe", "dualpipev") and layout.pp > 1
    hidden = a2a == 0.0 or (overlapped and 2 * chunk.a2a + chunk.zero3 <= chunk.F + chunk.B)

    if measured is None:
        held = [_held_params(sched, r, stages, layout) for r in range(layout.pp)]
        dp_sync = max(dp_sync_seconds(d, e, layout, spec, assumptions) for d, e in held)
        shards = [d / layout.dp + e / (layout.dp // layout.ep) if layout.zero else d + e for d, e in held]
        opt = optimizer_seconds(max(shards), spec, assumptions)
    else:
        dp_sync = opt = 0.0
    step = timeline.makespan + (dp_sync if assumptions.expose_dp_sync else 0.0) + opt
    timing = Timing(source, f, b, chunk.W, fb, p2p, moe_compute, a2a, hidden, timeline.makespan, timeline.bubble,
                    table2, timeline.bubble_fraction, imbalance, dp_sync, opt, step)

    main = _main_forward_flops(config, seq_len)
    model_flops = 3.0 * (main + parts.mtp.forward_flops)
    tokens_per_s = layout.tokens_per_step / step / layout.gpus
    tflops = tokens_per_s * model_flops / 1e12
    return Plan(
        model=name, gpu=spec, layout=layout, layers_per_stage=[len(s) for s in splits], memory=memory, timing=timing,
        memory_per_gpu_bytes=memory.total_bytes, fits=memory.fits, bubble_fraction=timeline.bubble_fraction,
        tokens_per_second_per_gpu=tokens_per_s, model_flops_per_token=model_flops, model_tflops_per_gpu=tflops,
        mfu=None if measured is not None else tflops * 1e12 / spec.bf16_flops,
        gpu_hours_per_trillion_tokens=1e12 / tokens_per_s / 3600, assumptions=assumptions,
        measured_stages=measured, timeline=timeline,
    )


def _held_params(schedule: Schedule, rank: int, stages: list[PartCost], layout: Layout) -> tuple[float, float]:
    """(replicated, expert) parameters on one GPU of pipeline rank ``rank`` (experts split over EP)."""
    from ..pipeline.stages import held_model_stages

    held = held_model_stages(schedule, rank)
    return (float(sum(stages[s].dense_params for s in held)),
            sum(stages[s].expert_params for s in held) / layout.ep)
