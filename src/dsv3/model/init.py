"""Random initialisation (report §4.2: "all learnable parameters are randomly initialised with a standard deviation
of 0.006"): Normal(0, ``initializer_range``) for every matrix and the embedding, ones for the norms, a zero
routing bias.

With a seed, every tensor draws from a generator of its own, seeded by the seed and the tensor's name (each routed
expert by its index in the layer too), so that a tensor's values do not depend on which other modules exist or in
what order they are visited: a pipeline rank that builds only its stages, a rank that holds only its experts, or
one that holds a shard of every tensor (:func:`materialize` after FSDP2 on the meta device) initialises what it
holds exactly as a one-process run does.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from .moe import Experts, Gate
from .norm import RMSNorm

if TYPE_CHECKING:
    from .transformer import DeepSeekV3


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for tensor ``name`` of a run seeded ``seed`` (a hash: neighbouring names draw unrelated
    streams)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _draw(shape: tuple[int, ...], std: float, seed: int | None, name: str, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(0.0, std,
                                                                            generator=_generator(seed, name, like))


def _set_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole-tensor values ``full`` into ``param``, or into its local shard if it is a DTensor (each
    rank drew the same ``full``: the shard is sliced here, nothing is sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def _generator(seed: int | None, name: str, like: torch.Tensor) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=like.device).manual_seed(tensor_seed(seed, name))


def _normal_(t: torch.Tensor, std: float, seed: int | None, name: str) -> None:
    from torch.distributed.tensor import DTensor

    if t.device.type == "meta":  # nothing allocated yet: materialize() initialises it
        return
    if isinstance(t, DTensor):  # draw the whole tensor, keep this rank's shard
        _set_(t, _draw(tuple(t.shape), std, seed, name, t))
    else:  # in place: no second copy (the same values as drawn into a new tensor)
        t.normal_(0.0, std, generator=_generator(seed, name, t))


def _experts_normal_(weights: torch.Tensor, std: float, seed: int | None, name: str, first: int) -> None:
    """One generator per expert (its index in the whole layer: ``first`` is that of the first one held)."""
    from torch.distributed.tensor import DTensor

    if weights.device.type == "meta":
        return
    if not isinstance(weights, DTensor):
        for e in range(weights.shape[0]):
            weights[e].normal_(0.0, std, generator=_generator(seed, f"{name}.{first + e}", weights))
        return
    full = torch.stack([_draw(tuple(weights.shape[1:]), std, seed, f"{name}.{first + e}", weights)
                        for e in range(weights.shape[0])])
    _set_(weights, full)


@torch.no_grad()
def init_weights(model: nn.Module, std: float, seed: int | None = None) -> None:
    """Initialise ``model``'s Linear, Embedding, Gate, Experts and RMSNorm weights in place (see the module
    docstring); ``seed`` None: from the global generator, in module order."""
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, Gate)):
            _normal_(module.weight, std, seed, f"{prefix}.weight")
        elif isinstance(module, Experts):
            for name in ("gate_up_proj", "down_proj"):
                _experts_normal_(getattr(module, name), std, seed, f"{prefix}.{name}", module.first_expert)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        if isinstance(module, Gate):
            module.tokens_per_expert.zero_()
            if module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()


@torch.no_grad()
def materialize(model: "DeepSeekV3", device: torch.device, std: float, seed: int | None) -> None:
    """Allocate on ``device`` a model built on the meta device (after whatever was applied to it there: expert
    parallelism's slicing, FSDP2's sharding), and give every tensor its initial value: the weights as
    :func:`init_weights` (so, with a seed, the values of the one-process model), the buffers their own."""
    from .balance_loss import BalanceLoss
    from .rope import RotaryEmbedding

    model.to_empty(device=device)
    init_weights(model, std, seed)
    for module in model.modules():
        if isinstance(module, BalanceLoss):
            module.weight.zero_()
            module.total.zero_()
    model.rotary = RotaryEmbedding(model.config).to(device)  # its frequencies are computed, not stored
