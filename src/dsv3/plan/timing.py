"""Time of a pipeline chunk from FLOPs and bytes: F, B, W and F&B of a stage, the MoE all-to-all, the pipeline's
point-to-point transfers, the data-parallel gradient synchronisation and the optimiser step.

* Compute: GEMM FLOPs at the dense peak of their precision (FP8 for Linear and expert GEMMs under ``--fp8``, BF16
  for the gate and the head), the attention core at the BF16 peak, and the memory-bound kernels as passes over
  the block's intermediate tensors at the HBM bandwidth, each at its achievable fraction
  (:mod:`dsv3.plan.assumptions`). Backward = 2 x forward (2.5 x for the attention core, whose backward
  recomputes the scores), plus the recomputed MLA up-projections (§3.2.3); W, the weight-gradient part of the
  backward, is the weight-gradient GEMMs: as many FLOPs as the forward GEMMs (half the backward of the Linear
  layers; the attention core has no weights).
* All-to-all per MoE layer and micro-batch (§3.2.2): each token goes to ``top-k`` experts on at most
  ``max_nodes_per_token`` nodes, once per node over InfiniBand, then over NVLink to the expert's GPU; dispatch in
  FP8 (BF16 without ``--fp8``), combine in BF16 (§3.3.2); IB and NVLink run at once, the slower one decides.
  The backward moves the same bytes (the combine's gradient is a dispatch and vice versa).
* DualPipe / DualPipeV overlap the all-to-all of one chunk with the computation of the other in an F&B pair:
  F&B = max(compute F + B on the SMs left by the communication kernels, all-to-all of both); lone F and B chunks
  (warm-up, cool-down) expose theirs. 1F1B overlaps nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from .assumptions import Assumptions
from .gpus import GPUSpec
from .layout import Layout
from .memory import BF16, FP8, FP8_WEIGHT, FP32
from .model_costs import PartCost


ATTENTION_BACKWARD = 2.5
"""Attention-core backward FLOPs over its forward's: FlashAttention's backward runs five matmuls (QK^T again, dV, dP,
dQ, dK) against the forward's two."""


@dataclass(frozen=True)
class ChunkTimes:
    """Seconds one stage spends on one micro-batch."""

    F: float
    """Forward computation."""
    B: float
    """Full backward computation (input and weight gradients, recomputation included)."""
    W: float
    """Of B, the weight-gradient GEMMs (zero-bubble schedules run them later)."""
    a2a: float
    """All-to-all of its MoE layers in the forward (the backward moves as much)."""
    zero3: float = 0.0
    """ZeRO-3 parameter gathers and gradient reduce-scatters of the chunk (forward + backward)."""

    def scaled(self, w: float) -> "ChunkTimes":
        return ChunkTimes(*(w * v for v in asdict(self).values()))

    def __add__(self, other: "ChunkTimes") -> "ChunkTimes":
        return ChunkTimes(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


def compute_share(layout: Layout, gpu: GPUSpec, a: Assumptions) -> float:
    """Share of the SMs left to computation: all but the communication kernels' while DualPipe overlaps the
    all-to-all (§3.2.2: 20 of 132), all otherwise."""
    if layout.ep > 1 and layout.schedule in ("dualpipe", "dualpipev") and layout.pp > 1:
        return (gpu.sms - a.comm_sms) / gpu.sms
    return 1.0


def chunk_compute(cost: PartCost, elementwise_bytes: float, layout: Layout, gpu: GPUSpec, a: Assumptions
                  ) -> ChunkTimes:
    """F, B, W of a stage whose forward per token is ``cost`` and moves ``elementwise_bytes`` per pass."""
    lowp_peak = gpu.fp8_flops if layout.fp8 else gpu.bf16_flops
    gemm = cost.lowp_flops / (lowp_peak * a.gemm_efficiency) + cost.bf16_flops / (gpu.bf16_flops * a.gemm_efficiency)
    attention = cost.attention_flops / (gpu.bf16_flops * a.attention_efficiency)
    memory = a.elementwise_passes * elementwise_bytes / (gpu.hbm_bandwidth * a.hbm_efficiency)
    forward = gemm + attention + memory
    if layout.recompute == "full":
        recompute = forward
    elif "mla_up" in layout.recompute:
        recompute = cost.up_projection_flops / (lowp_peak * a.gemm_efficiency)
    else:
        recompute = 0.0
    # backward: twice the forward, except the attention core, whose backward (FlashAttention) recomputes the
    # scores: 5 matmuls against the forward's 2
    backward = 2 * (gemm + memory) + ATTENTION_BACKWARD * attention + recompute
    scale = layout.tokens_per_microbatch / compute_share(layout, gpu, a)
    return ChunkTimes(F=forward * scale, B=backward * scale, W=gemm * scale, a2a=0.0)


def all_to_all_seconds(config: ModelConfig, layout: Layout, gpu: GPUSpec, a: Assumptions) -> tuple[float, float]:
    """(dispatch, combine) seconds of one MoE layer for one micro-batch (node-limited routing, §3.2.2)."""
    if layout.ep == 1:
        return 0.0, 0.0
    d, k, ep = config.hidden_size, config.num_experts_per_tok, layout.ep
    nvlink = gpu.nvlink_bandwidth * a.nvlink_efficiency
    network = gpu.network_bandwidth * a.network_efficiency
    per_node = ep // layout.ep_nodes  # GPUs of the group on one node
    times = []
    for elem in (FP8 if layout.fp8 else BF16, BF16):
        if layout.ep_nodes == 1:
            seconds = k * (ep - 1) / ep * d * elem / nvlink
        else:
            m, n = layout.max_nodes_per_token, layout.ep_nodes
            over_ib = m * (n - 1) / n * d * elem  # once per remote node the token reaches
            over_nvlink = k * (per_node - 1) / per_node * d * elem  # forwarded to the expert's GPU in the node
            seconds = max(over_ib / network, over_nvlink / nvlink)
        times.append(seconds * layout.tokens_per_microbatch)
    return times[0], times[1]


def p2p_seconds(config: ModelConfig, layout: Layout, gpu: GPUSpec, a: Assumptions) -> float:
    """One micro-batch's hidden state (BF16) from a pipeline stage to the next."""
    if layout.pp == 1:
        return 0.0
    bandwidth = (gpu.network_bandwidth * a.network_efficiency if layout.pp_spans_nodes
                 else gpu.nvlink_bandwidth * a.nvlink_efficiency)
    return layout.tokens_per_microbatch * config.hidden_size * BF16 / bandwidth


def _link(spans_nodes: bool, gpu: GPUSpec, a: Assumptions) -> float:
    return gpu.network_bandwidth * a.network_efficiency if spans_nodes else gpu.nvlink_bandwidth * a.nvlink_efficiency


def _groups(layout: Layout) -> tuple[int, int]:
    """Ranks that sum the gradients of one dense / one expert parameter: the DP (or DP / EP) replicas, and under
    DualPipe both copies of each stage."""
    copies = 2 if layout.schedule == "dualpipe" else 1
    return layout.dp * copies, layout.dp // layout.ep * copies


def dp_sync_seconds(dense_params: float, expert_params: float, layout: Layout, gpu: GPUSpec, a: Assumptions
                    ) -> float:
    """Gradient reduction (and, under ZeRO-1, the gather of the updated weights) of one GPU's parameters at the
    end of a step; ring algorithms: each GPU sends (n-1)/n of the data per reduce-scatter or all-gather.
    ZeRO-3 does its communication per chunk instead (:func:`zero3_chunk_seconds`)."""
    if layout.zero == 3:
        return 0.0
    n_dense, n_expert = _groups(layout)
    weight = FP8_WEIGHT if layout.fp8 else BF16
    per_param = 2 * a.grad_reduce_bytes if layout.zero == 0 else a.grad_reduce_bytes + weight
    copies_apart = layout.schedule == "dualpipe" and layout.pp_spans_nodes
    seconds = 0.0
    for params, n, spans in ((dense_params, n_dense, layout.dp_spans_nodes or copies_apart),
                             (expert_params, n_expert, layout.expert_dp_spans_nodes or copies_apart)):
        if n > 1:
            seconds += params * per_param * (n - 1) / n / _link(spans, gpu, a)
    return seconds


def zero3_chunk_seconds(cost: PartCost, layout: Layout, gpu: GPUSpec, a: Assumptions) -> float:
    """ZeRO-3 traffic of one chunk of a stage: gather its weights for the forward and again for the backward,
    reduce-scatter its gradients, for each micro-batch."""
    n_dense, n_expert = _groups(layout)
    weight = FP8_WEIGHT if layout.fp8 else BF16
    per_param = 2 * weight + a.grad_reduce_bytes
    seconds = 0.0
    for params, n, spans in ((cost.dense_params, n_dense, layout.dp_spans_nodes),
                             (cost.expert_params / layout.ep, n_expert, layout.expert_dp_spans_nodes)):
        if n > 1:
            seconds += params * per_param * (n - 1) / n / _link(spans, gpu, a)
    return seconds


def optimizer_seconds(params_on_gpu: float, gpu: GPUSpec, a: Assumptions) -> float:
    """AdamW over this GPU's shard: read the FP32 gradient, read and write the FP32 master weight and the two BF16
    moments, write the compute copy: memory-bound."""
    bytes_per_param = FP32 + 2 * FP32 + 2 * 2 * BF16 + BF16
    return params_on_gpu * bytes_per_param / (gpu.hbm_bandwidth * a.hbm_efficiency)
