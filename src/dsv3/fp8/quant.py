"""Fine-grained FP8 (E4M3) quantisation with FP32 scales, DeepSeek-V3 report §3.3.

Two groupings, both with ``scale = max|x| / 448`` computed online (no delayed amax history):

* activations / gradients: 1x128 tiles along the last dimension (each row, each 128 channels);
  scale shape ``(*x.shape[:-1], ceil(K / 128))``;
* weights: 128x128 blocks of a 2-D matrix; scale shape ``(ceil(N / 128), ceil(K / 128))``.

A scale here is always the *dequantisation* factor (``x ~= q * scale``), which is exactly what the
official DeepSeek-V3 checkpoint stores as ``weight_scale_inv``, so :func:`dequantize_blocks` is the
function a checkpoint loader calls.

The plain PyTorch code below is the reference and runs anywhere. On a CUDA GPU with FP8 support
the public functions dispatch to Triton kernels (:mod:`dsv3.fp8.triton_quant`) when Triton is
installed; set ``DSV3_FP8_NO_TRITON=1`` to force the reference path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value (§3.3: scale = amax / 448)
TILE = 128

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_blocks",
    "dequantize_tiles",
    "pow2_ceil",
    "quantize_blocks",
    "quantize_rows",
    "quantize_tiles",
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pow2_ceil(s: Tensor) -> Tensor:
    """Round positive FP32 values up to a power of two, exactly (bit trick, no log2 rounding).

    Adding 0x7FFFFF to the bit pattern carries into the exponent iff the mantissa is non-zero;
    masking the mantissa away then leaves 2^ceil(log2 s). Subnormal inputs (amax < ~5e-36)
    become 2^-126, still a power of two >= s.
    """
    bits = s.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def _scale_from_amax(amax: Tensor, pow2_scales: bool) -> Tensor:
    scale = amax / FP8_MAX
    # All-zero group (or amax so small the division underflows): any finite scale works since
    # every element quantises to 0; 1 keeps q = x / scale free of NaN/inf.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return pow2_ceil(scale) if pow2_scales else scale


def _to_fp8(x: Tensor) -> Tensor:
    # The clamp guards against x / scale landing a rounding step above 448: torch's cast maps
    # out-of-range values to NaN rather than saturating.
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# --------------------------------------------------------------------------- reference (torch)


def _quantize_tiles_torch(
    x: Tensor, tile: int, pow2_scales: bool
) -> tuple[Tensor, Tensor]:
    k = x.shape[-1]
    n_tiles = _ceil_div(k, tile)
    pad = n_tiles * tile - k
    # Row-major output whatever x's strides (x may be a transposed view): GEMMs need it.
    xf = x.to(torch.float32, memory_format=torch.contiguous_format)
    # Zero padding never changes a tile's amax, so a ragged last tile needs no special case.
    if pad:
        xf = F.pad(xf, (0, pad))
    xt = xf.unflatten(-1, (n_tiles, tile))
    scale = _scale_from_amax(xt.abs().amax(dim=-1), pow2_scales)
    q = _to_fp8(xt / scale.unsqueeze(-1)).flatten(-2)
    if pad:
        q = q[..., :k].contiguous()
    return q, scale


def _quantize_blocks_torch(
    w: Tensor, block: int, pow2_scales: bool
) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    wf = w.to(torch.float32, memory_format=torch.contiguous_format)
    if nb * block != n or kb * block != k:
        wf = F.pad(wf, (0, kb * block - k, 0, nb * block - n))
    wb = wf.view(nb, block, kb, block)
    scale = _scale_from_amax(wb.abs().amax(dim=(1, 3)), pow2_scales)
    q = _to_fp8(wb / scale[:, None, :, None]).view(nb * block, kb * block)
    if q.shape != (n, k):
        q = q[:n, :k].contiguous()
    return q, scale


# --------------------------------------------------------------------------- dispatch


@functools.cache
def _triton_module():
    """The Triton kernels, or None when Triton is not installed (it is an optional extra)."""
    try:
        from dsv3.fp8 import triton_quant
    except ImportError:
        return None
    return triton_quant


def _use_triton(x: Tensor, group: int, fp8_input: bool = False) -> bool:
    if not x.is_cuda or x.numel() == 0 or os.environ.get("DSV3_FP8_NO_TRITON") == "1":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) + ((FP8_DTYPE,) if fp8_input else ()):
        return False
    if group < 16 or group & (group - 1):  # Triton block sizes must be powers of two
        return False
    return _triton_on_device(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.cache
def _triton_on_device(index: int) -> bool:
    # E4M3 conversion instructions exist from sm89 (Ada) on. Cached: this runs for every FP8 GEMM operand.
    return torch.cuda.get_device_capability(index) >= (8, 9) and _triton_module() is not None


def quantize_tiles(
    x: Tensor, tile: int = TILE, pow2_scales: bool = False
) -> tuple[Tensor, Tensor]:
    """Quantise ``x`` to E4M3 per 1 x ``tile`` group along the last dim (report §3.3).

    Returns ``(q, scale)``: ``q`` has ``x``'s shape and dtype ``float8_e4m3fn``; ``scale`` is FP32
    of shape ``(*x.shape[:-1], ceil(K / tile))`` with ``x ~= q * scale`` per tile. A ragged last
    tile (K not a multiple of ``tile``) gets its own scale from its real elements.
    ``pow2_scales`` rounds each scale up to a power of two, so ``q * scale`` is exact.
    """
    if x.dim() == 0:
        raise ValueError("quantize_tiles needs at least one dimension")
    if _use_triton(x, tile):
        return _triton_module().quantize_tiles(x, tile, pow2_scales)
    return _quantize_tiles_torch(x, tile, pow2_scales)


def quantize_blocks(
    w: Tensor, block: int = TILE, pow2_scales: bool = False, with_transpose: bool = False
) -> tuple[Tensor, ...]:
    """Quantise a 2-D weight to E4M3 per ``block`` x ``block`` block (report §3.3).

    Returns ``(q, scale)`` with ``scale`` FP32 of shape ``(ceil(N / block), ceil(K / block))``,
    the layout of the official checkpoint's ``weight_scale_inv``. Ragged edge blocks are fine.
    ``with_transpose`` returns ``(q, scale, qt, scale_t)`` with W^T's quantisation as well: block
    quantisation commutes with transposition, so these are q and scale transposed (contiguous),
    which the input gradient ``dY W`` needs; the GPU kernel writes both from one read of W.
    A 3-D ``w`` (B, N, K) is a stack of matrices quantised each on its own (scales (B, nb, kb)).
    """
    if w.dim() not in (2, 3):
        raise ValueError(
            f"quantize_blocks expects a 2-D weight (or a 3-D stack), got shape {tuple(w.shape)}"
        )
    if _use_triton(w, block):
        return _triton_module().quantize_blocks(w, block, pow2_scales, with_transpose)
    if w.dim() == 3:
        parts = [quantize_blocks(m, block, pow2_scales, with_transpose) for m in w.unbind(0)]
        return tuple(torch.stack(t) for t in zip(*parts))
    q, s = _quantize_blocks_torch(w, block, pow2_scales)
    if with_transpose:
        return q, s, q.t().contiguous(), s.t().contiguous()
    return q, s


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
    """Build the FP8 operands of a GEMM over the rows of a (n_rows, C) layout in one pass (report §3.3).

    Row p of the layout is ``x[src_row[p]]``, a zero row where ``src_row[p] < 0`` (without ``src_row``:
    x's own rows, then zero rows up to ``n_rows``). ``x`` may itself be FP8 with 1x128 scales ``x_scale``
    stored scale-major, shape (ceil(C/128), len(x)); it is then dequantised (FP32) first. Returns
    ``(q, s, qt, st)``, None where not asked for:

    * ``rowwise``: q (n_rows, C) in 1x128 tiles along C, scales s (ceil(C/128), n_rows) (scale-major:
      a GEMM's K loop reads one contiguous scale row per step);
    * ``colwise``: qt (C, n_rows), the layout transposed, in 1x128 tiles along the rows (the tokens, for
      a weight gradient), scales st (n_rows/128, C); needs ``n_rows % 128 == 0``.

    Used by the grouped expert GEMMs (rows sorted by expert and padded so no 128-row tile mixes two
    experts) and by the weight gradient of :class:`~dsv3.fp8.FP8Linear`.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {tuple(x.shape)}")
    if colwise and n_rows % TILE:
        raise ValueError(f"quantize_rows: colwise needs n_rows % {TILE} == 0, got {n_rows}")
    if src_row is None and n_rows < x.shape[0]:
        raise ValueError(f"quantize_rows: n_rows {n_rows} < {x.shape[0]} rows of x")
    if _use_triton(x, TILE, fp8_input=x_scale is not None):
        return _triton_module().quantize_rows(
            x.contiguous(), n_rows, src_row=src_row, x_scale=None if x_scale is None else x_scale.contiguous(),
            rowwise=rowwise, colwise=colwise, pow2_scales=pow2_scales,
        )
    xf = x.float() if x_scale is None else dequantize_tiles(x, x_scale.t())
    rows = xf.new_zeros(n_rows, x.shape[1])
    if src_row is None:
        rows[: x.shape[0]] = xf
    else:
        ok = src_row >= 0
        rows[ok] = xf[src_row[ok]]
    q = s = qt = st = None
    if rowwise:
        q, s = _quantize_tiles_torch(rows, TILE, pow2_scales)
        s = s.t().contiguous()
    if colwise:
        qt, st = _quantize_tiles_torch(rows.t().contiguous(), TILE, pow2_scales)  # row-major, as the kernel's
        st = st.t().contiguous()
    return q, s, qt, st


def _pad_fp8(q: Tensor, pad: tuple[int, ...]) -> Tensor:
    """Zero-pad an FP8 tensor (through its byte view: constant pad has no FP8 kernels)."""
    if not any(pad):
        return q
    return F.pad(q.view(torch.uint8), pad).view(q.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 callers (reference tests) get an exact product; everything else multiplies in FP32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize_tiles(
    q: Tensor, scale: Tensor, tile: int = TILE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_tiles`: ``q * scale`` broadcast over each 1 x ``tile`` group."""
    k = q.shape[-1]
    n_tiles = _ceil_div(k, tile)
    if scale.shape != (*q.shape[:-1], n_tiles):
        raise ValueError(
            f"tile scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)} "
            f"with tile {tile} (expected {(*q.shape[:-1], n_tiles)})"
        )
    cd = _compute_dtype(dtype)
    qt = _pad_fp8(q, (0, n_tiles * tile - k)).unflatten(-1, (n_tiles, tile))
    out = (qt.to(cd) * scale.to(cd).unsqueeze(-1)).flatten(-2)[..., :k]
    return out.to(dtype) if out.dtype != dtype else out.contiguous()


def dequantize_blocks(
    q: Tensor, scale_inv: Tensor, block: int = TILE, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of :func:`quantize_blocks`; also the loader for official FP8 checkpoints.

    ``scale_inv`` has shape ``(ceil(N / block), ceil(K / block))`` and is what multiplies each
    FP8 block to give the real weight (the checkpoint's ``weight_scale_inv``).
    """
    if q.dim() != 2:
        raise ValueError(
            f"dequantize_blocks expects a 2-D tensor, got shape {tuple(q.shape)}"
        )
    n, k = q.shape
    nb, kb = _ceil_div(n, block), _ceil_div(k, block)
    if scale_inv.shape != (nb, kb):
        raise ValueError(
            f"block scale shape {tuple(scale_inv.shape)} does not match q {(n, k)} "
            f"with block {block} (expected {(nb, kb)})"
        )
    cd = _compute_dtype(dtype)
    qb = _pad_fp8(q, (0, kb * block - k, 0, nb * block - n)).reshape(
        nb, block, kb, block
    )
    out = (qb.to(cd) * scale_inv.to(cd)[:, None, :, None]).view(nb * block, kb * block)[
        :n, :k
    ]
    return out.to(dtype) if out.dtype != dtype else out.contiguous()
