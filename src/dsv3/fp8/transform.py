"""Turn a :class:`~dsv3.model.DeepSeekV3` into an FP8 mixed-precision training model (report §3.3).

:func:`apply_fp8_training` rewires the model from outside; the model code never mentions FP8:

* every ``nn.Linear`` of MLA (``q_proj`` or ``q_a_proj``/``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``,
  ``o_proj``), of the dense SwiGLU MLPs and shared experts (``gate_proj``, ``up_proj``, ``down_proj``) and
  each MTP module's ``eh_proj`` becomes an :class:`~dsv3.fp8.FP8Linear`;
* each routed :class:`~dsv3.model.moe.Experts` becomes an :class:`FP8Experts`, whose two grouped GEMMs
  (``gate_up_proj`` and ``down_proj``) run in FP8 with the same recipe as the Linear layers.

The new modules hold the *same* Parameter objects, so an optimiser built before or after the swap (and its
state) is unaffected. Kept in high precision, as §3.3 says: the embedding, the output head, the MoE gate,
the RMSNorms and the attention core (SDPA).

The recipe for one expert e with weight W_e (N, K) and its tokens X_e (M_e, K):

* forward  ``Y_e = X_e W_e^T``: X in 1x128 tiles along K (per token), W_e in 128x128 blocks;
* dgrad    ``dX_e = dY_e W_e``: dY in 1x128 tiles along N, W_e^T in (the transposed) 128x128 blocks;
* wgrad    ``dW_e = dY_e^T X_e``: both in 1x128 tiles along the tokens *of expert e* (a tile never mixes
  two experts' tokens); X comes back from its FP8 forward cache.

GEMM backends for the experts (``FP8Experts.backend``):

``emulate``   quantise -> dequantise -> FP32 matmul per expert: the reference, runs anywhere;
``scaled_mm`` a loop over experts of ``torch._scaled_mm`` with DeepSeek block scales (sm90; one host sync);
``triton``    two Triton grouped kernels (sm90): tokens are laid out with every expert's segment padded to
              128 rows, so each 128-row tile belongs to one expert and each token tile of the weight gradient
              stays inside one expert; no host sync, one launch per GEMM;
``auto``      ``triton`` on a Hopper GPU with Triton, else ``scaled_mm`` on Hopper, else ``emulate``.

:func:`apply_fp8_training` settles ``auto`` once, for the device the model is on, and each module shows its
backend in its repr. A backend that cannot run (``triton`` without Triton, ``scaled_mm`` off Hopper, a model
moved to another device since) is an error, never a quiet switch to emulation.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.fp8.linear import (SCALED_MM_NEEDS, Backend, FP8Linear, WeightGradFn, _hopper_scaled_mm_ok, fp8_matmul_nt,
                             run_weight_grad)
from dsv3.fp8.quant import TILE, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_rows, quantize_tiles
from dsv3.model.moe import Experts

try:  # Triton is optional (GPU extra); the kernels below exist only where it is installed.
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

ExpertsBackend = Literal["auto", "emulate", "scaled_mm", "triton"]

__all__ = ["ExpertsBackend", "FP8Experts", "apply_fp8_training", "fp8_backends", "fp8_grouped_linear",
           "resolve_experts_backend"]

# Linear layers swapped for FP8Linear, by the attribute name they have in their parent module.
_MLA_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def apply_fp8_training(model: nn.Module, backend: Backend = "auto", device: torch.device | None = None) -> nn.Module:
    """Swap the model's projection GEMMs to FP8 (see the module docstring); returns ``model`` itself.

    ``backend`` is passed to every :class:`FP8Linear` and :class:`FP8Experts` ("auto", "emulate" or
    "scaled_mm"; "triton" is the experts' grouped kernels with the Linear layers on "scaled_mm"); ``auto`` is settled here for the device of the model's
    parameters (``device`` for a model still on meta), and an explicit backend that cannot run there is a
    ValueError. Applying it twice changes nothing. :func:`fp8_backends` tells what was chosen.
    """
    from dsv3.model.attention import MLA
    from dsv3.model.ffn import MLP
    from dsv3.model.mtp import MTPModule

    linear_backend = "scaled_mm" if backend == "triton" else backend
    for module in list(model.modules()):
        names: tuple[str, ...] = ()
        if isinstance(module, MLA):
            names = _MLA_LINEARS
        elif isinstance(module, MLP):  # dense FFN layers and the shared experts
            names = _MLP_LINEARS
        elif isinstance(module, MTPModule):
            names = ("eh_proj",)
        for name in names:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear) and not isinstance(child, FP8Linear):
                setattr(module, name, FP8Linear.from_linear(child, backend=linear_backend, device=device))
        for name, child in list(module.named_children()):
            if isinstance(child, Experts) and not isinstance(child, FP8Experts):
                setattr(module, name, FP8Experts.from_experts(child, backend=backend, device=device))
    return model


def fp8_backends(model: nn.Module) -> dict[str, str]:
    """The GEMM backend of the model's FP8 modules: ``{"linear": ..., "experts": ...}`` (several, comma
    separated, if they differ; a kind the model lacks is left out)."""
    found: dict[str, set[str]] = {}
    for module in model.modules():
        if isinstance(module, (FP8Linear, FP8Experts)):
            found.setdefault("linear" if isinstance(module, FP8Linear) else "experts", set()).add(module.backend)
    return {kind: ", ".join(sorted(names)) for kind, names in found.items()}


# --------------------------------------------------------------------------------------------------------
# FP8 experts


class FP8Experts(Experts):
    """Routed experts whose grouped GEMMs (forward, dgrad, wgrad) all take FP8 operands (report §3.3).

    Same parameters as :class:`~dsv3.model.moe.Experts` (the master weights); only the matmuls change.
    """

    backend: ExpertsBackend = "auto"
    weight_grad_fn: WeightGradFn | None = None  # as FP8Linear's: who runs the weight-gradient GEMMs

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x (N, d) sorted by expert with ``counts`` (E,) rows each -> (N, d)."""
        impl = _resolve(self.backend, x)
        # Both GEMMs share the token grouping: build the (GPU) row layout once.
        layout = _TritonGrouped.layout(counts, x.shape[0]) if impl == "triton" else None
        kw = dict(backend=self.backend, layout=layout, weight_grad_fn=self.weight_grad_fn)
        h = fp8_grouped_linear(x, self.gate_up_proj, counts, **kw)
        gate, up = h.split(self.inter_dim, dim=-1)
        return fp8_grouped_linear(F.silu(gate) * up, self.down_proj, counts, **kw)

    @classmethod
    def from_experts(cls, experts: nn.Module, backend: ExpertsBackend = "auto", device=None) -> FP8Experts:
        """Wrap an existing ``Experts``, sharing (not copying) its Parameter objects; ``auto`` is settled here
        for the weights' device, or ``device`` while on meta (a ValueError where a backend cannot run there)."""
        where = device if experts.gate_up_proj.device.type == "meta" else experts.gate_up_proj.device
        if where is not None and torch.device(where).type != "meta":
            backend = resolve_experts_backend(backend, where)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_experts, new.inter_dim, new.first_expert = experts.n_experts, experts.inter_dim, experts.first_expert
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.implementation = getattr(experts, "implementation", "auto")
        new.backend = backend
        new.train(experts.training)
        return new

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, fp8=e4m3 1x128/128x128, backend={self.backend}"


def resolve_experts_backend(backend: ExpertsBackend, device: torch.device | str) -> ExpertsBackend:
    """The experts' backend on ``device``: ``auto`` becomes ``triton``, ``scaled_mm`` or ``emulate``; an explicit
    backend that cannot run there is a ValueError naming what it needs."""
    device = torch.device(device)
    hopper = _hopper_scaled_mm_ok(device)
    if backend == "auto":
        return ("triton" if triton is not None else "scaled_mm") if hopper else "emulate"
    if backend not in _BACKENDS:
        raise ValueError(f"FP8 experts backend: must be 'auto', {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend in ("scaled_mm", "triton") and not hopper:
        raise ValueError(f"FP8 experts backend {backend!r} needs {SCALED_MM_NEEDS}; got device {device}")
    if backend == "triton" and triton is None:
        raise ValueError("FP8 experts backend 'triton' needs Triton: pip install 'dsv3[gpu]'")
    return backend


def _resolve(backend: ExpertsBackend, x: Tensor) -> str:
    """The backend for this call: ``auto`` by x's device; a chosen GPU backend whose input is elsewhere (the
    model moved after the transform) is an error."""
    if backend == "auto":
        return resolve_experts_backend(backend, x.device)
    if backend != "emulate" and not _hopper_scaled_mm_ok(x):
        raise RuntimeError(f"FP8 experts backend {backend!r} needs {SCALED_MM_NEEDS}; the input is on {x.device} "
                           f"(apply the FP8 transform after moving the model)")
    return backend


class _FP8GroupedLinearFn(torch.autograd.Function):
    """``y[rows of e] = x[rows of e] @ w[e].T`` for every expert e, all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: Tensor, backend: str, layout=None,
                weight_grad_fn: WeightGradFn | None = None) -> Tensor:
        ops = _BACKENDS[backend]
        if layout is None:
            layout = ops.layout(counts, x.shape[0])
        xq, xs = ops.quant_rows(x, layout)  # 1x128 along K: per token, so independent of the grouping
        # W's blocks, and W^T's for the input gradient, from one read of the master weight.
        wq, ws, wqt, wst = quantize_blocks(weight, with_transpose=True)  # each expert on its own
        y = ops.mm(xq, xs, wq, ws, layout, x.dtype)
        ctx.save_for_backward(xq, xs, wqt, wst)  # X and W^T kept in FP8 only
        ctx.layout, ctx.ops, ctx.x_dtype, ctx.w_dtype = layout, ops, x.dtype, weight.dtype
        ctx.weight_grad_fn, ctx.weight = weight_grad_fn, weight if weight_grad_fn is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xq, xs, wqt, wst = ctx.saved_tensors
        ops, layout = ctx.ops, ctx.layout
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        # dY in 1x128 tiles along N (input gradient) and along each expert's tokens (weight gradient).
        gq, gs, gt = ops.quant_grad(grad_y.contiguous(), layout, need_x, need_w)
        if need_x:
            grad_x = ops.mm(gq, gs, wqt, wst, layout, ctx.x_dtype)
        if need_w:  # the GEMM now, or later by weight_grad_fn
            grad_w = run_weight_grad(ctx.weight_grad_fn, ctx.weight,
                                     functools.partial(ops.wgrad, gt, xq, xs, layout, ctx.w_dtype))
        return grad_x, grad_w, None, None, None, None


def fp8_grouped_linear(x: Tensor, weight: Tensor, counts: Tensor, *, backend: ExpertsBackend = "auto",
                       layout: _PaddedLayout | None = None, weight_grad_fn: WeightGradFn | None = None) -> Tensor:
    """Per-expert ``x_e @ weight[e].T`` with FP8 GEMMs; x (M, K) sorted by expert, ``counts`` (E,) rows each,
    weight (E, N, K) -> (M, N) in x's dtype. ``layout``: the triton backend's row layout of ``counts``, if the
    caller built it already (GEMMs over one grouping); ``weight_grad_fn``: who runs dW (:mod:`dsv3.fp8.linear`)."""
    impl = _resolve(backend, x)
    return _FP8GroupedLinearFn.apply(x, weight, counts, impl, layout if impl == "triton" else None, weight_grad_fn)


# --------------------------------------------------------------------------------------------------------
# backends: each has layout(counts, n_rows); quant_rows(x, layout) -> (xq, xs) in the backend's row layout;
# mm(aq, a_s, bq, b_s, layout, out_dtype) -> (M, N) in the caller's row order; quant_grad(gy, layout,
# need_x, need_w) -> (gq, gs, gt); wgrad(gt, xq, xs, layout, out_dtype) -> (E, N, K)


class _Emulate:
    """Reference: dequantise, FP32 (or float64 for float64 inputs) matmul per expert."""

    @staticmethod
    def layout(counts: Tensor, n_rows: int) -> list[int]:
        return counts.tolist()

    @staticmethod
    def quant_rows(x: Tensor, sizes) -> tuple[Tensor, Tensor]:
        return quantize_tiles(x)

    @staticmethod
    def mm(aq, a_s, bq, b_s, sizes, out_dtype):
        cd = torch.float64 if out_dtype == torch.float64 else torch.float32
        a = dequantize_tiles(aq, a_s, dtype=cd)
        out = []
        for e, a_e in enumerate(a.split(sizes)):
            if a_e.shape[0]:
                a_e = a_e @ dequantize_blocks(bq[e], b_s[e], dtype=cd).t()
            else:
                a_e = a_e.new_zeros(0, bq.shape[1])
            out.append(a_e)
        return torch.cat(out).to(out_dtype)

    @staticmethod
    def quant_grad(gy, sizes, need_x, need_w):
        gq, gs = quantize_tiles(gy) if need_x else (None, None)
        return gq, gs, gy  # the weight gradient quantises per expert itself

    @classmethod
    def wgrad(cls, gy, xq, xs, sizes, out_dtype):
        x = dequantize_tiles(xq, xs)  # FP32, as the GPU kernels dequantise
        cd = torch.float64 if gy.dtype == torch.float64 else torch.float32
        out = gy.new_zeros(len(sizes), gy.shape[1], x.shape[1], dtype=cd)
        for e, (g_e, x_e) in enumerate(zip(gy.split(sizes), x.split(sizes))):
            if g_e.shape[0]:  # 1x128 tiles along this expert's tokens
                out[e] = cls.expert_wgrad(*quantize_tiles(g_e.t()), *quantize_tiles(x_e.t()), cd)
        return out.to(out_dtype)

    @staticmethod
    def expert_wgrad(gq, gs, xq, xs, cd):
        """dW_e = dY_e^T X_e from both operands' 1x128 tiles along the expert's tokens."""
        return dequantize_tiles(gq, gs, dtype=cd) @ dequantize_tiles(xq, xs, dtype=cd).t()


class _ScaledMMLoop(_Emulate):
    """One ``torch._scaled_mm`` per expert (DeepSeek block scales, sm90)."""

    @staticmethod
    def mm(aq, a_s, bq, b_s, sizes, out_dtype):
        out, start = [], 0
        for e, m in enumerate(sizes):
            if m:
                out.append(fp8_matmul_nt(aq[start:start + m], a_s[start:start + m], bq[e], b_s[e], b_blocks=True,
                                         out_dtype=out_dtype, backend="scaled_mm"))
            start += m
        return torch.cat(out) if out else aq.new_zeros(0, bq.shape[1], dtype=out_dtype)

    @staticmethod
    def expert_wgrad(gq, gs, xq, xs, cd):
        return fp8_matmul_nt(gq, gs, xq, xs, b_blocks=False, out_dtype=torch.float32, backend="scaled_mm")


class _PaddedLayout:
    """Rows sorted by expert, each expert's segment padded to a multiple of 128 rows (no host sync).

    ``src_row`` (Mp,) the real row of each padded row, -1 in the padding; ``tile_expert`` (T,) the expert of each
    128-row tile, -1 for tiles past the last segment; ``pad_start``/``pad_count`` (E,) each segment's first row
    and length. T = M // 128 + E + 1 bounds sum_e ceil(count_e / 128) without reading the counts on the host; Mp =
    128 T.
    """

    def __init__(self, counts: Tensor, n_rows: int):
        e = counts.numel()
        dev = counts.device
        padded = (counts + TILE - 1) // TILE * TILE
        pad_end = padded.cumsum(0)
        self.pad_start = (pad_end - padded).to(torch.int32)
        self.pad_count = padded.to(torch.int32)
        start = counts.cumsum(0) - counts
        expert = torch.repeat_interleave(torch.arange(e, device=dev), counts, output_size=n_rows)
        dest = self.pad_start[expert].long() + torch.arange(n_rows, device=dev) - start[expert]  # padded row
        self.n_tiles = n_rows // TILE + e + 1
        self.n_padded = self.n_tiles * TILE
        self.src_row = torch.full((self.n_padded,), -1, dtype=torch.int64, device=dev)
        self.src_row.index_copy_(0, dest, torch.arange(n_rows, device=dev))
        tile_rows = torch.arange(self.n_tiles, device=dev) * TILE
        idx = torch.searchsorted(pad_end, tile_rows, right=True)
        self.tile_expert = torch.where(idx < e, idx, -1).to(torch.int32)
        self.n_experts, self.n_rows = e, n_rows


class _TritonGrouped:
    """Grouped block-scaled FP8 GEMMs in Triton over the padded layout (see :class:`_PaddedLayout`).

    Operands are quantised straight into the padded layout (:func:`quantize_rows`, one pass that gathers,
    quantises and, for the weight gradient, transposes); activation scales are stored scale-major so the
    GEMMs' K loops read contiguous scales; the forward and input-gradient GEMMs write their rows back in
    the caller's order (a scatter in the epilogue, no gather afterwards).
    """

    layout = _PaddedLayout

    @staticmethod
    def quant_rows(x: Tensor, layout: _PaddedLayout) -> tuple[Tensor, Tensor]:
        q, s, _, _ = quantize_rows(x, layout.n_padded, src_row=layout.src_row)
        return q, s

    @staticmethod
    def mm(aq, a_s, bq, b_s, layout: _PaddedLayout, out_dtype):
        """aq (Mp, K) padded rows with scale-major scales (K/128, Mp); bq (E, N, K) with (E, N/128, K/128)."""
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"triton grouped FP8 GEMM: unsupported output dtype {out_dtype}")
        e, n, k = bq.shape
        c = torch.empty(layout.n_rows, n, device=aq.device, dtype=out_dtype)
        launch = dict(TRITON_LAUNCH)
        if k >= LONG_K:
            launch.update(TRITON_LAUNCH_LONG_K)
        block_m = launch.pop("BLOCK_M")  # divides 128, so a row tile still belongs to one expert
        block_n = launch.pop("BLOCK_N")
        tma = launch.pop("TMA") and k % 16 == 0  # TMA wants 16-byte row strides
        n_mt = layout.n_tiles * (TILE // block_m)
        a_op, b_op = aq, bq
        if tma:  # bulk tensor copies; out-of-range K is zero-filled, columns past N are masked at the store
            a_op = TensorDescriptor(aq, [aq.shape[0], k], [k, 1], [block_m, TILE])
            b_op = TensorDescriptor(bq.reshape(e * n, k), [e * n, k], [k, 1], [block_n, TILE])
        grid = (n_mt * triton.cdiv(n, block_n),)
        _grouped_fp8_mm_kernel[grid](
            a_op, a_s, b_op, b_s.float().contiguous(), c, layout.tile_expert, layout.src_row, n, k,
            layout.n_padded, triton.cdiv(k, TILE), b_s.shape[1], n_mt, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=TILE, EVEN=(k % TILE == 0 and n % block_n == 0), TMA=tma, **launch,
        )
        return c

    @staticmethod
    def quant_grad(gy, layout: _PaddedLayout, need_x, need_w):
        gq, gs, gtq, gts = quantize_rows(gy, layout.n_padded, src_row=layout.src_row, rowwise=need_x,
                                         colwise=need_w)
        return gq, gs, (gtq, gts)

    @staticmethod
    def wgrad(gt, xq, xs, layout: _PaddedLayout, out_dtype):
        # 1x128 tiles along the padded token axis: tiles never straddle two experts' segments.
        gq, gs = gt  # (N, Mp), (Mp/128, N)
        _, _, xtq, xts = quantize_rows(xq, layout.n_padded, x_scale=xs, rowwise=False, colwise=True)
        n, k, mp = gq.shape[0], xtq.shape[0], gq.shape[1]
        out = torch.empty(layout.n_experts, n, k, device=gq.device, dtype=out_dtype)
        launch = dict(WGRAD_LAUNCH)
        tma = launch.pop("TMA") and mp % 16 == 0
        g_op, x_op = gq, xtq
        if tma:
            g_op = TensorDescriptor(gq, [n, mp], [mp, 1], [launch["BLOCK_N"], TILE])
            x_op = TensorDescriptor(xtq, [k, mp], [mp, 1], [launch["BLOCK_K"], TILE])
        grid = (triton.cdiv(n, launch["BLOCK_N"]), triton.cdiv(k, launch["BLOCK_K"]), layout.n_experts)
        _grouped_fp8_wgrad_kernel[grid](
            g_op, gs, x_op, xts, out, layout.pad_start, layout.pad_count, n, k, mp, BLOCK_T=TILE, TMA=tma, **launch,
        )
        return out


_BACKENDS = {"emulate": _Emulate, "scaled_mm": _ScaledMMLoop, "triton": _TritonGrouped}
# Launch settings of the grouped kernels, from `bench/profile_fp8.py --sweep` (H100, four expert shapes; best or
# within 5% of best on each); K steps are 128 wide (one activation/weight scale per step). TMA: operands loaded
# by the bulk tensor copy engine (pointer loads where K is not a multiple of 16 bytes).
TRITON_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "TMA": True, "num_warps": 4, "num_stages": 4}
# ... and for K >= LONG_K, where 8 warps won at every shape swept (16b gate_up 1070 -> 934 us, V3 gate_up
# 1011 -> 881 us; V3 down even) while the 16b down projection (K 1408) lost with them (589 -> 765 us).
LONG_K = 2048
TRITON_LAUNCH_LONG_K = {"num_warps": 8, "num_stages": 3}
WGRAD_LAUNCH = {"BLOCK_N": 128, "BLOCK_K": 256, "TMA": True, "num_warps": 8, "num_stages": 3}

if triton is not None:

    @triton.jit
    def _grouped_fp8_mm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_expert_ptr, dst_row_ptr, N, K, Mp, n_kb, n_nb, n_mt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN: tl.constexpr, TMA: tl.constexpr,
    ):
        """C[dst_row[tile]] = A[tile] @ B[e]^T for the expert e owning the 128-row tile. A (Mp, K) fp8 with
        1x128 scales stored scale-major (n_kb, Mp); B (E, N, K) fp8 with 128x128 scales (E, n_nb, n_kb);
        padding rows (dst_row -1) are not written. Partial sums are scaled into an FP32 accumulator after
        every 128-wide K step (the §3.3 promotion). With TMA, a_ptr / b_ptr are tensor descriptors of A and
        of B viewed as (E * N, K)."""
        # Programs in groups of GROUP_M row tiles x all column tiles: a group's A rows are read from HBM once
        # and then from L2 (row tiles along M first re-read A once per column tile).
        pid = tl.program_id(0)
        n_nt = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * n_nt
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(n_mt - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        e = tl.load(tile_expert_ptr + pid_m // (128 // BLOCK_M))
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        dst = tl.load(dst_row_ptr + rows)
        # Padding sits at the end of a segment: a sub-tile whose first row is padding has no real row.
        n_steps = tl.where((e >= 0) & (tl.load(dst_row_ptr + pid_m.to(tl.int64) * BLOCK_M) >= 0), n_kb, 0)
        e = tl.maximum(e, 0).to(tl.int64)
        cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        if not TMA:
            a_ptrs = a_ptr + rows[:, None] * K + ks[None, :]
            b_ptrs = b_ptr + e * N * K + cols[None, :] * K + ks[:, None]
        # one weight-block scale per column (BLOCK_N may span several 128-wide blocks)
        bs_ptrs = bs_ptr + e * n_nb * n_kb + tl.minimum(cols // 128, n_nb - 1) * n_kb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(n_steps):
            k0 = kb * BLOCK_K
            if TMA:
                a = a_ptr.load([(pid_m * BLOCK_M).to(tl.int32), k0])
                b = b_ptr.load([(e * N + pid_n * BLOCK_N).to(tl.int32), k0]).T
            elif EVEN:
                a = tl.load(a_ptrs + k0)
                b = tl.load(b_ptrs + k0)
            else:
                k_ok = ks + k0 < K
                a = tl.load(a_ptrs + k0, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs + k0, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
            sa = tl.load(as_ptr + kb * Mp + rows)
            sb = tl.load(bs_ptrs + kb)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        c_ptrs = c_ptr + tl.maximum(dst, 0)[:, None] * N + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(dst[:, None] >= 0) & (cols[None, :] < N))

    @triton.jit
    def _grouped_fp8_wgrad_kernel(
        g_ptr, gs_ptr, x_ptr, xs_ptr, c_ptr, pad_start_ptr, pad_count_ptr, N, K, Mp,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, TMA: tl.constexpr,
    ):
        """dW[e] = G[:, seg e] @ X[:, seg e]^T with G (N, Mp), X (K, Mp) fp8 in 1x128 tiles along tokens
        (scales (Mp/128, N), (Mp/128, K): one contiguous row per step); seg e = [pad_start[e],
        pad_start[e] + pad_count[e]), 128-aligned. Written in c's dtype. With TMA, g_ptr / x_ptr are tensor
        descriptors of G and X."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        e = tl.program_id(2)
        # Segments start on 128-row boundaries: saying so lets Triton vectorise the loads along tokens.
        t0 = tl.multiple_of(tl.load(pad_start_ptr + e), BLOCK_T).to(tl.int64)
        n_steps = tl.load(pad_count_ptr + e) // BLOCK_T
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok, k_ok = rn < N, rk < K
        if not TMA:
            ts = t0 + tl.arange(0, BLOCK_T)
            g_ptrs = g_ptr + rn[:, None] * Mp + ts[None, :]
            x_ptrs = x_ptr + rk[None, :] * Mp + ts[:, None]
        gs_ptrs = gs_ptr + (t0 // BLOCK_T) * N + rn
        xs_ptrs = xs_ptr + (t0 // BLOCK_T) * K + rk
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(n_steps):
            t = i * BLOCK_T
            if TMA:
                g = g_ptr.load([pid_n * BLOCK_N, (t0 + t).to(tl.int32)])
                x = x_ptr.load([pid_k * BLOCK_K, (t0 + t).to(tl.int32)]).T
            else:
                g = tl.load(g_ptrs + t, mask=n_ok[:, None], other=0.0)
                x = tl.load(x_ptrs + t, mask=k_ok[None, :], other=0.0)
            sg = tl.load(gs_ptrs + i * N, mask=n_ok, other=0.0)
            sx = tl.load(xs_ptrs + i * K, mask=k_ok, other=0.0)
            acc += tl.dot(g, x) * (sg[:, None] * sx[None, :])
        c_ptrs = c_ptr + e.to(tl.int64) * N * K + rn[:, None] * K + rk[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
