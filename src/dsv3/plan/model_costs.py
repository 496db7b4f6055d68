"""What each piece of the model weighs: parameters (replicated or expert) and forward FLOPs per token.

The pieces are those a pipeline stage is made of (:mod:`dsv3.pipeline.stages`): the embedding, decoder blocks
(dense or MoE), the final norm with the output head, and the MTP modules (each a block plus its projection, run
through the shared head). Parameters are counted on the meta device from the real modules, one block of each
kind, so they match :func:`dsv3.info.model_stats` exactly; FLOPs follow its convention: 2 x activated matmul
parameters plus causal attention ``heads x seq x (d_qk + d_v)`` per token and layer.

FLOPs are split by the precision the report runs them in (§3.3.1): the GEMMs of Linear layers and experts take
FP8 under ``--fp8``; the MoE gate and the output head stay BF16; the attention core is BF16.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..config import ModelConfig
from ..model.moe import Experts, Gate
from ..model.mtp import MTPModule
from ..model.transformer_block import Block


@dataclass(frozen=True)
class PartCost:
    """Parameters and per-token forward work of a piece of the model; pieces add up into a stage."""

    dense_params: int = 0
    """Parameters every expert-parallel rank holds (all but the routed experts)."""
    expert_params: int = 0
    """Routed experts' parameters (split over the expert-parallel ranks)."""
    gemm_params: int = 0
    """Of all parameters, the weights of Linear / expert GEMMs (FP8 under ``--fp8``, §3.3)."""
    lowp_flops: float = 0.0
    """Forward FLOPs per token in those GEMMs (activated experts only)."""
    bf16_flops: float = 0.0
    """Forward FLOPs per token in GEMMs kept in BF16: the MoE gate and the output head."""
    attention_flops: float = 0.0
    """Forward FLOPs per token of the attention core (QK^T and PV), causal, at the planned sequence length."""
    up_projection_flops: float = 0.0
    """Forward FLOPs per token of the MLA up-projections (``q_b_proj``, ``kv_b_proj``): recomputed in the
    backward when asked (§3.2.3)."""
    blocks: int = 0
    """Decoder blocks (main model and MTP)."""
    moe_layers: int = 0
    """Of these, MoE blocks (one all-to-all dispatch and combine each)."""

    def __add__(self, other: "PartCost") -> "PartCost":
        return PartCost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def forward_flops(self) -> float:
        return self.lowp_flops + self.bf16_flops + self.attention_flops


def _count(module: torch.nn.Module, config: ModelConfig) -> PartCost:
    """Parameters and GEMM FLOPs/token of a module built on the meta device (attention core not included)."""
    dense = expert = gemm = 0
    lowp = bf16 = 0.0
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, Experts):
            n = sub.gate_up_proj.numel() + sub.down_proj.numel()
            expert += n
            gemm += n
            lowp += 2.0 * n * config.num_experts_per_tok / sub.n_experts
            seen.update(id(p) for p in sub.parameters())
        elif isinstance(sub, Gate):
            dense += sub.weight.numel()
            bf16 += 2.0 * sub.weight.numel()
            seen.add(id(sub.weight))
    for p in module.parameters():
        if id(p) in seen:
            continue
        dense += p.numel()
        if p.dim() == 2:  # a Linear weight; 1-D tensors are norm scales
            gemm += p.numel()
            lowp += 2.0 * p.numel()
    return PartCost(dense_params=dense, expert_params=expert, gemm_params=gemm, lowp_flops=lowp, bf16_flops=bf16)


def _attention(config: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(attention-core FLOPs, up-projection FLOPs) per token of one MLA layer."""
    h = config.num_attention_heads
    core = float(h * seq_len * (config.qk_head_dim + config.v_head_dim))  # 2 x h x (seq/2) x (d_qk + d_v)
    up = config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    if config.q_lora_rank is not None:
        up += config.q_lora_rank * h * config.qk_head_dim
    return core, 2.0 * up


def _block(config: ModelConfig, layer: int, seq_len: int, mtp: bool = False) -> PartCost:
    """One block built on the meta device (an MTP module's own layers when ``mtp``)."""
    with torch.device("meta"):
        module = MTPModule(config, layer) if mtp else Block(config, layer)
    core, up = _attention(config, seq_len)
    return _count(module, config) + PartCost(attention_flops=core, up_projection_flops=up, blocks=1,
                                             moe_layers=int(config.is_moe_layer(layer)))


@dataclass(frozen=True)
class ModelParts:
    """The cost of each kind of piece of one configuration at one sequence length."""

    blocks: tuple[PartCost, ...]
    """Per main-model block (dense and MoE blocks differ)."""
    embedding: PartCost
    """The token embedding: a lookup, no FLOPs."""
    head: PartCost
    """Final RMSNorm and output head (a BF16 GEMM, §3.3.1)."""
    mtp: PartCost
    """All MTP modules (§2.2): each a block, its norms and ``eh_proj``, and a pass through the shared head (its
    FLOPs; the head's parameters are the main model's)."""

    def main_model(self) -> PartCost:
        """Embedding, blocks and head: what :func:`dsv3.info.model_stats` counts."""
        total = self.embedding + self.head
        for b in self.blocks:
            total = total + b
        return total


def model_parts(config: ModelConfig, seq_len: int) -> ModelParts:
    """Count every piece of ``config`` (one meta-device block per kind: milliseconds even for 671B)."""
    kinds: dict[bool, PartCost] = {}
    for i in range(config.num_hidden_layers):
        moe = config.is_moe_layer(i)
        if moe not in kinds:
            kinds[moe] = _block(config, i, seq_len)
    blocks = tuple(kinds[config.is_moe_layer(i)] for i in range(config.num_hidden_layers))
    d, v = config.hidden_size, config.vocab_size
    head = PartCost(dense_params=d + d * v, bf16_flops=2.0 * d * v)
    mtp = PartCost()
    for k in range(config.num_nextn_predict_layers):
        mtp = mtp + _block(config, config.num_hidden_layers + k, seq_len, mtp=True) + \
            PartCost(bf16_flops=2.0 * d * v)
    return ModelParts(blocks, PartCost(dense_params=v * d), head, mtp)


def stage_costs(parts: ModelParts, splits: list[range]) -> list[PartCost]:
    """Cost of each model stage of a pipeline cut (:func:`dsv3.pipeline.stages.split_layers`): its blocks, the
    embedding on the first, the head and the MTP modules on the last (§3.2.3)."""
    out = []
    for s, layers in enumerate(splits):
        cost = PartCost()
        for i in layers:
            cost = cost + parts.blocks[i]
        if s == 0:
            cost = cost + parts.embedding
        if s == len(splits) - 1:
            cost = cost + parts.head + parts.mtp
        out.append(cost)
    return out
