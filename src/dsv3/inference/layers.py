"""One decoder block over the paged latent cache: the two attention forms (the MoE: :mod:`.moe`).

These are plain functions of a block's own modules and of one layer's cache tensor
``latent`` (pages + 1, page_size, d_c + d_r) (see :mod:`dsv3.inference.cache`), so that one function serves
every layer: :func:`decode_block` is what the engine compiles with ``torch.compile`` (the same compiled code
runs all layers of a shape) and captures in CUDA graphs.

* :func:`prefill_attention`: the expanded form of training (report §2.1.1, eq. 1-11). q, c^KV and k^R
  come from :meth:`MLA.query` / :meth:`MLA.latent`; c^KV and k^R are written to the cache; keys and values
  are expanded with W^UK / W^UV (``kv_b_proj``) and attended with SDPA.
* :func:`absorbed_attention`: weight absorption (the model's :meth:`MLA.absorbed`). With W^UK_h and W^UV_h
  the per-head slices of ``kv_b_proj``::

      q_lat   = q^C_h W^UK_h                                 (the query moved into the latent space, d_c)
      score_t = (q_lat . c^KV_t + q^R_h . k^R_t) * softmax_scale
      o_h     = W^UV_h (sum_t softmax(score)_t c^KV_t)        then W^O (``o_proj``)

  so per cached token only the 576 latent values are read; keys and values are never expanded. Written in
  the model with einsum and softmax (the reference, and the CPU path); on the GPU the same math runs through
  the Triton kernels of :mod:`dsv3.inference.triton_mla` (``kernels=True``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model.attention import MLA
from ..model.moe import MoE
from ..model.transformer_block import Block
from .cache import read_latent, write_latent
from .fusion import mla_first_projections, mla_query_latent, swiglu
from .moe import moe_forward


@torch.library.custom_op("dsv3::write_latent", mutates_args=("latent",))
def _write_latent(latent: torch.Tensor, index: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """:func:`~dsv3.inference.cache.write_latent` as an opaque in-place op for ``torch.compile``: traced as
    plain indexing, the write into the cache (a graph input) became a copy of the layer's whole cache."""
    write_latent(latent, index, kv, k_pe)


def prefill_attention(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent: torch.Tensor, index: torch.Tensor, pages: torch.Tensor | None = None, visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expanded MLA for n new tokens x (B, n, d), their latents written at ``index`` (B, n). Without ``pages``
    the rows are new prompts right-padded to n that attend causally (the padding stays out of every real
    token's view). With ``pages`` (B, P) the rows continue cached sequences (a cached prefix, a recomputed
    sequence): every token attends over the latents of its row's pages where ``visible`` (B, n, P x
    page_size) allows, the cached positions and the new ones up to itself."""
    b, n, _ = x.shape
    (q_nope, q_pe), (kv, k_pe) = mla_query_latent(attn, x, cos, sin)
    _write_latent(latent, index, kv, k_pe)
    mask = None
    if pages is not None:
        kv, k_pe = read_latent(latent, pages).split([attn.kv_lora_rank, attn.qk_rope_head_dim], -1)
        mask = visible[:, None]  # (B, 1, n, T): the same for every head
    k, v = attn.expand_kv(kv.to(x.dtype), k_pe.to(x.dtype))
    q = torch.cat([q_nope, q_pe], dim=-1)
    o = F.scaled_dot_product_attention(  # the engine asks for cuDNN first (model.attention._prefer_cudnn)
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, scale=attn.softmax_scale,
    )
    return attn.o_proj(o.transpose(1, 2).reshape(b, n, attn.n_heads * attn.v_head_dim))


def absorbed_attention(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent: torch.Tensor, index: torch.Tensor, pages: torch.Tensor, positions: torch.Tensor, kernels: bool = False,
) -> torch.Tensor:
    """MLA with W^UK and W^UV absorbed, for new tokens x (B, S, d) written at ``index`` (B, S) and attending
    over the cached latents of ``pages`` (B, P): token (b, s) sees the cached positions 0 ..
    ``positions[b, s]``.

    The math is the model's :meth:`MLA.absorbed <dsv3.model.attention.MLA.absorbed>` over the gathered pages
    (the reference, and the CPU path). ``kernels``: the Triton kernels of :mod:`dsv3.inference.triton_mla`
    (CUDA) in place of its einsums, softmax and the page gather; the latent's norm and RoPE happen in the
    kernel that writes it to the cache, the query's RoPE in the attention kernel."""
    if kernels:
        b, s, _ = x.shape
        h, d_nope, d_v, d_c = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
        w = attn.kv_b_proj.weight.view(h, d_nope + d_v, d_c)
        w_uk, w_uv = w[:, :d_nope].to(x.dtype), w[:, d_nope:].to(x.dtype)  # (H, d_nope, d_c), (H, d_v, d_c)
        from .triton_mla import head_matmul, latent_attention, write_latent

        q0, kv_a = mla_first_projections(attn, x)
        q_nope, q_pe = attn.query_from(q0, cos, sin, rotate=False)
        write_latent(latent, index, kv_a, attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps, cos, sin)
        q_lat = head_matmul(q_nope.reshape(b * s, h, d_nope), w_uk).view(b, s, h, d_c)
        o_lat = latent_attention(q_lat, q_pe, latent, pages, positions, cos, sin, attn.softmax_scale)
        o = head_matmul(o_lat.view(b * s, h, d_c), w_uv.transpose(1, 2))
        return attn.o_proj(o.reshape(b, s, h * d_v))
    (q_nope, q_pe), (kv, k_pe) = mla_query_latent(attn, x, cos, sin)  # (B, S, H, d_nope), (B, S, H, d_r)
    _write_latent(latent, index, kv, k_pe)  # write first: a token attends to itself
    lat = read_latent(latent, pages).to(x.dtype)  # (B, T, d_c + d_r)
    visible = torch.arange(lat.shape[1], device=x.device) <= positions[:, :, None]  # (B, S, T)
    return attn.absorbed(q_nope, q_pe, lat, visible)


def run_block(
    block: Block, x: torch.Tensor, attend: Callable[[MLA, torch.Tensor], torch.Tensor], experts: str = "module"
) -> torch.Tensor:
    """One decoder block (as :meth:`Block.forward`) with the attention replaced by ``attend(mla, h)``; the
    norms and the FFN / MoE are the block's own modules (the MoE through :func:`moe_forward`)."""
    x = x + attend(block.self_attn, block.input_layernorm(x))
    h = block.post_attention_layernorm(x)
    y = moe_forward(block.mlp, h, experts) if isinstance(block.mlp, MoE) else swiglu(block.mlp, h)
    return x + y


def prefill_block(
    block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latent: torch.Tensor,
    index: torch.Tensor, pages: torch.Tensor | None = None, visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """A block over new prompt tokens with expanded attention (:func:`prefill_attention`)."""
    return run_block(block, x, lambda attn, h: prefill_attention(attn, h, cos, sin, latent, index, pages, visible))


def continue_block(
    block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latent: torch.Tensor,
    index: torch.Tensor, pages: torch.Tensor, visible: torch.Tensor,
) -> torch.Tensor:
    """:func:`prefill_block` for tokens that continue cached positions (their own function, so that
    ``torch.compile`` keeps its variants apart from the new prompts': dense and MoE blocks, main and MTP, with
    and without cached keys went past dynamo's recompile limit of 8 for one function)."""
    return run_block(block, x, lambda attn, h: prefill_attention(attn, h, cos, sin, latent, index, pages, visible))


def decode_block(
    block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latent: torch.Tensor,
    index: torch.Tensor, pages: torch.Tensor, positions: torch.Tensor, experts: str = "module",
    kernels: bool = False,
) -> torch.Tensor:
    """A block over new tokens with absorbed attention (:func:`absorbed_attention`)."""
    return run_block(
        block, x, lambda attn, h: absorbed_attention(attn, h, cos, sin, latent, index, pages, positions, kernels),
        experts,
    )
