"""A GEMM for a few rows per weight matrix: the decode step's experts and, for FP8 weights, its Linear layers.

In a decode step each expert sees a handful of token copies (1 at batch 1; about 3 at batch 32 with 64
experts, top-6) and each Linear layer a few dozen rows, so the step is bound by reading the weights once.
``torch._grouped_mm`` (CUTLASS) tiles for large groups: on the "16b" shapes it reads the six experts of a
batch-1 step at under 1 TB/s, and spends a launch on preparing its problem list; ``torch._scaled_mm`` needs
the activations quantised first (two more kernels per layer). :func:`grouped_mm_few_rows` instead runs one
program per (matrix, BLOCK_N output columns) tile: it returns at once when its matrix received no rows,
otherwise it streams its BLOCK_N x K slice of the weight once for up to BLOCK_M rows at a time, accumulating
in FP32.

Weights are the activations' dtype, or float8_e4m3fn with one FP32 factor per 128 x 128 block (the official
DeepSeek-V3 checkpoint layout, ``weight_scale_inv``; report §3.3): the FP8 tile is widened in registers and
its partial product multiplied by the block's factor, so half the bytes are read and no activation is
quantised (W8A16). The reference is the dequantised weight's matmul.

The function is a ``torch.library`` custom op, so ``torch.compile`` keeps it as one opaque call and CUDA
graphs capture it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCALE_BLOCK = 128
"""The side of an FP8 weight's scaling block (the checkpoint's ``weight_block_size``)."""

_CONFIGS = [  # (BLOCK_N, BLOCK_K, warps, stages)
    (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 128, 4, 5),  # 16-bit weights
    (64, 128, 4, 6), (128, 128, 8, 4), (16, 128, 4, 6),  # FP8: tiles inside one 128 x 128 scaling block
]


def fp8_prune(n_plain: int):
    """An autotune ``early_config_prune`` for kernels with an ``FP8`` flag: without FP8 the first ``n_plain``
    configs; with FP8 only tiles that lie inside one scaling block (one factor per tile and K step)."""

    def prune(configs, named_args, **kwargs):
        if not {**named_args, **kwargs}.get("FP8"):
            return configs[:n_plain]
        return [c for c in configs if c.kwargs["BLOCK_N"] <= SCALE_BLOCK and c.kwargs["BLOCK_K"] <= SCALE_BLOCK]

    return prune


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in _CONFIGS],
    key=["N", "K", "ROWS_BUCKET", "FP8"],
    prune_configs_by={"early_config_prune": fp8_prune(5)},
)
@triton.jit
def _grouped_mm_few_rows_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, ends_ptr,
    M, N, K, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ym, ROWS_BUCKET,
    FP8: tl.constexpr, ONE_MATRIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    if ONE_MATRIX:  # every row is matrix 0's: no row counts to read
        start = 0
        end = M
    else:
        end = tl.load(ends_ptr + e)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    if start < end:
        n0 = tl.program_id(1) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + e.to(tl.int64) * stride_we + cols[:, None] * stride_wn
        s_row = s_ptr + e.to(tl.int64) * stride_se + (n0 // 128) * stride_sn  # FP8: this tile's row of factors
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + ks
                x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                            mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0)
                w = tl.load(w_rows + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K), other=0.0)
                if FP8:
                    factor = tl.load(s_row + k0 // 128)
                    acc += tl.dot(x, tl.trans(w.to(x.dtype))) * factor
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=(rows[:, None] < end) & (cols[None, :] < N))


@torch.library.custom_op("dsv3::grouped_mm_few_rows", mutates_args=())
def grouped_mm_few_rows(
    x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """y[r] = x[r] @ w[e].T for the rows r of matrix e: x (M, K) sorted by matrix, w (E, N, K) with K
    contiguous, ``ends`` (E,) int32 = cumulative row counts (None: one matrix, E = 1, takes every row).
    FP8 weights come with ``scale`` (E, ceil(N/128), ceil(K/128)) FP32, the factor of each 128 x 128 block
    (w[e] = w8[e] * factor). Returns (M, N) in x's dtype."""
    m, k = x.shape
    n_mats, n, _ = w.shape
    fp8 = w.dtype == torch.float8_e4m3fn
    if fp8 != (scale is not None):
        raise ValueError("grouped_mm_few_rows: float8_e4m3fn weights need their block scales, others none")
    if ends is None and n_mats != 1:
        raise ValueError(f"grouped_mm_few_rows: {n_mats} matrices need the row counts (ends)")
    x = x.contiguous()
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    rows_per_mat = m if n_mats == 1 else 16  # one matrix (a Linear): every row in one tile, up to 64
    block_m = min(max(16, triton.next_power_of_2(rows_per_mat)), 64)
    bucket = 1 << max(m - 1, 0).bit_length()  # re-tune per power of two of rows only
    s = scale.contiguous() if fp8 else x  # not read without FP8

    def grid(meta):
        return (n_mats, triton.cdiv(n, meta["BLOCK_N"]))

    _grouped_mm_few_rows_kernel[grid](
        x, w, s, y, x if ends is None else ends, m, n, k, x.stride(0), w.stride(0), w.stride(1),
        s.stride(0) if fp8 else 0, s.stride(1) if fp8 else 0, y.stride(0), bucket,
        FP8=fp8, ONE_MATRIX=ends is None, BLOCK_M=block_m,
    )
    return y


@grouped_mm_few_rows.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor | None, scale: torch.Tensor | None = None
      ) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


def linear_few_rows(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T`` for x (..., K) of a few rows and one weight w (N, K) (FP8 with ``scale``
    (ceil(N/128), ceil(K/128)))."""
    flat = x.reshape(-1, x.shape[-1])
    y = grouped_mm_few_rows(flat, w.unsqueeze(0), None, None if scale is None else scale.unsqueeze(0))
    return y.view(*x.shape[:-1], w.shape[0])
