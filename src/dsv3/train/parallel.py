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
   are sharded over their ``dp_outer`` column only, the ranks holding the same experts: by FSDP2 along their rows,
   or under ZeRO-1 their AdamW states (:func:`dsv3.train.optim.build_optimizer`).

The routing biases are buffers that every rank updates identically from the all-reduced loads
(:class:`dsv3.train.balance.Balancer`): neither FSDP2 nor DDP (``broadcast_buffers=False``) touches them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..model import Block, DeepSeekV3

DP_SHARD_MODES = ("auto", "fsdp", "zero1")


@dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of a run: ``pp`` pipeline ranks times ``dp`` data-parallel ranks, the data-parallel
    ranks in groups of ``ep`` for the experts."""

    dp: int = 1
    ep: int = 1
    dp_shard: str = "auto"
    """``fsdp``: FSDP2 shards parameters, gradients and optimiser states; ``zero1``: data-parallel gradient
    all-reduce + sharded AdamW states; ``auto``: FSDP2, or ZeRO-1 with a pipeline (the report's layout)."""
    launched: bool = False
    """Started by torchrun: the distributed code paths run, even on a world of one (a single GPU tests them)."""
    pp: int = 1
    """Pipeline ranks (each holds one or two stages of the model, see :mod:`dsv3.pipeline`)."""

    def __post_init__(self) -> None:
        if self.dp < 1 or self.ep < 1 or self.pp < 1:
            raise ConfigError(f"parallel sizes must be >= 1, got pp={self.pp}, dp={self.dp}, ep={self.ep}")
        if self.dp % self.ep:
            raise ConfigError(f"ep: {self.ep} must divide the data-parallel size {self.dp} (world / pp): "
                              f"expert-parallel groups are subsets of the data-parallel ranks")
        if self.dp_shard not in DP_SHARD_MODES:
            raise ConfigError(f"dp_shard: must be one of {DP_SHARD_MODES}, got {self.dp_shard!r}")
        if self.dp_shard == "fsdp" and self.pp > 1:
            raise ConfigError("dp_shard fsdp with pp > 1 is not supported yet: a pipeline shards data-parallel "
                              "state with ZeRO-1 (leave --dp-shard at auto)")

    @property
    def shard(self) -> str:
        """How data parallelism runs: ``fsdp`` or ``zero1`` (``auto``: FSDP2, ZeRO-1 under a pipeline)."""
        if self.dp_shard != "auto":
            return self.dp_shard
        return "fsdp" if self.pp == 1 else "zero1"

    @property
    def world(self) -> int:
        return self.pp * self.dp

    @property
    def dp_outer(self) -> int:
        """Ranks holding the same experts (the replicas of one expert shard)."""
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.launched or self.world > 1


@dataclass
class Distributed:
    """This process's place in the run: its ranks, its device, the meshes (None in one process)."""

    dims: ParallelDims
    rank: int
    device: torch.device
    mesh: "dist.device_mesh.DeviceMesh | None" = None
    """2-D ``("pp", "dp")`` over all ranks (None in one process): rank = pp_rank * dp + dp_rank."""
    ep_mesh: "dist.device_mesh.DeviceMesh | None" = None
    """2-D ``("dp_outer", "ep")`` over this pipeline rank's data-parallel ranks, when the experts are split."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dims.dp

    @property
    def dp_mesh(self) -> "dist.device_mesh.DeviceMesh | None":
        """1-D over this pipeline rank's data-parallel ranks (what FSDP2 shards over)."""
        return self.mesh["dp"] if self.mesh is not None else None

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel ranks that run the same stages on other data (None in one process)."""
        return self.mesh.get_group("dp") if self.mesh is not None else None

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        """The pipeline ranks of this data-parallel replica (None without a pipeline)."""
        return self.mesh.get_group("pp") if self.mesh is not None and self.dims.pp > 1 else None

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

    def all_reduce(self, t: torch.Tensor, over: str = "world") -> torch.Tensor:
        """Sum in place over all ranks (``over="world"``) or this rank's data-parallel group (``"dp"``)."""
        if self.dims.distributed:
            dist.all_reduce(t, group=self.dp_group if over == "dp" else None)
        return t


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun sets them; (0, 0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_distributed(device: torch.device, ep: int = 1, dp_shard: str = "auto", pp: int = 1) -> Distributed:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU) and build the meshes.

    ``device`` is the device the run asked for; under torchrun a CUDA run takes ``cuda:LOCAL_RANK``."""
    rank, local_rank, world = world_from_env()
    if world % pp:
        raise ConfigError(f"pp: {pp} must divide the world size {world}")
    dims = ParallelDims(dp=world // pp, ep=ep, dp_shard=dp_shard, launched=launched_by_torchrun(), pp=pp)
    if not dims.distributed:
        return Distributed(dims, 0, device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dims.pp, dims.dp), mesh_dim_names=("pp", "dp"))
    ep_mesh = None
    if dims.ep > 1:
        ep_mesh = init_device_mesh(device.type, (dims.pp, dims.dp_outer, dims.ep),
                                   mesh_dim_names=("pp", "dp_outer", "ep"))["dp_outer", "ep"]
    return Distributed(dims, rank, device, mesh, ep_mesh)


# ------------------------------------------------------------------------------------------------------
# the transforms


def parallelize(model: DeepSeekV3, env: Distributed, *, fp8: bool = False, compile: bool = False,
                fp8_dispatch: bool = False, materialize: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Apply FP8, expert parallelism, compilation and data-parallel sharding to ``model`` in that order (see the
    module docstring). Returns the module to call for training: ``model`` itself, or its DDP / compiled
    wrapper (``model`` keeps its parameter names either way). ``materialize(model)``, for a model built on the
    meta device, allocates and initialises it once its layout is final: after FSDP2's sharding (each rank then
    allocates only its shards) or before DDP's wrapping (which broadcasts real values)."""
    if fp8:
        from ..fp8 import apply_fp8_training

        apply_fp8_training(model, device=env.device)  # a model on meta still gets the backend of its device
    if env.dims.ep > 1:
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, env, fp8_dispatch=fp8_dispatch)
    materialize = materialize or (lambda model: None)
    if not env.dims.distributed:
        materialize(model)
        return torch.compile(model) if compile else model
    if compile:
        for block in blocks(model):
            if isinstance(block, Block):  # a pipeline rank's other blocks are empty placeholders
                block.compile()
    if env.dims.pp > 1:  # the pipeline calls the stages; data-parallel gradients are reduced after the step
        materialize(model)
        return model
    if env.dims.shard == "fsdp":
        _fully_shard(model, env)
        materialize(model)
        return model
    materialize(model)
    from torch.nn.parallel import DistributedDataParallel

    if env.dims.ep > 1:  # each rank's experts are its own: neither broadcast from rank 0 nor averaged by DDP
        names = {id(p): n for n, p in model.named_parameters()}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [names[id(p)] for p in expert_parameters(model)])
    ids = [env.device.index] if env.device.type == "cuda" else None
    # the routing biases are updated identically on every rank, never synced from rank 0 in forward (torch 2.13
    # renames the option; its init-time sync of buffers that are equal on every rank then changes nothing)
    import inspect

    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


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

    ignored = None
    if env.dims.ep > 1 and env.dims.dp_outer > 1 and _rows_split_evenly(model, env.dims.dp_outer):
        _shard_experts(model, env)  # the blocks' fully_shard below skips what is sharded already
    elif env.dims.ep > 1:  # each rank's experts are its own, replicated over their column (if any)
        ignored = set(expert_parameters(model))
    for block in blocks(model):
        fully_shard(block, mesh=env.dp_mesh, ignored_params=ignored)
    fully_shard(model, mesh=env.dp_mesh, ignored_params=ignored, reshard_after_forward=False)


EXPERT_SHARD_DIM = 1
"""FSDP2 shards the experts' weights along their rows (dim 1), because expert parallelism has split dim 0
already: a checkpoint then records each shard as a plain block of the all-experts tensor."""


def _rows_split_evenly(model: nn.Module, parts: int) -> bool:
    """Whether every expert weight's rows split into ``parts`` equal shards (FSDP2 refuses uneven shards off
    dim 0; the experts then stay replicated over their column)."""
    return all(p.shape[EXPERT_SHARD_DIM] % parts == 0 for p in expert_parameters(model))


def _shard_experts(model: DeepSeekV3, env: Distributed) -> None:
    """FSDP2 ``fully_shard`` of each MoE layer's local experts over the ranks holding the same experts (the
    ``dp_outer`` column): weights, gradients and AdamW states 1 / dp_outer each. The reduce-scatter averages the
    column's gradients; :func:`dsv3.train.expert_parallel.reduce_expert_grads` divides them by ``ep`` more."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from ..model import Experts

    column = env.ep_mesh["dp_outer"]
    for module in model.modules():
        if isinstance(module, Experts):
            fully_shard(module, mesh=column, shard_placement_fn=lambda p: Shard(EXPERT_SHARD_DIM))


def grad_sync_context(module: nn.Module, env: Distributed):
    """A function ``sync(last) -> context`` to wrap each micro-batch's forward and backward: gradients are
    reduced across ranks only with the last micro-batch of a step."""

    def sync(last: bool):
        if not env.dims.distributed:
            return contextlib.nullcontext()
        if env.dims.shard == "zero1":
            return contextlib.nullcontext() if last else module.no_sync()
        module.set_requires_gradient_sync(last)  # FSDP2: reduce-scatter with the last backward only
        return contextlib.nullcontext()

    return sync


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, env: Distributed,
                   holders: dict[int, int] | None = None) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm before
    clipping (a device tensor, the same on every rank; read it after the optimiser step to avoid a host wait).

    Sharded (FSDP2 DTensor) gradients are summed over the data-parallel ranks, the experts' over an
    expert-parallel group (each expert once: a column holds copies), replicated ones counted once; under a
    pipeline every rank's share is summed over the pipeline ranks, a parameter that ``holders`` (by ``id``) says
    several pipeline ranks hold counting once."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_parameters(model)} if env.dims.ep > 1 else set()
    holders = holders or {}
    grads: list[torch.Tensor] = []
    parts: dict[str, list[torch.Tensor]] = {"plain": [], "sharded": [], "expert": []}
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        kind = "sharded" if isinstance(p.grad, DTensor) else "expert" if id(p) in experts else "plain"
        parts[kind].append(g.float().square().sum() / holders.get(id(p), 1))
        grads.append(g)

    def total(kind: str) -> torch.Tensor:
        return torch.stack(parts[kind]).sum() if parts[kind] else torch.zeros((), device=env.device)

    sq = total("plain")
    if parts["sharded"]:
        sq = sq + env.all_reduce(total("sharded"), over="dp")
    if env.dims.ep > 1:
        part = total("expert")
        dist.all_reduce(part, group=env.ep_group)
        sq = sq + part
    if env.pp_group is not None:
        dist.all_reduce(sq, group=env.pp_group)
    norm = sq.sqrt()
    if grads:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return norm


@torch.no_grad()
def all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum ``grads`` over ``group`` in place, as one flat buffer (callers list them in the same order on every
    rank: module order)."""
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])


def close_distributed() -> None:
    """Leave the process group (at the end of a torchrun job, or after its failure)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
