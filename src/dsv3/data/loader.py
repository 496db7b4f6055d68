"""Packing documents into fixed-length training windows, deterministically and resumably.

Documents are packed back to back, each ending with EOS, into one stream
(per epoch: FIM rearranges some documents on the fly, see ``fim.py``). The
stream is cut into fixed windows: window ``k`` is the tokens
``[k * seq_len, k * seq_len + seq_len + n_future)``, so consecutive windows
overlap by ``n_future`` tokens and every token is an input exactly once.
``n_future = 1`` gives plain next-token targets; multi-token prediction with
depth ``D`` needs ``n_future = 1 + D`` (the trainer shifts the targets further).

As in the paper, attention is not masked across documents by default. Set
``return_doc_ids`` to also get, per token, the index of the document it
belongs to (its EOS included); the model can then allow attention only
where ``doc_ids[i] == doc_ids[j]``.

The loader's whole state is ``(epoch, position)``: window order and FIM
choices are pure functions of ``(seed, epoch)``, so ``state_dict()`` saved
in a checkpoint and ``load_state_dict()`` in a new process give exactly the
batches the old run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import DataError
from .fim import FimPlan, fim_rearrange, plan_fim
from .tokens import TokenFile


@dataclass
class Batch:
    """A batch of packed windows; ``tokens`` is ``(batch, seq_len + n_future)`` int64."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor | None  # same shape as tokens, or None when not requested
    seq_len: int

    @property
    def inputs(self) -> torch.Tensor:
        """``(batch, seq_len)`` model inputs."""
        return self.tokens[:, : self.seq_len]

    @property
    def targets(self) -> torch.Tensor:
        """``(batch, seq_len)`` next-token targets (MTP depth d uses ``tokens[:, 1+d : 1+d+seq_len]``)."""
        return self.tokens[:, 1 : self.seq_len + 1]


class PackedStream:
    """One epoch's token stream: the token file with FIM applied to the planned documents."""

    def __init__(self, data: TokenFile, plan: FimPlan | None = None):
        self.data = data
        self.plan = plan
        raw_lengths = np.diff(data.doc_offsets)
        lengths = raw_lengths if plan is None else plan.lengths(raw_lengths)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, d: int) -> np.ndarray:
        """Tokens of document ``d`` as they appear in this stream (EOS last)."""
        raw = self.data.tokens[self.data.doc_offsets[d] : self.data.doc_offsets[d + 1]]
        if self.plan is None or not self.plan.chosen[d]:
            return raw
        body = fim_rearrange(raw[:-1], int(self.plan.start[d]), int(self.plan.stop[d]), self.data.fim_tokens)
        return np.concatenate([body, raw[-1:]])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[start, stop)`` of the stream and their document ids, both int64."""
        positions = np.arange(start, stop)
        doc_ids = np.searchsorted(self.offsets, positions, side="right") - 1
        if self.plan is None:  # no rearrangement: the stream is the file itself
            return self.data.tokens[start:stop].astype(np.int64), doc_ids
        pieces = []
        for d in range(int(doc_ids[0]), int(doc_ids[-1]) + 1):
            lo, hi = max(start, self.offsets[d]), min(stop, self.offsets[d + 1])
            pieces.append(self.document(d)[lo - self.offsets[d] : hi - self.offsets[d]])
        return np.concatenate(pieces).astype(np.int64), doc_ids


@dataclass(frozen=True)
class _Epoch:
    stream: PackedStream
    order: np.ndarray  # window indices in the order this epoch visits them


class PackedLoader:
    """Endless iterator of ``Batch`` over packed windows of a token file.

    ``shuffle`` visits the windows of each epoch in a permutation seeded by
    ``(seed, epoch)``, otherwise in stream order. With ``world_size > 1``
    each step consumes ``batch_size * world_size`` windows and rank ``r``
    gets the ``r``-th block of ``batch_size``; all ranks share the same
    state. Batches run on across epoch ends without a short batch.
    """

    def __init__(
        self,
        data: TokenFile,
        seq_len: int,
        batch_size: int,
        *,
        n_future: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        fim_rate: float = 0.0,
        return_doc_ids: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 1 or batch_size < 1 or n_future < 1:
            raise ValueError("seq_len, batch_size and n_future must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if fim_rate > 0 and data.fim_tokens is None:
            raise ValueError("fim_rate > 0 but the tokenizer has no FIM sentinel tokens")
        self.data = data
        self.seq_len, self.batch_size, self.n_future = seq_len, batch_size, n_future
        self.shuffle, self.seed, self.fim_rate = shuffle, seed, fim_rate
        self.return_doc_ids = return_doc_ids
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._epochs: dict[int, _Epoch] = {}
        if self.windows_in_epoch(0) == 0:
            raise DataError(
                f"split has {data.n_tokens} tokens, too few for one window of {seq_len + n_future}: "
                f"use a shorter sequence length or more data"
            )

    # --- epochs and windows -------------------------------------------------

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            plan = None
            if self.fim_rate > 0:
                body_lengths = np.diff(self.data.doc_offsets) - 1  # EOS stays in place
                plan = plan_fim(body_lengths, self.fim_rate, self.seed, epoch)
            stream = PackedStream(self.data, plan)
            n_windows = max(0, (stream.n_tokens - self.n_future) // self.seq_len)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, 1]).permutation(n_windows)
            else:
                order = np.arange(n_windows)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}  # keep two
            self._epochs[epoch] = _Epoch(stream, order)
        return self._epochs[epoch]

    def windows_in_epoch(self, epoch: int) -> int:
        """Number of windows in ``epoch`` (varies slightly with FIM)."""
        return len(self._epoch(epoch).order)

    def _window(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        start = k * self.seq_len
        return self._epoch(epoch).stream.read(start, start + self.seq_len + self.n_future)

    # --- iteration ----------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        picked = []  # (epoch, window) for every rank's share of this step
        for _ in range(self.batch_size * self.world_size):
            if self.position >= self.windows_in_epoch(self.epoch):
                self.epoch, self.position = self.epoch + 1, 0
            picked.append((self.epoch, int(self._epoch(self.epoch).order[self.position])))
            self.position += 1
        mine = picked[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _collate([self._window(e, k) for e, k in mine], self.seq_len, self.return_doc_ids)

    # --- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the loader is, plus the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_future": self.n_future,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "fim_rate": self.fim_rate,
            "n_tokens": self.data.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state saved with different settings or data."""
        # the position counts windows of the global stream, so the micro-batch and the world size may change
        self.epoch, self.position = resume_position(self.state_dict(), state, "loader")


def iter_eval_batches(
    data: TokenFile,
    seq_len: int,
    batch_size: int,
    *,
    n_future: int = 1,
    max_batches: int | None = None,
    return_doc_ids: bool = False,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | None = None,
) -> Iterator[Batch]:
    """Fixed validation batches: windows in stream order, no FIM, one pass.

    Rank ``r`` gets windows ``r, r + world_size, ...`` of the first
    ``max_windows`` (default: all); the last batch may be smaller. Every call
    yields the same batches.
    """
    stream = PackedStream(data)
    n_windows = max(0, (stream.n_tokens - n_future) // seq_len)
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = range(rank, n_windows, world_size)
    for n, first in enumerate(range(0, len(windows), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        batch = windows[first : first + batch_size]
        reads = [stream.read(k * seq_len, k * seq_len + seq_len + n_future) for k in batch]
        yield _collate(reads, seq_len, return_doc_ids)


def _collate(reads: list[tuple[np.ndarray, np.ndarray]], seq_len: int, with_doc_ids: bool) -> Batch:
    tokens = torch.from_numpy(np.stack([t for t, _ in reads]))
    doc_ids = torch.from_numpy(np.stack([d for _, d in reads])) if with_doc_ids else None
    return Batch(tokens=tokens, doc_ids=doc_ids, seq_len=seq_len)


def resume_position(mine: dict, saved: dict, what: str) -> tuple[int, int]:
    """(epoch, position) of a saved loader state, after checking that every setting but the position, the
    micro-batch and the world size matches this loader's (``mine``); else ``ValueError`` naming them."""
    free = ("epoch", "position", "batch_size", "world_size")
    mismatched = [k for k in mine if k not in free and saved.get(k) != mine[k]]
    if mismatched:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} != now {mine[k]!r}" for k in mismatched)
        raise ValueError(f"{what} state does not match this loader ({details})")
    return int(saved["epoch"]), int(saved["position"])
