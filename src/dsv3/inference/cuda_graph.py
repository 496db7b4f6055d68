"""CUDA graphs for decoding and prefilling: one step captured per padded shape, replayed at every step.

A decode step of a small batch is a few thousand small kernels (27 layers of norms, projections, rotary
embedding, the latent attention, routing, grouped expert GEMMs); launched one by one from Python, the GPU
spends most of the step waiting for the host. Captured once in a :class:`torch.cuda.CUDAGraph`, the step
is a single launch.

What makes :meth:`Engine.forward_cached <dsv3.inference.engine.Engine.forward_cached>` capturable:

* **fixed shapes**: a batch of b sequences is padded up to the nearest captured size (1, 2, 4, 8, 16, 32
  by default), and the keys read up to a bucket of whole pages (a power of two, at most a sequence's
  maximum). Padded rows are marked invalid: their latents go to the cache's scratch page, their outputs
  are dropped;
* **no host syncs** inside: no ``.item()`` / ``.tolist()``, no data-dependent shapes; the MoE counts its
  tokens per expert with a scatter-add and runs the experts as grouped GEMMs
  (:func:`~dsv3.inference.moe.moe_forward`);
* **static buffers**: the step reads tokens, slots, positions and validity from one input tensor that is
  filled (one host-to-device copy) before each replay, and writes the hidden states, the logits and the
  greedy tokens (argmax, on the device) into tensors owned by the graph. Reading the greedy tokens back is
  the step's only sync.

The cache (its latents and block table) and the weights are read in place, so they must not be
reallocated once graphs exist. All graphs share one memory pool: they never run at the same time, and
each replay's outputs are consumed before the next replay (so they are valid until then only).

Prefills of new prompts (:class:`PrefillGraphs`) are captured the same way, per (padded batch, prompt
length rounded up to a power of two): a prompt of a few hundred tokens is as many launches as a decode
step, with little work each. Prompts continuing a cached prefix, and prompts longer than
``max_prefill_tokens``, are prefilled eagerly.

On the CPU (``Engine(cuda_graph=True)`` there, for tests) nothing is captured: the same padded, fixed-shape
step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class CapturedStep:
    """One captured step: its input buffer (filled before each replay), its graph (``None`` on the CPU,
    where the step runs eagerly) and its output buffers."""

    inputs: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)


class _Graphs:
    """Steps of an engine captured lazily per key, all in one memory pool; ``forward(inputs, key)`` is the
    step, a function of the input buffer alone."""

    def __init__(self, engine: Engine, batch_sizes: Seq[int]):
        self.engine = engine
        self.batch_sizes = sorted({b for b in batch_sizes if 0 < b < engine.max_batch} | {engine.max_batch})
        self.capture = engine.device.type == "cuda"
        self.steps: dict[tuple[int, ...], CapturedStep] = {}
        self._pool = None

    def covers(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def padded_batch(self, batch: int) -> int:
        return next(b for b in self.batch_sizes if b >= batch)

    def replay(self, key: tuple[int, ...], host_inputs: torch.Tensor, forward: Callable) -> tuple[torch.Tensor, ...]:
        """Run the step of ``key`` on ``host_inputs`` (capturing it first if new); returns its outputs, valid
        until the next replay of any step."""
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._capture(torch.zeros_like(host_inputs, device=self.engine.device),
                                                   lambda inputs: forward(inputs, key))
        step.inputs.copy_(host_inputs, non_blocking=True)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.outputs = forward(step.inputs, key)
        return step.outputs

    def _capture(self, inputs: torch.Tensor, fn: Callable) -> CapturedStep:
        # Inputs all zero while warming up and capturing: every row invalid, so the only cache writes go to
        # the scratch page.
        step = CapturedStep(inputs)
        if not self.capture:
            return step
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # One eager run first, on a side stream (as torch.cuda.graph asks): lazy initialisation (cuBLAS
        # workspaces, kernel loading, torch.compile and Triton autotuning) must not happen during capture.
        device = self.engine.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self._pool):
            step.outputs = fn(inputs)
        return step


class DecodeGraphs(_Graphs):
    """The decode steps of an :class:`~dsv3.inference.engine.Engine`, one per (padded batch size, tokens
    per sequence, key bucket). Input buffer (4, B, S): tokens, slot (repeated over S), position, valid."""

    def key_pages(self, max_len: int) -> int:
        """Pages of keys read for sequences of at most ``max_len`` tokens: the next power of two, capped."""
        cache = self.engine.cache
        pages = cache.pages_for(max_len)
        return min(1 << (pages - 1).bit_length(), cache.max_pages_per_seq)

    def run(
        self, slots: list[int], tokens: torch.Tensor, starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of tokens (b, S) (host tensor) for ``slots`` whose new tokens start at ``starts``
        (the cache already extended). Returns views of the output buffers: hidden (b, S, d), logits
        (b, S, V), greedy tokens (b, S)."""
        b, s = tokens.shape
        size = self.padded_batch(b)
        n_keys = self.key_pages(max(starts) + s) * self.engine.cache.page_size
        host = torch.zeros(4, size, s, dtype=torch.long)
        host[0, :b] = tokens
        host[1, :b] = torch.tensor(slots)[:, None]
        host[2, :b] = torch.tensor(starts)[:, None] + torch.arange(s)
        host[3, :b] = 1
        hidden, logits, greedy = self.replay((size, s, n_keys), host, self._forward)
        return hidden[:b], logits[:b], greedy[:b]

    def _forward(self, inputs: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The step itself (:meth:`Engine.decode_forward`), all on the device."""
        tokens, slots, positions, valid = inputs[0], inputs[1, :, 0], inputs[2], inputs[3].bool()
        return self.engine.decode_forward(tokens, slots, positions, valid, key[2], capturable=True)


class PrefillGraphs(_Graphs):
    """Prefills of new prompts, one graph per (padded batch size, padded length): lengths round up to a
    power of two (at least ``min_len``), prompts are right-padded and padded rows are invalid. Input
    buffer (3, B, n): tokens, slot (repeated over n), valid."""

    def __init__(self, engine: Engine, batch_sizes: Seq[int], max_tokens: int, min_len: int = 16):
        super().__init__(engine, batch_sizes)
        self.max_tokens = max_tokens
        self.min_len = min_len

    def padded_len(self, n: int) -> int:
        return max(self.min_len, 1 << (n - 1).bit_length())

    def covers_prompts(self, lengths: Seq[int]) -> bool:
        n = self.padded_len(max(lengths))
        return self.covers(len(lengths)) and self.padded_batch(len(lengths)) * n <= self.max_tokens

    def run(self, slots: Seq[int], prompts: Seq[Seq[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill ``prompts`` into the empty ``slots`` (the cache already extended). Returns views of the
        output buffers: the final hidden states (b, n, d) (padded) and the last tokens' logits (b, V)."""
        b = len(prompts)
        size, n = self.padded_batch(b), self.padded_len(max(len(p) for p in prompts))
        host = torch.zeros(3, size, n, dtype=torch.long)
        for row, (slot, tokens) in enumerate(zip(slots, prompts)):
            host[0, row, :len(tokens)] = torch.as_tensor(list(tokens))
            host[1, row] = slot
            host[2, row, :len(tokens)] = 1
        hidden, logits = self.replay((size, n), host, self._forward)
        return hidden[:b], logits[:b]

    def _forward(self, inputs: torch.Tensor, key: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The prefill itself (:meth:`Engine.prefill_padded`), all on the device."""
        return self.engine.prefill_padded(inputs[0], inputs[1, :, 0], inputs[2].bool())
