"""The DeepSeek-V3 architecture in plain PyTorch: one module per concept of the report."""

from .attention import MLA
from .balance_loss import BalanceLoss, batch_balance_loss, sequence_balance_loss
from .doc_mask import DocumentMask, document_mask, set_document_attention
from .ffn import MLP
from .moe import Experts, Gate, MoE, combine, dispatch
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_frequencies
from .transformer import DeepSeekV3, ModelOutput
from .transformer_block import Block

__all__ = [
    "MLA", "MLP", "BalanceLoss", "Experts", "Gate", "MoE", "batch_balance_loss", "combine", "dispatch",
    "sequence_balance_loss",
    "MTPModule", "RMSNorm", "RotaryEmbedding", "apply_rope", "rope_frequencies", "DeepSeekV3", "ModelOutput",
    "document_mask", "DocumentMask", "set_document_attention", "Block",
]
