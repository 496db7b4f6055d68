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
FP32, the precision the gate computes in, so a step does not convert it again. FP8-served layers
(:class:`~dsv3.fp8.serving.FP8InferenceLinear`) are stacked with their 128 x 128 block factors
(``fused_in_proj_scale`` / ``fused_gate_up_scale``) where every part but the last fills whole blocks of
rows; other layers are left as they are. The engine's block functions (:mod:`dsv3.inference.layers`) use
the stacks where present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.fp8.quant import TILE
from dsv3.fp8.serving import FP8InferenceLinear, fp8_linear
from dsv3.model.attention import MLA
from dsv3.model.ffn import MLP
from dsv3.model.moe import Gate

__all__ = ["fuse_projections", "mla_first_projections", "mla_query_latent", "swiglu"]


def _stack(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Stack the weights of bias-free Linear layers of one kind, dtype and device (plain, or FP8-served with
    their block factors); their weights (and factors) become views. Returns (weights, factors or None), or
    None where they cannot be stacked."""
    fp8 = all(type(m) is FP8InferenceLinear for m in linears)
    if not fp8 and any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return None
    ws = [m.weight for m in linears]
    if len({(w.dtype, w.device) for w in ws}) != 1:
        return None
    if fp8 and any(m.out_features % TILE for m in linears[:-1]):
        return None  # a part would share a block of rows (one factor) with the next
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in ws])
        factors = torch.cat([m.weight_scale_inv for m in linears]) if fp8 else None
    start = 0
    for m in linears:
        m.weight.data = fused[start:start + m.out_features]
        if fp8:
            m.weight_scale_inv.data = factors[start // TILE:(start + m.out_features + TILE - 1) // TILE]
        start += m.out_features
    return fused, factors


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections of every MLA and SwiGLU MLP of ``model`` in place (see the module docstring);
    returns the number of fused groups. Applying it twice changes nothing."""
    n = 0
    for m in model.modules():
        if isinstance(m, MLA) and getattr(m, "fused_in_proj", None) is None:
            first = m.q_proj if m.q_lora_rank is None else m.q_a_proj
            fused = _stack([first, m.kv_a_proj_with_mqa])
            if fused is not None:
                m.fused_in_proj, m.fused_in_proj_scale = fused
                n += 1
        elif isinstance(m, MLP) and getattr(m, "fused_gate_up", None) is None:
            fused = _stack([m.gate_proj, m.up_proj])
            if fused is not None:
                m.fused_gate_up, m.fused_gate_up_scale = fused
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
    q0, kv_a = _linear(x, fused, attn.fused_in_proj_scale).split([fused.shape[0] - n_kv, n_kv], dim=-1)
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
    gate, up = _linear(x, fused, mlp.fused_gate_up_scale).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)


def _linear(x: torch.Tensor, weight: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight) if factors is None else fp8_linear(x, weight, factors)
