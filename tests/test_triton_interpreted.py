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
