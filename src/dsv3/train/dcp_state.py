"""Sharded training checkpoints with PyTorch Distributed Checkpoint (DCP), for runs under torchrun.

Every rank writes its own shards of one flat state dict, keyed by the unsharded model's names:

* ``model.<name>``: each parameter and buffer; FSDP2's parameters are DTensors, and the expert-parallel experts
  are presented as DTensors sharded over the ``ep`` mesh dimension (replicated over ``dp_outer``, or with FSDP2
  sharded over it along their rows), so the checkpoint records the global (all-experts) shape;
* ``optim.<name>.<key>``: the AdamW state of each parameter, sharded as its parameter (ZeRO-1: written by the
  rank that owns it; an expert's by its owner among the ranks holding that expert).

DCP reshards on load: a checkpoint saved on 4 ranks loads on 2, or into a plain one-process model (export).
The JSON state (step, tokens, data position, configs) is the rank-0 ``meta.json`` beside the shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..checkpoint import CheckpointError
from .parallel import EXPERT_SHARD_DIM, Distributed, expert_parameters


def local_states(optimizer) -> dict[torch.Tensor, dict]:
    """Parameter -> AdamW state of what this rank holds: ZeRO-1's local optimiser's, or the optimiser's own (of
    each part of an :class:`~dsv3.train.optim.Optimizers`)."""
    out = {}
    for part in getattr(optimizer, "parts", [optimizer]):
        out.update(getattr(part, "optim", part).state)
    return out


def _expert_view(t: torch.Tensor, env: Distributed | None, expert_names: set[str], name: str) -> torch.Tensor:
    """An expert-parallel expert tensor as a DTensor over the ``(dp_outer, ep)`` mesh with the all-experts shape:
    split along the experts over ``ep``; over ``dp_outer`` replicated, or (FSDP2) sharded along its rows."""
    if env is None or env.ep_mesh is None or name not in expert_names:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(t, DTensor):  # FSDP2's shard over the dp_outer column
        shape = torch.Size((t.shape[0] * env.dims.ep, *t.shape[1:]))
        return DTensor.from_local(t.to_local().detach(), env.ep_mesh, [Shard(EXPERT_SHARD_DIM), Shard(0)],
                                  run_check=False, shape=shape, stride=_contiguous_stride(shape))
    return DTensor.from_local(t.detach(), env.ep_mesh, [Replicate(), Shard(0)], run_check=False)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= n
    return tuple(reversed(out))


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, env: Distributed | None
                  ) -> dict[str, torch.Tensor]:
    """The flat state dict of model and optimiser (see the module docstring); its tensors alias the live ones,
    so loading into it restores them in place."""
    names = {id(p): n for n, p in model.named_parameters()}
    expert_names = {names[id(p)] for p in expert_parameters(model) if id(p) in names}
    out = {f"model.{k}": _expert_view(v, env, expert_names, k) for k, v in model.state_dict().items()}
    if optimizer is not None:
        for p, state in local_states(optimizer).items():
            name = names[id(p)]
            for key, value in state.items():
                if torch.is_tensor(value):
                    out[f"optim.{name}.{key}"] = value if value.dim() == 0 else _expert_view(value, env, expert_names, name)
    return out


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every state tensor (one step with zero gradients and a zero learning rate), so that a load has
    somewhere to write: AdamW keeps no state for a parameter it has not stepped yet."""
    saved = [(g, g["lr"]) for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g, _ in saved:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in saved:
        g["lr"] = lr
    for p in params:
        p.grad = None


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: Distributed) -> None:
    """Write this rank's shards into ``directory`` (collective: every rank calls it with the same path)."""
    dcp.save(state_tensors(model, optimizer, env), checkpoint_id=str(directory))


def load_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             env: Distributed | None) -> None:
    """Restore model (and optimiser) in place from a DCP checkpoint, at this run's world size (collective under
    torchrun; ``env`` None: one process, no process group)."""
    if optimizer is not None and not local_states(optimizer):
        init_optimizer_state(optimizer)
    state = state_tensors(model, optimizer, env)
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=env is None or not dist.is_initialized())
    except (RuntimeError, ValueError, KeyError) as e:  # missing keys, shape mismatch
        raise CheckpointError(f"{directory}: cannot load into this model: {e}") from None
