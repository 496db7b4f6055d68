"""Memory per GPU: weights, gradients and optimiser states by ZeRO stage, and activations at the schedule's peak.

Bytes per parameter follow the report (§3.3.3): GEMM weights in BF16, or FP8 (+ one FP32 scale per 128x128
block) under ``--fp8``, other weights (embedding, head, gate, norms) BF16; gradients accumulated in FP32; FP32
master weights and two BF16 AdamW moments. ZeRO-1 shards the optimiser states over the data-parallel ranks
that hold the same parameters (DP for replicated weights, DP / EP for routed experts); ZeRO-3 shards weights and
gradients too and gathers two blocks at a time.

Activations are those a block keeps for its backward (:func:`block_activations`, per token), with the report's
choices: Linear and SwiGLU inputs cached in FP8 under ``--fp8`` (§3.3.3), RMSNorm outputs and the MLA
up-projections recomputed (§3.2.3), the SwiGLU output recomputed from its input. The schedule decides how many
micro-batches are in flight on each rank: :func:`peak_in_flight` replays its action list (Table 2's PP for 1F1B
and PP + 1 for DualPipe come out of it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..pipeline import Schedule, flat_actions
from .assumptions import Assumptions
from .layout import Layout
from .model_costs import PartCost

BF16, FP32 = 2.0, 4.0
FP8 = 1.0 + 4.0 / 128  # E4M3 and one FP32 scale per 1x128 tile (§3.3.2)
FP8_WEIGHT = 1.0 + 4.0 / (128 * 128)  # one FP32 scale per 128x128 block


def block_activations(config: ModelConfig, moe: bool, fp8: bool, recompute: frozenset[str] | str
                      ) -> list[tuple[str, float]]:
    """(tensor, bytes per token) a decoder block keeps for its backward.

    Under ``recompute="full"`` only the block's input stays (the rest is rebuilt in the backward). The gate's
    weights multiply the routed outputs; their gradient needs the expert outputs, which we take as recomputed
    from the cached SwiGLU inputs (the combine keeps nothing else)."""
    d, h = config.hidden_size, config.num_attention_heads
    if recompute == "full":
        return [("block input", d * BF16)]
    lin = FP8 if fp8 else BF16  # inputs of FP8 GEMMs are cached in FP8 (§3.3.3)
    items: list[tuple[str, float, str | None]] = [
        ("block input (RMSNorm backward)", d * BF16, None),
        ("attention RMSNorm output", d * lin, "norm"),
    ]
    if config.q_lora_rank is not None:
        items += [("c_Q", config.q_lora_rank * BF16, None),
                  ("RMSNorm(c_Q)", config.q_lora_rank * lin, "norm"),
                  ("q (up-projected)", h * config.qk_head_dim * BF16, "mla_up")]
    else:
        items += [("q", h * config.qk_head_dim * BF16, None)]
    items += [
        ("c_KV and k_R", (config.kv_lora_rank + config.qk_rope_head_dim) * BF16, None),
        ("RMSNorm(c_KV)", config.kv_lora_rank * lin, "norm"),
        ("k, v (up-projected)", h * (config.qk_head_dim + config.v_head_dim) * BF16, "mla_up"),
        ("attention output", h * config.v_head_dim * BF16, None),
        ("softmax log-sum-exp", h * FP32, None),
        ("FFN input (RMSNorm backward)", d * BF16, None),
        ("FFN RMSNorm output", d * lin, "norm"),
    ]
    if moe:
        k, inter = config.num_experts_per_tok, config.moe_intermediate_size
        shared = config.n_shared_experts * inter
        items += [
            ("gate scores and weights", (config.n_routed_experts + k) * FP32, None),
            ("routed expert inputs (on the expert's rank)", k * d * lin, None),
            ("routed SwiGLU inputs", k * 2 * inter * lin, None),
            ("routed SwiGLU outputs", k * inter * lin, "swiglu"),
        ]
        if shared:
            items += [("shared SwiGLU inputs", 2 * shared * lin, None),
                      ("shared SwiGLU outputs", shared * lin, "swiglu")]
    else:
        inter = config.intermediate_size
        items += [("SwiGLU inputs", 2 * inter * lin, None), ("SwiGLU outputs", inter * lin, "swiglu")]
    return [(name, size) for name, size, tag in items if tag is None or tag not in recompute]


def head_activations(config: ModelConfig, recompute: frozenset[str] | str) -> float:
    """Bytes per token the final norm, the output head and the MTP modules keep: the head's input and BF16
    logits for each head pass (main and every MTP depth), and each MTP module's block and projection input."""
    d, v = config.hidden_size, config.vocab_size
    norm_out = 0.0 if recompute == "full" or "norm" in recompute else d * BF16
    one_head = d * BF16 + norm_out + v * BF16
    depth = config.num_nextn_predict_layers
    mtp_block = sum(b for _, b in block_activations(config, config.is_moe_layer(config.num_hidden_layers),
                                                    False, recompute)) if depth else 0.0
    # embedding and hidden state into the MTP norms, then the projection's input
    mtp_own = 2 * d * BF16 + (0.0 if recompute == "full" or "norm" in recompute else 2 * d * BF16)
    return one_head * (1 + depth) + depth * (mtp_block + mtp_own)


def intermediate_bytes(config: ModelConfig, moe: bool) -> float:
    """Bytes per token of every intermediate tensor of a block in BF16, nothing recomputed: the traffic of its
    memory-bound kernels per pass (:attr:`~dsv3.plan.assumptions.Assumptions.elementwise_passes`)."""
    return sum(b for _, b in block_activations(config, moe, False, frozenset()))


@dataclass(frozen=True)
class InFlight:
    """Activation memory of one pipeline rank over a step."""

    peak_bytes: float
    """The most activation bytes held at once."""
    peak_chunks: int
    """(stage, micro-batch) activations held at that moment."""


def peak_in_flight(schedule: Schedule, rank: int, stage_bytes: list[float]) -> InFlight:
    """Replay ``rank``'s actions in order: a forward adds its stage's activations, a full backward frees them, an
    input-gradient backward keeps them until its weight-gradient chunk (which needs the layers' inputs). In an
    overlapped pair the forward's activations count before the backward frees its own."""
    live, chunks, best = 0.0, 0, InFlight(0.0, 0)
    for step in schedule.steps[rank]:
        for a in flat_actions(step):
            if a.kind == "F":
                live, chunks = live + stage_bytes[a.stage], chunks + 1
                if live > best.peak_bytes:
                    best = InFlight(live, chunks)
            elif a.kind in ("B", "W"):
                live, chunks = live - stage_bytes[a.stage], chunks - 1
    return best


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the pipeline rank that needs the most."""

    weight_bytes: float
    """Weights used by the GEMMs and lookups (BF16; FP8 GEMM weights under ``--fp8``), after ZeRO-3 sharding."""
    gradient_bytes: float
    """FP32 gradient accumulators (sharded under ZeRO-3)."""
    optimizer_bytes: float
    """FP32 master weights and BF16 AdamW moments (sharded under ZeRO >= 1)."""
    activation_bytes: float
    """Activations kept for the backward at the schedule's peak."""
    transient_bytes: float
    """Working set of the chunk being run: one block's un-recomputed activations (or the FP32 logits of the loss),
    plus two gathered blocks under ZeRO-3."""
    runtime_bytes: float
    """CUDA context and communication buffers (an assumption)."""
    total_bytes: float
    """Everything above: the memory this GPU needs."""
    usable_bytes: float
    """HBM less the allocator's headroom."""
    fits: bool
    """total_bytes <= usable_bytes."""
    rank: int
    """The pipeline rank these numbers are for (the one needing the most)."""
    params: int
    """Parameters on that GPU (its stages, routed experts split over EP), before ZeRO sharding."""
    peak_chunks: int
    """Micro-batch activations (of one stage each) in flight at its peak."""
    per_rank_bytes: list[float]
    """total_bytes of every pipeline rank."""

    def to_json(self) -> dict:
        return asdict(self)


def stage_activation_bytes(config: ModelConfig, splits: list[range], fp8: bool,
                           recompute: frozenset[str] | str) -> list[float]:
    """Activation bytes per token each model stage keeps for its backward."""
    per_block = {moe: sum(b for _, b in block_activations(config, moe, fp8, recompute)) for moe in (False, True)}
    out = []
    for s, layers in enumerate(splits):
        total = sum(per_block[config.is_moe_layer(i)] for i in layers)
        if s == len(splits) - 1:
            total += head_activations(config, recompute)
        out.append(total)
    return out


def estimate_memory(config: ModelConfig, layout: Layout, schedule: Schedule, stages: list[PartCost],
                    stage_act: list[float], largest_block: PartCost, hbm_bytes: float,
                    assumptions: Assumptions) -> Memory:
    """Memory of every pipeline rank of ``layout`` (stages: :func:`~dsv3.plan.model_costs.stage_costs`,
    stage_act: :func:`stage_activation_bytes`, largest_block: the block with the most parameters, which ZeRO-3
    gathers); the breakdown is the largest rank's."""
    from ..pipeline.stages import held_model_stages

    tokens = layout.tokens_per_microbatch
    w_gemm = FP8_WEIGHT if layout.fp8 else BF16
    ep, dp = layout.ep, layout.dp
    expert_dp = dp // ep  # ranks holding the same expert shard
    kinds = {config.is_moe_layer(i) for i in range(config.num_hidden_layers)}
    working = max(sum(b for _, b in block_activations(config, moe, layout.fp8, frozenset())) for moe in kinds)
    logits = config.vocab_size * FP32  # the loss's FP32 logits, transient on the last stage
    block_gemm = largest_block.gemm_params - largest_block.expert_params
    per_block_weights = (block_gemm * w_gemm + (largest_block.dense_params - block_gemm) * BF16
                         + largest_block.expert_params / ep * w_gemm)
    act_bytes = [stage_act[schedule.model_stage[v]] * tokens for v in range(len(schedule.rank_of))]
    last = len(stages) - 1
    best: Memory | None = None
    totals = []
    for r in range(layout.pp):
        held = held_model_stages(schedule, r)
        dense = sum(stages[s].dense_params for s in held)
        expert = sum(stages[s].expert_params for s in held) / ep
        dense_gemm = sum(stages[s].gemm_params - stages[s].expert_params for s in held)
        if schedule.name == "1f1b" and layout.pp > 1 and r == layout.pp - 1 and config.num_nextn_predict_layers:
            dense += config.vocab_size * config.hidden_size  # the MTP modules' copy of the embedding
        w_dense = dense_gemm * w_gemm + (dense - dense_gemm) * BF16
        w_expert = expert * w_gemm
        opt_per_param = FP32 + 2 * BF16
        weights, grads = w_dense + w_expert, (dense + expert) * FP32
        optim = (dense + expert) * opt_per_param
        transient = tokens * max(working, logits if last in held else 0.0)
        if layout.zero >= 1:
            optim = dense * opt_per_param / dp + expert * opt_per_param / expert_dp
        if layout.zero == 3:
            weights = w_dense / dp + w_expert / expert_dp
            grads = dense * FP32 / dp + expert * FP32 / expert_dp
            transient += 2 * per_block_weights  # this block's and the prefetched next one's, gathered
        flight = peak_in_flight(schedule, r, act_bytes)
        total = weights + grads + optim + flight.peak_bytes + transient + assumptions.runtime_reserve_bytes
        totals.append(total)
        if best is None or total > best.total_bytes:
            usable = hbm_bytes * (1 - assumptions.allocator_headroom)
            best = Memory(weights, grads, optim, flight.peak_bytes, transient, assumptions.runtime_reserve_bytes,
                          total, usable, total <= usable, r, int(dense + expert), flight.peak_chunks, [])
    assert best is not None
    return Memory(**{**asdict(best), "per_rank_bytes": totals})
