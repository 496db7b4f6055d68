"""Making a trained model ready for the engine: one explicit step, applied by the engine that will own it."""

from __future__ import annotations

import torch

from ..fp8.serving import FP8InferenceLinear, dequantized_linear
from ..model.attention import MLA
from ..model.transformer import DeepSeekV3
from .fusion import fuse_projections


def prepare_model(model: DeepSeekV3, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  fuse: bool = True) -> DeepSeekV3:
    """In place: move / cast the model where asked, switch it to eval mode and, with ``fuse``, stack the
    projections that read the same input and keep the routers' weights in FP32
    (:func:`~dsv3.inference.fusion.fuse_projections`). Returns the model. Training it afterwards is not
    meant: the fused stacks are inference-only views.

    An FP8-served ``kv_b_proj`` (:mod:`dsv3.fp8.serving`) is dequantised to the embeddings' dtype here: the
    decode step's absorbed attention uses its per-head slices W^UK and W^UV as matrices, not as a GEMM over
    the tokens (for V3 16.8M weights a layer, 0.15% of it)."""
    if device is not None or dtype is not None:
        param = next(model.parameters())
        moved = (device is not None and torch.device(device) != param.device) or (dtype not in (None, param.dtype))
        if moved and any(getattr(m, "fused_in_proj", None) is not None or getattr(m, "fused_gate_up", None)
                         is not None for m in model.modules()):
            raise ValueError("this model was prepared for inference already (fused); move or cast it before")
        model.to(device=device, dtype=dtype)
    model.eval()
    dtype = model.embed_tokens.weight.dtype
    for attn in model.modules():
        if isinstance(attn, MLA) and isinstance(attn.kv_b_proj, FP8InferenceLinear):
            attn.kv_b_proj = dequantized_linear(attn.kv_b_proj, dtype)
    if fuse:
        fuse_projections(model)
    return model
