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


class Optimizers:
    """Several optimisers stepped as one (what the trainer and the checkpoint need of an optimiser): under ZeRO-1
    with expert parallelism the dense parameters' states are sharded over all data-parallel ranks and the routed
    experts' over the ranks holding the same experts, two ``ZeroRedundancyOptimizer`` over two groups."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self, closure=None) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay matrices (and the embedding); not norms or other vectors. Plain tensors and FSDP2's sharded
    parameters (DTensors) in separate groups, one per device mesh (the experts' differs): AdamW's multi-tensor
    kernels take one kind per call."""
    from torch.distributed.tensor import DTensor

    def mesh(p: torch.Tensor) -> tuple | None:
        if not isinstance(p, DTensor):
            return None
        return tuple(p.device_mesh.mesh.flatten().tolist()), p.device_mesh.mesh_dim_names

    meshes = list(dict.fromkeys(mesh(p) for p in params))  # plain first, then in module order
    meshes.sort(key=lambda m: m is not None)
    groups = []
    for decay in (True, False):
        for m in meshes:
            mine = [p for p in params if (p.dim() >= 2) == decay and mesh(p) == m]
            if mine:
                groups.append({"params": mine, "weight_decay": weight_decay if decay else 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    bf16_moments: bool = False, zero1_group=None, experts: list[torch.nn.Parameter] = (),
                    expert_group=None) -> torch.optim.Optimizer | Optimizers:
    """AdamW over ``model``'s trainable parameters. ``zero1_group``: AdamW's states sharded over these
    data-parallel ranks (``ZeroRedundancyOptimizer``, report §3.2's ZeRO-1). Under ZeRO-1, ``experts`` (the
    expert-parallel experts, different on every rank of an expert-parallel group) are sharded apart, over
    ``expert_group`` (the ranks holding the same experts; None: this rank alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if zero1_group is None:
        groups = _param_groups(params, weight_decay)
        if bf16_moments:
            return AdamWLowPrecisionMoments(groups, lr=lr, betas=betas)
        from torch.distributed.tensor import DTensor

        fused = not any(isinstance(p, DTensor) for p in params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = AdamWLowPrecisionMoments if bf16_moments else torch.optim.AdamW

    def zero1(params: list[torch.nn.Parameter], group) -> torch.optim.Optimizer:
        if group is None:
            return cls(_param_groups(params, weight_decay), lr=lr, betas=betas)
        return ZeroRedundancyOptimizer(_param_groups(params, weight_decay), optimizer_class=cls,
                                       process_group=group, lr=lr, betas=betas)

    expert_ids = {id(p) for p in experts}
    dense = zero1([p for p in params if id(p) not in expert_ids], zero1_group)
    mine = [p for p in params if id(p) in expert_ids]
    return Optimizers([dense, zero1(mine, expert_group)]) if mine else dense
