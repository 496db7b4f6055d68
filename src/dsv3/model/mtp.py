"""Multi-Token Prediction modules (report §2.2, eq. 21-25).

Module k (1-based) at position i takes the previous depth's representation h_i^{k-1} and the embedding of
token t_{i+k}, and predicts token t_{i+k+1}:

    h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]      (eq. 21; ``eh_proj`` = M_k)
    h_i^k = TRM_k(h'_i)                                          (eq. 22; a full decoder block)
    P^k_{i+k+1} = OutHead(RMSNorm(h_i^k))                        (eq. 23; ``shared_head.norm``)

The embedding and output head are the main model's (shared, eq. 21/23). In the checkpoint the
concatenation puts the embedding first, the order the official weights were trained with; h^0 is the main
model's final normalised hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .doc_mask import DocumentMask
from .norm import RMSNorm
from .transformer_block import Block


class SharedHead(nn.Module):
    """The MTP module's final norm; the projection itself is the main model's ``lm_head``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: the block's own layers plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head``."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """Eq. 21: project the concatenation of the normalised embedding and hidden state back to width d."""
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: DocumentMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 21-23 up to the shared head: (h^k, the next depth's input; RMSNorm(h^k), the head's input).
        All of the module's own weights are used inside this call (what FSDP's per-module hooks expect)."""
        h = super().forward(self.combine(h_prev, emb_next), cos, sin, mask)
        return h, self.shared_head.norm(h)
