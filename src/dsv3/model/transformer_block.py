"""One decoder block: pre-norm MLA and a pre-norm FFN (dense SwiGLU or DeepSeekMoE), both residual."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .doc_mask import DocumentMask
from .ffn import MLP
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(config)
        self.mlp: MLP | MoE = (
            MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
