"""Pipeline parallelism in the trainer: this rank's stages, the schedule of each step, the gradient reductions.

With ``--pp P`` the world is P pipeline ranks times the data-parallel ranks. :class:`Pipeline`

1. cuts the model into stages (:func:`dsv3.pipeline.split_layers`) and keeps on this rank only what its stages
   use (:func:`dsv3.pipeline.prune_to_stages`; :func:`stage_pruner` does it before the model is allocated): the
   parameters, optimiser and checkpoint shards are its own;
2. with a zero-bubble schedule (DualPipe, DualPipeV) defers the weight gradients of the blocks' Linear layers and
   experts to the schedule's W chunks (:mod:`dsv3.pipeline.weight_grad`);
3. runs each step's micro-batches in the schedule's order (:class:`dsv3.pipeline.executor.PipelineExecutor`),
   the loss at the last stage (main head and MTP, as without a pipeline), on a GPU the two halves of each
   overlapped pair on two CUDA streams at once (:class:`dsv3.pipeline.overlap.ChunkStreams`);
4. after the step sums the gradients of what two pipeline ranks both hold (DualPipe's two copies of every stage;
   1F1B's embedding, which the last rank's MTP module needs too) and averages over the data-parallel ranks.

The aux-loss-free bias, the balance loss and the metrics need nothing special: the gates count where they run,
and the trainer sums the counts over every rank once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, ModelConfig
from ..model import DeepSeekV3
from ..pipeline import Schedule, build_schedule
from ..pipeline.executor import PipelineExecutor
from ..pipeline.overlap import chunk_streams
from ..pipeline.stages import (
    PipelineStage,
    held_model_stages,
    prune_to_stages,
    replicated_parameters,
    split_layers,
)
from ..pipeline.weight_grad import WeightGradStore
from .batch import TrainBatch
from .parallel import Distributed, all_reduce_flat, expert_parameters
from .step import combine_losses, cross_entropy_sum, token_losses


def _schedule(name: str, pp: int, n_microbatches: int) -> Schedule:
    try:
        return build_schedule(name, pp, n_microbatches)
    except ValueError as e:
        raise ConfigError(f"pp_schedule: {e}") from None


def _placement(config: ModelConfig, env: Distributed, schedule: str) -> tuple[Schedule, list[range], list[int]]:
    """(the schedule's stage layout, the layers of each model stage, the model stages this rank holds)."""
    layout = _schedule(schedule, env.dims.pp, 2 * env.dims.pp)  # stage placement does not depend on the count
    try:
        splits = split_layers(config, layout.n_model_stages)
    except ValueError as e:
        raise ConfigError(f"pp: {e}") from None
    return layout, splits, held_model_stages(layout, env.pp_rank)


def stage_pruner(config: ModelConfig, env: Distributed, schedule: str) -> Callable[[nn.Module], None]:
    """A :func:`dsv3.build_model` transform keeping what this rank's stages use, so that the other stages are
    never allocated (the MTP modules, when the config has them, need the embedding on the last stage)."""
    _, splits, held = _placement(config, env, schedule)
    return lambda model: prune_to_stages(model, splits, held, needs_embedding=config.num_nextn_predict_layers > 0)


class Pipeline:
    """This rank's share of a pipeline-parallel model (see the module docstring)."""

    def __init__(self, model: DeepSeekV3, env: Distributed, schedule: str, depth: int, overlap: str = "auto"):
        self.env, self.name, self.depth = env, schedule, depth
        try:
            self.streams = chunk_streams(env.device, overlap)
        except ValueError as e:
            raise ConfigError(f"pp_overlap: {e}") from None
        self.layout, self.splits, self.held = _placement(model.config, env, schedule)
        prune_to_stages(model, self.splits, self.held, needs_embedding=depth > 0)  # done already if built so
        self.model = model
        self.replicated = replicated_parameters(self.layout, env.pp_rank, depth)
        self._groups = self._replica_groups()
        self.store = WeightGradStore()
        self.zero_bubble = schedule != "1f1b"
        self._schedules: dict[int, Schedule] = {}

    def schedule(self, n_microbatches: int) -> Schedule:
        return _schedule(self.name, self.env.dims.pp, n_microbatches)

    def check_microbatches(self, counts: set[int]) -> None:
        """Every per-rank micro-batch count a run's steps will have must suit the schedule (names the numbers)."""
        for n in sorted(counts):
            try:
                build_schedule(self.name, self.env.dims.pp, n)
            except ValueError as e:
                hint = " (the batch-size ramp makes smaller steps: --set batch_ramp=false, or size the batch)" \
                    if len(counts) > 1 else ""
                raise ConfigError(f"pp_schedule: a step of {n} micro-batches per data-parallel rank: {e}{hint}") from None

    def _replica_groups(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """Process groups of the pipeline ranks holding the same parameters (created on every rank, in one order)."""
        env = self.env
        wanted = sorted({ranks for r in range(env.dims.pp)
                         for ranks in replicated_parameters(self.layout, r, self.depth).values()})
        groups = {}
        for ranks in wanted:
            for j in range(env.dims.dp):
                group = dist.new_group([r * env.dims.dp + j for r in ranks])
                if j == env.dp_rank and env.pp_rank in ranks:
                    groups[ranks] = group
        return groups

    def stages(self) -> dict[int, PipelineStage]:
        lay = self.layout
        return {v: PipelineStage(self.model, lay.model_stage[v], lay.n_model_stages, self.splits[lay.model_stage[v]])
                for v in lay.stages_of(self.env.pp_rank)}

    def holders(self) -> dict[int, int]:
        """id(parameter) -> how many pipeline ranks hold it (for the gradient norm), where more than one."""
        out = {}
        for name, p in self.model.named_parameters():
            for prefix, ranks in self.replicated.items():
                if name.startswith(prefix):
                    out[id(p)] = len(ranks)
        return out

    # -------------------------------------------------------------------------------------------- a step
    def forward_backward(self, batches: list[TrainBatch], *, mtp_weight: float, denominators: torch.Tensor,
                         autocast) -> torch.Tensor:
        """The step's micro-batches through the schedule; returns (1 + depth,) float64 token-loss sums (non-zero
        on the ranks holding the last stage)."""
        sched = self._schedules.setdefault(len(batches), self.schedule(len(batches)))
        sums = torch.zeros(1 + self.depth, dtype=torch.float64, device=self.env.device)

        def loss_fn(logits: list[torch.Tensor], batch: TrainBatch) -> torch.Tensor:
            losses = token_losses(logits, batch)
            sums.add_(torch.stack(losses).detach().double())
            return combine_losses(losses, denominators, mtp_weight)

        executor = PipelineExecutor(sched, self.env.pp_rank, self.stages(), self.env.pp_group, self.store,
                                    self.streams)
        executor.run(batches, hidden=self._hidden(batches), loss_fn=loss_fn, with_mtp=self.depth > 0,
                     autocast=autocast)
        return sums

    @torch.no_grad()
    def evaluate(self, batches: list[TrainBatch], autocast, counted: int) -> torch.Tensor:
        """(CE sum, tokens) of the main head over the first ``counted`` of ``batches`` (the rest keep the ranks'
        forwards in step; non-zero on the rank holding the last stage)."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)

        def on_logits(logits: list[torch.Tensor], m: int) -> None:
            if m < counted:
                totals[0] += cross_entropy_sum(logits[0], batches[m].targets(0)).double()
                totals[1] += batches[m].targets(0).numel()

        executor = PipelineExecutor(self.layout, self.env.pp_rank, self.stages(), self.env.pp_group, self.store)
        executor.forward_only(batches, hidden=self._hidden(batches), on_logits=on_logits, autocast=autocast)
        return totals

    def _hidden(self, batches: list[TrainBatch]):
        """m -> (shape, dtype, device) of micro-batch m's activations between stages (the weights' dtype: the
        residual stream stays in it under autocast)."""
        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        d = self.model.config.hidden_size
        return lambda m: (torch.Size((batches[m].tokens.shape[0], batches[m].seq_len, d)), dtype, self.env.device)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum over the pipeline ranks holding the same parameters, average over the data-parallel ranks (the
        experts' gradients are the trainer's: :func:`dsv3.train.expert_parallel.reduce_expert_grads`)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        for _, p in named:  # a parameter no token reached this step still takes part (the same buffer everywhere)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for prefix, ranks in self.replicated.items():
            all_reduce_flat([p.grad for n, p in named if n.startswith(prefix)], self._groups[ranks])
        env = self.env
        if env.dims.dp > 1:
            experts = {id(p) for p in expert_parameters(self.model)} if env.dims.ep > 1 else set()
            grads = [p.grad for _, p in named if id(p) not in experts]
            all_reduce_flat(grads, env.dp_group)
            torch._foreach_div_(grads, float(env.dims.dp))

