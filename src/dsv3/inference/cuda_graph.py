"""CUDA graphs for decoding and prefilling: one step captured per padded shape, replayed at every step.

A decode step of a small batch is a few thousand small kernels (27 layers of norms, projections, rotary
embedding, the latent attention, routing, grouped expert GEMMs); launched one by one from Python, the GPU
spends most of the step waiting for the host. Captured once in a :class:`torch.cuda.CUDAGraph`, the step
is a single launch.

What makes :meth:`ModelRunner.forward_cached <dsv3.inference.runner.ModelRunner.forward_cached>` capturable:

* **fixed shapes**: a batch of b sequences is padded up to the nearest captured size (1, 2, 4, 8, 16, 32
  by default), and the keys read up to a bucket of whole pages (a power of two, at most a sequence's
  maximum). Padded rows are marked invalid: their latents go to the cache's scratch page, their outputs
  are dropped;
* **no host syncs** inside: no ``.item()`` / ``.tolist()``, no data-dependent shapes; the MoE counts its
  tokens per expert with a scatter-add and runs the experts as grouped GEMMs
  (:func:`~dsv3.inference.moe.moe_forward`);
* **static buffers**: the step reads tokens, slots, positions and validity (and each row's sampling
  parameters) from input tensors that are filled (one host-to-device copy each) before each replay, and
  writes the hidden states, the logits and the next tokens (argmax or a draw, on the device,
  :mod:`dsv3.inference.sampler`) into tensors owned by the graph. Reading the next tokens back is the
  step's only sync.

The graphs know only the step functions they capture and the cache geometry (no reference to the runner
that owns them). The cache (its latents and block table) and the weights are read in place, so they must not be
reallocated once graphs exist. All graphs share one memory pool: they never run at the same time, and
each replay's outputs are consumed before the next replay (so they are valid until then only).

Prefills of new prompts (:class:`PrefillGraphs`) are captured the same way, per (padded batch, prompt
length rounded up to a power of two): a prompt of a few hundred tokens is as many launches as a decode
step, with little work each. Prompts continuing a cached prefix, and prompts longer than
``max_prefill_tokens``, are prefilled eagerly.

On the CPU (``EngineConfig(cuda_graph=True)`` there, for tests) nothing is captured: the same padded, fixed-shape
step runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

import torch

from .cache import PagedLatentCache
from .penalties import ProcessingTensors
from .sampler import SamplingTensors


@dataclass
class CapturedStep:
    """One captured step: its input buffers (filled before each replay), its graph (``None`` on the CPU,
    where the step runs eagerly) and its output buffers."""

    inputs: tuple[torch.Tensor, ...]
    graph: torch.cuda.CUDAGraph | None = None
    outputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)


class StepGraphs:
    """Steps captured lazily per key, all in one memory pool; ``forward(*inputs)`` is the step, a function of
    its input buffers alone (host or device tensors are copied into them before each replay)."""

    def __init__(self, batch_sizes: Seq[int], max_batch: int, device: torch.device):
        self.batch_sizes = sorted({b for b in batch_sizes if 0 < b < max_batch} | {max_batch})
        self.device = device
        self.capture = device.type == "cuda"
        self.steps: dict[tuple, CapturedStep] = {}
        self._pool = None

    def covers(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def padded_batch(self, batch: int) -> int:
        return next(b for b in self.batch_sizes if b >= batch)

    def replay(self, key: tuple, host_inputs: tuple[torch.Tensor, ...], forward: Callable) -> tuple[torch.Tensor, ...]:
        """Run the step of ``key`` on ``host_inputs`` (capturing it first if new); returns its outputs, valid
        until the next replay of any step."""
        step = self.steps.get(key)
        if step is None:
            buffers = tuple(torch.zeros_like(t, device=self.device) for t in host_inputs)
            step = self.steps[key] = self._capture(buffers, forward)
        for buf, host in zip(step.inputs, host_inputs):
            buf.copy_(host, non_blocking=True)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.outputs = forward(*step.inputs)
        return step.outputs

    def _capture(self, inputs: tuple[torch.Tensor, ...], fn: Callable) -> CapturedStep:
        # Inputs all zero while warming up and capturing: every row invalid, so the only cache writes go to
        # the scratch page.
        step = CapturedStep(inputs)
        if not self.capture:
            return step
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # One eager run first, on a side stream (as torch.cuda.graph asks): lazy initialisation (cuBLAS
        # workspaces, kernel loading, torch.compile and Triton autotuning) must not happen during capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self._pool):
            step.outputs = fn(*inputs)
        return step


DecodeStep = Callable[[tuple[torch.Tensor, ...], int, str], tuple[torch.Tensor, ...]]

FULL = "full"
"""The decode mode of a batch in which some row uses penalties, biases, ``min_tokens``, ``min_p``, a constraint
or log-probabilities (:func:`~dsv3.inference.sampler.sample_processed`); the others are ``greedy``, ``sample``
and ``filtered`` (top-k / top-p)."""


class DecodeGraphs(StepGraphs):
    """Decode steps, one per (padded batch size, tokens per sequence, key bucket, sampling mode). ``step(inputs,
    n_keys, mode)`` is :meth:`ModelRunner._graph_decode <dsv3.inference.runner.ModelRunner._graph_decode>`; inputs:
    ints (4, B, S) tokens, slot (repeated over S), position, valid, plus top-k and seed rows (6, B, S) when
    sampling, plus block-stop and use-bias rows (8, B, S) in the full mode; floats (2, B) temperature and top-p
    when sampling, (6, B) with presence, frequency, repetition and min-p in the full mode; the full mode's
    constraint bitmask (B, words) int32. Four modes at most per shape: greedy, sample, filtered, full."""

    def __init__(self, step: DecodeStep, batch_sizes: Seq[int], max_batch: int, cache: PagedLatentCache):
        super().__init__(batch_sizes, max_batch, cache.device)
        self.step, self.page_size, self.max_pages = step, cache.page_size, cache.max_pages_per_seq

    def key_pages(self, max_len: int) -> int:
        """Pages of keys read for sequences of at most ``max_len`` tokens: the next power of two, capped."""
        pages = -(-max_len // self.page_size)
        return min(1 << (pages - 1).bit_length(), self.max_pages)

    def run(
        self, slots: list[int], tokens: torch.Tensor, starts: list[int], sampling: SamplingTensors | None = None,
        filtered: bool = True, processing: ProcessingTensors | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of tokens (b, S) (host tensor) for ``slots`` whose new tokens start at ``starts``
        (the cache already extended), the next tokens drawn by ``sampling`` ((b,) rows) or greedy, through the
        full path when ``processing`` is given (host tensors, b rows; ``sampling`` then required). Returns views
        of the output buffers: hidden (b, S, d), logits (b, S, V), next tokens (b,) (the full mode: their
        log-probability packs (b, 3 + 2K), token in column 0)."""
        b, s = tokens.shape
        size = self.padded_batch(b)
        n_keys = self.key_pages(max(starts) + s) * self.page_size
        mode = "greedy" if sampling is None else FULL if processing is not None else \
            "filtered" if filtered else "sample"
        ints = torch.zeros({"greedy": 4, FULL: 8}.get(mode, 6), size, s, dtype=torch.long)
        ints[0, :b] = tokens
        ints[1, :b] = torch.tensor(slots)[:, None]
        ints[2, :b] = torch.tensor(starts)[:, None] + torch.arange(s)
        ints[3, :b] = 1
        inputs: tuple[torch.Tensor, ...] = (ints,)
        if sampling is not None:  # padding rows: temperature 0 (greedy)
            floats = torch.zeros(2 if processing is None else 6, size, dtype=torch.float32)
            floats[0, :b], floats[1, :b] = sampling.temperature.cpu(), sampling.top_p.cpu()
            ints[4, :b] = sampling.top_k.cpu()[:, None]
            ints[5, :b] = sampling.seed.cpu()[:, None]
            inputs = (ints, floats)
        if processing is not None:  # padding rows: neutral (repetition 1, every token allowed)
            p = processing
            floats[2:, :b] = torch.stack([p.presence, p.frequency, p.repetition, p.min_p]).cpu()
            floats[4, b:] = 1.0
            ints[6, :b], ints[7, :b] = p.block_stop.cpu()[:, None], p.use_bias.cpu()[:, None]
            bitmask = p.bitmask
            if size > b:
                bitmask = torch.full((size, bitmask.shape[1]), -1, dtype=torch.int32, pin_memory=self.capture)
                bitmask[:b] = p.bitmask
            inputs = (ints, floats, bitmask)
        hidden, logits, nxt = self.replay((size, s, n_keys, mode), inputs, lambda *x: self.step(x, n_keys, mode))
        return hidden[:b], logits[:b], nxt[:b]


class PrefillGraphs(StepGraphs):
    """Prefills of new prompts, one graph per (padded batch size, padded length): lengths round up to a power
    of two (at least ``min_len``), prompts are right-padded and padded rows are invalid. ``step(ints)`` with
    ints (3, B, n): tokens, slot (repeated over n), valid."""

    def __init__(self, step: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], batch_sizes: Seq[int],
                 max_batch: int, device: torch.device, max_tokens: int, min_len: int = 16):
        super().__init__(batch_sizes, max_batch, device)
        self.step, self.max_tokens, self.min_len = step, max_tokens, min_len

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
        ints = torch.zeros(3, size, n, dtype=torch.long)
        for row, (slot, tokens) in enumerate(zip(slots, prompts)):
            ints[0, row, :len(tokens)] = torch.as_tensor(list(tokens))
            ints[1, row] = slot
            ints[2, row, :len(tokens)] = 1
        hidden, logits = self.replay((size, n), (ints,), self.step)
        return hidden[:b], logits[:b]
