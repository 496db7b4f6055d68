"""Inference-time weight fusion: one GEMM for the projections that read the same input.

A decode step at small batch is a chain of GEMVs, each reading its weight once plus a fixed cost per kernel
(launch inside the CUDA graph, split-K reduction, tail effects). Projections that read the same activation
can share one GEMM over their stacked weights:

* MLA (report §2.1.1): the first query projection (``q_proj``, or ``q_a_proj`` for the low-rank query) and
  ``kv_a_proj_with_mqa`` both read the block's normalised input;
* SwiGLU MLPs (the dense FFN and the shared experts): ``gate_proj`` and ``up_proj`` read the same input.

:func:`fuse_projections` stacks each group once and points the model's own ``nn.Linear`` weights at rows of
the stack, so no memory is added and the model's plain forward is unchanged; the stack is a plain attribute
(``fused_in_proj`` / ``fused_gate_up``), outside the state dict. It also stores each MoE router weight in
FP32, the precision the gate computes in, so a step does not convert it again. Layers that are not plain
bias-free ``nn.Linear`` (FP8-served ones) are left as they are. The engine's block functions
(:mod:`dsv3.inference.layers`) use the stacks where present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.attention import MLA
from dsv3.model.ffn import MLP
from dsv3.model.moe import Gate

__all__ = ["fuse_projections", "mla_first_projections", "mla_query_latent", "swiglu"]


def _stack(linears: list[nn.Module]) -> torch.Tensor | None:
    """Stack the weights of plain bias-free Linear layers of one dtype/device; their weights become views."""
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    ws = [m.weight for m in linears]
    if len({(w.dtype, w.device) for w in ws}) != 1:
        return None
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in ws])
    start = 0
    for m in linears:
        m.weight.data = fused[start:start + m.out_features]
        start += m.out_features
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections of every MLA and SwiGLU MLP of ``model`` in place (see the module docstring);
    returns the number of fused groups. Applying it twice changes nothing."""
    n = 0
    for m in model.modules():
        if isinstance(m, MLA) and getattr(m, "fused_in_proj", None) is None:
            first = m.q_proj if m.q_lora_rank is None else m.q_a_proj
            fused = _stack([first, m.kv_a_proj_with_mqa])
            if fused is not None:
                m.fused_in_proj = fused
                n += 1
        elif isinstance(m, MLP) and getattr(m, "fused_gate_up", None) is None:
            fused = _stack([m.gate_proj, m.up_proj])
            if fused is not None:
                m.fused_gate_up = fused
                n += 1
        elif isinstance(m, Gate) and m.weight.dtype != torch.float32:
            m.weight.data = m.weight.data.float()
    return n


def mla_first_projections(attn: MLA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's two projections of x: the first query projection (``q_proj`` or ``q_a_proj``) and
    ``kv_a_proj_with_mqa``, as one GEMM where fused."""
    fused = getattr(attn, "fused_in_proj", None)
    if fused is None:
        return (attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj)(x), attn.kv_a_proj_with_mqa(x)
    n_kv = attn.kv_a_proj_with_mqa.out_features
    q0, kv_a = F.linear(x, fused).split([fused.shape[0] - n_kv, n_kv], dim=-1)
    return q0, kv_a


def mla_query_latent(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``(attn.query(x), attn.latent(x))``, with one GEMM for both first projections where fused."""
    q0, kv_a = mla_first_projections(attn, x)
    return attn.query_from(q0, cos, sin), attn.latent_from(kv_a, cos, sin)


def swiglu(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)``, with one GEMM for gate and up where fused."""
    fused = getattr(mlp, "fused_gate_up", None)
    if fused is None:
        return mlp(x)
    gate, up = F.linear(x, fused).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)
