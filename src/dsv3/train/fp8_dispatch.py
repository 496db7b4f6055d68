"""FP8 expert-parallel dispatch (report §3.3.4, "Low-Precision Storage and Communication").

The report quantises the activations entering the MoE up-projections to FP8 *before* the dispatch all-to-all,
with the 1x128 tile-wise scales its FP8 GEMMs take as inputs (§3.3.2), which halves the dispatch traffic from
BF16; the combine (the experts' outputs coming back) stays BF16. Here:

* forward: each row is quantised to E4M3 with one FP32 scale per 1x128 tile (:func:`dsv3.fp8.quantize_tiles`;
  a hidden size that is not a multiple of 128 gets a ragged last tile with its own scale), the FP8 payload and
  the scales travel by ``all_to_all_single`` with the same row splits, and the receiver dequantises to the
  input's dtype (the experts then run as without this option, FP8 GEMMs or not);
* backward: the gradient goes back unquantised, a plain all-to-all with the splits swapped. That is the
  straight-through estimator over the quantisation, as FP8 training treats its casts (report §3.3).

Per row of width d the dispatch sends ``d`` bytes plus 4 bytes per started 128 columns, instead of ``2d``
(BF16) or ``4d`` (FP32). No host synchronisation is added: the split sizes are the ones the caller already
read (:meth:`dsv3.train.expert_parallel.ExpertParallelMoE.send`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..fp8.quant import FP8_DTYPE, dequantize_tiles, quantize_tiles

__all__ = ["dequantize_dispatched", "fp8_all_to_all", "quantize_for_dispatch"]


def quantize_for_dispatch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x`` (N, d) -> (payload (N, d) uint8, scales (N, ceil(d / 128)) float32): the FP8 E4M3 values
    with 1x128 tile scales (``x ~= q * scale``), the FP8 bytes viewed as uint8 because gloo's all-to-all has
    no float8 dtypes (NCCL moves them as bytes either way)."""
    q, scale = quantize_tiles(x)
    return q.view(torch.uint8), scale


def dequantize_dispatched(payload: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_for_dispatch`: the rows in ``dtype``."""
    return dequantize_tiles(payload.view(FP8_DTYPE), scale, dtype=dtype)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), out_splits, in_splits, group))


class _FP8AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        payload, scale = quantize_for_dispatch(x)
        # Both collectives are issued before either is waited on (functional collectives are asynchronous).
        payload = funcol.all_to_all_single(payload, out_splits, in_splits, group)
        scale = funcol.all_to_all_single(scale, out_splits, in_splits, group)
        return dequantize_dispatched(funcol.wait_tensor(payload), funcol.wait_tensor(scale), x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        # Straight-through: d(dequant(quant(x)))/dx taken as the identity, so the gradient only travels back.
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def fp8_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   group: dist.ProcessGroup) -> torch.Tensor:
    """``all_to_all_single`` of the rows of ``x`` (N, d) sent in FP8 with 1x128 scales and received in
    ``x.dtype`` (``in_splits`` rows to each rank, ``out_splits`` from each); the gradient returns unquantised.
    Same arguments as the unquantised dispatch in :mod:`dsv3.train.expert_parallel`."""
    if x.dim() != 2:
        raise ValueError(f"fp8_all_to_all expects rows (N, d), got shape {tuple(x.shape)}")
    return _FP8AllToAll.apply(x, out_splits, in_splits, group)
