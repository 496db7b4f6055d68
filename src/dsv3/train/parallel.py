"""How a training run is spread over processes, and the model transforms that do it (report §3.2).

Under ``torchrun`` every process runs the same ``dsv3 train``. :class:`ParallelDims` says how the world is
used: ``dp`` data-parallel ranks (all of them, today: no pipeline yet), of which groups of ``ep`` consecutive
ranks split the routed experts between them (expert parallelism borrows its ranks from data parallelism, as
the report's 64-way EP inside its DP). Two device meshes describe it: ``dp`` (all ranks, what FSDP2 shards
over) and, with experts split, ``("dp_outer", "ep")``: an expert-parallel group is a row, and the ranks holding
the same experts are a column.

:func:`parallelize` applies everything from outside the model, in this order:

1. FP8 (``--fp8``): the projections and experts swap to FP8 GEMMs (:func:`dsv3.fp8.apply_fp8_training`);
2. expert parallelism (``--ep``): each MoE layer keeps only its rank's experts and sends tokens to them with
   all-to-all (:mod:`dsv3.train.expert_parallel`);
3. ``torch.compile`` (``--compile``): the whole model in one process, block by block when sharded (FSDP's
   hooks sit between blocks);
4. data parallelism: FSDP2 ``fully_shard`` of each block and of the root (parameters, gradients and optimiser
   states sharded over the data-parallel ranks; the default), or ZeRO-1 (``--dp-shard zero1``: DDP's gradient
   all-reduce and ``ZeroRedundancyOptimizer``'s sharded AdamW states, the report's choice). The routed experts
   are not data-parallel sharded: each is replicated over its column and its gradients are summed there.

The routing biases are buffers that every rank updates identically from the all-reduced loads
(:class:`dsv3.train.balance.Balancer`): neither FSDP2 nor DDP (``broadcast_buffers=False``) touches them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..model import Block, DeepSeekV3

DP_SHARD_MODES = ("fsdp", "zero1")


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of a run: ``dp`` data-parallel ranks in groups of ``ep`` for the experts."""

    dp: int = 1
    ep: int = 1
    dp_shard: str = "fsdp"
    """``fsdp``: FSDP2 shards parameters, gradients and optimiser states; ``zero1``: DDP + sharded AdamW states."""
    launched: bool = False
    """Started by torchrun: the distributed code paths run, even on a world of one (a single GPU tests them)."""

    def __post_init__(self) -> None:
        if self.dp < 1 or self.ep < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got dp={self.dp}, ep={self.ep}")
        if self.dp % self.ep:
            raise ConfigError(f"ep: {self.ep} must divide the data-parallel size {self.dp} (the world size): "
                              f"expert-parallel groups are subsets of the data-parallel ranks")
        if self.dp_shard not in DP_SHARD_MODES:
            raise ConfigError(f"dp_shard: must be one of {DP_SHARD_MODES}, got {self.dp_shard!r}")
        if self.dp_shard == "zero1" and self.ep > 1:
            raise ConfigError("dp_shard zero1 with ep > 1 is not supported yet: use --dp-shard fsdp with --ep")

    @property
    def world(self) -> int:
        return self.dp

    @property
    def dp_outer(self) -> int:
        """Ranks holding the same experts (the replicas of one expert shard)."""
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.launched or self.world > 1


@dataclass
class Distributed:
    """This process's place in the run: its rank, the world, its device, the mesh (None in one process)."""

    dims: ParallelDims
    rank: int
    device: torch.device
    dp_mesh: "dist.device_mesh.DeviceMesh | None" = None
    """1-D over all ranks (None in one process)."""
    ep_mesh: "dist.device_mesh.DeviceMesh | None" = None
    """2-D ``("dp_outer", "ep")`` when the experts are split (else None)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """All data-parallel ranks (None in one process)."""
        return dist.group.WORLD if self.dims.distributed else None

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        """The ranks this rank exchanges tokens with (None without expert parallelism)."""
        return self.ep_mesh.get_group("ep") if self.ep_mesh is not None else None

    @property
    def dp_outer_group(self) -> dist.ProcessGroup | None:
        """The ranks holding the same experts as this one (None when there is only this one)."""
        return self.ep_mesh.get_group("dp_outer") if self.ep_mesh is not None and self.dims.dp_outer > 1 else None

    def barrier(self) -> None:
        if self.dims.distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks, in place; returns ``t``."""
        if self.dims.distributed:
            dist.all_reduce(t)
        return t


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun sets them; (0, 0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_distributed(device: torch.device, ep: int = 1, dp_shard: str = "fsdp") -> Distributed:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU) and build the mesh.

    ``device`` is the device the run asked for; under torchrun a CUDA run takes ``cuda:LOCAL_RANK``."""
    rank, local_rank, world = world_from_env()
    dims = ParallelDims(dp=world, ep=ep, dp_shard=dp_shard, launched=launched_by_torchrun())
    if not dims.distributed:
        return Distributed(dims, 0, device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    dp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    ep_mesh = None
    if dims.ep > 1:
        ep_mesh = init_device_mesh(device.type, (dims.dp_outer, dims.ep), mesh_dim_names=("dp_outer", "ep"))
    return Distributed(dims, rank, device, dp_mesh, ep_mesh)


# ------------------------------------------------------------------------------------------------------
# the transforms


def parallelize(model: DeepSeekV3, env: Distributed, *, fp8: bool = False, compile: bool = False) -> nn.Module:
    """Apply FP8, expert parallelism, compilation and data-parallel sharding to ``model`` in that order (see the
    module docstring). Returns the module to call for training: ``model`` itself, or its DDP / compiled
    wrapper (``model`` keeps its parameter names either way)."""
    if fp8:
        from ..fp8 import apply_fp8_training

        apply_fp8_training(model)
    if env.dims.ep > 1:
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, env)
    if not env.dims.distributed:
        return torch.compile(model) if compile else model
    if compile:
        for block in blocks(model):
            block.compile()
    if env.dims.dp_shard == "fsdp":
        _fully_shard(model, env)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def blocks(model: DeepSeekV3) -> list[Block]:
    """The decoder blocks, main model then MTP modules: the units of sharding and compilation."""
    return [*model.layers, *model.mtp]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' weights, in module order (sharded by expert parallelism, never by data
    parallelism)."""
    from ..model import Experts

    return [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)]


def _fully_shard(model: DeepSeekV3, env: Distributed) -> None:
    from torch.distributed.fsdp import fully_shard

    ignored = set(expert_parameters(model)) if env.dims.ep > 1 else None
    for block in blocks(model):
        fully_shard(block, mesh=env.dp_mesh, ignored_params=ignored)
    fully_shard(model, mesh=env.dp_mesh, ignored_params=ignored, reshard_after_forward=False)


def grad_sync_context(module: nn.Module, env: Distributed):
    """A function ``sync(last) -> context`` to wrap each micro-batch's forward and backward: gradients are
    reduced across ranks only with the last micro-batch of a step."""

    def sync(last: bool):
        if not env.dims.distributed:
            return contextlib.nullcontext()
        if env.dims.dp_shard == "zero1":
            return contextlib.nullcontext() if last else module.no_sync()
        module.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter with the last backward only
        return contextlib.nullcontext()

    return sync


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, env: Distributed) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm before
    clipping (a device tensor, the same on every rank; read it after the optimiser step to avoid a host wait).

    Sharded (FSDP2 DTensor) gradients are summed over the data-parallel ranks, the experts' over an
    expert-parallel group (each expert once: a column holds copies), replicated ones counted once."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_parameters(model)} if env.dims.ep > 1 else set()
    grads, sharded, plain, expert = [], [], [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            g = g.to_local()
            sharded.append(g)
        elif id(p) in experts:
            expert.append(g)
        else:
            plain.append(g)
        grads.append(g)

    def sum_sq(ts: list[torch.Tensor]) -> torch.Tensor:
        if not ts:
            return torch.zeros((), device=env.device)
        return torch.stack([t.float().square().sum() for t in ts]).sum()

    total = sum_sq(plain)
    if sharded:
        part = sum_sq(sharded)
        dist.all_reduce(part, group=env.dp_group)
        total = total + part
    if expert:
        part = sum_sq(expert)
        dist.all_reduce(part, group=env.ep_group)
        total = total + part
    norm = total.sqrt()
    if grads:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return norm


def close_distributed() -> None:
    """Leave the process group (at the end of a torchrun job, or after its failure)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
