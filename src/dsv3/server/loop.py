"""The one thread that drives the engine, between the asyncio world of the HTTP handlers and the synchronous
engine.

The engine and its :class:`~dsv3.inference.Scheduler` are touched by exactly one thread, the
:class:`EngineLoop`'s. Handlers hand it a submission (prompts' token ids, one :class:`SamplingParams` per
choice) through a queue and await the results; the loop thread submits to the engine, runs ``engine.step()``
while there is work and passes every :class:`TokenEvent` back to the handler's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. Cancelling (a client that disconnects) only
calls the engine's thread-safe ``cancel``; the pages are freed at the next step.

The loop also times each request (:class:`RequestTiming`: admission, first token, the gaps between tokens,
end) with one clock read per step, and reports every finished request to ``on_finish`` (the server's metrics).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inference import Engine, GenerationRequest, GenerationResult, SamplingParams, TokenConstraint, TokenEvent

log = logging.getLogger("dsv3.server")


@dataclass
class Job:
    """A prompt's token ids and one :class:`SamplingParams` per choice, with each choice's constraint (or none):
    a constraint holds one sequence's grammar state, so every choice has its own object."""

    prompt: list[int]
    params: list[SamplingParams]
    constraints: list[TokenConstraint | None] | None = None

    def requests(self) -> list[GenerationRequest]:
        constraints = self.constraints or [None] * len(self.params)
        return [GenerationRequest(prompt=self.prompt, params=p, constraint=c)
                for p, c in zip(self.params, constraints, strict=True)]


@dataclass
class RequestTiming:
    """When things happened to one engine request, in ``time.monotonic()`` seconds. Written by the engine
    thread only; read once the request has finished."""

    arrival: float
    """When the HTTP request arrived."""
    admitted: float | None = None
    """Start of the engine step that first admitted it into the batch (its prefill began)."""
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    finish_reason: str | None = None
    """As the last event said: stop, length, cancelled or error."""
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between the steps that brought it tokens after the first (a step that brings several, as a
    verified speculative draft does, counts once)."""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.arrival


@dataclass
class Submitted:
    """What :meth:`EngineLoop.submit` hands back: one result and one timing per engine request (prompt-major,
    then choice), filled in as tokens come, and the queue receiving all their :class:`TokenEvent` s."""

    results: list[GenerationResult]
    timings: list[RequestTiming]
    events: asyncio.Queue


@dataclass
class _Tracked:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    result: GenerationResult
    timing: RequestTiming


@dataclass
class _Submission:
    jobs: list[Job]
    arrival: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    future: asyncio.Future


class EngineLoop:
    """Drives ``engine`` on its own thread (see the module docstring). ``num_threads`` sets torch's intra-op
    threads on that thread (on a CPU, 1 is fastest for small models); ``on_finish(result, timing)`` is
    called on that thread for every request that ends (it must be quick and thread-safe)."""

    def __init__(self, engine: Engine, num_threads: int | None = None, idle_wait: float = 0.05,
                 on_finish: Callable[[GenerationResult, RequestTiming], None] | None = None):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.num_threads = num_threads
        self.idle_wait = idle_wait
        self.on_finish = on_finish
        self._inbox: queue.SimpleQueue[_Submission] = queue.SimpleQueue()
        self._requests: dict[str, _Tracked] = {}
        self._unadmitted = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pending = 0
        """Requests submitted and not finished (counted on the event loop, for ``max_pending``)."""
        self.error: BaseException | None = None
        """The exception of the last failed engine step (its requests were failed, the loop kept going)."""

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def submit(self, jobs: list[Job], arrival: float | None = None) -> Submitted:
        """Queue one request per prompt and choice of ``jobs``, all or none. Raises what ``engine.submit``
        raised (``ValueError`` for a bad prompt, :class:`~dsv3.inference.CacheFullError` for one that could
        never fit the cache). ``arrival``: when the HTTP request came (default now)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        future = loop.create_future()
        self._inbox.put(_Submission(jobs, time.monotonic() if arrival is None else arrival, loop, events, future))
        self._wake.set()
        results, timings = await future
        return Submitted(results, timings, events)

    def cancel(self, request_ids: list[str]) -> None:
        """Stop requests (thread-safe); their pages are freed at the engine's next step."""
        for rid in request_ids:
            self.engine.cancel(rid)
        self._wake.set()

    # -- on the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        while not self._stop.is_set():
            self._take_submissions()
            if not self.scheduler.has_work:
                self._wake.wait(self.idle_wait)
                self._wake.clear()
                continue
            start = time.monotonic()
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step: fail the requests in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self.error = e
                events = self._fail_all(e)
            now = time.monotonic()
            if self._unadmitted:
                self._note_admissions(start)
            for event in events:
                self._deliver(event, start, now)
        for event in self._fail_all(RuntimeError("the server is shutting down")):
            now = time.monotonic()
            self._deliver(event, now, now)

    def _take_submissions(self) -> None:
        while True:
            try:
                sub = self._inbox.get_nowait()
            except queue.Empty:
                return
            tracked: list[tuple[str, _Tracked]] = []
            try:
                for job in sub.jobs:
                    for request in job.requests():
                        result = self.engine.submit(request)
                        tracked.append((request.request_id, _Tracked(sub.loop, sub.events, result,
                                                                     RequestTiming(sub.arrival))))
                        self._requests[request.request_id] = tracked[-1][1]
                        self._unadmitted += 1
            except Exception as e:
                self._drop([rid for rid, _ in tracked])
                _call_soon(sub.loop, _resolve, sub.future, None, e)
                continue
            outcome = ([t.result for _, t in tracked], [t.timing for _, t in tracked])
            if not _call_soon(sub.loop, _resolve, sub.future, outcome, None, self, [rid for rid, _ in tracked]):
                self._drop([rid for rid, _ in tracked])  # the event loop is gone

    def _note_admissions(self, step_start: float) -> None:
        """Stamp the requests the step just admitted (they are running now, and were not before)."""
        for seq in self.scheduler.running:
            tracked = self._requests.get(seq.request.request_id)
            if tracked is not None and tracked.timing.admitted is None:
                tracked.timing.admitted = step_start
                self._unadmitted -= 1

    def _drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self._requests.pop(rid, None) is not None:
                self._unadmitted -= 1
            self.engine.cancel(rid)

    def _deliver(self, event: TokenEvent, step_start: float, now: float) -> None:
        tracked = self._requests.get(event.request_id)
        if tracked is None:
            return
        timing = tracked.timing
        if event.token is not None:
            if timing.first_token is None:
                timing.first_token = now
            elif now > timing.last_token:
                timing.token_gaps.append(now - timing.last_token)
            timing.last_token = now
        if event.finish_reason is not None:
            del self._requests[event.request_id]
            if timing.admitted is None:  # admitted and finished within one step, or never admitted
                self._unadmitted -= 1
                if event.token is not None:
                    timing.admitted = step_start
            timing.finished, timing.finish_reason = now, event.finish_reason
            if self.on_finish is not None:
                try:
                    self.on_finish(tracked.result, timing)
                except Exception:  # metrics must never take the engine down
                    log.exception("on_finish failed")
        if not _call_soon(tracked.loop, tracked.events.put_nowait, event):
            self.engine.cancel(event.request_id)

    def _fail_all(self, error: BaseException) -> list[TokenEvent]:
        """Cancel every tracked request and tell each one ``error`` (as an ``"error"`` finish)."""
        ids = list(self._requests)
        for rid in ids:
            self.engine.cancel(rid)
        message = f"{type(error).__name__}: {error}"
        return [TokenEvent(rid, None, message, "error") for rid in ids]


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # loop closed
        return False


def _resolve(future: asyncio.Future, outcome, error, engine_loop: EngineLoop | None = None,
             request_ids: list[str] | None = None) -> None:
    """On the event loop: hand a submission's outcome to the handler awaiting it (or cancel the requests
    when that handler is gone)."""
    if future.cancelled():
        if engine_loop is not None and request_ids:
            engine_loop.cancel(request_ids)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)
