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
# Warps per 128x128 tile of the block and row-layout quantisers (bench/profile_fp8.py --sweep); channels and
# warps per program of the row quantiser's column pass when it runs alone (--sweep-quant; see quantize_rows).
LAUNCH = {"block_warps": 16, "rows_warps": 16, "cols_block": 32, "cols_warps": 4}


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    s = tl.where(s > 0, s, 1.0)  # all-zero group: any finite scale, keep q free of NaN
    if POW2:  # round up to a power of two; same bit trick as quant.pow2_ceil
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _e4m3(x, s):
    """x / s (s per row of x), correctly rounded, clamped to E4M3's range and converted."""
    q = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    return tl.minimum(tl.maximum(q, -448.0), 448.0).to(tl.float8e4nv)


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
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _e4m3(x, s), mask=mask)
    tl.store(s_ptr + t * M + rows, s, mask=rows < M)  # scale-major


@triton.jit
def _block_quant_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    qt_ptr,
    st_ptr,
    N,
    K,
    stride_b,
    stride_n,
    stride_k,
    nb,
    kb,
    BLOCK: tl.constexpr,
    POW2: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """One 128x128 block of matrix b of a (B, N, K) stack; with TRANSPOSED also writes W^T's (K, N) bytes
    and (kb, nb) scales: a block's scale does not change under transposition."""
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = (bn * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (bk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(
        w_ptr + b * stride_b + rows[:, None] * stride_n + cols[None, :] * stride_k,
        mask=mask,
        other=0.0,
    )
    w = w.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    # Lift the scalar amax to a 1-element tensor: div_rn wants tensor operands.
    s = _scale(tl.full((1,), 0.0, tl.float32) + amax, POW2)
    base = b * N * K
    tl.store(q_ptr + base + rows[:, None] * K + cols[None, :], _e4m3(w, s), mask=mask)
    tl.store(s_ptr + b * nb * kb + bn * kb + bk + tl.arange(0, 1), s)
    if TRANSPOSED:
        # The block again in transposed orientation (an L1/L2 hit), quantised with the same scale: the
        # bytes of W^T without an in-register transpose.
        mask_t = (cols[:, None] < K) & (rows[None, :] < N)
        wt = tl.load(
            w_ptr + b * stride_b + rows[None, :] * stride_n + cols[:, None] * stride_k,
            mask=mask_t,
            other=0.0,
        )
        tl.store(qt_ptr + base + cols[:, None] * N + rows[None, :], _e4m3(wt.to(tl.float32), s), mask=mask_t)
        tl.store(st_ptr + b * nb * kb + bk * nb + bn + tl.arange(0, 1), s)


@triton.jit
def _rows_quant_kernel(
    x_ptr,
    xs_ptr,
    src_row_ptr,
    q_ptr,
    s_ptr,
    qt_ptr,
    st_ptr,
    M_src,
    C,
    Mp,
    stride_x,
    GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROWWISE: tl.constexpr,
    COLWISE: tl.constexpr,
    POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One 128-row x BLOCK_C-channel tile (BLOCK_C = 128 with ROWWISE) of a (Mp, C) row layout, read from x (gathered
    by src_row, -1 = zero row; or rows 0..M_src-1 as they are), optionally dequantised first (x FP8 with 1x128
    scales stored scale-major (C/128, M_src)). ROWWISE: 1x128 tiles along the channels -> q (Mp, C), scales
    (C/128, Mp). COLWISE: 1x128 tiles along the rows, written transposed -> qt (C, Mp), scales (Mp/128, C)."""
    pt = tl.program_id(0)
    cb = tl.program_id(1)
    p = pt.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    p_ok = p < Mp
    if GATHER:
        r = tl.load(src_row_ptr + p, mask=p_ok, other=-1).to(tl.int64)
    else:
        r = tl.where(p < M_src, p, -1)
    valid = r >= 0
    r0 = tl.where(valid, r, 0)
    c = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_sc = xs_ptr + ((cb * BLOCK_C) // 128) * M_src + r0  # the input's 1x128 scales of these channels (HAS_SCALE)
    if ROWWISE:
        x = tl.load(x_ptr + r0[:, None] * stride_x + c[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_SCALE:
            x = x * tl.load(x_sc, mask=valid, other=0.0)[:, None]
        s = _scale(tl.max(tl.abs(x), axis=1), POW2)
        tl.store(q_ptr + p[:, None] * C + c[None, :], _e4m3(x, s), mask=p_ok[:, None] & c_ok[None, :])
        tl.store(s_ptr + cb * Mp + p, s, mask=p_ok)
    if COLWISE:
        # The tile loaded in transposed orientation (channels x rows; an L2 hit after the rowwise pass), so
        # the transposed bytes are stored without an in-register transpose.
        xt = tl.load(x_ptr + r0[None, :] * stride_x + c[:, None], mask=c_ok[:, None] & valid[None, :], other=0.0)
        xt = xt.to(tl.float32)
        if HAS_SCALE:
            xt = xt * tl.load(x_sc, mask=valid, other=0.0)[None, :]
        s = _scale(tl.max(tl.abs(xt), axis=1), POW2)
        tl.store(qt_ptr + c[:, None] * Mp + p[None, :], _e4m3(xt, s), mask=c_ok[:, None] & p_ok[None, :])
        tl.store(st_ptr + pt * C + c, s, mask=c_ok)


def quantize_tiles(x: Tensor, tile: int, pow2_scales: bool) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`dsv3.fp8.quant.quantize_tiles` (any strides for 2-D input). The scales are
    stored scale-major and returned as a transposed view: the (M, K/128) layout that ``torch._scaled_mm``
    wants for 1x128 scales, so no copy is needed before the GEMM."""
    k = x.shape[-1]
    # 2-D views (e.g. a transpose) go in as they are: the kernel takes strides.
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    n_tiles = triton.cdiv(k, tile)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((n_tiles, m), dtype=torch.float32, device=x.device)
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
    return q.view(x.shape), s.t().view(*x.shape[:-1], n_tiles)


def quantize_blocks(
    w: Tensor, block: int, pow2_scales: bool, with_transpose: bool = False
) -> tuple[Tensor, ...]:
    """Triton version of :func:`dsv3.fp8.quant.quantize_blocks` for a (N, K) matrix or a (B, N, K) stack
    (one launch; scales (B, nb, kb)); ``with_transpose`` also returns each matrix's W^T quantised
    (same bytes transposed, scales transposed)."""
    squeeze = w.dim() == 2
    w3 = w.unsqueeze(0) if squeeze else w
    bsz, n, k = w3.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    q = torch.empty((bsz, n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((bsz, nb, kb), dtype=torch.float32, device=w.device)
    qt = torch.empty((bsz, k, n), dtype=FP8_DTYPE, device=w.device) if with_transpose else q
    st = torch.empty((bsz, kb, nb), dtype=torch.float32, device=w.device) if with_transpose else s
    _block_quant_kernel[(nb, kb, bsz)](
        w3,
        q,
        s,
        qt,
        st,
        n,
        k,
        w3.stride(0),
        w3.stride(1),
        w3.stride(2),
        nb,
        kb,
        BLOCK=block,
        POW2=pow2_scales,
        TRANSPOSED=with_transpose,
        num_warps=LAUNCH["block_warps"],
    )
    out = (q, s, qt, st) if with_transpose else (q, s)
    return tuple(t[0] for t in out) if squeeze else out


def quantize_rows(
    x: Tensor,
    n_rows: int,
    *,
    src_row: Tensor | None = None,
    x_scale: Tensor | None = None,
    rowwise: bool = True,
    colwise: bool = False,
    pow2_scales: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Triton version of :func:`dsv3.fp8.quant.quantize_rows` (x with unit stride along its rows)."""
    m_src, c = x.shape
    if x.stride(1) != 1:
        raise ValueError("quantize_rows wants rows with unit stride")
    n_cb, n_pt = triton.cdiv(c, 128), triton.cdiv(n_rows, 128)
    if colwise and n_rows % 128:
        raise ValueError(f"quantize_rows: colwise needs n_rows % 128 == 0, got {n_rows}")
    dev = x.device
    q = torch.empty((n_rows, c), dtype=FP8_DTYPE, device=dev) if rowwise else None
    s = torch.empty((n_cb, n_rows), dtype=torch.float32, device=dev) if rowwise else None
    qt = torch.empty((c, n_rows), dtype=FP8_DTYPE, device=dev) if colwise else None
    st = torch.empty((n_pt, c), dtype=torch.float32, device=dev) if colwise else None
    dummy = x

    def launch(rows: bool, cols: bool, block_c: int) -> None:
        _rows_quant_kernel[(n_pt, triton.cdiv(c, block_c))](
            x,
            dummy if x_scale is None else x_scale,
            dummy if src_row is None else src_row,
            dummy if not rows else q,
            dummy if not rows else s,
            dummy if not cols else qt,
            dummy if not cols else st,
            m_src,
            c,
            n_rows,
            x.stride(0),
            GATHER=src_row is not None,
            HAS_SCALE=x_scale is not None,
            ROWWISE=rows,
            COLWISE=cols,
            POW2=pow2_scales,
            BLOCK=128,
            BLOCK_C=block_c,
            num_warps=LAUNCH["rows_warps"] if rows else LAUNCH["cols_warps"],
        )

    # Column tiles (1x128 along the rows) in narrower programs of their own: more loads in flight per SM
    # than one 128x128 tile doing both passes, though x is read twice when both layouts are asked for
    # (bench/profile_fp8.py --sweep-quant: the experts' dY 722 -> 466 us, their X^T 324 -> 212 us).
    split = colwise and LAUNCH["cols_block"] < 128
    if rowwise or not split:
        launch(rowwise, colwise and not split, 128)
    if split:
        launch(False, True, LAUNCH["cols_block"])
    return q, s, qt, st
