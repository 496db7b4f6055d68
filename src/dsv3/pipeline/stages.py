"""The model cut into pipeline stages at block boundaries (report §3.2.1, §3.2.3).

Stage 0 holds the embedding, the last stage the final norm, the output head and the MTP modules, and each stage a
run of consecutive decoder blocks, balanced by their cost (matmul FLOPs per token: a dense block, an MoE block
and the head weigh differently). A :class:`PipelineStage` runs its piece of the model's own modules, so the
weights stay the model's (and are named as in the model): a rank that holds the first and the last stage (the
V of DualPipeV, both ends under DualPipe) shares the embedding and head between them physically. A rank keeps
only what its stages need (:func:`prune_to_stages`); 1F1B's last rank keeps a copy of the embedding for the MTP
module, whose gradient is summed with rank 0's (:func:`replicated_parameters`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..model import DeepSeekV3
from .schedule import Schedule


def block_costs(config: ModelConfig) -> list[float]:
    """Matmul multiply-adds per token of each main-model block (attention projections + FFN as activated)."""
    d, h = config.hidden_size, config.num_attention_heads
    q = d * h * config.qk_head_dim if config.q_lora_rank is None else \
        d * config.q_lora_rank + config.q_lora_rank * h * config.qk_head_dim
    kv = d * (config.kv_lora_rank + config.qk_rope_head_dim) + \
        config.kv_lora_rank * h * (config.qk_nope_head_dim + config.v_head_dim)
    attention = q + kv + h * config.v_head_dim * d
    dense = 3 * d * config.intermediate_size
    moe = 3 * d * config.moe_intermediate_size * (config.num_experts_per_tok + config.n_shared_experts) \
        + d * config.n_routed_experts
    return [attention + (moe if config.is_moe_layer(i) else dense) for i in range(config.num_hidden_layers)]


def split_layers(config: ModelConfig, n_stages: int) -> list[range]:
    """Consecutive blocks per model stage, minimising the costliest stage (the head and the MTP modules weigh
    on the last stage); every stage gets at least one block."""
    n = config.num_hidden_layers
    if n < n_stages:
        raise ValueError(f"{n_stages} pipeline stages need at least as many layers, the model has {n}: "
                         f"use fewer stages or more layers (--set model.num_hidden_layers=...)")
    costs = block_costs(config)
    head = config.hidden_size * config.vocab_size
    last_extra = head + config.num_nextn_predict_layers * (max(costs) + 2 * config.hidden_size ** 2 + head)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least possible max stage cost for layers [0, i) in k stages; cut[k][i] the last cut
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = prefix[i] - prefix[j] + (last_extra if k == n_stages and i == n else 0.0)
                value = max(best[k - 1][j], cost)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(n_stages, 0, -1):
        bounds.append(range(cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


class PipelineStage(nn.Module):
    """Model stage ``index`` of ``n_stages``: runs the model's own modules for its part of the forward.

    Input: the token batch (its inputs are read at stage 0, its tokens by the MTP modules at the last) and, after
    stage 0, the hidden state from the stage before. Output: the hidden state, or at the last stage the logits of
    the main head followed by each MTP depth's."""

    def __init__(self, model: DeepSeekV3, index: int, n_stages: int, layers: range):
        super().__init__()
        self.model = [model]  # a list: the stage uses the model's modules without registering them twice
        self.index, self.n_stages, self.layers = index, n_stages, layers

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1

    def forward(self, x: torch.Tensor | None, batch, with_mtp: bool) -> torch.Tensor | list[torch.Tensor]:
        model = self.model[0]
        cos, sin, mask = model.position_inputs(batch.seq_len, batch.tokens.device, batch.input_doc_ids)
        h = model.embed_tokens(batch.inputs) if self.first else x
        for i in self.layers:
            h = model.layers[i](h, cos, sin, mask)
        if not self.last:
            return h
        h = model.norm(h)
        logits = [model.lm_head(h)]
        if with_mtp and len(model.mtp):
            logits += model.mtp_forward(h, batch.tokens, cos, sin, mask)
        return logits

    def extra_repr(self) -> str:
        parts = (["embedding"] if self.first else []) + [f"layers {self.layers.start}-{self.layers.stop - 1}"]
        return ", ".join(parts + (["norm, head, MTP"] if self.last else []))


def held_model_stages(schedule: Schedule, rank: int) -> list[int]:
    """The model stages a pipeline rank runs (two under DualPipe and DualPipeV)."""
    return sorted({schedule.model_stage[v] for v in schedule.stages_of(rank)})


def prune_to_stages(model: DeepSeekV3, splits: list[range], held: list[int], needs_embedding: bool) -> None:
    """Drop, in place, every module this rank's model stages do not use (they become empty ``nn.Identity``), so
    that its parameters, optimiser and checkpoint shards are only its own. ``needs_embedding``: keep the
    embedding beyond stage 0 (the MTP modules of the last stage embed tokens)."""
    keep = {i for s in held for i in splits[s]}
    last = len(splits) - 1
    for i in range(len(model.layers)):
        if i not in keep:
            model.layers[i] = nn.Identity()
    if 0 not in held and not (last in held and needs_embedding):
        model.embed_tokens = nn.Identity()
    if last not in held:
        model.norm, model.lm_head, model.mtp = nn.Identity(), nn.Identity(), nn.ModuleList()


def replicated_parameters(schedule: Schedule, rank: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Parameter-name prefixes this pipeline rank holds together with other pipeline ranks, and those ranks
    (sorted): under DualPipe every stage (its two copies), and the embedding when two ranks hold it (1F1B's last
    rank, for the MTP modules). Their gradients are summed over the holders after each step."""
    p = schedule.n_ranks
    held = held_model_stages(schedule, rank)
    last = schedule.n_model_stages - 1
    out: dict[str, tuple[int, ...]] = {}
    if schedule.name == "dualpipe":
        out[""] = tuple(sorted({rank, p - 1 - rank}))  # everything
        return out
    if depth and schedule.name == "1f1b" and p > 1 and (0 in held or last in held):
        out["embed_tokens."] = (0, p - 1)
    return out
