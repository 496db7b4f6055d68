"""One optimiser step's forward and backward on one rank: the seam a pipeline schedule replaces.

:func:`forward_backward` runs the rank's micro-batches through the model and back, accumulating gradients, and
returns the summed token losses. The losses (report eq. 24-25) are sums of cross-entropy over labelled positions
divided by ``denominators``: the labelled positions of the *global* batch per data-parallel rank, so that the
gradients FSDP2 / DDP average over the ranks are those of the mean over every labelled token of the global batch,
whatever the micro-batching, the data-parallel size or the masks. The balance losses act inside the MoE layers
(:class:`dsv3.model.BalanceLoss`) and need nothing here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE_INDEX, TrainBatch


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the positions whose label is not IGNORE_INDEX (float32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def token_losses(logits: list[torch.Tensor], batch: TrainBatch) -> list[torch.Tensor]:
    """[main CE sum, MTP depth-1 CE sum, ...] (report eq. 24 per depth) from the head's logits and each depth's."""
    return [cross_entropy_sum(lg, batch.targets(k)) for k, lg in enumerate(logits)]


def step_losses(model: nn.Module, batch: TrainBatch, depth: int) -> list[torch.Tensor]:
    """Forward one micro-batch: [main CE sum, MTP depth-1 CE sum, ...]."""
    out = model(batch.inputs, future_tokens=batch.future_tokens if depth else None, doc_ids=batch.input_doc_ids,
                with_mtp=depth > 0)
    return token_losses([out.logits, *out.mtp_logits], batch)


def combine_losses(losses: list[torch.Tensor], denominators: torch.Tensor, mtp_weight: float) -> torch.Tensor:
    """L = CE_main / n_0 + lambda / D * sum_k CE_k / n_k (eq. 25), n = ``denominators``."""
    loss = losses[0] / denominators[0]
    depth = len(losses) - 1
    if depth:
        loss = loss + mtp_weight / depth * sum(ce / denominators[k] for k, ce in enumerate(losses[1:], 1))
    return loss


def forward_backward(
    model: nn.Module,
    batches: list[TrainBatch],
    *,
    depth: int,
    mtp_weight: float,
    denominators: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    grad_sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
) -> torch.Tensor:
    """Forward and backward of every micro-batch; returns (1 + depth,) float64 summed token losses (detached).

    Per micro-batch: :func:`combine_losses` of its token losses. ``grad_sync(last)`` wraps each micro-batch:
    data-parallel gradients are reduced with the last one only."""
    sums = torch.zeros(1 + depth, dtype=torch.float64, device=denominators.device)
    for i, batch in enumerate(batches):
        with grad_sync(i == len(batches) - 1):
            with autocast():
                losses = step_losses(model, batch, depth)
            combine_losses(losses, denominators, mtp_weight).backward()
        sums += torch.stack(losses).detach().double()
    return sums
