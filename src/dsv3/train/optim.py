"""AdamW as in the report (§3.2-3.3): beta 0.9/0.95, weight decay 0.1 on matrices, FP32 master weights, and an
option to keep the first and second moments in BF16 to save memory (§3.3 'Low-Precision Optimizer States')."""

from __future__ import annotations

import torch


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW whose moments are stored in ``moment_dtype`` (BF16), with the update computed in FP32.
    torch.optim.AdamW keeps moments in the parameter dtype, hence this small class."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    bf16_moments: bool = False, zero1_group=None) -> torch.optim.Optimizer:
    """Decay matrices (and the embedding); not norms or other vectors. ``zero1_group``: AdamW's states sharded
    over these data-parallel ranks (``ZeroRedundancyOptimizer``, report §3.2's ZeRO-1)."""
    from torch.distributed.tensor import DTensor

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # FSDP2's sharded parameters (DTensors) and the expert-parallel experts (plain tensors) in separate groups:
    # AdamW's multi-tensor kernels take one kind per call
    groups = [{**g, "params": [p for p in g["params"] if isinstance(p, DTensor) == sharded]}
              for g in groups for sharded in (False, True)]
    groups = [g for g in groups if g["params"]]
    if zero1_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        cls = AdamWLowPrecisionMoments if bf16_moments else torch.optim.AdamW
        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=zero1_group, lr=lr, betas=betas)
    if bf16_moments:
        return AdamWLowPrecisionMoments(groups, lr=lr, betas=betas)
    sharded = any(isinstance(p, DTensor) for p in decay + no_decay)
    fused = not sharded and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)
