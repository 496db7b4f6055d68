"""The MoE layer for inference (report §2.1.2): routing and experts without host syncs.

:func:`moe_forward` is :meth:`dsv3.model.moe.MoE.forward` without the router statistics of training, for
the engine's block functions (:mod:`dsv3.inference.layers`): the token copies are ordered by expert
without reading counts back to the host (:func:`sort_by_expert`), so a step can be captured in a CUDA
graph; the decode routing (:func:`route`) and experts have GPU kernels (:mod:`dsv3.inference.triton_moe`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import Gate, MoE, expert_counts
from .fusion import swiglu


def sort_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort of the token copies ``ids`` (N,) by expert, without host syncs: ``order`` (N,) (as
    ``ids.argsort(stable=True)``), its inverse ``place`` (the sorted position of each copy) and the tokens
    per expert ``counts`` (E,).

    No ``torch.bincount`` (see :func:`~dsv3.model.moe.expert_counts`). For the few copies of a
    decode step a counting sort replaces the sort kernel (tens of microseconds even for a few hundred
    keys): a copy's place is the number of copies of smaller experts plus those of its own expert before
    it, two comparisons over all pairs that ``torch.compile`` fuses into one reduction."""
    n = ids.numel()
    arange = torch.arange(n, device=ids.device)
    if n > 2048:  # prefill: a real sort
        counts = expert_counts(ids, n_experts)
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
"""Token copies up to which ``experts="few_rows"`` runs the Triton kernel (larger batches: the module; FP8
experts always the kernel, as their grouped FP8 GEMM reads the counts to the host)."""


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
    s13, s2 = _fp8_factors(module)  # FP8-served experts: their block factors
    if experts == "gathered":
        if s13 is not None:
            raise ValueError("experts='gathered' reads the weights as they are: not for FP8-served experts")
        e = ids[order]
        gate, up = torch.bmm(module.gate_up_proj[e], x_sorted[:, :, None]).squeeze(-1).split(module.inter_dim, -1)
        y_sorted = torch.bmm(module.down_proj[e], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
    elif experts == "few_rows" and (ids.numel() <= FEW_ROWS_MAX or s13 is not None):
        from ..kernels.few_rows import grouped_mm_few_rows

        ends = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm_few_rows(x_sorted, module.gate_up_proj, ends, s13).split(module.inter_dim, -1)
        y_sorted = grouped_mm_few_rows(F.silu(gate) * up, module.down_proj, ends, s2)
    else:
        y_sorted = module(x_sorted, counts)
    # back to (token, k) order by a gather (fused with the weighted sum when compiled)
    y = (y_sorted[place].view(b * s, -1, d) * weights.unsqueeze(-1).to(y_sorted.dtype)).sum(dim=1).to(x.dtype)
    if moe.shared_experts is not None:
        y = y + swiglu(moe.shared_experts, flat)
    return y.view(b, s, d)


DECODE_FUSED_MAX = 16
"""Tokens up to which ``experts="few_rows"`` runs routed and shared experts in two kernels without sorting
(:func:`dsv3.inference.triton_moe.moe_decode_experts`, whose 16-row tile holds them all)."""


def _fp8_factors(experts: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The 128 x 128 block factors of FP8-served experts (:class:`dsv3.fp8.serving.FP8InferenceExperts`:
    gate_up, down), or (None, None) for experts in the activations' dtype."""
    return getattr(experts, "gate_up_proj_scale_inv", None), getattr(experts, "down_proj_scale_inv", None)


def _moe_decode(moe: MoE, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The experts of a few tokens (``few_rows``, at most :data:`DECODE_FUSED_MAX`): each expert's program
    finds its tokens in ``indices``; the shared MLP joins the same two kernels where its gate and up are
    fused (:func:`~dsv3.inference.fusion.fuse_projections`) and its width is a multiple of an expert's."""
    from .triton_moe import moe_decode_experts

    t, d = flat.shape
    module, shared = moe.experts, moe.shared_experts
    stacked = None if shared is None else getattr(shared, "fused_gate_up", None)
    s13, s2 = _fp8_factors(module)
    shared_factors = (None, None) if stacked is None else (getattr(shared, "fused_gate_up_scale", None),
                                                           getattr(shared.down_proj, "weight_scale_inv", None))
    inline = (stacked is not None and shared.down_proj.in_features % module.inter_dim == 0
              and (s13 is None) == (shared_factors[0] is None) == (shared_factors[1] is None))
    scales = [] if s13 is None else [s13, s2, *shared_factors] if inline else [s13, s2]
    parts = moe_decode_experts(flat, indices, module.gate_up_proj, module.down_proj,
                               stacked if inline else None, shared.down_proj.weight if inline else None, scales)
    k = indices.shape[1]
    y = (parts[:t * k].view(t, k, d) * weights.unsqueeze(-1).float()).sum(dim=1)
    if inline:
        y = y + parts[t * k:].view(-1, t, d).sum(dim=0)
    elif shared is not None:
        y = y + swiglu(shared, flat).float()
    return y.to(flat.dtype)
