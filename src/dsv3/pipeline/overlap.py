"""Overlapped forward-backward on a GPU: the two chunks of a DualPipe pair on two CUDA streams (report §3.2.1).

A pair is the forward chunk of one micro-batch and the backward chunk of another; nothing flows between them, so
the GPU may run them at the same time: one's communication (the all-to-all of expert parallelism, the pipeline's
sends) and its latency-bound kernels fill the gaps of the other's GEMMs. :class:`ChunkStreams` gives each chunk
its stream:

- a backward runs where its forward ran (autograd runs each backward op on the stream of its forward op), so a
  forward paired with a backward takes the *other* stream, and an unpaired forward stays on its micro-batch's
  stream when it can;
- the schedule's steps stay ordered: each step starts after everything of the steps before it on both streams
  (:meth:`ChunkStreams.next_step`), so only the two halves of a pair run concurrently. Two backwards, which both
  add into the parameters' ``.grad``, or a weight-gradient chunk, never run at the same time;
- a tensor handed from one stream to another (an activation passed between this rank's two stages, a received
  buffer) carries the event after which it is ready (:meth:`ChunkStreams.ready`) and is recorded on the stream
  that reads it, so the caching allocator does not hand its memory out while that stream still reads it.

The streams wait for the caller's stream when a step of the schedule begins and the caller waits for them when it
ends (the optimiser then reads the gradients on the caller's stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

Key = tuple[int, int]  # (virtual stage, micro-batch)


class ChunkStreams:
    """Two CUDA streams of ``device`` and which chunk runs on which."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"overlapped forward-backward needs CUDA streams; the model is on {self.device}")
        self.streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        self._of: dict[Key, int] = {}

    def begin(self) -> None:
        """Start of a schedule run: the streams see everything the caller's stream did (the optimiser's update)."""
        caller = torch.cuda.current_stream(self.device)
        for s in self.streams:
            s.wait_stream(caller)
        self._of.clear()

    def end(self) -> None:
        """End of a schedule run: the caller's stream sees all the chunks' work."""
        caller = torch.cuda.current_stream(self.device)
        for s in self.streams:
            caller.wait_stream(s)

    def next_step(self) -> None:
        """The next step of the schedule starts after all work of the earlier ones, on both streams."""
        a, b = self.streams
        a.wait_stream(b)
        b.wait_stream(a)

    def assign_forward(self, key: Key, partner: Key | None) -> None:
        """Choose the stream of a forward chunk: not its paired backward's, else its micro-batch's latest."""
        if partner is not None:
            self._of[key] = 1 - self._of[partner]
            return
        mine = [i for (_, m), i in self._of.items() if m == key[1]]
        self._of[key] = mine[-1] if mine else 0

    @contextlib.contextmanager
    def use(self, key: Key) -> Iterator[None]:
        """Run a chunk of ``key`` (forward, backward or weight gradient) on its stream."""
        with torch.cuda.stream(self.streams[self._of[key]]):
            yield

    def ready(self) -> torch.cuda.Event:
        """An event after the current stream's work so far (a tensor handed to another stream is ready after it)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def receive(self, tensor: torch.Tensor, event: torch.cuda.Event | None) -> torch.Tensor:
        """Make ``tensor`` (ready after ``event``) safe to read on the current stream."""
        stream = torch.cuda.current_stream(self.device)
        if event is not None:
            stream.wait_event(event)
        tensor.record_stream(stream)
        return tensor


def chunk_streams(device: torch.device | str, setting: str = "auto") -> ChunkStreams | None:
    """The streams for ``setting``: ``on`` (an error where there are no CUDA streams), ``off``, or ``auto`` (on
    with CUDA, off otherwise)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"overlap must be 'auto', 'on' or 'off', got {setting!r}")
    on_gpu = torch.device(device).type == "cuda"
    if setting == "on" and not on_gpu:
        raise ValueError(f"'on' needs CUDA streams, this run is on {device} (use 'auto' or 'off')")
    return ChunkStreams(device) if on_gpu and setting != "off" else None
