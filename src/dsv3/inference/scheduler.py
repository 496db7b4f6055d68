"""Continuous batching: requests join and leave the running batch between decode steps.

:meth:`Scheduler.step` does, in order:

1. retire cancelled requests (waiting or running) and free their pages;
2. admit waiting requests, first come first served, while the batch has room (``engine.max_batch``) and
   the cache can hold each admitted request's worst case (prompt + max new tokens): admission reserves
   that many pages, so a running sequence never runs out of pages mid-generation; each admitted request
   is prefilled and gets its first token;
3. run one decode step for the sequences that were already running;
4. retire finished sequences and free their pages at once.

It is synchronous: a server calls :meth:`step` from one background thread; :meth:`submit` and
:meth:`cancel` only touch a queue and a set and may be called from other threads.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from .cache import CacheFullError
from .sampling import GenerationRequest, GenerationResult, TokenEvent

if TYPE_CHECKING:
    from .engine import Engine, Sequence


class Scheduler:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: deque[tuple[GenerationRequest, list[int], GenerationResult]] = deque()
        self.running: list[Sequence] = []
        self._reserved: dict[str, int] = {}  # pages reserved by each running request
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request. Returns its result, filled in place as tokens come (``finish_reason`` is set
        at the end). Raises ``ValueError`` for a bad prompt and :class:`CacheFullError` for a request that
        could never fit the cache."""
        prompt = self.engine.encode_prompt(request.prompt)
        need = self.engine.pages_needed(len(prompt), request.params)
        if need > self.engine.cache.num_pages:
            raise CacheFullError(
                f"request {request.request_id} needs {need} pages, the cache has {self.engine.cache.num_pages}"
            )
        result = GenerationResult(request_id=request.request_id, prompt_tokens=len(prompt))
        with self._lock:
            self.waiting.append((request, prompt, result))
        return result

    def cancel(self, request_id: str) -> None:
        """Stop a request; it is retired (and its pages freed) at the start of the next :meth:`step`."""
        with self._lock:
            self._cancelled.add(request_id)

    def step(self) -> list[TokenEvent]:
        """Admit, decode one token for every running sequence, retire. Returns the new tokens."""
        events = self._retire_cancelled()
        decoding = list(self.running)
        events += self._admit()
        events += self.engine.advance(decoding)
        for seq in [s for s in self.running if s.finished]:
            self._retire(seq)
        return events

    # ------------------------------------------------------------------------------------------------
    def _admit(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        cache = self.engine.cache
        while self.waiting and len(self.running) < self.engine.max_batch and cache.num_free_slots > 0:
            request, prompt, result = self.waiting[0]
            need = self.engine.pages_needed(len(prompt), request.params)
            if sum(self._reserved.values()) + need > cache.num_pages:
                break  # first come first served: wait for pages rather than let later requests pass
            with self._lock:
                self.waiting.popleft()
            seq, first = self.engine.start(request, prompt, result)
            self._reserved[request.request_id] = need
            self.running.append(seq)
            events += first
        return events

    def _retire(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._reserved.pop(seq.request.request_id, None)
        self.engine.release(seq)

    def _retire_cancelled(self) -> list[TokenEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = deque()
            dropped = []
            for item in self.waiting:
                (dropped if item[0].request_id in cancelled else kept).append(item)
            self.waiting = kept
        events = []
        for _, _, result in dropped:
            result.finish_reason = "cancelled"
            events.append(TokenEvent(result.request_id, None, "", "cancelled"))
        for seq in [s for s in self.running if s.request.request_id in cancelled]:
            seq.result.finish_reason = "cancelled"
            events.append(TokenEvent(seq.result.request_id, None, "", "cancelled"))
            self._retire(seq)
        return events
