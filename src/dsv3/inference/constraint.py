"""Constrained decoding: a request may carry a :class:`TokenConstraint` that says which tokens may come next.

The engine asks each constrained row for a bitmask of the allowed next tokens before a step, applies the masks
to the logits on the device for the whole batch (disallowed tokens get -inf before penalties, temperature,
top-k / top-p and greedy), and tells the constraint which token was chosen after the step's one host read. The
bitmask layout is xgrammar's: ``int32`` words, ``ceil(vocab_size / 32)`` per row, bit ``j`` of word ``i`` set
when token ``32 * i + j`` is allowed (:func:`bitmask_words`). Grammar-backed constraints (JSON, JSON schema,
tool calls) live in :mod:`dsv3.inference.grammar`; this module is only the contract and the reference mask.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    """Which token may come next, for one request. Host-side; called once per step of that request."""

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``row`` (``int32``, ``(bitmask_words(vocab_size),)``, on the host;
        every bit of it is overwritten)."""
        ...

    def accept(self, token: int) -> None:
        """The token chosen for this request (always one the last bitmask allowed)."""
        ...

    def is_finished(self) -> bool:
        """True once the constrained text is complete: the request then finishes with ``"stop"``."""
        ...


def bitmask_words(vocab_size: int) -> int:
    """Words of a bitmask row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


def allowed_from_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Boolean (..., vocab_size) mask of the allowed tokens of an int32 bitmask (..., words): the plain reference
    of the layout (works on any device)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1
    return allowed.reshape(*bitmask.shape[:-1], -1)[..., :vocab_size].bool()


def bitmask_from_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """The int32 bitmask (..., words) of a boolean (..., vocab_size) mask (inverse of :func:`allowed_from_bitmask`)."""
    vocab = allowed.shape[-1]
    padded = torch.zeros(*allowed.shape[:-1], bitmask_words(vocab) * 32, dtype=torch.int64, device=allowed.device)
    padded[..., :vocab] = allowed.long()
    words = (padded.reshape(*allowed.shape[:-1], -1, 32) << torch.arange(32, device=allowed.device)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` (b, V) with the tokens a bitmask (b, words) disallows set to -inf (out of place)."""
    allowed = allowed_from_bitmask(bitmask, logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf"))
