"""A cluster layout: how the GPUs are split into pipeline, data- and expert-parallel ranks, and the checks that
refuse impossible ones with the numbers that make them impossible.

Ranks are ordered pipeline-outermost, as in the report's cluster (§3.2): rank = pipeline rank x DP + data-parallel
rank, so the DP ranks of one pipeline stage are neighbours and fill nodes; expert parallelism borrows its ranks
from data parallelism (an EP group is E consecutive DP ranks, the routed experts split over them), so EP64 on
nodes of 8 spans 8 nodes, as in the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..pipeline import SCHEDULES, Schedule, build_schedule

RECOMPUTE_CHOICES = ("norm", "mla_up", "swiglu")
"""What can be recomputed in the backward instead of stored: RMSNorm outputs and the MLA up-projections (report
§3.2.3), the SwiGLU outputs (§3.3.3: its input is cached, its output recomputed)."""
REPORT_RECOMPUTE = frozenset(RECOMPUTE_CHOICES)


class PlanError(ValueError):
    """An impossible layout; the message names the numbers."""


@dataclass(frozen=True)
class Layout:
    """Where every rank sits and what one step runs."""

    gpus: int
    """GPUs in all."""
    gpus_per_node: int
    """GPUs sharing one NVLink domain."""
    pp: int
    """Pipeline-parallel ranks."""
    dp: int
    """Data-parallel ranks per pipeline stage (gpus / pp)."""
    ep: int
    """Expert-parallel ranks (borrowed from the DP ranks: divides dp)."""
    schedule: str
    """Pipeline schedule: ``1f1b``, ``dualpipev``, ``dualpipe`` (``1f1b`` when pp = 1: the schedule is ignored)."""
    seq_len: int
    """Tokens per sequence."""
    global_batch: int
    """Sequences per optimiser step, all ranks together."""
    micro_batch: int
    """Sequences per micro-batch (one forward chunk)."""
    n_microbatches: int
    """Micro-batches each pipeline runs per step: global_batch / (dp x micro_batch)."""
    zero: int
    """ZeRO stage over the data-parallel ranks: 0 nothing sharded, 1 optimiser states, 3 everything."""
    fp8: bool
    """FP8 GEMMs, FP8 activation caching and FP8 dispatch (report §3.3)."""
    recompute: frozenset[str] | str
    """Recomputed in the backward: a subset of :data:`RECOMPUTE_CHOICES`, or ``"full"`` (every block)."""
    ep_nodes: int
    """Nodes one expert-parallel group spans (worst group)."""
    max_nodes_per_token: int
    """Nodes a token's experts may sit on: node-limited routing (§2.1.2: at most 4 in the report)."""
    dp_spans_nodes: bool
    """The data-parallel group of a stage reaches beyond one node (its reduction goes over the network)."""
    expert_dp_spans_nodes: bool
    """The replicas of one expert shard (dp / ep of them) sit on different nodes."""
    pp_spans_nodes: bool
    """Some pipeline neighbours sit on different nodes (activations go over the network)."""

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def n_model_stages(self) -> int:
        """Stages the model is cut into: 2 x pp for DualPipeV (its V), pp otherwise."""
        return 2 * self.pp if self.schedule == "dualpipev" else self.pp

    def build_schedule(self) -> Schedule:
        return build_schedule(self.schedule, self.pp, self.n_microbatches)

    def to_json(self) -> dict:
        d = asdict(self)
        d["recompute"] = self.recompute if isinstance(self.recompute, str) else sorted(self.recompute)
        return d


def parse_recompute(text: str | None) -> frozenset[str] | str:
    """``report`` (default: RMSNorm, MLA up-projections, SwiGLU), ``none``, ``full``, or a comma list of
    :data:`RECOMPUTE_CHOICES`."""
    if text is None or text == "report":
        return REPORT_RECOMPUTE
    if text in ("none", ""):
        return frozenset()
    if text == "full":
        return "full"
    parts = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = parts - set(RECOMPUTE_CHOICES)
    if unknown:
        raise PlanError(f"--recompute: unknown {sorted(unknown)}; use report, none, full or a comma list of "
                        f"{', '.join(RECOMPUTE_CHOICES)}")
    return parts


def _nodes_touched(ranks: list[int], per_node: int) -> int:
    return len({r // per_node for r in ranks})


def make_layout(config: ModelConfig, *, gpus: int, pp: int = 1, ep: int = 1, gpus_per_node: int = 8,
                schedule: str = "1f1b", seq_len: int = 4096, global_batch: int | None = None, micro_batch: int = 1,
                zero: int = 1, fp8: bool = False, recompute: frozenset[str] | str | None = None) -> Layout:
    """Check a layout against the model and the schedule; :class:`PlanError` naming the numbers if impossible.

    ``global_batch`` defaults to 4 x pp micro-batches per pipeline (1 without a pipeline)."""
    for name, value in (("--gpus", gpus), ("--pp", pp), ("--ep", ep), ("--gpus-per-node", gpus_per_node),
                        ("--seq-len", seq_len), ("--micro-batch", micro_batch)):
        if value < 1:
            raise PlanError(f"{name} must be >= 1, got {value}")
    if zero not in (0, 1, 3):
        raise PlanError(f"--zero must be 0, 1 or 3, got {zero}")
    if schedule not in SCHEDULES:
        raise PlanError(f"--pp-schedule must be one of {SCHEDULES}, got {schedule!r}")
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise PlanError(f"--gpus {gpus} is not a whole number of nodes of {gpus_per_node} GPUs")
    if gpus % pp:
        raise PlanError(f"--gpus {gpus} is not a multiple of --pp {pp}: data parallelism needs gpus / pp ranks")
    dp = gpus // pp
    if ep > 1 and config.n_routed_experts == 0:
        raise PlanError(f"--ep {ep}: the model has no routed experts to split")
    if dp % ep:
        raise PlanError(f"EP {ep} must divide the data-parallel ranks DP = gpus / PP = {gpus} / {pp} = {dp} "
                        f"(expert parallelism borrows its ranks from data parallelism)")
    if config.n_routed_experts and config.n_routed_experts % ep:
        raise PlanError(f"EP {ep} must divide the {config.n_routed_experts} routed experts of each MoE layer")
    if pp > config.num_hidden_layers:
        raise PlanError(f"PP {pp} needs at least {pp} layers, the model has {config.num_hidden_layers}")
    if pp == 1:
        schedule = "1f1b"  # no pipeline: one rank runs forward then backward of each micro-batch
    if global_batch is None:
        global_batch = dp * micro_batch * (1 if pp == 1 else 4 * pp)
    if global_batch < 1 or global_batch % (dp * micro_batch):
        raise PlanError(f"global batch {global_batch} sequences is not a multiple of DP x micro-batch = "
                        f"{dp} x {micro_batch} = {dp * micro_batch}")
    n_micro = global_batch // (dp * micro_batch)
    try:
        build_schedule(schedule, pp, n_micro)
    except ValueError as e:
        raise PlanError(f"global batch {global_batch} / (DP {dp} x micro-batch {micro_batch}) = {n_micro} "
                        f"micro-batches per pipeline and step: {e}") from None
    if schedule == "dualpipev" and 2 * pp > config.num_hidden_layers:
        raise PlanError(f"dualpipev cuts the model into 2 x PP = {2 * pp} stages, the model has "
                        f"{config.num_hidden_layers} layers")

    per_node = gpus_per_node
    stages = [list(range(s * dp, (s + 1) * dp)) for s in range(pp)]  # ranks are stage-major
    ep_nodes = max(_nodes_touched(list(range(g, g + ep)), per_node) for g in range(0, gpus, ep))
    k = config.num_experts_per_tok
    # node-limited routing: a token reaches topk_group groups; a group spans ceil(ep_nodes / n_group) nodes
    limit = config.topk_group * math.ceil(ep_nodes / config.n_group) if config.n_group > 1 else k
    max_nodes = min(ep_nodes, k, limit) if ep > 1 else 1
    dp_spans = any(_nodes_touched(ranks, per_node) > 1 for ranks in stages)
    replicas_span = any(_nodes_touched(ranks[e::ep], per_node) > 1 for ranks in stages for e in range(ep))
    pp_spans = any(a // per_node != b // per_node for s in range(pp - 1) for a, b in zip(stages[s], stages[s + 1]))
    return Layout(
        gpus=gpus, gpus_per_node=gpus_per_node, pp=pp, dp=dp, ep=ep, schedule=schedule, seq_len=seq_len,
        global_batch=global_batch, micro_batch=micro_batch, n_microbatches=n_micro, zero=zero, fp8=fp8,
        recompute=REPORT_RECOMPUTE if recompute is None else recompute, ep_nodes=ep_nodes,
        max_nodes_per_token=max_nodes, dp_spans_nodes=dp_spans, expert_dp_spans_nodes=replicas_span,
        pp_spans_nodes=pp_spans,
    )
