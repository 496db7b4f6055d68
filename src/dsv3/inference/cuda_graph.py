"""CUDA graphs for decoding: one decode step captured per padded batch size, replayed at every step.

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
  (:func:`~dsv3.inference.layers.moe_forward`);
* **static buffers**: the step reads tokens, slots, positions and validity from one input tensor that is
  filled (one host-to-device copy) before each replay, and writes the hidden states, the logits and the
  greedy tokens (argmax, on the device) into tensors owned by the graph. Reading the greedy tokens back is
  the step's only sync.

The cache (its latents and block table) and the weights are read in place, so they must not be
reallocated once graphs exist. All graphs share one memory pool: they never run at the same time, and
each replay's outputs are consumed before the next replay (so they are valid until then only).

On the CPU (``Engine(cuda_graph=True)`` there, for tests) nothing is captured: the same padded, fixed-shape
step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class CapturedStep:
    """One captured decode step: its input buffer (4, B, S) = tokens, slot (repeated over S), position,
    valid; its graph (``None`` on the CPU); and its output buffers."""

    inputs: torch.Tensor
    n_keys: int
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    greedy: torch.Tensor | None = None


class DecodeGraphs:
    """The decode steps of an :class:`~dsv3.inference.engine.Engine`, captured lazily, one per (padded
    batch size, tokens per sequence, key bucket)."""

    def __init__(self, engine: Engine, batch_sizes: Seq[int] = (1, 2, 4, 8, 16, 32)):
        self.engine = engine
        self.batch_sizes = sorted({b for b in batch_sizes if 0 < b < engine.max_batch} | {engine.max_batch})
        self.capture = engine.device.type == "cuda"
        self.steps: dict[tuple[int, int, int], CapturedStep] = {}
        self._pool = None

    def covers(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def padded_batch(self, batch: int) -> int:
        return next(b for b in self.batch_sizes if b >= batch)

    def key_pages(self, max_len: int) -> int:
        """Pages of keys read for sequences of at most ``max_len`` tokens: the next power of two, capped."""
        cache = self.engine.cache
        pages = cache.pages_for(max_len)
        return min(1 << (pages - 1).bit_length(), cache.max_pages_per_seq)

    # ------------------------------------------------------------------------------------------------
    def run(
        self, slots: list[int], tokens: torch.Tensor, starts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of tokens (b, S) (host tensor) for ``slots`` whose new tokens start at ``starts``
        (the cache already extended). Returns views of the output buffers: hidden (b, S, d), logits
        (b, S, V), greedy tokens (b, S)."""
        b, s = tokens.shape
        size = self.padded_batch(b)
        n_keys = self.key_pages(max(starts) + s) * self.engine.cache.page_size
        step = self.steps.get((size, s, n_keys))
        if step is None:
            step = self.steps[(size, s, n_keys)] = self._capture(size, s, n_keys)
        host = torch.zeros(4, size, s, dtype=torch.long)
        host[0, :b] = tokens
        host[1, :b] = torch.tensor(slots)[:, None]
        host[2, :b] = torch.tensor(starts)[:, None] + torch.arange(s)
        host[3, :b] = 1
        step.inputs.copy_(host, non_blocking=True)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.hidden, step.logits, step.greedy = self._forward(step.inputs, n_keys)
        return step.hidden[:b], step.logits[:b], step.greedy[:b]

    def _forward(self, inputs: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step itself: embedding, main blocks, norm, head, argmax, all on the device."""
        engine, model = self.engine, self.engine.model
        tokens, slots, positions, valid = inputs[0], inputs[1, :, 0], inputs[2], inputs[3].bool()
        x = model.embed_tokens(tokens)
        x = engine.forward_cached(x, engine.main_blocks, slots, positions, valid, n_keys, capturable=True)
        h = model.norm(x)
        logits = model.lm_head(h)
        return h, logits, logits.argmax(dim=-1)

    def _capture(self, size: int, s: int, n_keys: int) -> CapturedStep:
        # All rows invalid while warming up and capturing: the only cache writes go to the scratch page.
        inputs = torch.zeros(4, size, s, dtype=torch.long, device=self.engine.device)
        step = CapturedStep(inputs, n_keys)
        if not self.capture:
            return step
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # One eager run first, on a side stream (as torch.cuda.graph asks): lazy initialisation (cuBLAS
        # workspaces, kernel loading) must not happen during capture.
        side = torch.cuda.Stream(self.engine.device)
        side.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(side):
            self._forward(inputs, n_keys)
        torch.cuda.current_stream(self.engine.device).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self._pool):
            step.hidden, step.logits, step.greedy = self._forward(inputs, n_keys)
        return step
