"""Triton kernels for MLA's absorbed attention at decode time (report §2.1.1, weight absorption).

A decode step attends a handful of new tokens over the paged latent cache. Written as PyTorch ops this is a
gather of the sequences' pages, a batched product for the scores, a softmax and a second batched product,
each a separate kernel that moves little; plus two per-head products for the absorption (W^UK into the
query, W^UV out of the latent) that cuBLAS runs at a fraction of the copy bandwidth. Here:

* :func:`head_matmul`: y[t, h] = x[t, h] @ W[h] for every head h in one launch (W^UK and W^UV), one program
  per (head, column tile) streaming its weight tile once for all tokens;
* :func:`latent_attention`: flash-decoding over the cache pages (no gather): program (token, split) reads
  the keys of its split page by page, scores all heads at once against [c^KV; k^R] (the shared key of
  every head), keeps an online softmax and accumulates the c^KV values; a second kernel combines the
  splits per (token, head).

Imported lazily (Triton is optional). Both are ``torch.library`` custom ops, so ``torch.compile`` keeps them
as opaque calls and CUDA graphs capture them. The reference is :func:`dsv3.inference.layers.absorbed_attention`
with ``kernels=False`` (einsum, softmax).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ROWS = tl.constexpr(16)  # the smallest row tile tl.dot takes: a decode step's tokens (more loop)


@triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
             for bn, bk, w, s in [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (32, 256, 4, 3)]],
    key=["T", "K", "N"],
)
@triton.jit
def _head_matmul_kernel(
    x_ptr, w_ptr, y_ptr, T, K, N,
    stride_xt, stride_xh, stride_wh, stride_wk, stride_wn, stride_yt, stride_yh,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    h = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_head = w_ptr + h.to(tl.int64) * stride_wh
    for m0 in range(0, T, ROWS):
        rows = m0 + tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            x = tl.load(x_ptr + rows[:, None] * stride_xt + h * stride_xh + k[None, :],
                        mask=(rows[:, None] < T) & (k[None, :] < K), other=0.0)
            w = tl.load(w_head + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(x, w, acc)
        tl.store(y_ptr + rows[:, None] * stride_yt + h * stride_yh + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cols[None, :] < N))


@torch.library.custom_op("dsv3::head_matmul", mutates_args=())
def head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (T, H, K) (last dim contiguous), w (H, K, N) with either of its last two dims contiguous ->
    (T, H, N) in x's dtype: ``torch.einsum("thk,hkn->thn", x, w)`` with FP32 accumulation."""
    t, h, k = x.shape
    n = w.shape[2]
    if x.stride(2) != 1:
        x = x.contiguous()
    y = torch.empty(t, h, n, device=x.device, dtype=x.dtype)
    if t == 0:
        return y
    _head_matmul_kernel[lambda m: (h, triton.cdiv(n, m["BLOCK_N"]))](
        x, w, y, t, k, n, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
    )
    return y


@head_matmul.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], x.shape[1], w.shape[2])


@triton.jit
def _latent_attention_kernel(
    q_ptr, qr_ptr, lat_ptr, pages_ptr, pos_ptr, cos_ptr, sin_ptr, o_ptr, m_ptr, l_ptr,
    H, S, KEYS_PER_SPLIT, scale,
    stride_qt, stride_qh, stride_rt, stride_rh, stride_pb, stride_cs, stride_ot, stride_os, stride_oh,
    PAGE: tl.constexpr, D_C: tl.constexpr, D_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program (token, split): the scores of all heads over the split's keys and their value sums. The
    query's RoPE part arrives unrotated (interleaved pairs, as :func:`dsv3.model.rope.apply_rope`) and is
    rotated here."""
    tok = tl.program_id(0)  # b * S + s
    split = tl.program_id(1)
    b = tok // S
    heads = tl.arange(0, BLOCK_H)
    cs = tl.arange(0, D_C)
    rs = tl.arange(0, D_R)
    q_c = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + cs[None, :], mask=heads[:, None] < H,
                  other=0.0)
    half = tl.arange(0, D_R // 2)
    q_pairs = qr_ptr + tok * stride_rt + heads[:, None] * stride_rh + 2 * half[None, :]
    x1 = tl.load(q_pairs, mask=heads[:, None] < H, other=0.0).to(tl.float32)
    x2 = tl.load(q_pairs + 1, mask=heads[:, None] < H, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + tok * stride_cs + half).to(q_c.dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + tok * stride_cs + half).to(q_c.dtype).to(tl.float32)[None, :]
    q_r = tl.reshape(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (BLOCK_H, D_R)).to(q_c.dtype)
    last = tl.load(pos_ptr + tok)  # keys 0 .. last are visible
    start = split * KEYS_PER_SPLIT
    end = tl.minimum(start + KEYS_PER_SPLIT, last + 1)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, D_C), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        keys = t0 + tl.arange(0, BLOCK_T)
        live = keys < end
        page = tl.load(pages_ptr + b * stride_pb + keys // PAGE, mask=live, other=0)
        row = tl.multiple_of((page.to(tl.int64) * PAGE + keys % PAGE) * (D_C + D_R), 64)
        kv = tl.load(lat_ptr + row[:, None] + cs[None, :], mask=live[:, None], other=0.0)
        kr = tl.load(lat_ptr + row[:, None] + D_C + rs[None, :], mask=live[:, None], other=0.0)
        s = tl.dot(q_c, tl.trans(kv)) + tl.dot(q_r, tl.trans(kr))
        s = tl.where(live[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
        m = m_new
    out = tok * stride_ot + split * stride_os
    tl.store(o_ptr + out + heads[:, None] * stride_oh + cs[None, :], acc, mask=heads[:, None] < H)
    tl.store(m_ptr + tok * tl.num_programs(1) * H + split * H + heads, m, mask=heads < H)
    tl.store(l_ptr + tok * tl.num_programs(1) * H + split * H + heads, l, mask=heads < H)


@triton.jit
def _combine_splits_kernel(o_ptr, m_ptr, l_ptr, out_ptr, H, SPLITS, stride_out,
                           BLOCK_S: tl.constexpr, D_C: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[tok, h] = sum_s e^(m_s - max m) o_s / sum_s e^(m_s - max m) l_s over the splits s, BLOCK_S splits
    at a time with a running maximum (any number of splits); program (token, head, BLOCK_C of the d_c values)."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_run = tl.full((), float("-inf"), dtype=tl.float32)
    l_run = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        stat = tok * SPLITS * H + ss * H + h
        m = tl.load(m_ptr + stat, mask=ss < SPLITS, other=float("-inf"))
        l = tl.load(l_ptr + stat, mask=ss < SPLITS, other=0.0)
        o = tl.load(o_ptr + stat[:, None].to(tl.int64) * D_C + cs[None, :], mask=(ss < SPLITS)[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: the first split always has keys
        w = tl.exp(m - m_new)  # splits past the token's last key: m = -inf, weight 0
        alpha = tl.exp(m_run - m_new)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        l_run = l_run * alpha + tl.sum(l * w, axis=0)
        m_run = m_new
    tl.store(out_ptr + tok * stride_out + h * D_C + cs, (acc / l_run).to(out_ptr.dtype.element_ty))


LAUNCH = {"block_t": 32, "keys_per_split": 64, "num_warps": 4, "num_stages": 2, "waves": 4, "max_splits": 1024,
          "combine_block": 128}
"""Launch settings of :func:`latent_attention`: keys per inner step and per split (at least), warps and
pipeline stages of the split kernel, the programs the splits aim for in multiples of the GPU's
multiprocessors (a long context at batch 1 is only memory-bound when it is spread over all of them), and the
most splits per token; the combine kernel's values per program (a power of two)."""


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@torch.library.custom_op("dsv3::latent_attention", mutates_args=())
def latent_attention(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, pages: torch.Tensor, positions: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Absorbed attention of new tokens over the paged latent cache, without gathering the pages.

    ``q_lat`` (B, S, H, d_c) = q^C W^UK and ``q_pe`` (B, S, H, d_r) the query's RoPE part before rotation
    by ``cos`` / ``sin`` (B, S, d_r / 2) (d_c and d_r powers of two); ``latent`` (pages + 1, page_size,
    d_c + d_r) one layer's cache; ``pages`` (B, P) each sequence's pages; ``positions`` (B, S): token
    (b, s) sees the keys 0 .. positions[b, s]. Returns
    sum_t softmax_t(scale (q_lat . c^KV_t + q_pe . k^R_t)) c^KV_t: (B, S, H, d_c) in q_lat's dtype.

    Two kernels: flash-decoding over splits of the keys (program (token, split): unnormalised value sums,
    running max and denominator in FP32), then one program per (token, head) combining the splits."""
    b, s, h, d_c = q_lat.shape
    d_r = q_pe.shape[-1]
    t = b * s
    page = latent.shape[1]
    n_keys = pages.shape[1] * page
    block_t = LAUNCH["block_t"]
    # enough programs to stream the cache from every multiprocessor, each over at least keys_per_split keys
    programs = LAUNCH["waves"] * _multiprocessors(q_lat.device)
    splits = max(1, min(triton.cdiv(n_keys, LAUNCH["keys_per_split"]), triton.cdiv(programs, t),
                        LAUNCH["max_splits"]))
    per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_t) * block_t
    splits = triton.cdiv(n_keys, per_split)
    q_lat, q_pe = q_lat.reshape(t, h, d_c), q_pe.reshape(t, h, d_r)
    cos, sin = (c.expand(b, s, -1).reshape(t, -1).contiguous() for c in (cos, sin))
    if q_lat.stride(2) != 1 or q_pe.stride(2) != 1:
        q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    out = torch.empty(b, s, h, d_c, device=q_lat.device, dtype=q_lat.dtype)
    if t == 0:
        return out
    o = torch.empty(t, splits, h, d_c, device=q_lat.device, dtype=torch.float32)
    m = torch.empty(t, splits, h, device=q_lat.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _latent_attention_kernel[(t, splits)](
        q_lat, q_pe, latent, pages, positions.contiguous(), cos, sin, o, m, l, h, s, per_split, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), pages.stride(0), cos.stride(0),
        o.stride(0), o.stride(1), o.stride(2),
        PAGE=page, D_C=d_c, D_R=d_r, BLOCK_H=max(16, triton.next_power_of_2(h)), BLOCK_T=block_t,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"],
    )
    block_c = min(d_c, LAUNCH["combine_block"])
    _combine_splits_kernel[(t, h, d_c // block_c)](o, m, l, out, h, splits, h * d_c,
                                                   BLOCK_S=min(32, triton.next_power_of_2(splits)), D_C=d_c,
                                                   BLOCK_C=block_c, num_warps=4)
    return out


@latent_attention.register_fake
def _(q_lat, q_pe, latent, pages, positions, cos, sin, scale):
    return q_lat.new_empty(q_lat.shape)


@triton.jit
def _write_latent_kernel(latent_ptr, index_ptr, kv_ptr, g_ptr, cos_ptr, sin_ptr, eps, stride_kv, stride_cs,
                         D_C: tl.constexpr, D_R: tl.constexpr):
    tok = tl.program_id(0)
    dtype = latent_ptr.dtype.element_ty
    row = latent_ptr + tl.load(index_ptr + tok).to(tl.int64) * (D_C + D_R)
    src = kv_ptr + tok * stride_kv
    cs = tl.arange(0, D_C)
    c = tl.load(src + cs).to(tl.float32)
    c = (c * tl.rsqrt(tl.sum(c * c, axis=0) / D_C + eps)).to(dtype)  # RMSNorm as the model's: FP32, cast, scale
    tl.store(row + cs, c * tl.load(g_ptr + cs).to(dtype))
    half = tl.arange(0, D_R // 2)
    x1 = tl.load(src + D_C + 2 * half).to(tl.float32)
    x2 = tl.load(src + D_C + 2 * half + 1).to(tl.float32)
    cos = tl.load(cos_ptr + tok * stride_cs + half).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + tok * stride_cs + half).to(dtype).to(tl.float32)
    tl.store(row + D_C + 2 * half, (x1 * cos - x2 * sin).to(dtype))
    tl.store(row + D_C + 2 * half + 1, (x2 * cos + x1 * sin).to(dtype))


@torch.library.custom_op("dsv3::write_latent_rows", mutates_args=("latent",))
def write_latent(
    latent: torch.Tensor, index: torch.Tensor, kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> None:
    """Eq. 1 and 3 into the cache in one kernel: from ``kv_a`` (B, S, d_c + d_r) = kv_a_proj_with_mqa(x)
    (c^KV before its RMSNorm with ``norm_weight`` and ``eps``; k^R before RoPE by ``cos`` / ``sin``
    (B, S, d_r / 2)), the rows [RMSNorm(c^KV); RoPE(k^R)] at ``index`` (B, S) of one layer's cache
    (pages + 1, page_size, d_c + d_r), as :meth:`MLA.latent_from` and
    :func:`dsv3.inference.cache.write_latent` would; d_c and d_r powers of two."""
    b, s, width = kv_a.shape
    d_r = 2 * cos.shape[-1]
    kv_a = kv_a.reshape(b * s, width)
    if kv_a.stride(1) != 1:
        kv_a = kv_a.contiguous()
    cos, sin = (c.expand(b, s, -1).reshape(b * s, -1).contiguous() for c in (cos, sin))
    if index.numel():
        _write_latent_kernel[(b * s,)](latent, index.reshape(-1).contiguous(), kv_a, norm_weight, cos, sin, eps,
                                       kv_a.stride(0), cos.stride(0), D_C=width - d_r, D_R=d_r, num_warps=2)
