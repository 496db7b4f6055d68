"""FP8 primitives (report §3.3): tile/block quantisation and the FP8 Linear autograd.

CPU tests check the reference math and the emulated GEMMs; ``gpu`` tests check that the Triton
quantisers and the ``torch._scaled_mm`` GEMMs agree with that reference.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from dsv3.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    dequantize_blocks,
    dequantize_tiles,
    fp8_linear,
    quantize_blocks,
    quantize_rows,
    quantize_tiles,
)
from dsv3.fp8 import linear as fp8_linear_mod
from dsv3.fp8 import quant as fp8_quant

E4M3_MIN_NORMAL = 2.0**-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spread(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random values whose magnitude varies a lot across rows/tiles (exercises per-tile scales)."""
    g = _gen(seed)
    mag = torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 2)
    return torch.randn(*shape, generator=g) * mag


def _roundtrip_bound(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    # E4M3 has 3 mantissa bits: round-to-nearest error <= 2^-4 relative for normal values; below
    # the smallest normal (|x / s| < 2^-6) the spacing is 2^-9, so absolute error <= 2^-10 * s.
    return torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * scale_full) * (1 + 1e-6)


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 200), (7, 1), (2, 130)])
def test_tiles_roundtrip_error_and_shapes(shape):
    x = _spread(*shape)
    q, s = quantize_tiles(x)
    k = shape[-1]
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(k / 128))
    xr = dequantize_tiles(q, s)
    assert xr.dtype == torch.float32 and xr.shape == x.shape
    s_full = s.repeat_interleave(128, -1)[..., :k]
    assert ((xr - x).abs() <= _roundtrip_bound(x, s_full)).all()


@pytest.mark.parametrize("shape", [(256, 384), (130, 200), (5, 7)])
def test_blocks_roundtrip_error_and_shapes(shape):
    w = _spread(*shape)
    q, s = quantize_blocks(w)
    n, k = shape
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (
        math.ceil(n / 128),
        math.ceil(k / 128),
    )
    wr = dequantize_blocks(q, s)
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    assert ((wr - w).abs() <= _roundtrip_bound(w, s_full)).all()


def test_tile_scale_is_amax_over_448_with_ragged_layout():
    # K = 200: tile 0 = channels 0..127, tile 1 = the 72 ragged channels 128..199.
    amax = torch.tensor([[3.5, 0.75], [448.0, 1e-3], [1.0, 1234.5]])
    x = torch.rand(3, 200, generator=_gen(1)) * 0.5  # |x| < 0.5 * tile amax below
    x[:, :128] *= amax[:, :1]
    x[:, 128:] *= amax[:, 1:]
    x[:, 5] = -amax[:, 0]  # the extreme may be negative
    x[:, 199] = amax[:, 1]  # ... and may sit in the ragged tail
    _, s = quantize_tiles(x)
    assert torch.equal(s, amax / 448.0)


def test_block_scale_layout_ragged():
    # N = 130, K = 200 -> 2 x 2 blocks; give each block a distinct amax at a corner element.
    w = torch.zeros(130, 200)
    amax = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w[:128, :128] = 0.25  # smaller values elsewhere in block (0, 0)
    w[0, 0], w[127, 199], w[129, 0], w[128, 128] = 1.0, -2.0, 3.0, 4.0
    q, s = quantize_blocks(w)
    assert torch.equal(s, amax / 448.0)
    assert q[0, 0].float() == 448.0 and q[127, 199].float() == -448.0


@pytest.mark.parametrize("quant", ["tiles", "blocks"])
def test_pow2_scales_are_powers_of_two_and_exact(quant):
    x = _spread(130, 300, seed=3)
    fn, deq = (
        (quantize_tiles, dequantize_tiles)
        if quant == "tiles"
        else (quantize_blocks, dequantize_blocks)
    )
    q, s = fn(x, pow2_scales=True)
    _, s_plain = fn(x)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()  # s = 0.5 * 2^e exactly
    assert (s >= s_plain).all() and (s < 2 * s_plain).all()  # rounded *up*, by < 2x
    # With power-of-two scales the dequantised product is exact in FP32.
    assert torch.equal(deq(q, s).double(), deq(q, s, dtype=torch.float64))
    assert q.float().abs().max() <= 448.0


def test_pow2_ceil_bit_trick():
    s = torch.tensor([1.0, 1.5, 0.75, 2.0**-130, 3e-41, 448.0, 2.0**-126 * 1.0001])
    # Subnormals round up to the smallest normal power of two: still a power of two >= s.
    expect = torch.tensor([1.0, 2.0, 1.0, 2.0**-126, 2.0**-126, 512.0, 2.0**-125])
    assert torch.equal(fp8_quant.pow2_ceil(s), expect)


@pytest.mark.parametrize("pow2", [False, True])
def test_zero_groups_give_no_nan(pow2):
    x = torch.randn(3, 300, generator=_gen(2))
    x[1] = 0.0
    x[2, 128:256] = 0.0
    q, s = quantize_tiles(x, pow2_scales=pow2)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(q.float()).all()
    assert (dequantize_tiles(q, s)[1] == 0).all() and (q.float()[2, 128:256] == 0).all()
    qb, sb = quantize_blocks(torch.zeros(130, 200), pow2_scales=pow2)
    assert torch.isfinite(sb).all() and (qb.float() == 0).all()


def test_tiny_amax_does_not_divide_by_zero():
    x = torch.zeros(1, 128)
    x[0, 0] = 1e-44  # amax / 448 underflows to 0 in FP32
    q, s = quantize_tiles(x)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(q.float()).all()


def test_bf16_and_strided_inputs():
    x = _spread(64, 300, seed=4)
    q, s = quantize_tiles(x.bfloat16())
    q32, s32 = quantize_tiles(x.bfloat16().float())
    assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(
        s, s32
    )
    qt, st = quantize_tiles(x.t())  # non-contiguous input: tiles run along x's dim 0
    qt_ref, st_ref = quantize_tiles(x.t().contiguous())
    assert torch.equal(qt.view(torch.uint8), qt_ref.view(torch.uint8)) and torch.equal(
        st, st_ref
    )


def test_block_quantisation_commutes_with_transpose():
    w = _spread(130, 300, seed=5)
    q, s = quantize_blocks(w)
    qt, st = quantize_blocks(w.t())
    assert torch.equal(qt.view(torch.uint8), q.t().view(torch.uint8)) and torch.equal(
        st, s.t()
    )


def test_block_quantisation_with_transpose_and_stacks():
    w = _spread(3, 130, 300, seed=6)
    q, s, qt, st = quantize_blocks(w, with_transpose=True)
    assert q.shape == (3, 130, 300) and s.shape == (3, 2, 3) and qt.shape == (3, 300, 130) and st.shape == (3, 3, 2)
    for b in range(3):  # each matrix of the stack on its own, and W^T's quantisation = the transpose
        qb, sb = quantize_blocks(w[b])
        qtb, stb = quantize_blocks(w[b].t())
        assert torch.equal(q[b].view(torch.uint8), qb.view(torch.uint8)) and torch.equal(s[b], sb)
        assert torch.equal(qt[b].view(torch.uint8), qtb.view(torch.uint8)) and torch.equal(st[b], stb)


def test_quantize_rows_gathers_pads_and_transposes():
    x = _spread(300, 200, seed=9)
    src_row = torch.tensor([5, 3, -1, 0] + [-1] * 124 + list(range(100, 228)))  # 256 layout rows
    q, s, qt, st = quantize_rows(x, 256, src_row=src_row, colwise=True)
    rows = torch.zeros(256, 200)
    rows[src_row >= 0] = x[src_row[src_row >= 0]]
    q_ref, s_ref = quantize_tiles(rows)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref.t())
    assert s.shape == (2, 256)  # scale-major
    qt_ref, st_ref = quantize_tiles(rows.t())
    assert torch.equal(qt.view(torch.uint8), qt_ref.view(torch.uint8)) and torch.equal(st, st_ref.t())
    assert st.shape == (2, 200) and float(q[2].float().abs().max()) == 0
    # An FP8 input with scale-major scales is dequantised first; without src_row rows are x's, zero-padded.
    xq, xs = quantize_tiles(x)
    _, _, qt2, st2 = quantize_rows(xq, 384, x_scale=xs.t().contiguous(), rowwise=False, colwise=True)
    rows2 = torch.zeros(384, 200)
    rows2[:300] = dequantize_tiles(xq, xs)
    qt2_ref, st2_ref = quantize_tiles(rows2.t())
    assert torch.equal(qt2.view(torch.uint8), qt2_ref.view(torch.uint8)) and torch.equal(st2, st2_ref.t())
    with pytest.raises(ValueError, match="n_rows % 128"):
        quantize_rows(x, 300, colwise=True)
    with pytest.raises(ValueError, match="n_rows 256 < 300"):
        quantize_rows(x, 256)


def test_dequantize_blocks_is_the_checkpoint_loader():
    # The official checkpoint stores fp8 `weight` + fp32 `weight_scale_inv` (ceil(N/128),
    # ceil(K/128)); the real weight is weight * weight_scale_inv per block.
    params = list(inspect.signature(dequantize_blocks).parameters)
    assert params == ["q", "scale_inv", "block", "dtype"]
    g = _gen(6)
    q = (torch.randn(200, 300, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
    scale_inv = torch.rand(2, 3, generator=g) + 0.1
    w = dequantize_blocks(q, scale_inv, dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16
    i, j = torch.meshgrid(torch.arange(200), torch.arange(300), indexing="ij")
    expect = q.float() * scale_inv[i // 128, j // 128]
    assert torch.equal(w, expect.bfloat16())
    with pytest.raises(ValueError):
        dequantize_blocks(q, scale_inv[:1])
    with pytest.raises(ValueError):
        dequantize_tiles(q, scale_inv)


# ----------------------------------------------------------------------------- FP8 linear


def _deq64_tiles(q, s):
    return dequantize_tiles(q, s, dtype=torch.float64)


def _reference_fp8_linear(x, w, b, gy):
    """Float64 reference of the §3.3 recipe: the same quantised operands, exact products/sums."""
    x2, gy2 = x.reshape(-1, x.shape[-1]).float(), gy.reshape(-1, gy.shape[-1]).float()
    xq, xs = quantize_tiles(x2)  # forward: X 1x128 along in_features
    wq, ws = quantize_blocks(w.float())  # W 128x128
    w64 = dequantize_blocks(wq, ws, dtype=torch.float64)
    y = _deq64_tiles(xq, xs) @ w64.t() + b.double()
    gq, gs = quantize_tiles(gy2)  # dX: dY 1x128 along out_features, W 128x128
    dx = _deq64_tiles(gq, gs) @ w64
    # dW: X comes from its FP8 cache, requantised with dY in 1x128 tiles along tokens.
    x_cached = dequantize_tiles(xq, xs)
    gtq, gts = quantize_tiles(gy2.t().contiguous())
    xtq, xts = quantize_tiles(x_cached.t().contiguous())
    dw = _deq64_tiles(gtq, gts) @ _deq64_tiles(xtq, xts).t()
    return y, dx, dw, gy2.double().sum(0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(layer_in, layer_out, tokens, dtype=torch.float32, backend="emulate", seed=0):
    g = _gen(seed)
    x = _spread(*tokens, layer_in, seed=seed).to(dtype).requires_grad_()
    w = (torch.randn(layer_out, layer_in, generator=g) / layer_in**0.5).requires_grad_()
    b = torch.randn(layer_out, generator=g).requires_grad_()
    y = fp8_linear(x, w, b, backend=backend)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)
    return x, w, b, y, gy


@pytest.mark.parametrize(
    "layer_in,layer_out,tokens",
    [(256, 384, (64,)), (200, 130, (3, 50)), (512, 256, (2, 128))],
)
def test_fp8_linear_matches_float64_reference_of_same_quantised_math(
    layer_in, layer_out, tokens
):
    x, w, b, y, gy = _run(layer_in, layer_out, tokens)
    y_ref, dx_ref, dw_ref, db_ref = _reference_fp8_linear(
        x.detach(), w.detach(), b.detach(), gy
    )
    assert y.shape == (*tokens, layer_out) and y.dtype == x.dtype
    assert x.grad.shape == x.shape and w.grad.dtype == torch.float32
    # FP32 accumulation vs exact float64 of the same FP8 operands: only summation rounding.
    assert _rel(y.reshape(-1, layer_out), y_ref) < 1e-6
    assert _rel(x.grad.reshape(-1, layer_in), dx_ref) < 1e-6
    assert _rel(w.grad, dw_ref) < 1e-6
    assert _rel(b.grad, db_ref) < 1e-6

    # Loose check against unquantised float64 math: E4M3 costs a few percent.
    x64, w64, gy64 = (
        x.detach().double(),
        w.detach().double(),
        gy.double().reshape(-1, layer_out),
    )
    x64 = x64.reshape(-1, layer_in)
    assert _rel(y.reshape(-1, layer_out), x64 @ w64.t() + b.detach().double()) < 0.06
    assert _rel(x.grad.reshape(-1, layer_in), gy64 @ w64) < 0.06
    assert _rel(w.grad, gy64.t() @ x64) < 0.06


def test_fp8_linear_bf16_activations_fp32_master_weight():
    x, w, b, y, _ = _run(256, 128, (2, 32), dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    x64 = x.detach().double().reshape(-1, 256)
    assert (
        _rel(y.reshape(-1, 128), x64 @ w.detach().double().t() + b.detach().double())
        < 0.06
    )


def test_fp8_linear_caches_activation_in_fp8_only():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fp8_linear(x, w)
    kinds = {(tuple(t.shape), t.dtype) for t in saved}
    assert ((64, 256), FP8_DTYPE) in kinds and ((64, 2), torch.float32) in kinds
    assert not any(t.shape == x.shape and t.dtype != FP8_DTYPE for t in saved)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_fp8_linear_no_bias_and_frozen_weight():
    x = torch.randn(8, 128, requires_grad=True)
    w = torch.randn(16, 128)  # frozen: only dX is computed
    fp8_linear(x, w).sum().backward()
    assert x.grad.shape == x.shape


def test_fp8linear_from_linear_shares_parameters():
    lin = nn.Linear(256, 128)
    f = FP8Linear.from_linear(lin)
    assert f.weight is lin.weight and f.bias is lin.bias
    assert isinstance(f, nn.Linear) and f.in_features == 256 and f.out_features == 128
    assert [id(p) for p in f.parameters()] == [id(p) for p in lin.parameters()]
    opt = torch.optim.SGD(f.parameters(), lr=0.1)
    before = lin.weight.detach().clone()
    f(torch.randn(4, 256)).square().sum().backward()
    opt.step()
    # The optimiser updates the shared master weight.
    assert not torch.equal(lin.weight, before)
    nb = FP8Linear.from_linear(nn.Linear(128, 64, bias=False))
    assert nb.bias is None and nb(torch.randn(3, 128)).shape == (3, 64)


# ------------------------------------------------- torch._scaled_mm layouts, checked on CPU


def _check_size_stride(t, dim, size, stride):
    return t.size(dim) == size and (size <= 1 or t.stride(dim) == stride)


def _fake_scaled_mm(used):
    """A CPU stand-in for ``torch._scaled_mm`` that enforces aten's blockwise layout rules."""

    def fake(
        a,
        b,
        scale_a,
        scale_b,
        bias=None,
        scale_result=None,
        out_dtype=None,
        use_fast_accum=False,
    ):
        assert a.dtype == b.dtype == FP8_DTYPE and not use_fast_accum
        m, k = a.shape
        n = b.shape[1]
        assert a.stride(1) == 1 and b.stride(0) == 1, (
            "sm90: mat1 row-major, mat2 column-major"
        )
        assert k % 128 == 0 and m % 16 == 0 and n % 16 == 0
        kt = k // 128
        # 1x128 on mat1: (M, K/128) outer-dim-major.
        assert _check_size_stride(scale_a, 0, m, 1) and _check_size_stride(
            scale_a, 1, kt, m
        )
        sbt = scale_b.t()  # aten checks mat2.t() against scale_b.t()
        rows = torch.arange(n)
        if _check_size_stride(sbt, 0, n, 1) and _check_size_stride(sbt, 1, kt, n):
            used.append("1x128")
            sb = sbt
        elif _check_size_stride(sbt, 0, -(-n // 128), kt) and _check_size_stride(
            sbt, 1, kt, 1
        ):
            used.append("128x128")
            sb = sbt[rows // 128]
        else:
            raise AssertionError(f"bad scale_b {scale_b.shape} {scale_b.stride()}")
        a32 = a.float() * scale_a.repeat_interleave(128, 1)
        b32 = b.float() * sb.repeat_interleave(128, 1).t()
        return (a32 @ b32).to(out_dtype)

    return fake


@pytest.mark.parametrize(
    "layer_in,layer_out,tokens",
    [(512, 512, (2, 64)), (200, 130, (50,)), (384, 136, (7,))],
)
def test_scaled_mm_backend_layouts_on_cpu(monkeypatch, layer_in, layer_out, tokens):
    used: list[str] = []
    monkeypatch.setattr(torch, "_scaled_mm", _fake_scaled_mm(used), raising=False)
    monkeypatch.setattr(fp8_linear_mod, "_hopper_scaled_mm_ok", lambda t: True)
    x, w, b, y, _ = _run(layer_in, layer_out, tokens, backend="scaled_mm", seed=7)
    x_e, w_e, b_e, y_e, _ = _run(layer_in, layer_out, tokens, backend="emulate", seed=7)
    assert len(used) == 3  # forward, dX, dW all went through _scaled_mm
    # Contraction/128 % 4 == 0: native 128x128 weight scales; else expanded to 1x128 tiles.
    assert used[0] == ("128x128" if layer_in % 512 == 0 else "1x128")  # forward
    assert used[1] == ("128x128" if layer_out % 512 == 0 else "1x128")  # dX
    assert used[2] == "1x128"  # dW: both operands 1x128 along tokens
    for got, ref in [
        (y, y_e),
        (x.grad, x_e.grad),
        (w.grad, w_e.grad),
        (b.grad, b_e.grad),
    ]:
        assert got.shape == ref.shape and _rel(got, ref) < 1e-6


# ----------------------------------------------------------------------------- GPU fast paths

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def _assert_fp8_within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> None:
    # Same-sign E4M3 codes are ordered like integers, so |code difference| is the ulp distance.
    ca, cb = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    same_sign = (ca >> 7) == (cb >> 7)
    zeros = (a.float() == 0) & (b.float() == 0)
    assert (zeros | (same_sign & ((ca - cb).abs() <= 1))).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_gpu_quantisers_match_cpu_reference(pow2, dtype, transpose):
    x = _spread(300, 200, seed=8).to(dtype)
    x[3] = 0
    if transpose:
        x = x.t()
    q, s = quantize_tiles(x.cuda(), pow2_scales=pow2)
    q_ref, s_ref = quantize_tiles(x, pow2_scales=pow2)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=2**-23, atol=0)
    _assert_fp8_within_one_ulp(q.cpu(), q_ref)
    qb, sb = quantize_blocks(x.cuda(), pow2_scales=pow2)
    qb_ref, sb_ref = quantize_blocks(x, pow2_scales=pow2)
    torch.testing.assert_close(sb.cpu(), sb_ref, rtol=2**-23, atol=0)
    _assert_fp8_within_one_ulp(qb.cpu(), qb_ref)


@pytest.mark.gpu
@needs_cuda
def test_gpu_rows_and_stacked_block_quantisers_match_cpu_reference():
    x = _spread(700, 330, seed=10).bfloat16()
    src_row = torch.randperm(896, generator=_gen(1))
    src_row = torch.where(src_row < 700, src_row, -1)
    out = quantize_rows(x.cuda(), 896, src_row=src_row.cuda(), colwise=True)
    ref = quantize_rows(x, 896, src_row=src_row, colwise=True)
    for got, want in zip(out, ref):
        if got.dtype == FP8_DTYPE:
            _assert_fp8_within_one_ulp(got.cpu(), want)
        else:
            torch.testing.assert_close(got.cpu(), want, rtol=2**-23, atol=0)
    xq, xs = quantize_tiles(x.float())
    out = quantize_rows(xq.cuda(), 768, x_scale=xs.t().contiguous().cuda(), rowwise=False, colwise=True)
    ref = quantize_rows(xq, 768, x_scale=xs.t().contiguous(), rowwise=False, colwise=True)
    _assert_fp8_within_one_ulp(out[2].cpu(), ref[2])
    torch.testing.assert_close(out[3].cpu(), ref[3], rtol=2**-23, atol=0)
    for w in (_spread(3, 200, 330, seed=11).bfloat16(), _spread(512, 1024, seed=12), _spread(2, 256, 384, seed=13)):
        out = quantize_blocks(w.cuda(), with_transpose=True)
        ref = quantize_blocks(w, with_transpose=True)
        for got, want in zip(out, ref):
            if got.dtype == FP8_DTYPE:
                _assert_fp8_within_one_ulp(got.cpu(), want)
            else:
                torch.testing.assert_close(got.cpu(), want, rtol=2**-23, atol=0)


def _sm90_scaled_mm() -> bool:
    return torch.cuda.is_available() and fp8_linear_mod._hopper_scaled_mm_ok(
        torch.empty(0, device="cuda")
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(
    not _sm90_scaled_mm(), reason="needs sm90 + CUDA >= 12.9 for _scaled_mm"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layer_in,layer_out,tokens",
    [(1024, 512, (4, 256)), (576, 1536, (300,)), (200, 130, (50,)), (256, 208, (129,))],
)
def test_gpu_scaled_mm_matches_emulation(dtype, layer_in, layer_out, tokens):
    def run(backend):
        torch.manual_seed(0)
        x = torch.randn(
            *tokens, layer_in, device="cuda", dtype=dtype, requires_grad=True
        )
        w = (
            torch.randn(layer_out, layer_in, device="cuda") / layer_in**0.5
        ).requires_grad_()
        y = fp8_linear(x, w, backend=backend)
        y.backward(torch.randn_like(y))
        return y, x.grad, w.grad

    # Tensor cores accumulate each 128-wide K block with limited precision before the FP32
    # promotion, so allow more than FP32 summation noise; bf16 adds output rounding.
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    for got, ref in zip(run("scaled_mm"), run("emulate"), strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape and _rel(got, ref) < tol
