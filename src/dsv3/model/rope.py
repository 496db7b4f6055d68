"""Rotary position embedding with YaRN extension, for the decoupled RoPE part of MLA (report §2.1.1, §4.3).

The checkpoint's convention is *interleaved*: the rotary dimensions form pairs (x0, x1), (x2, x3), ...,
each pair rotated by one frequency (the official code views them as complex numbers).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension whose wavelength fits ``num_rotations`` times into ``max_pos`` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(dim: int, base: float, yarn: dict | None = None) -> torch.Tensor:
    """Inverse frequencies theta_j = base^(-2j/dim), j < dim/2, blended by YaRN when configured.

    YaRN (Peng et al. 2023, used in §4.3 with s = 40, alpha = 1, beta = 32): dimensions that rotate more than
    ``beta_fast`` times over the original context keep their frequency (extrapolation), those rotating fewer
    than ``beta_slow`` times are divided by the factor s (interpolation), with a linear ramp in between.
    """
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if yarn is None:
        return freqs.float()
    factor = float(yarn["factor"])
    original = int(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by the factor)
    freqs = freqs / factor * (1 - keep) + freqs * keep
    return freqs.float()


class RotaryEmbedding(nn.Module):
    """cos/sin of position * theta for the given positions; a non-persistent buffer holds the frequencies."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        yarn = config.yarn
        self.register_buffer(
            "inv_freq", rope_frequencies(config.qk_rope_head_dim, float(config.rope_theta), yarn), persistent=False
        )
        # YaRN's optional magnitude factor on the rotated parts; 1 for DeepSeek's checkpoints (mscale ==
        # mscale_all_dim), whose temperature goes into the softmax scale instead (ModelConfig.softmax_scale).
        self.attention_factor = 1.0
        if yarn is not None:
            f = float(yarn["factor"])
            if yarn.get("mscale") and yarn.get("mscale_all_dim"):
                from ..config import yarn_mscale

                self.attention_factor = yarn_mscale(f, float(yarn["mscale"])) / yarn_mscale(f, float(yarn["mscale_all_dim"]))
            elif "attention_factor" in yarn:
                self.attention_factor = float(yarn["attention_factor"])

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., seq) -> cos, sin of shape (..., seq, d_r / 2), float32."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (batch, seq, heads, d_r) by cos/sin (batch or 1, seq, d_r / 2)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
