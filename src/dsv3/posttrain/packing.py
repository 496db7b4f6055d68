"""Packing SFT samples into fixed-length rows, isolated from one another (report §5.1: "each single sequence is
packed from multiple samples ... a sample masking strategy to ensure that these examples remain isolated and
mutually invisible"), and the loader that serves the rows resumably.

**Capacity.** A row of the batch is a window of S + 1 tokens for the main head: it reads tokens 0..S-1 and
predicts tokens 1..S. A pack holds at most :func:`pack_capacity` = S + 1 tokens, so every token of every sample
is a main-head input or target exactly as it would be with the sample alone. The D tokens after the window that
MTP needs (``TrainBatch.future_tokens``) are padding: MTP depth k's targets t_{i+k+1} beyond a sample's end are
ignored anyway, so the last sample of a row loses nothing. (Packing S + D + 1 tokens instead would make the
last D tokens of a full row -- typically the last sample's answer end and its EOS -- MTP-only targets, never
learnt by the main head.)

**Labels.** ``labels[i] = tokens[i + 1]`` only where token i + 1 is in the same sample as token i and is
trained; so the first token of the next sample is never a target, nor are prompts and padding. ``doc_ids``
numbers the samples of a row 0, 1, ... and gives the padding its own number, and the batch is ``isolated``:
attention stays within a sample and :meth:`~dsv3.train.batch.TrainBatch.targets` drops MTP targets whose
position lies in another sample.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..data.loader import resume_position
from ..train.batch import IGNORE_INDEX, TrainBatch
from .sft_data import SFTSample


def pack_capacity(seq_len: int) -> int:
    """Tokens a pack may hold for rows of ``seq_len`` input positions: S + 1 (module docstring)."""
    return seq_len + 1


@dataclass
class PackStats:
    samples: int = 0
    """Samples given."""
    packs: int = 0
    split: int = 0
    """Samples longer than the capacity cut into pieces (each piece then packed as a sample)."""
    dropped: int = 0
    """Samples longer than the capacity left out (``overflow="drop"``)."""
    untrained: int = 0
    """Samples or pieces with no target (nothing trained after their first token), left out."""
    tokens: int = 0
    """Tokens packed."""
    capacity: int = 0

    @property
    def fill(self) -> float:
        """Packed tokens / (packs x capacity): the share of the rows that is not padding."""
        return self.tokens / (self.packs * self.capacity) if self.packs else 0.0

    def __str__(self) -> str:
        extra = "".join(f", {n} {what}" for n, what in ((self.split, "split"), (self.dropped, "dropped as too long"),
                                                         (self.untrained, "without targets left out")) if n)
        return f"{self.samples} samples in {self.packs} packs of {self.capacity} tokens ({self.fill:.1%} full){extra}"


def pack_best_fit(samples: Sequence[SFTSample], capacity: int, overflow: Literal["split", "drop"] = "split"
                  ) -> tuple[list[list[SFTSample]], PackStats]:
    """Best-fit decreasing bin packing: samples longest first (ties in input order), each into the open pack with
    the least room that still fits it, else a new pack. Deterministic; O(n log n) plus O(min(n, capacity)) list
    moves per sample. Samples over ``capacity`` are cut into ``capacity``-token pieces (``"split"``; a piece
    keeps its tokens' ``trained`` flags) or left out (``"drop"``); samples or pieces with no target are left
    out. Returns the packs (samples in the order placed) and the statistics."""
    if capacity < 2:
        raise ValueError(f"capacity must be at least 2 tokens, got {capacity}")
    if overflow not in ("split", "drop"):
        raise ValueError(f"overflow must be 'split' or 'drop', got {overflow!r}")
    stats = PackStats(samples=len(samples), capacity=capacity)
    items: list[SFTSample] = []
    for s in samples:
        if len(s) <= capacity:
            pieces = [s]
        elif overflow == "drop":
            stats.dropped += 1
            continue
        else:
            stats.split += 1
            pieces = [SFTSample(s.tokens[a : a + capacity], s.trained[a : a + capacity])
                      for a in range(0, len(s), capacity)]
        for p in pieces:
            if _has_target(p):
                items.append(p)
            else:
                stats.untrained += 1

    lengths = [len(s.tokens) for s in items]
    order = sorted(range(len(items)), key=lengths.__getitem__, reverse=True)  # stable: ties stay in input order
    packs: list[list[SFTSample]] = []
    rooms: list[int] = []  # sorted distinct room left in open packs
    by_room: dict[int, list[int]] = {}  # room -> packs with exactly that room (the latest opened is used first)
    for i in order:
        n = lengths[i]
        j = bisect_left(rooms, n)
        if j < len(rooms):
            room = rooms[j]
            with_room = by_room[room]
            p = with_room.pop()
            if not with_room:
                del by_room[room], rooms[j]
        else:
            room, p = capacity, len(packs)
            packs.append([])
        packs[p].append(items[i])
        room -= n
        if room >= 2:  # a smaller room holds no sample with a target
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(p)
    stats.packs = len(packs)
    stats.tokens = sum(lengths)
    return packs, stats


def _has_target(s: SFTSample) -> bool:
    """Whether a token after the first is trained (without copying the flags)."""
    try:
        s.trained.index(True, 1)
    except ValueError:
        return False
    return True


def collate(packs: Sequence[Sequence[SFTSample]], seq_len: int, depth: int, pad_id: int) -> TrainBatch:
    """One row per pack of at most ``seq_len + 1`` tokens: an isolated :class:`TrainBatch` of (B, S + D) tokens,
    labels and doc ids, padded with ``pad_id`` (module docstring)."""
    width = seq_len + depth  # the window is width + 1 tokens: tokens = window[:-1], labels = window[1:]
    window = np.full((len(packs), width + 1), pad_id, dtype=np.int64)
    labels = np.full((len(packs), width), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.empty((len(packs), width + 1), dtype=np.int64)
    for r, pack in enumerate(packs):
        n_tokens = sum(len(s) for s in pack)
        if n_tokens > pack_capacity(seq_len):
            raise ValueError(f"pack {r} has {n_tokens} tokens, more than seq_len + 1 = {pack_capacity(seq_len)}")
        at = 0
        for d, s in enumerate(pack):
            n = len(s)
            tokens = np.asarray(s.tokens, dtype=np.int64)
            window[r, at : at + n] = tokens
            doc_ids[r, at : at + n] = d
            # position at + j predicts token j + 1 of the same sample, where that one is trained
            labels[r, at : at + n - 1] = np.where(np.asarray(s.trained[1:], dtype=bool), tokens[1:], IGNORE_INDEX)
            at += n
        doc_ids[r, at:] = len(pack)  # the padding: a document of its own
    return TrainBatch(torch.from_numpy(window[:, :width]), torch.from_numpy(labels), seq_len,
                      torch.from_numpy(doc_ids[:, :width]), isolated=True)


class SFTLoader:
    """Endless iterator of :class:`TrainBatch` micro-batches over packs, like
    :class:`~dsv3.data.loader.PackedLoader`: each epoch visits the packs in a permutation seeded by
    ``(seed, epoch)`` (or in order without ``shuffle``); each call takes the next ``batch_size x world_size``
    packs and rank r gets the r-th block of ``batch_size``; batches run on across epoch ends. The whole state is
    ``(epoch, position)``, so :meth:`state_dict` / :meth:`load_state_dict` resume exactly."""

    def __init__(self, packs: Sequence[Sequence[SFTSample]], seq_len: int, batch_size: int, pad_id: int, *,
                 depth: int = 0, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not packs:
            raise ValueError("no packs: the SFT data has no sample with a target")
        if seq_len < 1 or batch_size < 1 or depth < 0:
            raise ValueError("seq_len and batch_size must be positive, depth non-negative")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.packs = list(packs)
        self.n_tokens = sum(len(s) for pack in self.packs for s in pack)
        longest = max(sum(len(s) for s in pack) for pack in self.packs)
        if longest > pack_capacity(seq_len):
            raise ValueError(f"a pack has {longest} tokens, more than seq_len + 1 = {pack_capacity(seq_len)}")
        self.seq_len, self.batch_size, self.pad_id, self.depth = seq_len, batch_size, pad_id, depth
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.packs)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of ``batch_size`` packs (all ranks, all micro-batches) that visit every pack once: the
        last may run into the next epoch."""
        return -(-len(self.packs) // batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.packs)
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # keep two
            self._orders[epoch] = order
        return self._orders[epoch]

    def __iter__(self) -> Iterator[TrainBatch]:
        return self

    def __next__(self) -> TrainBatch:
        picked = []  # every rank's share of this call
        for _ in range(self.batch_size * self.world_size):
            if self.position >= len(self.packs):
                self.epoch, self.position = self.epoch + 1, 0
            picked.append(int(self._order(self.epoch)[self.position]))
            self.position += 1
        mine = picked[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return collate([self.packs[k] for k in mine], self.seq_len, self.depth, self.pad_id)

    def state_dict(self) -> dict:
        """Where the loader is, plus the settings that must match on resume."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "depth": self.depth, "batch_size": self.batch_size, "world_size": self.world_size,
                "shuffle": self.shuffle, "n_packs": len(self.packs), "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state saved with different settings or data. The position counts
        packs of the global order, so the micro-batch size and the world size may change."""
        self.epoch, self.position = resume_position(self.state_dict(), state, "SFT loader")
