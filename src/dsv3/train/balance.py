"""Load balancing of the routed experts in training (report §2.1.2) and the MaxVio metric.

- Auxiliary-loss-free balancing: the gates count the tokens they route during forward; once per optimiser step
  the counts of every data-parallel rank are summed (the global batch, the report's "each training step") and
  each expert's bias moves by gamma against its load: b_i -= gamma if overloaded, += gamma if underloaded.
- The complementary sequence-wise balance loss (eq. 17-20, weight alpha = 0.0001) or, for the ablation, a
  conventional batch-wise auxiliary loss: :class:`~dsv3.model.BalanceLoss` modules attached to the MoE layers.
- MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024), from the same global counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model import BalanceLoss, Block, DeepSeekV3, Gate, MoE


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    """The MoE layers of the model: main layers first, then the MTP blocks."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_gates(model: torch.nn.Module) -> list[Gate]:
    """The gates, in the order of :func:`moe_layers`."""
    return [layer.gate for layer in moe_layers(model)]


def attach_balance_losses(model: DeepSeekV3, kind: str) -> list[BalanceLoss]:
    """Give every MoE layer a :class:`BalanceLoss` of ``kind`` ("sequence" or "batch"); returns them."""
    losses = []
    for layer in moe_layers(model):
        layer.balance_loss = BalanceLoss(kind).to(layer.gate.weight.device)
        losses.append(layer.balance_loss)
    return losses


class Balancer:
    """The training side of balancing: the balance losses' weight and totals, the gates' global loads, the
    bias update. ``group``: the ranks whose counts together make the global batch's (None: one process; every
    rank under torchrun, as a pipeline rank counts only its own layers); ``replica_group``: ranks that must hold
    equal biases for the same layers (the data-parallel ranks)."""

    def __init__(self, model: torch.nn.Module, loss_kind: str, alpha: float, group: dist.ProcessGroup | None = None,
                 replica_group: dist.ProcessGroup | None = None):
        config = model.config
        # (layer id, MoE) of the layers this rank holds; a pipeline rank holds some, one process all
        held = sorted((m.layer_id, m.mlp) for m in model.modules() if isinstance(m, Block) and isinstance(m.mlp, MoE))
        every = [i for i in range(config.num_hidden_layers + config.num_nextn_predict_layers) if config.is_moe_layer(i)]
        self.slots = [every.index(layer_id) for layer_id, _ in held]
        self.n_layers, self.n_experts = len(every), config.n_routed_experts
        self.gates = [moe.gate for _, moe in held]
        self.losses = attach_balance_losses(model, loss_kind) if alpha > 0 else []
        self.alpha = alpha
        self.group, self.replica_group = group, replica_group

    def start_step(self, n_micro: int) -> None:
        """Weight each micro-batch's balance loss by alpha / n_micro (the main losses' accumulation scale)."""
        for loss in self.losses:
            loss.weight.fill_(self.alpha / n_micro)

    def take_loss(self) -> torch.Tensor:
        """The weighted balance loss summed over layers and micro-batches since the last call (this rank's)."""
        if not self.losses:
            return torch.zeros((), dtype=torch.float64)
        total = torch.stack([loss.total for loss in self.losses]).sum()
        for loss in self.losses:
            loss.total.zero_()
        return total

    def take_loads(self) -> torch.Tensor:
        """(MoE layers of the model, experts) int64 tokens routed to each expert since the last call, summed over
        ``group`` (one all-reduce); the gates' counters restart from zero."""
        device = self.gates[0].tokens_per_expert.device if self.gates else None
        loads = torch.zeros(self.n_layers, self.n_experts, dtype=torch.long, device=device)
        for slot, gate in zip(self.slots, self.gates):
            loads[slot] = gate.tokens_per_expert
            gate.tokens_per_expert.zero_()
        if self.group is not None:
            dist.all_reduce(loads, group=self.group)
        return loads

    @torch.no_grad()
    def update_bias(self, loads: torch.Tensor, gamma: float) -> None:
        update_bias(self.gates, [loads[slot] for slot in self.slots], gamma)

    @torch.no_grad()
    def check_replicated(self) -> None:
        """Raise if the routing biases differ between the data-parallel ranks (they are buffers every rank
        updates on its own from the same global loads; a difference would be a bug)."""
        biases = [g.e_score_correction_bias for g in self.gates if g.e_score_correction_bias is not None]
        if self.replica_group is None or not biases:
            return
        mine = torch.cat(biases)
        reference = mine.clone()
        dist.broadcast(reference, src=dist.get_global_rank(self.replica_group, 0), group=self.replica_group)
        if not torch.equal(mine, reference):
            raise RuntimeError(f"routing biases differ between data-parallel ranks (rank {dist.get_rank()}, "
                               f"max difference {(mine - reference).abs().max().item():.3g})")


@torch.no_grad()
def update_bias(gates: list[Gate], loads: list[torch.Tensor], gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i) for every expert of every gate (loads: (E,) token counts)."""
    if gamma == 0:
        return
    for gate, load in zip(gates, loads, strict=True):
        if gate.e_score_correction_bias is None:
            continue  # routing without a bias (the aux-loss ablation, DeepSeek-V2)
        load = load.float()
        gate.e_score_correction_bias.add_(gamma * torch.sign(load.mean() - load))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of one layer's expert loads."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0
