"""One decoder block over the paged latent cache: the two attention forms, and the MoE without host syncs.

These are plain functions of a block's own modules and of one layer's cache tensor
``latent`` (pages + 1, page_size, d_c + d_r) (see :mod:`dsv3.inference.cache`), so that one function serves
every layer: :func:`decode_block` is what the engine compiles with ``torch.compile`` (the same compiled code
runs all layers of a shape) and captures in CUDA graphs.

* :func:`prefill_attention`: the expanded form of training (report §2.1.1, eq. 1-11). q, c^KV and k^R
  come from :meth:`MLA.query` / :meth:`MLA.latent`; c^KV and k^R are written to the cache; keys and values
  are expanded with W^UK / W^UV (``kv_b_proj``) and attended with SDPA.
* :func:`absorbed_attention`: weight absorption. With W^UK_h and W^UV_h the per-head slices of
  ``kv_b_proj``::

      q_lat   = q^C_h W^UK_h                                 (the query moved into the latent space, d_c)
      score_t = (q_lat . c^KV_t + q^R_h . k^R_t) * softmax_scale
      o_h     = W^UV_h (sum_t softmax(score)_t c^KV_t)        then W^O (``o_proj``)

  so per cached token only the 576 latent values are read; keys and values are never expanded. Written
  here with einsum and softmax (the reference, and the CPU path); on the GPU the same math runs through the
  Triton kernels of :mod:`dsv3.inference.triton_mla` (``kernels=True``).
* :func:`moe_forward`: routing and experts for inference (the decode kernels of
  :mod:`dsv3.inference.triton_moe` on the GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model.attention import MLA
from ..model.moe import Gate, MoE
from ..model.transformer_block import Block
from .cache import read_latent, write_latent
from .fusion import mla_first_projections, mla_query_latent, swiglu


@torch.library.custom_op("dsv3::write_latent", mutates_args=("latent",))
def _write_latent(latent: torch.Tensor, index: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """:func:`~dsv3.inference.cache.write_latent` as an opaque in-place op for ``torch.compile``: traced as
    plain indexing, the write into the cache (a graph input) became a copy of the layer's whole cache."""
    write_latent(latent, index, kv, k_pe)


def prefill_attention(
    attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    latent: torch.Tensor, index: torch.Tensor, start: int = 0, pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expanded MLA for n new tokens x (B, n, d) at positions start .. start+n-1, their latents written at
    ``index`` (B, n). Prompts right-padded to n attend causally (the padding stays out of every real
    token's view). A prefix continuation (start > 0, B = 1) also attends over the cached positions,
    read through ``pages`` (1, P)."""
    b, n, _ = x.shape
    (q_nope, q_pe), (kv, k_pe) = mla_query_latent(attn, x, cos, sin)
    _write_latent(latent, index, kv, k_pe)
    mask = None
    if start > 0:
        kv, k_pe = read_latent(latent, pages)[:, :start + n].split([attn.kv_lora_rank, attn.qk_rope_head_dim], -1)
        mask = torch.arange(start + n, device=x.device) <= torch.arange(start, start + n, device=x.device)[:, None]
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

    The cache row [c^KV; k^R] serves as the key of every head against the query [q^C W^UK; q^R], so the
    score q_lat . c^KV + q^R . k^R is one product; the value is its c^KV part. ``kernels``: the Triton
    kernels of :mod:`dsv3.inference.triton_mla` (CUDA) in place of the einsums, softmax and page gather;
    the latent's norm and RoPE happen in the kernel that writes it to the cache, the query's RoPE in the
    attention kernel."""
    b, s, _ = x.shape
    h, d_nope, d_v, d_c = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    w = attn.kv_b_proj.weight.view(h, d_nope + d_v, d_c)
    w_uk, w_uv = w[:, :d_nope].to(x.dtype), w[:, d_nope:].to(x.dtype)  # (H, d_nope, d_c), (H, d_v, d_c)
    if kernels:
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
    hidden = (torch.arange(lat.shape[1], device=x.device) > positions[:, :, None])[:, :, None, :]  # (B, S, 1, T)
    q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, w_uk), q_pe], dim=-1)  # (B, S, H, d_c + d_r)
    scores = torch.einsum("bshc,btc->bsht", q, lat)
    scores = (scores.float() * attn.softmax_scale).masked_fill(hidden, float("-inf"))
    probs = scores.softmax(dim=-1).to(x.dtype)
    o_lat = torch.einsum("bsht,btc->bshc", probs, lat[..., :d_c])
    o = torch.einsum("bshc,hvc->bshv", o_lat, w_uv)
    return attn.o_proj(o.reshape(b, s, h * d_v))


def sort_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort of the token copies ``ids`` (N,) by expert, without host syncs: ``order`` (N,) (as
    ``ids.argsort(stable=True)``), its inverse ``place`` (the sorted position of each copy) and the tokens
    per expert ``counts`` (E,).

    ``torch.bincount`` (used by :func:`dsv3.model.moe.dispatch`) reads its input's min and max back to the
    host on CUDA, which stalls every step and cannot be captured in a CUDA graph. For the few copies of a
    decode step a counting sort replaces the sort kernel (tens of microseconds even for a few hundred
    keys): a copy's place is the number of copies of smaller experts plus those of its own expert before
    it, two comparisons over all pairs that ``torch.compile`` fuses into one reduction."""
    n = ids.numel()
    arange = torch.arange(n, device=ids.device)
    if n > 2048:  # prefill: a real sort
        counts = torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
        order = ids.argsort(stable=True)
        return order, torch.empty_like(order).scatter_(0, order, arange), counts
    counts = (ids == torch.arange(n_experts, device=ids.device)[:, None]).sum(dim=1)
    before = (ids[None, :] < ids[:, None]) | ((ids[None, :] == ids[:, None]) & (arange[None, :] < arange[:, None]))
    place = before.sum(dim=1)
    return torch.empty_like(ids).scatter_(0, place, arange), place, counts


ROUTE_FEW_MAX = 64
"""Tokens up to which :func:`route` computes the routing as fusible element-wise work and reductions."""


def route(gate: Gate, x: torch.Tensor, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate values (T, K) and expert indices (T, K) of :meth:`Gate.forward` (eq. 13-16) for x (T, d).

    For the few tokens of a decode step (at most :data:`ROUTE_FEW_MAX`) with plain top-k routing (one expert
    group, sigmoid affinities, as in the ``16b`` preset) the same math is written as element-wise work and
    reductions that ``torch.compile`` fuses into a few kernels, where the gate costs a cuBLAS dot and reduce
    for its tiny FP32 product plus a top-k kernel: the product as a broadcast sum, and the top-k by ranks (an
    expert's rank = how many experts beat its biased affinity, ties to the lower index), the k chosen
    coming out in rank order. Otherwise (group-limited V3 routing, softmax scoring, prefill) the gate itself.
    ``kernel``: the top-k and gate values in one Triton kernel (:func:`~dsv3.inference.triton_moe.route_topk`)
    after the affinities.
    """
    if gate.n_groups > 1 or gate.score_func != "sigmoid" or x.shape[0] > ROUTE_FEW_MAX:
        weights, indices, _ = gate(x)
        return weights, indices
    scores = (x.float()[:, None, :] * gate.weight.float()).sum(dim=-1).sigmoid()  # (T, E), eq. 15
    bias = gate.e_score_correction_bias
    if kernel:
        from .triton_moe import route_topk

        indices, weights = route_topk(scores, bias, gate.top_k, gate.norm_topk, float(gate.route_scale))
        return weights, indices
    choice = scores if bias is None else scores + bias
    experts = torch.arange(choice.shape[-1], device=x.device)
    ahead = (choice[:, None, :] > choice[:, :, None]) | (
        (choice[:, None, :] == choice[:, :, None]) & (experts[None, :] < experts[:, None]))
    rank = ahead.sum(dim=-1)  # (T, E)
    wanted = torch.arange(gate.top_k, device=x.device)
    indices = (rank[:, None, :] == wanted[None, :, None]).long().argmax(dim=-1)  # (T, K): expert of rank r
    weights = scores.gather(1, indices)
    if gate.norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * gate.route_scale, indices


FEW_ROWS_MAX = 512
"""Token copies up to which ``experts="few_rows"`` runs the Triton kernel (larger batches: the module)."""


def moe_forward(moe: MoE, x: torch.Tensor, experts: str = "module") -> torch.Tensor:
    """:meth:`MoE.forward` for inference (no router statistics), without host syncs (:func:`sort_by_expert`).

    ``experts`` picks how the routed experts run on the sorted token copies:

    * ``"module"``: the model's own :class:`~dsv3.model.moe.Experts` (``torch._grouped_mm`` in bf16 on Hopper,
      else the reference loop, which splits by counts read back to the host);
    * ``"few_rows"``: the Triton kernels of :mod:`dsv3.inference.triton_moe` for decode steps: up to
      :data:`DECODE_FUSED_MAX` tokens routed and shared experts in two kernels without a sort, up to
      :data:`FEW_ROWS_MAX` copies a grouped kernel over the sorted copies, beyond that the module;
    * ``"gathered"``: each copy times its own expert's gathered weights (fixed shapes, no host sync, for any
      dtype and device: meant for small models and tests).
    """
    b, s, d = x.shape
    flat = x.reshape(-1, d)
    weights, indices = route(moe.gate, flat, kernel=experts == "few_rows")
    if experts == "few_rows" and flat.shape[0] <= DECODE_FUSED_MAX:
        return _moe_decode(moe, flat, weights, indices).view(b, s, d)
    ids = indices.flatten()
    order, place, counts = sort_by_expert(ids, moe.n_experts)
    x_sorted = flat[order // indices.shape[1]]
    module = moe.experts
    if experts == "gathered":
        e = ids[order]
        gate, up = torch.bmm(module.gate_up_proj[e], x_sorted[:, :, None]).squeeze(-1).split(module.inter_dim, -1)
        y_sorted = torch.bmm(module.down_proj[e], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
    elif experts == "few_rows" and ids.numel() <= FEW_ROWS_MAX:
        from .triton_moe import grouped_mm_few_rows

        ends = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm_few_rows(x_sorted, module.gate_up_proj, ends).split(module.inter_dim, -1)
        y_sorted = grouped_mm_few_rows(F.silu(gate) * up, module.down_proj, ends)
    else:
        y_sorted = module(x_sorted, counts)
    # back to (token, k) order by a gather (fused with the weighted sum when compiled)
    y = (y_sorted[place].view(b * s, -1, d) * weights.unsqueeze(-1).to(y_sorted.dtype)).sum(dim=1).to(x.dtype)
    if moe.shared_experts is not None:
        y = y + swiglu(moe.shared_experts, flat)
    return y.view(b, s, d)


DECODE_FUSED_MAX = 16
"""Tokens up to which ``experts="few_rows"`` runs routed and shared experts in two kernels without sorting
(:func:`dsv3.inference.triton_moe.moe_decode_experts`)."""


def _moe_decode(moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The experts of a few tokens (``few_rows``, at most :data:`DECODE_FUSED_MAX`): each expert's program
    finds its tokens in ``indices``; the shared MLP joins the same two kernels where its gate and up are
    fused (:func:`~dsv3.inference.fusion.fuse_projections`) and its width is a multiple of an expert's."""
    from .triton_moe import moe_decode_experts

    t, d = flat.shape
    module, shared = moe.experts, moe.shared_experts
    stacked = None if shared is None else getattr(shared, "fused_gate_up", None)
    inline = stacked is not None and shared.down_proj.in_features % module.inter_dim == 0
    parts = moe_decode_experts(flat, indices, module.gate_up_proj, module.down_proj,
                               stacked if inline else None, shared.down_proj.weight if inline else None)
    k = indices.shape[1]
    y = (parts[:t * k].view(t, k, d) * weights.unsqueeze(-1).float()).sum(dim=1)
    if inline:
        y = y + parts[t * k:].view(-1, t, d).sum(dim=0)
    elif shared is not None:
        y = y + swiglu(shared, flat).float()
    return y.to(flat.dtype)


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
    index: torch.Tensor, start: int = 0, pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """A block over new prompt tokens with expanded attention (:func:`prefill_attention`)."""
    return run_block(block, x, lambda attn, h: prefill_attention(attn, h, cos, sin, latent, index, start, pages))


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
