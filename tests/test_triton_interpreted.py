"""The Triton kernels of dsv3.inference.triton_mla run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
read when the kernels are defined: a fresh process), so CI checks their logic without a GPU; the GPU test
(tests/test_inference.py) checks them compiled, at the 16b preset's sizes."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    from dsv3.inference import triton_mla
    from dsv3.model.rope import apply_rope

    g = torch.Generator().manual_seed(0)
    triton_mla.LAUNCH.update(keys_per_split=8, block_t=8, combine_block=16)  # many splits from few keys: the combine loops
    for b, s, h, d_c, d_r, page, n_pages in [(1, 1, 4, 64, 16, 8, 40), (2, 2, 4, 64, 16, 8, 9)]:
        latent = torch.randn(3 * n_pages + 1, page, d_c + d_r, generator=g)
        pages = torch.stack([torch.randperm(3 * n_pages, generator=g)[:n_pages] for _ in range(b)])
        positions = torch.randint(s, n_pages * page, (b, 1), generator=g) - s + 1 + torch.arange(s)
        q_lat, q_pe = torch.randn(b, s, h, d_c, generator=g), torch.randn(b, s, h, d_r, generator=g)
        cos, sin = torch.randn(b, s, d_r // 2, generator=g), torch.randn(b, s, d_r // 2, generator=g)
        got = triton_mla.latent_attention(q_lat, q_pe, latent, pages, positions, cos, sin, 0.1).double()
        lat = latent[pages].flatten(1, 2).double()
        q = torch.cat([q_lat, apply_rope(q_pe, cos, sin)], -1).double()
        scores = torch.einsum("bshc,btc->bsht", q, lat) * 0.1
        hidden = torch.arange(lat.shape[1]) > positions[:, :, None, None]
        ref = torch.einsum("bsht,btc->bshc", scores.masked_fill(hidden, float("-inf")).softmax(-1), lat[..., :d_c])
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (b, n_pages, err)
    print("ok")
""")


def test_latent_attention_kernels_interpreted():
    """Flash-decoding over pages out of order, tokens at different positions, two tokens per sequence, and more
    splits than the combine kernel takes at once (40 splits of 8 keys), against the einsum reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


FP8_SCRIPT = textwrap.dedent("""
    import torch
    import triton
    from dsv3.fp8.quant import dequantize_blocks, quantize_blocks
    from dsv3.inference import triton_moe
    from dsv3.kernels import few_rows

    one = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128})]  # the interpreter cannot time configs
    for kernel in (few_rows._grouped_mm_few_rows_kernel, triton_moe._moe_decode_gate_up_kernel,
                   triton_moe._moe_decode_down_kernel):
        kernel.configs = one
    g = torch.Generator().manual_seed(0)

    def fp8(w):  # (..., N, K) -> FP8, block factors, the dequantised weight
        flat = [quantize_blocks(m) for m in w.reshape(-1, *w.shape[-2:])]
        q, s = torch.stack([f[0] for f in flat]), torch.stack([f[1] for f in flat])
        deq = torch.stack([dequantize_blocks(a, b) for a, b in zip(q, s)]).double()
        return q.view(*w.shape), s.view(*w.shape[:-2], *s.shape[1:]), deq.view(*w.shape)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    # grouped over experts (empty ones, sizes not multiples of the blocks) and one matrix (a Linear)
    for counts, n, k in [([1, 0, 2, 0, 3], 256, 384), ([3], 200, 130)]:
        q, s, deq = fp8(torch.randn(len(counts), n, k, generator=g) / k ** 0.5)
        x = torch.randn(sum(counts), k, generator=g)
        y = few_rows.grouped_mm_few_rows(x, q, torch.tensor(counts).cumsum(0).to(torch.int32), s)
        ref = torch.einsum("mk,mnk->mn", x.double(), deq[torch.repeat_interleave(torch.arange(len(counts)),
                                                                                 torch.tensor(counts))])
        assert err(y, ref) < 1e-6, (counts, err(y, ref))
    y = few_rows.linear_few_rows(x.view(1, 3, k), q[0], s[0])
    assert y.shape == (1, 3, n) and err(y[0], x.double() @ deq[0].T) < 1e-6
    assert err(few_rows.linear_few_rows(x, deq[0].float()), x.double() @ deq[0].T) < 1e-6  # 16-bit weights

    # routed + shared experts of a few tokens, FP8 (one token: by slot; three tokens: by expert)
    def mlp(x, w13, w2):
        gate, up = (x @ w13.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2.T

    e, d, inter, pieces = 6, 256, 128, 2
    q13, s13, w13 = fp8(torch.randn(e, 2 * inter, d, generator=g) / d ** 0.5)
    q2, s2, w2 = fp8(torch.randn(e, d, inter, generator=g) / inter ** 0.5)
    qs13, ss13, ws13 = fp8(torch.randn(2 * inter * pieces, d, generator=g) / d ** 0.5)
    qs2, ss2, ws2 = fp8(torch.randn(d, inter * pieces, generator=g) / inter ** 0.5)
    for t, k in [(1, 2), (3, 2)]:
        x = torch.randn(t, d, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        y = triton_moe.moe_decode_experts(x, ids, q13, q2, qs13, qs2, [s13, s2, ss13, ss2]).double()
        ref = torch.stack([mlp(x[i].double(), w13[j], w2[j]) for i, j in
                           zip(torch.arange(t).repeat_interleave(k).tolist(), ids.flatten().tolist())])
        assert err(y[:t * k], ref) < 1e-6, (t, err(y[:t * k], ref))
        shared = y[t * k:].view(pieces, t, d).sum(0)
        assert err(shared, mlp(x.double(), ws13, ws2)) < 1e-6
    print("ok")
""")


def test_fp8_few_rows_and_decode_experts_kernels_interpreted():
    """FP8 weights with 128x128 block factors in the decode kernels (the official checkpoint layout, kept
    FP8): the few-rows GEMM over experts and for one Linear, and the fused routed + shared experts, against
    the dequantised weights in float64."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FP8_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
