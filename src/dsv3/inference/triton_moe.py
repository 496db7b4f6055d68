"""A Triton grouped GEMM for the routed experts of a decode step: few rows per expert, all weights streamed.

In a decode step each expert sees a handful of token copies (1 at batch 1; about 3 at batch 32 with 64
experts, top-6), so the step is bound by reading the chosen experts' weights once. ``torch._grouped_mm``
(CUTLASS) tiles for large groups: on the "16b" shapes it reads the six experts of a batch-1 step at
under 1 TB/s, and spends a launch on preparing its problem list. Here one program owns an
(expert, BLOCK_N output columns) tile: it returns at once when the expert received no rows, otherwise it
streams its BLOCK_N x K slice of the weight once for up to BLOCK_M rows at a time, accumulating in float32.

Imported lazily (Triton is optional); :func:`grouped_mm_few_rows` is also a ``torch.library`` custom op,
so that ``torch.compile`` keeps it as one opaque call and CUDA graphs capture it. The reference is the
experts' plain loop / ``torch._grouped_mm`` (:class:`dsv3.model.moe.Experts`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # the smallest row tile tl.dot takes; rows beyond it loop (weights re-read from L2)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 128, 4, 5)]
    ],
    key=["N", "K", "ROWS_BUCKET"],
)
@triton.jit
def _grouped_mm_few_rows_kernel(
    x_ptr, w_ptr, y_ptr, ends_ptr,
    N, K, stride_xm, stride_we, stride_wn, stride_ym, ROWS_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    end = tl.load(ends_ptr + e)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    if start < end:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + e.to(tl.int64) * stride_we + cols[:, None] * stride_wn
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + ks
                x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                            mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0)
                w = tl.load(w_rows + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
                acc = tl.dot(x, tl.trans(w), acc)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=(rows[:, None] < end) & (cols[None, :] < N))


@torch.library.custom_op("dsv3::grouped_mm_few_rows", mutates_args=())
def grouped_mm_few_rows(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e].T for the rows r of expert e: x (M, K) sorted by expert, w (E, N, K) with K
    contiguous, ``ends`` (E,) int32 = cumulative row counts. Returns (M, N) in x's dtype."""
    m, k = x.shape
    n_experts, n, _ = w.shape
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    bucket = 1 << max(m - 1, 0).bit_length()  # re-tune per power of two of rows only

    def grid(meta):
        return (n_experts, triton.cdiv(n, meta["BLOCK_N"]))

    _grouped_mm_few_rows_kernel[grid](
        x, w, y, ends, n, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0), bucket, BLOCK_M=BLOCK_M,
    )
    return y


@grouped_mm_few_rows.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])
