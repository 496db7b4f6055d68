"""FP8 Linear layer with DeepSeek-V3 fine-grained scaling, report §3.3.

All three GEMMs of a Linear layer take E4M3 inputs with FP32 scales and accumulate in FP32:

* forward       ``Y  = X W^T``:   X in 1x128 tiles (along in_features), W in 128x128 blocks;
* input grad    ``dX = dY W``:    dY in 1x128 tiles (along out_features), W in 128x128 blocks;
* weight grad   ``dW = dY^T X``:  dY and X both in 1x128 tiles along the token dimension
  (§3.3: 128x128 blocks for activation gradients made a 16B model diverge).

X is cached for backward in FP8 (tiles + scales), not in high precision; for the weight
gradient it is dequantised and requantised along tokens. Master weights stay in their own
dtype (FP32/BF16): the weight is quantised on the fly each call.

Backends: ``scaled_mm`` runs the GEMMs on ``torch._scaled_mm`` with DeepSeek block scales
(cuBLASLt 1x128 / 128x128 scaling; Hopper, sm90, CUDA >= 12.9); ``emulate`` runs anywhere with the
same numerics: quantise -> dequantise -> FP32 matmul -> cast. ``auto`` is ``scaled_mm`` where it can
run and ``emulate`` elsewhere, decided by the device alone: :meth:`FP8Linear.from_linear` settles it
once for the layer's device, and an explicit backend that cannot run on its input is an error, never a
quiet switch to emulation.

The weight gradient can be handed to someone else: with ``weight_grad_fn`` set (a :data:`WeightGradFn`), the
backward computes dX and quantises dY, and passes the master weight and a function doing the rest of dW (the
same GEMM on the same FP8 operands) to ``weight_grad_fn``, which adds it to ``weight.grad`` now or later (the
zero-bubble split of a backward into input and weight halves, report §3.2.1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.fp8.quant import (
    TILE,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_rows,
    quantize_tiles,
)

Backend = Literal["auto", "emulate", "scaled_mm"]
WeightGradFn = Callable[[Tensor, Callable[[], Tensor]], None]
"""``fn(weight, compute)``, called by a backward instead of returning the weight's gradient: ``compute()`` returns
that gradient (in the weight's dtype) and ``fn`` must add it to ``weight.grad``, at once or later."""

__all__ = ["Backend", "FP8Linear", "WeightGradFn", "fp8_linear", "fp8_matmul_nt", "resolve_backend"]


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@functools.cache
def _device_supports_deepseek_scaling(index: int) -> bool:
    # torch (ScaledBlas.cpp) accepts 1x128 / 128x128 scales only on sm90 with cuBLASLt >= 12.9.
    if torch.version.hip is not None or torch.version.cuda is None:
        return False
    cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    return torch.cuda.get_device_capability(index)[0] == 9 and cuda >= (12, 9)


def _hopper_scaled_mm_ok(t: Tensor | torch.device) -> bool:
    device = t if isinstance(t, torch.device) else t.device
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and _device_supports_deepseek_scaling(device.index or 0)
    )


SCALED_MM_NEEDS = "a Hopper GPU (sm90) and a CUDA >= 12.9 build of torch"


def resolve_backend(backend: Backend, device: torch.device | str) -> Backend:
    """The backend that runs on ``device``: ``auto`` becomes ``scaled_mm`` or ``emulate``; an explicit
    ``scaled_mm`` where it cannot run is a ValueError."""
    device = torch.device(device)
    if backend == "auto":
        return "scaled_mm" if _hopper_scaled_mm_ok(device) else "emulate"
    if backend == "scaled_mm" and not _hopper_scaled_mm_ok(device):
        raise ValueError(f"FP8 backend 'scaled_mm' needs {SCALED_MM_NEEDS}; got device {device}")
    if backend not in ("emulate", "scaled_mm"):
        raise ValueError(f"FP8 backend: must be 'auto', 'emulate' or 'scaled_mm', got {backend!r}")
    return backend


def _pad_rows_cols(q: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D FP8 tensor to (rows, cols); zeros add nothing to the GEMM."""
    r, c = q.shape
    if (r, c) == (rows, cols):
        return q
    return F.pad(q.view(torch.uint8), (0, cols - c, 0, rows - r)).view(q.dtype)


def _scaled_mm_nt(
    aq: Tensor,
    a_s: Tensor,
    bq: Tensor,
    b_s: Tensor,
    b_blocks: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """``a @ b.T`` on ``torch._scaled_mm`` with DeepSeek block scales (sm90 cuBLASLt).

    Layouts follow torch's checks for ``_scaled_mm`` (aten ScaledBlas.cpp): mat1 row-major and
    mat2 column-major; a 1x128 scale for mat1 is (M, K/128) outer-dim-major (stride (1, M)); for
    mat2 = b.T a 1x128 scale is (K/128, N) row-major and a 128x128 scale is (K/128, N/128) as the
    transpose of the row-major (N/128, K/128) checkpoint layout. Shapes are zero-padded to what
    cuBLASLt takes (K to 128, M and N to 16): padding inside the last tile/block leaves the scale
    grid unchanged and the extra zeros contribute nothing.
    """
    m, c = aq.shape
    n = bq.shape[0]
    cp, mp, np_ = _round_up(c, TILE), _round_up(m, 16), _round_up(n, 16)
    n_c = cp // TILE
    # sm90 cuBLASLt: mat1 row-major, mat2 (= bq.t()) column-major.
    aq = _pad_rows_cols(aq, mp, cp).contiguous()
    bq = _pad_rows_cols(bq, np_, cp).contiguous()
    a_s = F.pad(a_s, (0, 0, 0, mp - m), value=1.0) if mp != m else a_s
    scale_a = a_s.float().t().contiguous().t()
    if b_blocks and n_c % 4 == 0:
        # torch versions differ on whether this stride must be padded to a multiple of 4; with
        # K/128 % 4 == 0 both rules agree (DeepSeek-V3 dims all satisfy it).
        scale_b = b_s.float().contiguous().t()
    else:
        # A 128x128 block is 128 rows of 1x128 tiles sharing one scale: same math.
        if b_blocks:
            b_s = b_s.repeat_interleave(TILE, dim=0)[:n]
        b_s = F.pad(b_s, (0, 0, 0, np_ - n), value=1.0) if np_ != n else b_s
        scale_b = b_s.float().t().contiguous()
    # use_fast_accum=False: promote partial sums to FP32 (§3.3 "increasing accumulation precision")
    out = torch._scaled_mm(
        aq,
        bq.t(),
        scale_a=scale_a,
        scale_b=scale_b,
        out_dtype=out_dtype,
        use_fast_accum=False,
    )
    if (mp, np_) != (m, n):
        out = out[:m, :n].contiguous()
    return out


def fp8_matmul_nt(
    aq: Tensor,
    a_scale: Tensor,
    bq: Tensor,
    b_scale: Tensor,
    *,
    b_blocks: bool,
    out_dtype: torch.dtype,
    backend: Backend = "auto",
) -> Tensor:
    """``A @ B^T`` for FP8 operands that share the contraction (last) dim, FP32 accumulation.

    ``aq`` (M, C) has 1x128 tile scales (M, ceil(C/128)); ``bq`` (N, C) has 1x128 tile scales
    (N, ceil(C/128)) or, with ``b_blocks``, 128x128 block scales (ceil(N/128), ceil(C/128)).
    """
    if backend == "auto":
        backend = resolve_backend(backend, aq.device)
    if backend == "scaled_mm":
        if not _hopper_scaled_mm_ok(aq):
            raise RuntimeError(f"FP8 backend 'scaled_mm' needs {SCALED_MM_NEEDS}; the operands are on {aq.device}")
        mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
        return _scaled_mm_nt(aq, a_scale, bq, b_scale, b_blocks, mm_dtype).to(out_dtype)
    a = dequantize_tiles(aq, a_scale)
    b = dequantize_blocks(bq, b_scale) if b_blocks else dequantize_tiles(bq, b_scale)
    return (a @ b.t()).to(out_dtype)


def _grad_operands(gy: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor | None, ...]:
    """dY in 1x128 tiles along N for the input gradient (gq, gs: (M, N/128)), and dY^T (N, M') in 1x128
    tiles along the tokens for the weight gradient (gtq, gts: (N, M'/128)); None where not needed.

    On a GPU both come from one pass over dY (:func:`quantize_rows`; the token count zero-padded to
    M' = a multiple of 128, which adds nothing to the weight-gradient product); elsewhere from the plain
    reference functions (M' = M).
    """
    if gy.is_cuda:
        m = gy.shape[0]
        gq, gs, gtq, gts = quantize_rows(gy, _round_up(m, TILE), rowwise=need_x, colwise=need_w)
        if need_x:
            gq, gs = gq[:m], gs.t()[:m]  # scale-major: the layout torch._scaled_mm takes, no copy
        return gq, gs, gtq, None if gts is None else gts.t()
    gq, gs = quantize_tiles(gy) if need_x else (None, None)
    gtq, gts = quantize_tiles(gy.t()) if need_w else (None, None)
    return gq, gs, gtq, gts


def _x_wgrad_operand(xq: Tensor, xs: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
    """X^T (K, n_tokens) in 1x128 tiles along the tokens, from X's FP8 forward cache (dequantised and
    requantised in one pass on a GPU); n_tokens >= len(X) zero-pads the tokens."""
    if xq.is_cuda:
        _, _, xtq, xts = quantize_rows(xq, n_tokens, x_scale=xs.t(), rowwise=False, colwise=True)
        return xtq, xts.t()
    return quantize_tiles(dequantize_tiles(xq, xs).t())


def run_weight_grad(weight_grad_fn: WeightGradFn | None, weight: Tensor | None,
                    compute: Callable[[], Tensor]) -> Tensor | None:
    """In a backward: the weight gradient ``compute()`` for autograd to accumulate, or None once ``compute`` is
    handed to ``weight_grad_fn`` (which accumulates it into ``weight.grad`` itself)."""
    if weight_grad_fn is None:
        return compute()
    weight_grad_fn(weight, compute)
    return None


def _weight_grad(gtq: Tensor, gts: Tensor, xq: Tensor, xs: Tensor, w_dtype: torch.dtype, backend: Backend) -> Tensor:
    """dW = dY^T X from dY^T's FP8 tiles and X's FP8 forward cache: both operands in 1x128 tiles along the
    token dim (never 128x128 for gradients, §3.3); X is requantised along the tokens here."""
    xtq, xts = _x_wgrad_operand(xq, xs, gtq.shape[1])
    # FP32 accumulation inside the GEMM; written once in the weight's dtype
    out_dtype = w_dtype if w_dtype in (torch.bfloat16, torch.float16) else torch.float32
    return fp8_matmul_nt(gtq, gts, xtq, xts, b_blocks=False, out_dtype=out_dtype, backend=backend).to(w_dtype)


class _FP8LinearFn(torch.autograd.Function):
    """Autograd for ``y = x @ w.T + b`` with every GEMM in FP8 (report §3.3)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, backend: Backend,
        weight_grad_fn: WeightGradFn | None = None,
    ) -> Tensor:
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        xq, xs = quantize_tiles(x2)  # 1x128 along in_features
        # 128x128 blocks, and W^T's blocks for the input gradient from the same read of W: block
        # quantisation commutes with transposition. W^T is kept in FP8 (half of a BF16 copy).
        wq, ws, wqt, wst = quantize_blocks(weight, with_transpose=True)
        y = fp8_matmul_nt(
            xq, xs, wq, ws, b_blocks=True, out_dtype=x.dtype, backend=backend
        )
        if bias is not None:
            y = y + bias.to(y.dtype)
        # X is cached in FP8 only; the master weight is kept only for a weight_grad_fn (where dW goes).
        ctx.save_for_backward(xq, xs, wqt, wst)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.w_dtype = weight.dtype
        ctx.x_shape, ctx.x_dtype, ctx.backend = x.shape, x.dtype, backend
        ctx.weight_grad_fn, ctx.weight = weight_grad_fn, weight if weight_grad_fn is not None else None
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xq, xs, wqt, wst = ctx.saved_tensors
        out_f = wqt.shape[1]
        gy = grad_y.reshape(-1, out_f)
        grad_x = grad_w = grad_b = None
        need_x, need_w = ctx.needs_input_grad[:2]
        gq, gs, gtq, gts = _grad_operands(gy, need_x, need_w)
        if need_x:
            grad_x = fp8_matmul_nt(
                gq,
                gs,
                wqt,
                wst,
                b_blocks=True,
                out_dtype=ctx.x_dtype,
                backend=ctx.backend,
            ).reshape(ctx.x_shape)
        if need_w:
            # dY^T is quantised here, with dY (one pass on a GPU); the GEMM may be run later by weight_grad_fn.
            compute = functools.partial(_weight_grad, gtq, gts, xq, xs, ctx.w_dtype, ctx.backend)
            grad_w = run_weight_grad(ctx.weight_grad_fn, ctx.weight, compute)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = gy.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def fp8_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: Backend = "auto",
    weight_grad_fn: WeightGradFn | None = None,
) -> Tensor:
    """``x @ weight.T + bias`` with FP8 forward and backward GEMMs (report §3.3).

    ``x``: (..., in_features), any float dtype (output has the same dtype); ``weight``:
    (out_features, in_features) master weight; ``backend``: "auto" (``torch._scaled_mm`` on sm90,
    emulation elsewhere, by x's device), "emulate", or "scaled_mm" (an error where it cannot run);
    ``weight_grad_fn``: where the weight gradient goes (see the module docstring); None: autograd's way.
    """
    return _FP8LinearFn.apply(x, weight, bias, backend, weight_grad_fn)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 with fine-grained scaling (report §3.3).

    Parameters are ordinary ``nn.Linear`` parameters (the FP32/BF16 master weights the optimiser
    updates); only the matmuls change. ``backend`` is shown in the module's repr. ``weight_grad_fn``, None unless
    set from outside (:mod:`dsv3.pipeline.weight_grad`), takes over the weight-gradient GEMM.
    """

    backend: Backend = "auto"
    weight_grad_fn: WeightGradFn | None = None

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, backend=self.backend, weight_grad_fn=self.weight_grad_fn)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Backend = "auto",
                    device: torch.device | None = None) -> FP8Linear:
        """Wrap an existing ``nn.Linear``, sharing (not copying) its Parameter objects; ``auto`` is settled
        here for the layer's device, or ``device`` while the layer is still on meta (a ValueError where an
        explicit backend cannot run there)."""
        where = device if linear.weight.device.type == "meta" else linear.weight.device
        if where is not None and torch.device(where).type != "meta":
            backend = resolve_backend(backend, where)
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.backend = backend
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 1x128/128x128, backend={self.backend}"
