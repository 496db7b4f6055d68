"""Training batches as inputs and labels, the form every recipe shares.

A packed window of S + 1 + D tokens (D = MTP depth) becomes

* ``tokens`` (B, S + D): the main model reads ``tokens[:, :S]``; MTP module k also embeds ``tokens[:, k:k+S]``;
* ``labels`` (B, S + D): ``labels[:, i]`` is the token to predict after ``tokens[:, i]``, or
  :data:`IGNORE_INDEX` where nothing is to be learnt (none in pre-training; prompts in SFT, padding). The main
  head's targets are ``labels[:, :S]``, MTP depth k's ``labels[:, k:k+S]`` (report eq. 24: t_{i+k+1}).

Packed SFT samples are *isolated* (report §5.1: "mutually invisible"): ``doc_ids`` then covers all S + D
tokens, attention stays within a sample, ``labels`` already ignores the first token of the next sample, and
:meth:`TrainBatch.targets` also ignores an MTP depth's target that lies in another sample than its position.

Nothing else slices windows: the trainer, the losses and later recipes read these two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label of a position that contributes no loss (the default ``ignore_index`` of ``F.cross_entropy``)."""


@dataclass
class TrainBatch:
    tokens: torch.Tensor
    """(B, S + D) input tokens."""
    labels: torch.Tensor
    """(B, S + D) next-token labels, IGNORE_INDEX where no loss is taken."""
    seq_len: int
    """S, the positions the main model sees."""
    doc_ids: torch.Tensor | None = None
    """(B, S) packed-document index of each input position, for the optional document mask; (B, S + D) when
    ``isolated``."""
    isolated: bool = False
    """Packed samples that must not see or predict one another (SFT): MTP targets across samples are ignored."""

    def __post_init__(self):
        if self.isolated and (self.doc_ids is None or self.doc_ids.shape != self.tokens.shape):
            raise ValueError("an isolated batch needs doc_ids for all S + D tokens, shaped like tokens")

    @classmethod
    def from_window(cls, window: torch.Tensor, seq_len: int, doc_ids: torch.Tensor | None = None) -> "TrainBatch":
        """From packed windows (B, S + 1 + D): every position is labelled with the token that follows it."""
        if window.dim() != 2 or window.shape[1] <= seq_len:
            raise ValueError(f"window must be (batch, > seq_len {seq_len}), got {tuple(window.shape)}")
        return cls(window[:, :-1], window[:, 1:], seq_len, None if doc_ids is None else doc_ids[:, :seq_len])

    @property
    def depth(self) -> int:
        """D, the MTP depths the batch carries labels for."""
        return self.tokens.shape[1] - self.seq_len

    @property
    def inputs(self) -> torch.Tensor:
        """(B, S) the main model's input tokens."""
        return self.tokens[:, : self.seq_len]

    @property
    def future_tokens(self) -> torch.Tensor:
        """(B, D) the tokens after the window, which MTP module k embeds at the last k positions."""
        return self.tokens[:, self.seq_len :]

    @property
    def input_doc_ids(self) -> torch.Tensor | None:
        """(B, S) the document index of each of the main model's input positions (None: no document mask)."""
        return None if self.doc_ids is None else self.doc_ids[:, : self.seq_len]

    def targets(self, depth: int = 0) -> torch.Tensor:
        """(B, S) labels of the main head (depth 0) or of MTP depth k. In an isolated batch, position i's depth-k
        target t_{i+k+1} counts only if it is in i's sample: ``labels`` ignores crossings between neighbours,
        and token i+k must be in i's sample too."""
        labels = self.labels[:, depth : depth + self.seq_len]
        if depth and self.isolated:
            same = self.doc_ids[:, depth : depth + self.seq_len] == self.doc_ids[:, : self.seq_len]
            labels = labels.masked_fill(~same, IGNORE_INDEX)
        return labels

    def label_counts(self, depth: int) -> torch.Tensor:
        """(depth + 1,) int64: labelled positions of the main head and of each MTP depth."""
        return torch.stack([(self.targets(k) != IGNORE_INDEX).sum() for k in range(depth + 1)])

    def to(self, device: torch.device, non_blocking: bool = False) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TrainBatch(move(self.tokens), move(self.labels), self.seq_len, move(self.doc_ids), self.isolated)
