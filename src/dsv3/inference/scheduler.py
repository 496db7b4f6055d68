"""Continuous batching: which requests run in each step. The scheduler owns the requests (as
:class:`Sequence` objects) and the cache's slot and page accounting; it runs nothing on the model.

:meth:`Scheduler.schedule` decides one step, in order:

1. retire cancelled requests (waiting or running) and free their pages;
2. keep room for the running sequences' next positions (one per step, two with speculative decoding): when
   the cache has too few free pages, preempt the latest admitted sequence: its slot and pages are freed
   and it goes back to the front of the queue, to be recomputed (its prompt and completion prefilled again)
   when pages are free; its tokens so far are kept;
3. continue the prompts being prefilled, then admit waiting requests, first come first served, while the
   batch has a free slot, the cache has pages and the step's prefill budget (``max_prefill_tokens``) lasts: a
   longer prompt is prefilled in chunks over several steps, between the decode steps of the running
   sequences. With prefix caching a prompt starting with cached pages attaches them and only the rest is
   computed (not for a new request asking for ``prompt_logprobs``: it needs every prompt position's logits).
   Pages are taken as sequences grow, not reserved for the longest completion at admission.

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
    draft: list[int] | None = None
    """Speculative decoding: the MTP module's proposals for the k tokens after :attr:`last_token`."""
    draft_probs: Any = field(default=None, repr=False)
    """Their draft distributions q (k, V) on the device; ``None`` for greedy (one-hot)."""
    mtp_len: int = 0
    """Positions of this sequence already in the MTP block's cache."""
    preemptions: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def constraint(self):
        """The request's :class:`~dsv3.inference.constraint.TokenConstraint`, or ``None``."""
        return self.request.constraint

    @property
    def needs_prompt_logits(self) -> bool:
        """A new request asking for ``prompt_logprobs``: every prompt position is computed (no cached prefix)."""
        return self.params.prompt_logprobs is not None and not self.result.tokens

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

    @property
    def n_prefill(self) -> int:
        """``len(prefill_tokens)``; while running, the sequence decodes once its cache holds that many."""
        return len(self.prompt) + max(len(self.result.tokens) - 1, 0)


@dataclass
class Plan:
    """One step: the prefill chunks (sequence, tokens to prefill now: the rest of its prompt, or a part of it
    within the step's token budget; a sequence whose prompt is then complete samples its first token unless
    it is recomputed), the sequences to decode, and the events of cancelled requests."""

    prefill: list[tuple[Sequence, int]]
    decode: list[Sequence]
    events: list[TokenEvent]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def admitted(self) -> list[Sequence]:
        return [seq for seq, _ in self.prefill]


class Scheduler:
    """Requests waiting and running over the slots and pages of ``cache``; a decode step appends
    ``lookahead`` positions to each running sequence (2k with k speculative drafts a step)."""

    def __init__(self, cache: PagedLatentCache, max_batch: int, lookahead: int = 1, max_prefill_tokens: int = 8192):
        self.cache, self.max_batch, self.lookahead = cache, max_batch, lookahead
        self.max_prefill_tokens = max_prefill_tokens
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
        """Retire the cancelled, make room for the running (preempting if needed), continue the prompts being
        prefilled and admit the waiting, within the step's prefill budget."""
        events = self._retire_cancelled()
        cache = self.cache
        decode = [s for s in self.running if cache.lengths[s.slot] == s.n_prefill]
        prefilling = [s for s in self.running if cache.lengths[s.slot] < s.n_prefill]
        preempted = []
        while decode and self._growth(decode) > cache.num_free_pages:
            victim = decode.pop()  # the latest admitted
            self._preempt(victim)
            preempted.append(victim)
        free = cache.num_free_pages - self._growth(decode)
        budget = self.max_prefill_tokens
        chunks = []
        for seq in prefilling:  # prompts longer than a step's budget, in the order they came
            n = min(seq.n_prefill - cache.lengths[seq.slot], budget)
            need = self._pages(seq, cache.lengths[seq.slot], n)
            if n == 0 or need > free:
                break
            chunks.append((seq, n))
            budget, free = budget - n, free - need
        waiting_room = len(chunks) == len(prefilling)  # first come first served: the unfinished prompts first
        while (waiting_room and budget > 0 and self.waiting and len(self.running) < self.max_batch
               and cache.num_free_slots > 0):
            seq = self.waiting[0]
            tokens = seq.prefill_tokens
            prefix = [] if seq.needs_prompt_logits else cache.match_prefix(tokens)
            cached = len(prefix) * cache.page_size
            n = min(len(tokens) - cached, budget)
            # new pages, and the cached ones that were idle (attaching takes them off the free count)
            need = self._pages(seq, cached, n) + cache.idle_pages(prefix)
            if need > free:
                break  # first come first served: wait for pages rather than let later requests pass
            with self._lock:
                self.waiting.popleft()
            seq.slot = cache.new_sequence(prefix)
            seq.mtp_len = cached  # the MTP block's latents are cached with them
            if not seq.result.tokens:
                seq.result.cached_tokens = cached
            budget, free = budget - n, free - need
            self.running.append(seq)
            chunks.append((seq, n))
        return Plan(chunks, decode, events, preempted)

    def _pages(self, seq: Sequence, start: int, n: int) -> int:
        """New pages for prefilling positions start .. start+n-1 of ``seq`` (and its first decode step's, when
        that completes its prompt)."""
        end = start + n + (self.lookahead if start + n == seq.n_prefill else 0)
        return self.cache.pages_for(end) - self.cache.pages_for(start)

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
