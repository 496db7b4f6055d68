"""Continuous batching: which requests run in each step. The scheduler owns the requests (as
:class:`Sequence` objects) and the cache's slot and page accounting; it runs nothing on the model.

:meth:`Scheduler.schedule` decides one step, in order:

1. retire cancelled requests (waiting or running) and free their pages;
2. keep room for the running sequences' next positions (one per step, two with speculative decoding): when
   the cache has too few free pages, preempt the latest admitted sequence: its slot and pages are freed
   and it goes back to the front of the queue, to be recomputed (its prompt and completion prefilled again)
   when pages are free; its tokens so far are kept;
3. admit waiting requests, first come first served, while the batch has a free slot and the cache has pages
   for the prompt; with prefix caching a prompt starting with cached pages attaches them and only the rest
   is computed. Pages are taken as sequences grow, not reserved for the longest completion at admission.

The engine then prefills the admitted sequences in one forward, decodes the running ones in one step and
hands back the finished ones (:meth:`Scheduler.retire`). :meth:`submit` and :meth:`cancel` only touch a
queue and a set and may be called from other threads; everything else runs on the thread that steps.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .cache import CacheFullError, PagedLatentCache
from .sampling import GenerationRequest, GenerationResult, SamplingParams, TokenEvent


@dataclass(eq=False)
class Sequence:
    """A request being generated: its tokens, its cache slot while it holds one, its sampling state.

    Invariant between steps, while running: the cache holds positions 0 .. n-2 of the n tokens prompt +
    completion; the last token (:attr:`last_token`) is the input of the next step.
    """

    request: GenerationRequest
    prompt: list[int]
    result: GenerationResult
    seed: int
    """The request's seed, or one drawn at submission: the noise of the token at position i is a function of
    (seed, i) (:mod:`dsv3.inference.sampler`), so a seeded request's output does not depend on its batch."""
    stop_ids: frozenset[int]
    max_new_tokens: int
    """``params.max_new_tokens``, lowered so that prompt + completion fits ``max_seq_len``."""
    detokenizer: Any = None
    """The request's :class:`~dsv3.inference.detokenize.IncrementalDetokenizer` (with a tokenizer)."""
    slot: int = -1
    """Its cache slot while running; -1 while waiting or preempted."""
    draft: int | None = None
    """Speculative decoding: the MTP module's proposal for the token after :attr:`last_token`."""
    draft_probs: Any = field(default=None, repr=False)
    """Its draft distribution q (V,) on the device; ``None`` for greedy (one-hot)."""
    mtp_len: int = 0
    """Positions of this sequence already in the MTP block's cache."""
    preemptions: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.result.tokens

    @property
    def last_token(self) -> int:
        return self.result.tokens[-1]

    @property
    def finished(self) -> bool:
        return self.result.finish_reason is not None

    @property
    def prefill_tokens(self) -> list[int]:
        """What an admission prefills: the prompt, or for a recomputed sequence everything but its last token
        (which the next decode step consumes)."""
        return self.prompt + self.result.tokens[:-1]


@dataclass
class Plan:
    """One step: the sequences to prefill (then each samples its first token unless it is recomputed) and
    those to decode, plus the events of cancelled requests."""

    admitted: list[Sequence]
    decode: list[Sequence]
    events: list[TokenEvent]
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Requests waiting and running over the slots and pages of ``cache``; a decode step appends
    ``lookahead`` positions to each running sequence (2 with speculative decoding: the verified draft)."""

    def __init__(self, cache: PagedLatentCache, max_batch: int, lookahead: int = 1):
        self.cache, self.max_batch, self.lookahead = cache, max_batch, lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.preemptions = 0
        """Sequences preempted so far (each recomputed later)."""

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, seq: Sequence) -> GenerationResult:
        """Queue a sequence; returns its result, filled in place as tokens come. Raises
        :class:`CacheFullError` for a request that could never fit the cache."""
        # a verify step writes one position past the last token, never past prompt + max_new_tokens
        need = self.cache.pages_for(len(seq.prompt) + seq.max_new_tokens)
        if need > self.cache.num_pages:
            raise CacheFullError(
                f"request {seq.request.request_id} needs up to {need} pages, the cache has {self.cache.num_pages}")
        with self._lock:
            self.waiting.append(seq)
        return seq.result

    def cancel(self, request_id: str) -> None:
        """Stop a request; it is retired (and its pages freed) at the next :meth:`schedule`."""
        with self._lock:
            self._cancelled.add(request_id)

    def schedule(self) -> Plan:
        """Retire the cancelled, make room for the running (preempting if needed), admit the waiting."""
        events = self._retire_cancelled()
        decode = list(self.running)
        preempted = []
        while decode and self._growth(decode) > self.cache.num_free_pages:
            victim = decode.pop()  # the latest admitted
            self._preempt(victim)
            preempted.append(victim)
        free = self.cache.num_free_pages - self._growth(decode)
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and self.cache.num_free_slots > 0:
            seq = self.waiting[0]
            tokens = seq.prefill_tokens
            prefix = self.cache.match_prefix(tokens)
            # new pages, and the cached ones that were idle (attaching takes them off the free count)
            need = self.cache.pages_for(len(tokens) + self.lookahead) - len(prefix) + self.cache.idle_pages(prefix)
            if need > free:
                break  # first come first served: wait for pages rather than let later requests pass
            with self._lock:
                self.waiting.popleft()
            seq.slot = self.cache.new_sequence(prefix)
            seq.mtp_len = len(prefix) * self.cache.page_size  # the MTP block's latents are cached with them
            if not seq.result.tokens:
                seq.result.cached_tokens = seq.mtp_len
            free -= need
            self.running.append(seq)
            admitted.append(seq)
        return Plan(admitted, decode, events, preempted)

    def retire(self, seq: Sequence) -> None:
        """Take a finished sequence out of the batch and free its slot and pages."""
        self.running.remove(seq)
        self._free(seq)

    # ------------------------------------------------------------------------------------------------
    def _growth(self, seqs: list[Sequence]) -> int:
        """New pages the next decode step of ``seqs`` takes."""
        cache = self.cache
        return sum(max(0, cache.pages_for(cache.lengths[s.slot] + self.lookahead) - len(cache.pages[s.slot]))
                   for s in seqs)

    def _free(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.cache.free(seq.slot)
        seq.slot, seq.mtp_len, seq.draft, seq.draft_probs = -1, 0, None, None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.preemptions += 1
        self.preemptions += 1
        with self._lock:
            self.waiting.appendleft(seq)

    def _retire_cancelled(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return []
            dropped = [s for s in self.waiting if s.request.request_id in cancelled]
            self.waiting = deque(s for s in self.waiting if s.request.request_id not in cancelled)
        events = []
        for seq in dropped + [s for s in self.running if s.request.request_id in cancelled]:
            seq.result.finish_reason = "cancelled"
            events.append(TokenEvent(seq.result.request_id, None, "", "cancelled"))
            if seq in self.running:
                self.retire(seq)
        return events
