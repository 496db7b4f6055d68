"""Balance losses of DeepSeekMoE (report §2.1.2, eq. 17-20), attached to the MoE layer's output.

The complementary sequence-wise balance loss keeps each *sequence* from loading a few experts:

    L_Bal = alpha * sum_i f_i P_i,   f_i = N_r / (K_r T) * sum_t 1(token t chose expert i),
                                     P_i = 1/T * sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}

over the T tokens of one sequence, averaged over the sequences. The conventional auxiliary loss of the ablation
(GShard style) is the same product over a whole micro-batch.

:class:`BalanceLoss` is attached to an :class:`~dsv3.model.moe.MoE` layer from outside (the trainer does it; the
model alone has none). In training it computes the loss from the gate's affinities and choices and hands its
gradient to backward through the layer's output (:class:`_AttachLoss`), so the loss never travels through the
model's return value: a pipeline stage or a data-parallel rank attaches it where the layer runs. ``weight`` (a
buffer: alpha divided by the micro-batches per step, set by the trainer) scales it; ``total`` accumulates the
weighted value for the logs.
"""

from __future__ import annotations

import torch
from torch import nn


def sequence_balance_loss(probs: torch.Tensor, indices: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Eq. 17-20 without alpha: mean over sequences of sum_i f_i P_i.

    probs (T, E) the normalised affinities s' of the T = n_seqs * S tokens (sequence-major); indices (T, K)."""
    n_tokens, n_experts = probs.shape
    k = indices.shape[1]
    seq_len = n_tokens // n_seqs
    counts = torch.zeros(n_seqs, n_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(1, indices.view(n_seqs, -1), torch.ones(n_seqs, seq_len * k, device=probs.device))
    f = counts * (n_experts / (k * seq_len))
    p = probs.float().view(n_seqs, seq_len, n_experts).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


def batch_balance_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The GShard-style auxiliary loss of the ablation: the same f_i P_i product over all T tokens at once."""
    n_tokens, n_experts = probs.shape
    k = indices.shape[1]
    counts = torch.zeros(n_experts, device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, indices.flatten(), torch.ones(indices.numel(), device=probs.device))
    f = counts * (n_experts / (k * n_tokens))
    return (f * probs.float().mean(dim=0)).sum()


class _AttachLoss(torch.autograd.Function):
    """Identity on ``y``; in backward also sends a gradient of 1 to ``loss`` (already weighted)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class BalanceLoss(nn.Module):
    """The balance loss of one MoE layer: ``kind`` "sequence" (eq. 17-20) or "batch" (the ablation)."""

    def __init__(self, kind: str = "sequence"):
        super().__init__()
        if kind not in ("sequence", "batch"):
            raise ValueError(f"balance loss kind: must be 'sequence' or 'batch', got {kind!r}")
        self.kind = kind
        self.register_buffer("weight", torch.zeros(()), persistent=False)
        """alpha / (micro-batches per optimiser step): set by the trainer before each step."""
        self.register_buffer("total", torch.zeros((), dtype=torch.float64), persistent=False)
        """Sum of the weighted losses since the trainer last read and zeroed it."""

    def forward(self, y: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor, n_seqs: int,
                normalise: bool) -> torch.Tensor:
        """y: the layer's output, returned unchanged; scores (T, E) affinities, indices (T, K) the choices;
        ``normalise``: scores are sigmoid affinities, to be divided by their sum per token (s' of eq. 19)."""
        probs = scores / scores.sum(dim=-1, keepdim=True) if normalise else scores
        if self.kind == "sequence":
            loss = sequence_balance_loss(probs, indices, n_seqs)
        else:
            loss = batch_balance_loss(probs, indices)
        loss = loss * self.weight
        self.total.add_(loss.detach().double())
        return _AttachLoss.apply(y, loss)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"
