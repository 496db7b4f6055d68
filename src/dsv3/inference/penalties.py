"""What changes the logits before temperature: constraint masks, ``logit_bias``, ``min_tokens`` and the repetition,
frequency and presence penalties, for a whole batch on the device.

The order is vLLM's: the allowed-token mask of a constraint, the biases and the ``min_tokens`` mask of the stop
tokens, then the penalties (repetition, then frequency and presence); temperature, min-p, top-k and top-p follow
in :mod:`dsv3.inference.sampler`, and a greedy row takes the argmax of the processed logits.

The penalties need the tokens each sequence has seen. They are kept on the device, per cache slot, in
:class:`ProcessingState`: the count of every vocabulary token in the completion (updated inside the step that
samples it, so a decode step stays one CUDA graph with no host work per row) and a mask of the prompt's tokens
(filled once the prompt is prefilled). The biases and the stop tokens of ``min_tokens`` are per-slot rows too, so
a step only gathers rows by slot: every tensor has a fixed shape. The per-row parameters of a step are
:class:`ProcessingTensors`; a row without an option gets the neutral value (penalty 0 or 1, no bias, all tokens
allowed), for which the processed logits equal the raw ones exactly: plain rows in a processed batch keep their
tokens. :func:`process_logits_reference` is the plain one-row reference the tests compare with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

import torch

from .constraint import TokenConstraint, allowed_from_bitmask, bitmask_words
from .sampling import SamplingParams


class ProcessingState:
    """Per-slot device tensors the processed sampling path reads, (max_seqs, vocab_size) each: completion token
    counts, prompt-token mask, logit biases and the stop tokens that ``min_tokens`` masks. Allocated once (captured
    CUDA graphs read them in place): 10 bytes per slot and vocabulary entry."""

    def __init__(self, max_seqs: int, vocab_size: int, device: torch.device | str):
        self.vocab_size = vocab_size
        self.counts = torch.zeros(max_seqs, vocab_size, dtype=torch.int32, device=device)
        """Occurrences of each token in the slot's completion so far."""
        self.in_prompt = torch.zeros(max_seqs, vocab_size, dtype=torch.bool, device=device)
        self.bias = torch.zeros(max_seqs, vocab_size, dtype=torch.float32, device=device)
        self.stop = torch.zeros(max_seqs, vocab_size, dtype=torch.bool, device=device)

    def reset(self, slot: int, params: SamplingParams, prompt: Sequence[int], completion: Sequence[int],
              stop_ids: Collection[int]) -> None:
        """Set the rows of ``slot`` for a sequence whose prompt is now in the cache (a new one, or one recomputed
        after a preemption: ``completion`` is what it generated so far). Only the rows its options read are
        written (a row without an option never reads its slot's rows)."""
        dev = self.counts.device

        def ids(tokens) -> torch.Tensor:
            return torch.tensor(list(tokens), dtype=torch.long).to(dev, non_blocking=True)

        if params.penalised:
            out = ids(completion)
            self.counts[slot].zero_().index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
            self.in_prompt[slot].zero_().index_fill_(0, ids(prompt), True)
        if params.logit_bias:
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32).to(dev, non_blocking=True)
            self.bias[slot].zero_().index_copy_(0, ids(params.logit_bias), values)
        if params.min_tokens > 0:
            self.stop[slot].zero_().index_fill_(0, ids(stop_ids), True)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor) -> None:
        """Count the sampled ``tokens`` (B,) of ``slots`` (B,), with ``weight`` (B,) 1 for real rows and 0 for
        padding; on the device, inside the step (a scatter-add: capturable)."""
        flat = slots * self.vocab_size + tokens
        self.counts.view(-1).scatter_add_(0, flat, weight.to(torch.int32))


@dataclass
class ProcessingTensors:
    """Per-row options of the processed path for one step (row b = sequence b)."""

    presence: torch.Tensor
    """(B,) float32, presence penalty (0 = off)."""
    frequency: torch.Tensor
    """(B,) float32, frequency penalty (0 = off)."""
    repetition: torch.Tensor
    """(B,) float32, repetition penalty (1 = off)."""
    min_p: torch.Tensor
    """(B,) float32 (0 = off); applied after temperature by the sampler."""
    block_stop: torch.Tensor
    """(B,) bool: fewer than ``min_tokens`` generated, the slot's stop tokens are masked this step."""
    use_bias: torch.Tensor
    """(B,) bool: the row adds its slot's logit biases."""
    bitmask: torch.Tensor
    """(B, words) int32, allowed next tokens (:mod:`~dsv3.inference.constraint`'s layout; -1 = all)."""

    @classmethod
    def from_rows(
        cls, params: Sequence[SamplingParams], generated: Sequence[int],
        constraints: Sequence[TokenConstraint | None], vocab_size: int, device: torch.device | str | None = None,
        size: int | None = None, pin: bool = False,
    ) -> ProcessingTensors:
        """The tensors of a batch: ``generated[b]`` tokens generated so far by row b, ``constraints[b]`` its
        constraint (asked for its bitmask now) or ``None``. ``size`` pads with neutral rows (a CUDA graph's batch);
        ``pin``: the bitmask in pinned host memory (asynchronous copy to a GPU)."""
        b = len(params)
        size = b if size is None else size
        if len(generated) != b or len(constraints) != b or size < b:
            raise ValueError(f"{b} params, {len(generated)} counts, {len(constraints)} constraints, size {size}")
        pad = size - b

        def floats(values, neutral):
            return torch.tensor(list(values) + [neutral] * pad, dtype=torch.float32)

        bitmask = torch.full((size, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin)
        for row, constraint in enumerate(constraints):
            if constraint is not None:
                constraint.fill_bitmask(bitmask[row])
        host = cls(
            presence=floats([p.presence_penalty for p in params], 0.0),
            frequency=floats([p.frequency_penalty for p in params], 0.0),
            repetition=floats([p.repetition_penalty for p in params], 1.0),
            min_p=floats([p.min_p for p in params], 0.0),
            block_stop=torch.tensor([n < p.min_tokens for p, n in zip(params, generated)] + [False] * pad),
            use_bias=torch.tensor([bool(p.logit_bias) for p in params] + [False] * pad),
            bitmask=bitmask,
        )
        return host.to(device) if device is not None else host

    def to(self, device: torch.device | str) -> ProcessingTensors:
        # non_blocking: a host-to-device copy that does not wait for the stream
        return ProcessingTensors(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


def process_logits(
    logits: torch.Tensor, p: ProcessingTensors, state: ProcessingState, slots: torch.Tensor
) -> torch.Tensor:
    """The processed float32 logits (B, V) of raw ``logits`` (B, V) of the sequences in ``slots`` (B,): masks,
    biases, penalties; no host sync, fixed shapes (capturable)."""
    x = logits.float()
    x = x.masked_fill(~allowed_from_bitmask(p.bitmask, x.shape[-1]), float("-inf"))
    x = torch.where(p.use_bias[:, None], x + state.bias[slots], x)
    x = x.masked_fill(p.block_stop[:, None] & state.stop[slots], float("-inf"))
    counts = state.counts[slots]
    seen = counts > 0
    r = p.repetition[:, None]
    x = torch.where(seen | state.in_prompt[slots], torch.where(x > 0, x / r, x * r), x)
    return x - p.frequency[:, None] * counts - p.presence[:, None] * seen


def process_logits_reference(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], completion: Sequence[int],
    stop_ids: Collection[int] = (), allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`process_logits` of one row, token by token: raw ``logits`` (V,) of a sequence with this ``prompt``
    and ``completion`` so far, its stop tokens and an optional boolean mask (V,) of the allowed tokens."""
    x = logits.float().clone()
    if allowed is not None:
        x[~allowed] = float("-inf")
    for token, bias in params.logit_bias.items():
        x[token] = x[token] + bias
    if len(completion) < params.min_tokens:
        for token in stop_ids:
            x[token] = float("-inf")
    r = params.repetition_penalty
    for token in set(prompt) | set(completion):
        x[token] = x[token] / r if x[token] > 0 else x[token] * r
    for token, count in Counter(completion).items():
        x[token] = x[token] - params.frequency_penalty * count - params.presence_penalty
    return x
