"""Fill-in-the-Middle (FIM) in prefix-suffix-middle (PSM) order, on token ids.

A document's tokens are cut at two points into prefix, middle and suffix and
rearranged as::

    <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>

so the model learns to write the middle from both sides while ordinary
next-token prediction is unchanged (DeepSeek-V3 applies this to 10% of
documents). Choices made here:

* Cuts are on *token* boundaries: the two cut points are drawn uniformly
  from ``0..n`` (``n`` tokens, EOS excluded) and sorted. Cutting tokens
  rather than characters needs no re-tokenisation, so FIM is cheap enough to
  apply on the fly and is exactly invertible. (A cut may split a multi-byte
  UTF-8 character between two byte tokens; the byte-level model copes.)
* FIM is applied on the fly by the loader, not baked into the token file:
  whether document ``d`` is rearranged, and where, is drawn from a generator
  seeded with ``(seed, epoch)`` at row ``d``, so it depends only on those
  three numbers. The cached token file stays reusable for any rate, and
  every epoch sees different rearrangements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

DEFAULT_FIM_RATE = 0.1  # the paper's share of documents


class FimTokens(NamedTuple):
    """Ids of the three FIM sentinels."""

    begin: int  # before the prefix
    hole: int  # before the suffix
    end: int  # before the middle


def fim_rearrange(body: np.ndarray, start: int, stop: int, fim: FimTokens) -> np.ndarray:
    """PSM form of ``body`` whose middle is ``body[start:stop]`` (EOS not included)."""
    sentinel = lambda token: np.asarray([token], dtype=body.dtype)  # noqa: E731
    return np.concatenate([
        sentinel(fim.begin), body[:start],
        sentinel(fim.hole), body[stop:],
        sentinel(fim.end), body[start:stop],
    ])


def apply_fim(body: Sequence[int] | np.ndarray, rng: np.random.Generator, fim: FimTokens) -> np.ndarray:
    """Rearrange one document (without EOS) at two uniformly random token cuts."""
    body = np.asarray(body)
    start, stop = sorted(rng.integers(0, len(body) + 1, size=2))
    return fim_rearrange(body, int(start), int(stop), fim)


def invert_fim(tokens: Sequence[int] | np.ndarray, fim: FimTokens, eos_id: int | None = None) -> np.ndarray:
    """The original document of a PSM-rearranged one; other documents are returned as is.

    With ``eos_id``, a trailing EOS (as in the packed stream) stays at the end.
    """
    tokens = np.asarray(tokens)
    if eos_id is not None and len(tokens) and tokens[-1] == eos_id:
        return np.concatenate([invert_fim(tokens[:-1], fim), tokens[-1:]])
    if len(tokens) == 0 or tokens[0] != fim.begin:
        return tokens
    hole = int(np.flatnonzero(tokens == fim.hole)[0])
    end = int(np.flatnonzero(tokens == fim.end)[0])
    prefix, suffix, middle = tokens[1:hole], tokens[hole + 1 : end], tokens[end + 1 :]
    return np.concatenate([prefix, middle, suffix])


@dataclass(frozen=True)
class FimPlan:
    """Which documents of an epoch are rearranged, and their middles ``[start, stop)``."""

    chosen: np.ndarray  # (n_docs,) bool
    start: np.ndarray  # (n_docs,) int64, meaningful where chosen
    stop: np.ndarray  # (n_docs,) int64

    def lengths(self, doc_lengths: np.ndarray) -> np.ndarray:
        """Lengths after rearrangement: three sentinels more for chosen documents."""
        return doc_lengths + 3 * self.chosen


def plan_fim(body_lengths: np.ndarray, rate: float, seed: int, epoch: int) -> FimPlan:
    """Draw the FIM decisions of one epoch for documents with ``body_lengths`` tokens (EOS excluded).

    Row ``d`` of a generator seeded with ``(seed, epoch)`` decides document
    ``d``, so a document's fate depends only on (seed, epoch, d).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"FIM rate must be in [0, 1], got {rate}")
    body_lengths = np.asarray(body_lengths, dtype=np.int64)
    draws = np.random.default_rng([seed, epoch, 0]).random((len(body_lengths), 3))
    chosen = (draws[:, 0] < rate) & (body_lengths > 0)
    cuts = np.minimum(np.floor(draws[:, 1:] * (body_lengths[:, None] + 1)), body_lengths[:, None])
    cuts = np.sort(cuts.astype(np.int64), axis=1)
    return FimPlan(chosen=chosen, start=cuts[:, 0], stop=cuts[:, 1])
