"""The DeepSeek-V3 architecture in plain PyTorch: one module per concept of the report."""

from .attention import MLA
from .ffn import MLP
from .moe import Experts, Gate, MoE, RouterStats, combine, dispatch, sequence_balance_loss
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_frequencies
from .transformer import DeepSeekV3, ModelOutput, document_mask
from .transformer_block import Block

__all__ = [
    "MLA", "MLP", "Experts", "Gate", "MoE", "RouterStats", "combine", "dispatch", "sequence_balance_loss",
    "MTPModule", "RMSNorm", "RotaryEmbedding", "apply_rope", "rope_frequencies", "DeepSeekV3", "ModelOutput",
    "document_mask", "Block",
]
