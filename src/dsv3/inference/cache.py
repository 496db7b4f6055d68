"""A preallocated, paged cache of MLA latents (report §2.1.1).

MLA needs only the normalised compressed KV c^KV (``kv_lora_rank`` = 512 for V3) and the shared RoPE key
k^R (``qk_rope_head_dim`` = 64) of every past token: 576 values per token and layer, instead of
128 heads x (192 + 128) for the expanded keys and values. The cache stores exactly these, concatenated as
[c^KV; k^R], in one tensor allocated once:

    latent  (n_layers, num_pages + 1, page_size, kv_lora_rank + qk_rope_head_dim)

Memory is handed out in *pages* of ``page_size`` tokens. Each sequence lives in a *slot* (a row of the
block table); its row lists the pages holding its positions 0, page_size, 2 * page_size, ... in order, so
sequences of any length share the pool with at most one partly filled page each. Page ``num_pages`` (the
last one) is a scratch page that is never handed out: unused entries of the block table point at it, so a
padded batch (fixed shapes for a CUDA graph) can read and write through every row without touching a
live sequence.

Bookkeeping (free pages, page lists, lengths) is plain Python on the host; the block table is mirrored
on the device for the gathers and scatters of the attention.

**Prefix caching** (``prefix_caching=True``): a full page of a prompt is registered under a key made of its
tokens, the first token of the next page and the key of the page before it, so a key names one exact
prefix. A later sequence whose tokens start with the same prefix attaches those pages instead of computing
them again (:meth:`match_prefix`, :meth:`new_sequence`): pages are reference-counted, never written again
once full, and when their last user is gone they stay cached, evicted least recently used first when a
page is needed. The next page's first token is part of the key because the MTP module's latent at a page's
last position depends on it (speculative decoding caches the MTP block's latents beside the main layers').
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class CacheFullError(RuntimeError):
    """No free page (or no free slot) is left for a sequence that needs one."""


class PagedLatentCache:
    """Latent KV cache shared by up to ``max_seqs`` sequences of at most ``max_seq_len`` tokens each.

    ``n_layers`` counts every layer with attention that caches: the main layers, then the MTP blocks
    (layer index ``num_hidden_layers + k``).
    """

    def __init__(
        self,
        n_layers: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        max_seqs: int,
        max_seq_len: int,
        page_size: int = 16,
        num_pages: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        prefix_caching: bool = False,
    ):
        if page_size < 1 or max_seqs < 1 or max_seq_len < 1:
            raise ValueError("page_size, max_seqs and max_seq_len must be >= 1")
        self.n_layers = n_layers
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.page_size = page_size
        self.max_seqs = max_seqs
        self.max_seq_len = max_seq_len
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.num_pages = num_pages if num_pages is not None else max_seqs * self.max_pages_per_seq
        if self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        self.null_page = self.num_pages  # scratch page for padding, never allocated
        self.device = torch.device(device)
        self.latent = torch.zeros(
            n_layers, self.num_pages + 1, page_size, kv_lora_rank + rope_dim, device=self.device, dtype=dtype
        )
        self.block_table = torch.full(
            (max_seqs, self.max_pages_per_seq), self.null_page, dtype=torch.long, device=self.device
        )
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() gives page 0 first
        self._free_slots: list[int] = list(range(max_seqs - 1, -1, -1))
        self.prefix_caching = prefix_caching
        self._refs = [0] * self.num_pages  # sequences holding each page
        self._key_of: dict[int, tuple] = {}  # registered (full, immutable) page -> its key
        self._page_of: dict[tuple, int] = {}  # key -> page
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered pages nobody holds, least recent first
        self.pages: list[list[int]] = [[] for _ in range(max_seqs)]
        """Pages of each slot, in position order (host copy of the block table's live entries)."""
        self.lengths: list[int] = [0] * max_seqs
        """Tokens of each slot whose latents are (being) written."""

    # ------------------------------------------------------------------------------------------------
    # accounting
    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can take: never used, or cached without a user (evicted when taken)."""
        return len(self._free_pages) + len(self._idle)

    @property
    def num_cached_pages(self) -> int:
        """Registered prefix pages (in use or idle)."""
        return len(self._key_of)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def pages_for(self, n_tokens: int) -> int:
        """Pages needed to hold ``n_tokens`` tokens."""
        return -(-n_tokens // self.page_size)

    def bytes_per_token(self) -> int:
        return self.n_layers * (self.kv_lora_rank + self.rope_dim) * self.latent.element_size()

    # ------------------------------------------------------------------------------------------------
    # sequences
    def new_sequence(self, prefix: Sequence[int] = ()) -> int:
        """A free slot, empty, or holding the cached ``prefix`` pages (from :meth:`match_prefix`) as its first
        positions."""
        if not self._free_slots:
            raise CacheFullError(f"all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        for page in prefix:
            self._refs[page] += 1
            self._idle.pop(page, None)
        self.pages[slot] = list(prefix)
        if prefix:
            self.block_table[slot, :len(prefix)] = self._device_pages(prefix)
        self.lengths[slot] = len(prefix) * self.page_size
        return slot

    def _device_pages(self, pages) -> torch.Tensor:
        # non_blocking: a blocking host-to-device copy synchronises the stream (a second host sync per step)
        return torch.tensor(list(pages), dtype=torch.long).to(self.device, non_blocking=True)

    def free(self, slot: int) -> None:
        """Return the slot and all its pages to the pool at once."""
        self.truncate(slot, 0)
        if slot not in self._free_slots:
            self._free_slots.append(slot)

    def extend(self, slot: int, n_tokens: int) -> int:
        """Grow the sequence in ``slot`` by ``n_tokens`` positions, allocating pages as needed; returns the
        first new position. Raises :class:`CacheFullError` (and changes nothing) when it cannot."""
        start = self.lengths[slot]
        new_len = start + n_tokens
        if new_len > self.max_seq_len:
            raise CacheFullError(f"slot {slot}: {new_len} tokens exceed max_seq_len = {self.max_seq_len}")
        need = self.pages_for(new_len) - len(self.pages[slot])
        if need > self.num_free_pages:
            raise CacheFullError(
                f"out of cache pages: slot {slot} needs {need} more page(s) of {self.page_size} tokens, "
                f"{self.num_free_pages} of {self.num_pages} free"
            )
        if need > 0:
            new_pages = [self._take_page() for _ in range(need)]
            first = len(self.pages[slot])
            self.pages[slot].extend(new_pages)
            self.block_table[slot, first:first + need] = self._device_pages(new_pages)
        self.lengths[slot] = new_len
        return start

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (rejected speculative tokens) and free the pages
        beyond them."""
        if length > self.lengths[slot]:
            raise ValueError(f"slot {slot}: cannot truncate {self.lengths[slot]} tokens to {length}")
        keep = self.pages_for(length)
        dropped = self.pages[slot][keep:]
        if dropped:
            del self.pages[slot][keep:]
            for page in reversed(dropped):
                self._release(page)
            self.block_table[slot, keep:] = self.null_page
        self.lengths[slot] = length

    def _take_page(self) -> int:
        if self._free_pages:
            page = self._free_pages.pop()
        else:  # evict the least recently used cached page
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._key_of:
                self._idle[page] = None  # most recently used last
            else:
                self._free_pages.append(page)

    # ------------------------------------------------------------------------------------------------
    # prefix caching
    def _keys(self, tokens: Sequence[int], n_pages: int):
        """The keys of the first ``n_pages`` full pages of ``tokens`` (each needs the next page's first token)."""
        key: tuple = ()
        ps = self.page_size
        for i in range(n_pages):
            key = (hash(key), tuple(tokens[i * ps:(i + 1) * ps + 1]))
            yield key

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages holding the longest prefix of ``tokens`` in whole pages, leaving at least one
        token to compute (its logits start the completion). Empty without prefix caching."""
        if not self.prefix_caching:
            return []
        pages = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.page_size):
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def idle_pages(self, pages: Sequence[int]) -> int:
        """How many of ``pages`` are cached without a user (attaching them takes them from the free count)."""
        return sum(page in self._idle for page in pages)

    def register_prefix(self, slot: int, tokens: Sequence[int]) -> None:
        """Offer the full pages of ``slot`` holding ``tokens`` (its first positions, written) to later
        sequences."""
        if not self.prefix_caching:
            return
        n = min((len(tokens) - 1) // self.page_size, self.lengths[slot] // self.page_size)
        for page, key in zip(self.pages[slot], self._keys(tokens, n)):
            if page not in self._key_of and key not in self._page_of:
                self._key_of[page], self._page_of[key] = key, page

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (the weights changed); pages in use stay with their sequences."""
        self._free_pages.extend(self._idle)
        self._idle.clear()
        self._key_of.clear()
        self._page_of.clear()

    # ------------------------------------------------------------------------------------------------
    # device side: where each new token's latents go
    def flat_index(
        self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Row of ``latent[layer].view(-1, width)`` holding each (slot, position); same shape as positions.
        ``slots`` broadcasts against ``positions`` (e.g. (B, 1) and (B, S)). Where ``valid`` is False the
        row is in the scratch page (padding tokens)."""
        page = self.block_table[slots, (positions // self.page_size).clamp(max=self.max_pages_per_seq - 1)]
        if valid is not None:
            page = torch.where(valid, page, self.null_page)
        return page * self.page_size + positions % self.page_size


def write_latent(latent: torch.Tensor, index: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Store c^KV (..., d_c) and k^R (..., d_r) in one layer's cache ``latent`` (pages + 1, page_size, width)
    at the flat rows ``index`` (...) from :meth:`PagedLatentCache.flat_index`."""
    flat = latent.view(-1, latent.shape[-1])
    flat[index.reshape(-1)] = torch.cat([kv, k_pe], dim=-1).reshape(-1, flat.shape[-1]).to(flat.dtype)


def read_latent(latent: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The rows [c^KV; k^R] of ``pages`` (B, P) of one layer's cache, in position order:
    (B, P * page_size, width). Positions beyond a sequence's length hold garbage (the caller masks them)."""
    return latent[pages].flatten(1, 2)
