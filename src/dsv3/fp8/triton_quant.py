"""Triton kernels for the report §3.3 FP8 quantisation (GPU fast path of :mod:`dsv3.fp8.quant`).

Imported lazily: Triton is an optional dependency. The kernels reproduce the reference
``q = clamp(x / (amax / 448), +-448) -> e4m3`` bit for bit: both divisions are correctly
rounded (``div_rn``; Triton's plain ``/`` on FP32 may be approximate) and the FP32 -> E4M3
conversion rounds to nearest even, like torch's cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dsv3.fp8.quant import FP8_DTYPE  # kernels hard-code FP8_MAX = 448 (E4M3)

# 32 rows x one 128-wide tile per program: enough work per CTA, few registers.
_ROWS_PER_PROGRAM = 32


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    s = tl.where(s > 0, s, 1.0)  # all-zero group: any finite scale, keep q free of NaN
    if POW2:  # round up to a power of two; same bit trick as quant.pow2_ceil
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _tile_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_m,
    stride_k,
    n_tiles,
    BLOCK_M: tl.constexpr,
    TILE: tl.constexpr,
    POW2: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    t = tl.program_id(1)
    cols = (t * TILE + tl.arange(0, TILE)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(
        x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k,
        mask=mask,
        other=0.0,
    )
    x = x.to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=1), POW2)
    q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rows * n_tiles + t, s, mask=rows < M)


@triton.jit
def _block_quant_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    N,
    K,
    stride_n,
    stride_k,
    n_kb,
    BLOCK: tl.constexpr,
    POW2: tl.constexpr,
):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    rows = (bn * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (bk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(
        w_ptr + rows[:, None] * stride_n + cols[None, :] * stride_k,
        mask=mask,
        other=0.0,
    )
    w = w.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    # Lift the scalar amax to a 1-element tensor: div_rn wants tensor operands.
    s = _scale(tl.full((1,), 0.0, tl.float32) + amax, POW2)
    q = tl.math.div_rn(w, tl.broadcast_to(s[:, None], w.shape))
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + bn * n_kb + bk + tl.arange(0, 1), s)


def quantize_tiles(x: Tensor, tile: int, pow2_scales: bool) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`dsv3.fp8.quant.quantize_tiles` (any strides for 2-D input)."""
    k = x.shape[-1]
    # 2-D views (e.g. a transpose) go in as they are: the kernel takes strides.
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    n_tiles = triton.cdiv(k, tile)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, n_tiles), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, _ROWS_PER_PROGRAM), n_tiles)
    _tile_quant_kernel[grid](
        x2,
        q,
        s,
        m,
        k,
        x2.stride(0),
        x2.stride(1),
        n_tiles,
        BLOCK_M=_ROWS_PER_PROGRAM,
        TILE=tile,
        POW2=pow2_scales,
        num_warps=4,
    )
    return q.view(x.shape), s.view(*x.shape[:-1], n_tiles)


def quantize_blocks(w: Tensor, block: int, pow2_scales: bool) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`dsv3.fp8.quant.quantize_blocks`."""
    n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=w.device)
    _block_quant_kernel[(nb, kb)](
        w,
        q,
        s,
        n,
        k,
        w.stride(0),
        w.stride(1),
        kb,
        BLOCK=block,
        POW2=pow2_scales,
        num_warps=8,
    )
    return q, s
