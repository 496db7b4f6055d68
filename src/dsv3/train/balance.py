"""Load balancing of the routed experts (report §2.1.2) and the MaxVio metric.

- Auxiliary-loss-free balancing: after each optimiser step, each expert's bias moves by gamma against its
  load relative to the mean over the global batch (b_i -= gamma if overloaded, += gamma if underloaded).
- Complementary sequence-wise balance loss (eq. 17-20), weight alpha (report: 0.0001).
- Ablation: a conventional (GShard-style) auxiliary loss over the whole batch instead of the bias.
- MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024).
"""

from __future__ import annotations

import torch

from ..model.moe import Gate, RouterStats, sequence_balance_loss


def moe_gates(model: torch.nn.Module) -> list[Gate]:
    """The gates in the order of ``ModelOutput.router_stats``: main layers first, then the MTP blocks."""
    layers = list(model.layers) + list(model.mtp)
    return [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def update_bias(gates: list[Gate], loads: list[torch.Tensor], gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i) for every expert of every gate (loads: (E,) token counts)."""
    if gamma == 0:
        return
    for gate, load in zip(gates, loads, strict=True):
        load = load.float()
        gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's expert loads."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def sequence_wise_loss(stats: list[RouterStats], top_k: int, seq_len: int) -> torch.Tensor:
    """Sum over MoE layers of the sequence-wise balance term (multiply by alpha)."""
    return sum(sequence_balance_loss(s, top_k, seq_len) for s in stats)


def batch_aux_loss(stats: list[RouterStats], top_k: int, seq_len: int) -> torch.Tensor:
    """GShard-style auxiliary loss: the same f_i P_i product computed over the whole batch rather than per
    sequence (ablation baseline of the aux-loss-free method; multiply by its own alpha)."""
    total = 0
    for s in stats:
        n_seq, n_experts = s.seq_counts.shape
        f = s.seq_counts.sum(0) * (n_experts / (top_k * seq_len * n_seq))
        total = total + (f * s.seq_probs.mean(0)).sum()
    return total
