"""Expert parallelism (report §3.2): each rank of an expert-parallel group holds 1/EP of every MoE layer's
routed experts, and token copies travel to their expert's rank and back by all-to-all.

For one MoE layer on one rank (T tokens, K experts each, E experts, EP ranks, L = E / EP local experts):

1. the copies are sorted by expert (:func:`~dsv3.model.moe.dispatch`), which groups them by destination rank;
2. the per-expert counts are exchanged (an all-to-all of E integers on the device), and the split sizes are read
   on the host once (the one host sync of the layer);
3. ``all_to_all_single`` (with autograd) sends the copies; what arrives is ordered by source rank, then local
   expert, and is regrouped by local expert for the grouped GEMM;
4. the outputs go back the same way and are combined with the gate values as without parallelism.

With ``fp8_dispatch`` (``--fp8-dispatch``, report §3.3.4) step 3 sends the copies in FP8 with 1x128 scales and
the receiver dequantises them (:mod:`dsv3.train.fp8_dispatch`); step 4, the combine, stays in the activations'
dtype, as in the report.

Gradients: a local expert's gradient already sums the contributions of every rank of its group (the all-to-all's
backward brings them). :func:`reduce_expert_grads` sums it over the ranks holding the same experts and divides
by the data-parallel size, the average FSDP2 applies to every other gradient.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from ..config import ModelConfig
from ..model import MoE
from ..model.moe import dispatch, unsort
from .fp8_dispatch import fp8_all_to_all
from .node_limited import DispatchReach, ExpertPlacement
from .parallel import Distributed, all_reduce_flat, expert_parameters


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x, out_splits, in_splits, group))


class ExpertParallelMoE(MoE):
    """A :class:`~dsv3.model.MoE` whose ``experts`` hold experts ``first_expert .. first_expert + L - 1`` only,
    the others being on the other ranks of ``group`` (see the module docstring)."""

    group: dist.ProcessGroup
    ep: int
    first_expert: int
    reach: DispatchReach | None = None
    """Where ``send`` counts the ranks and nodes each token reaches in training (:func:`count_dispatch_reach`)."""
    fp8_dispatch: bool = False
    """Send the dispatched copies in FP8 (:func:`~dsv3.train.fp8_dispatch.fp8_all_to_all`); set by
    :func:`apply_expert_parallel`."""

    @classmethod
    def from_moe(cls, moe: MoE, group: dist.ProcessGroup, ep: int, ep_rank: int) -> "ExpertParallelMoE":
        """Take ``moe``'s modules (the same objects) and keep this rank's slice of its experts."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_experts = moe.n_experts
        new.gate, new.experts, new.shared_experts, new.balance_loss = (
            moe.gate, moe.experts, moe.shared_experts, moe.balance_loss)
        local = moe.n_experts // ep
        new.group, new.ep, new.first_expert = group, ep, ep_rank * local
        experts = moe.experts
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(experts, name)
                setattr(experts, name, nn.Parameter(full[new.first_expert:new.first_expert + local].clone(),
                                                    requires_grad=full.requires_grad))
        experts.n_experts, experts.first_expert = local, new.first_expert
        new.train(moe.training)
        return new

    def send(self, flat: torch.Tensor, indices: torch.Tensor):
        x_sorted, order, counts = dispatch(flat, indices, self.n_experts)
        local = self.n_experts // self.ep
        if self.reach is not None and self.training:
            self.reach.count(indices // local)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # (source rank, local expert) counts
        recv_counts = recv_counts.view(self.ep, local)
        splits = torch.cat([counts.view(self.ep, local).sum(1), recv_counts.sum(1)]).tolist()  # the host read
        send_splits, recv_splits = splits[: self.ep], splits[self.ep:]
        send_rows = fp8_all_to_all if self.fp8_dispatch else _all_to_all
        x_recv = send_rows(x_sorted, recv_splits, send_splits, self.group)
        # regroup what arrived (source-major) by local expert, keeping the source order within an expert
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=flat.device).repeat(self.ep),
                                                recv_counts.flatten(), output_size=sum(recv_splits))
        regroup = expert_of_row.argsort(stable=True)
        return x_recv[regroup], recv_counts.sum(0), (order, regroup, send_splits, recv_splits)

    def receive(self, y_local: torch.Tensor, routing: tuple) -> torch.Tensor:
        _, regroup, send_splits, recv_splits = routing
        return _all_to_all(unsort(y_local, regroup), send_splits, recv_splits, self.group)

    def extra_repr(self) -> str:
        local = self.n_experts // self.ep
        return f"experts {self.first_expert}..{self.first_expert + local - 1} of {self.n_experts} (EP {self.ep})"


def apply_expert_parallel(model: nn.Module, env: Distributed, fp8_dispatch: bool = False) -> None:
    """Replace every MoE layer by an :class:`ExpertParallelMoE` holding this rank's experts; ``fp8_dispatch``
    sends the tokens to the experts in FP8 (report §3.3.4)."""
    ep, group = env.dims.ep, env.ep_group
    ep_rank = env.ep_mesh["ep"].get_local_rank()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                if child.n_experts % ep:
                    raise ValueError(f"ep {ep} does not divide the {child.n_experts} routed experts")
                setattr(module, name, ExpertParallelMoE.from_moe(child, group, ep, ep_rank))
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            module.fp8_dispatch = fp8_dispatch


def expert_placement(config: ModelConfig, env: Distributed, ranks_per_node: int = 0) -> ExpertPlacement:
    """The routed experts' placement on this rank's expert-parallel group; ``ranks_per_node`` 0: torchrun's
    LOCAL_WORLD_SIZE (all ranks on one node outside torchrun)."""
    per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", env.dims.world))
    return ExpertPlacement(config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok,
                           tuple(dist.get_process_group_ranks(env.ep_group)), per_node)


def describe_expert_sharding(model: nn.Module, env: Distributed) -> str:
    """How the local experts are held by the ranks holding the same ones (for the start log: FSDP2 falls back
    to copies where it cannot split the weights' rows evenly)."""
    from torch.distributed.tensor import DTensor

    column = env.dims.dp_outer
    if column == 1:
        return "each rank's experts its own"
    experts = expert_parameters(model)
    how = "sharded by FSDP2" if experts and isinstance(experts[0], DTensor) else "replicated"
    return f"experts {how} over the {column} ranks holding them"


def count_dispatch_reach(model: nn.Module, placement: ExpertPlacement, device: torch.device) -> DispatchReach:
    """Have every expert-parallel MoE layer of ``model`` count the ranks and nodes its tokens reach, in one
    :class:`~dsv3.train.node_limited.DispatchReach` summed over the layers."""
    reach = DispatchReach(placement.node_of_rank(), device)
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            module.reach = reach
    return reach


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, env: Distributed) -> None:
    """Sum each local expert's gradient over the ranks holding the same experts and divide by the data-parallel
    size (so that it is the gradient of the global batch's mean loss, as FSDP2 / DDP make the others). Call it
    after the step's last backward."""
    from torch.distributed.tensor import DTensor

    params = expert_parameters(model)
    for p in params:  # no token reached this rank's experts (every rank of a column must take part)
        if p.grad is None and not isinstance(p, DTensor):
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if grads and isinstance(grads[0], DTensor):
        # FSDP2-sharded experts: the reduce-scatter averaged over the column (dp / ep ranks); gloo has no
        # pre-multiplied sum for FSDP2's custom divide factor, hence the division here
        torch._foreach_div_([g.to_local() for g in grads], float(env.dims.ep))
        return
    if not grads:
        return
    if env.dp_outer_group is not None:
        all_reduce_flat(grads, env.dp_outer_group)
    torch._foreach_div_(grads, float(env.dims.dp))


@torch.no_grad()
def gathered_state_dict(model: nn.Module, env: Distributed) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every expert-parallel layer's experts whole: each rank's slice (plain tensors,
    not FSDP2-sharded) gathered over its expert-parallel group, in expert order. A collective: every rank of the
    group calls it. What a whole-model consumer needs (an inference engine's weights, an export)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, ExpertParallelMoE):
            continue
        for pname, p in module.experts.named_parameters(recurse=False):
            if isinstance(p, DTensor):
                raise ValueError("gathered_state_dict: FSDP2-sharded experts (use ZeRO-1 or no sharding)")
            parts = [torch.empty_like(p) for _ in range(module.ep)]
            dist.all_gather(parts, p.detach().contiguous(), group=module.group)
            key = f"{name}.experts.{pname}".removeprefix(".")
            state[key] = torch.cat(parts)
    return state


__all__ = ["ExpertParallelMoE", "apply_expert_parallel", "count_dispatch_reach", "describe_expert_sharding",
           "expert_placement", "gathered_state_dict", "reduce_expert_grads"]
