"""Running a pipeline schedule on this rank: its stages' forwards and backwards in the schedule's order, with the
activations and gradients sent to and received from the neighbouring stages by ``torch.distributed`` P2P.

Sends are asynchronous and waited at the end of the step. Between two ranks, messages are received in the order
the sender sends them (NCCL matches point-to-point messages in order): every rank knows every rank's action list,
so it knows that order, and a message that arrives before it is needed waits in a mailbox. A stage handing its
output to a stage on the same rank (the turn of DualPipeV's V) skips the network. A schedule that the simulator
runs without deadlock therefore runs here without one.

An overlapped pair runs its two halves one after the other on the CPU; on a GPU, given :class:`ChunkStreams`, the
two halves run on two CUDA streams at the same time (:mod:`dsv3.pipeline.overlap`).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .overlap import ChunkStreams
from .schedule import Action, Schedule, flat_actions
from .stages import PipelineStage
from .weight_grad import WeightGradStore

Message = tuple[str, int, int]  # ("act" | "grad", virtual stage it is for, micro-batch)
Hidden = Callable[[int], tuple[torch.Size, torch.dtype, torch.device]]
"""(shape, dtype, device) of the activation between stages for micro-batch m (its gradient is alike)."""


class PipelineExecutor:
    """This pipeline rank's part of ``schedule``: ``stages`` maps each virtual stage it holds to its module."""

    def __init__(self, schedule: Schedule, rank: int, stages: dict[int, PipelineStage],
                 group: dist.ProcessGroup | None, store: WeightGradStore | None = None,
                 streams: ChunkStreams | None = None):
        self.schedule, self.rank, self.stages, self.group = schedule, rank, stages, group
        self.store = store or WeightGradStore()
        self.streams = streams
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []

    # ------------------------------------------------------------------------------------------ messages
    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank)

    def _plan_channels(self, steps: Sequence[Sequence], paths: Sequence[Sequence[int]]) -> None:
        """For every other rank, the messages it will send here, in its sending order."""
        self.paths = paths
        self.channels: dict[int, deque[Message]] = {}
        for src, src_steps in enumerate(steps):
            if src == self.rank:
                continue
            for step in src_steps:
                for a in flat_actions(step):
                    for msg, dst in self._sends_of(a):
                        if dst == self.rank:
                            self.channels.setdefault(src, deque()).append(msg)
        # a message that arrived (or was produced here) before it is needed, and the event after which it is ready
        self.mailbox: dict[Message, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def _neighbour(self, stage: int, microbatch: int, offset: int) -> int | None:
        path = self.paths[microbatch]
        i = path.index(stage) + offset
        return path[i] if 0 <= i < len(path) else None

    def _sends_of(self, a: Action) -> list[tuple[Message, int]]:
        """The messages action ``a`` sends and to which rank."""
        rank_of = self.schedule.rank_of
        if a.kind == "F":
            nxt = self._neighbour(a.stage, a.microbatch, 1)
            return [] if nxt is None else [(("act", nxt, a.microbatch), rank_of[nxt])]
        if a.kind in ("B", "I"):
            prev = self._neighbour(a.stage, a.microbatch, -1)
            return [] if prev is None else [(("grad", prev, a.microbatch), rank_of[prev])]
        return []

    def _send(self, msg: Message, dst: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if dst == self.rank:
            self.mailbox[msg] = (tensor, self.streams.ready() if self.streams else None)
            return
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=self._global(dst), group=self.group), tensor))

    def _receive(self, msg: Message, src: int, hidden: Hidden) -> torch.Tensor:
        while msg not in self.mailbox:
            if src == self.rank:
                raise RuntimeError(f"pipeline rank {self.rank}: {msg} was never produced locally")
            nxt = self.channels[src].popleft()
            shape, dtype, device = hidden(nxt[2])
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, src=self._global(src), group=self.group)
            self.mailbox[nxt] = (buf, self.streams.ready() if self.streams else None)
        tensor, event = self.mailbox.pop(msg)
        return self.streams.receive(tensor, event) if self.streams else tensor

    def _finish_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    # ------------------------------------------------------------------------------------------ running
    def run(self, batches: Sequence, *, hidden: Hidden,
            loss_fn: Callable[[list[torch.Tensor], object], torch.Tensor] | None, with_mtp: bool,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """Forward and backward of every micro-batch of the step (``batches[m]`` is micro-batch m's data, read
        by the first and last stage). ``loss_fn(logits, batch)`` gives the loss to differentiate at the last stage;
        ``hidden(m)`` the (shape, dtype, device) of micro-batch m's activations between stages."""
        s = self.schedule
        self._plan_channels(s.steps, s.paths)
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        if self.streams:
            self.streams.begin()
        for step in s.steps[self.rank]:
            actions = flat_actions(step)
            if self.streams:
                self.streams.next_step()
                for a in actions:
                    if a.kind == "F":
                        partner = [(b.stage, b.microbatch) for b in actions if b is not a]
                        self.streams.assign_forward((a.stage, a.microbatch), partner[0] if partner else None)
            for a in actions:
                key = (a.stage, a.microbatch)
                with self.streams.use(key) if self.streams else contextlib.nullcontext():
                    if a.kind == "F":
                        saved[key] = self._forward(a, batches, hidden, loss_fn, with_mtp, autocast)
                    elif a.kind in ("B", "I"):
                        x, out = saved.pop(key)
                        self._backward(a, x, out, hidden)
                    else:
                        self.store.run(key)
        if self.streams:
            self.streams.end()
        self._finish_sends()
        if saved or len(self.store):
            raise RuntimeError(f"pipeline rank {self.rank}: chunks left after the step ({sorted(saved)})")

    def _forward(self, a: Action, batches, hidden, loss_fn, with_mtp, autocast):
        prev = self._neighbour(a.stage, a.microbatch, -1)
        x = None
        if prev is not None:
            x = self._receive(("act", a.stage, a.microbatch), self.schedule.rank_of[prev], hidden)
            x.requires_grad_(torch.is_grad_enabled())
        batch = batches[a.microbatch]
        with autocast():
            out = self.stages[a.stage](x, batch, with_mtp)
        for msg, dst in self._sends_of(a):
            self._send(msg, dst, out)
        if self._neighbour(a.stage, a.microbatch, 1) is None:
            return x, loss_fn(out, batch)
        return x, out

    def _backward(self, a: Action, x: torch.Tensor | None, out: torch.Tensor, hidden) -> None:
        nxt = self._neighbour(a.stage, a.microbatch, 1)
        defer = self.store.deferring((a.stage, a.microbatch)) if a.kind == "I" else contextlib.nullcontext()
        with defer:
            if nxt is None:
                out.backward()
            else:
                grad = self._receive(("grad", a.stage, a.microbatch), self.schedule.rank_of[nxt], hidden)
                torch.autograd.backward(out, grad)
        for msg, dst in self._sends_of(a):
            self._send(msg, dst, x.grad)

    @torch.no_grad()
    def forward_only(self, batches: Sequence, *, hidden, on_logits: Callable[[list[torch.Tensor], int], None],
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        """Every micro-batch forward through the first path (validation); ``on_logits`` at the last stage."""
        s = self.schedule
        path = s.paths[0]
        paths = [path] * len(batches)
        steps = [[Action("F", v, m) for m in range(len(batches)) for v in path if s.rank_of[v] == r]
                 for r in range(s.n_ranks)]
        self._plan_channels(steps, paths)
        for a in steps[self.rank]:
            _, out = self._forward(a, batches, hidden, lambda logits, batch: logits, False, autocast)
            if self._neighbour(a.stage, a.microbatch, 1) is None:
                on_logits(out, a.microbatch)
        self._finish_sends()
