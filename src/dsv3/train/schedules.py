"""The report's training schedules (§4.2), with every length in tokens and scalable to any run.

The 671B run lasted 14.8T tokens. Each stage is kept as its fraction of that budget, so
``Schedules.paper(total_tokens)`` gives the same shape for a run of any size:

- learning rate: linear warm-up (2K steps in the report; here ``warmup_tokens``), constant at the peak until
  10T, cosine decay to 0.1x peak over 4.3T, then 0.1x (2.2e-5) for 333B and 7.3e-6/2.2e-4 = 1/30 x for the
  last 167B tokens;
- batch size: ramps from 3072 to 15360 sequences over the first 469B tokens (ratio 0.2 -> 1), then constant;
- bias update speed gamma: 0.001 for the first 14.3T tokens, 0 for the remaining 500B;
- MTP loss weight lambda: 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAPER_TOTAL = 14.8e12
PAPER_CONSTANT_UNTIL = 10e12
"""End of the report's constant learning-rate stage (tokens)."""


@dataclass
class Schedules:
    total_tokens: float
    peak_lr: float = 2.2e-4
    warmup_tokens: float = 0.0
    constant_until: float = 0.0
    """End of the constant stage (tokens)."""
    decay_until: float = 0.0
    """End of the cosine decay to ``decay_ratio`` x peak."""
    decay_ratio: float = 0.1
    final_until: float = 0.0
    """End of the first final-constant stage at ``decay_ratio``; after it ``last_ratio`` x peak to the end."""
    last_ratio: float = 7.3e-6 / 2.2e-4
    batch_start: int = 1
    batch_end: int = 1
    batch_ramp_tokens: float = 0.0
    gamma: float = 0.001
    gamma_until: float = 0.0
    mtp_weight_first: float = 0.3
    mtp_weight_second: float = 0.1
    mtp_switch: float = 0.0

    @classmethod
    def paper(cls, total_tokens: float, peak_lr: float = 2.2e-4, warmup_tokens: float | None = None,
              batch_size: int = 15360, batch_start: int | None = None, gamma: float = 0.001) -> "Schedules":
        """The report's stages scaled to ``total_tokens``. ``warmup_tokens`` defaults to 1% of the run."""
        f = total_tokens / PAPER_TOTAL
        return cls(
            total_tokens=total_tokens, peak_lr=peak_lr,
            warmup_tokens=0.01 * total_tokens if warmup_tokens is None else warmup_tokens,
            constant_until=PAPER_CONSTANT_UNTIL * f, decay_until=14.3e12 * f, final_until=(14.3e12 + 333e9) * f,
            batch_start=max(1, round(batch_size * 3072 / 15360)) if batch_start is None else batch_start,
            batch_end=batch_size, batch_ramp_tokens=469e9 * f,
            gamma=gamma, gamma_until=14.3e12 * f, mtp_switch=10e12 * f,
        )

    def lr(self, tokens: float) -> float:
        """Learning rate after ``tokens`` training tokens."""
        if tokens < self.warmup_tokens:
            return self.peak_lr * tokens / self.warmup_tokens
        if tokens < self.constant_until:
            return self.peak_lr
        if tokens < self.decay_until:
            progress = (tokens - self.constant_until) / (self.decay_until - self.constant_until)
            ratio = self.decay_ratio + (1 - self.decay_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return self.peak_lr * ratio
        if tokens < self.final_until:
            return self.peak_lr * self.decay_ratio
        return self.peak_lr * self.last_ratio

    def batch_size(self, tokens: float, multiple: int = 1) -> int:
        """Global batch (sequences): linear ramp from ``batch_start`` to ``batch_end``, rounded down to a
        multiple of ``multiple`` (the micro-batch) and never below it."""
        if tokens >= self.batch_ramp_tokens or self.batch_ramp_tokens <= 0:
            b = self.batch_end
        else:
            b = self.batch_start + (self.batch_end - self.batch_start) * tokens / self.batch_ramp_tokens
        return max(multiple, int(b) // multiple * multiple)

    def bias_update_speed(self, tokens: float) -> float:
        return self.gamma if tokens < self.gamma_until else 0.0

    def mtp_weight(self, tokens: float) -> float:
        return self.mtp_weight_first if tokens < self.mtp_switch else self.mtp_weight_second
