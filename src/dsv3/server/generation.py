"""What OpenAI's generation endpoints (:mod:`.completions`, :mod:`.chat`) share: the mapping of the request's
sampling fields onto the engine's :class:`SamplingParams`, and :class:`Generation`, the engine requests of one
HTTP request.

A request becomes one engine request per prompt and choice (``n``), submitted together to the
:class:`~dsv3.server.loop.EngineLoop`; the handler then either awaits them all (a JSON response) or streams
their tokens as server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). A client that goes away
cancels the requests still running, streaming or not.

Defaults: ``temperature`` and ``top_p`` 1, no penalties. Choice i of a request with ``seed`` s samples with
seed s + i.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from ..inference import CacheFullError, SamplingParams, TokenLogprobs, UnsupportedOptionError
from .errors import (
    ContextLengthError, InvalidPromptError, InvalidRequestError, OverloadedError, ServerError,
    UnavailableError, UnsupportedParameterError,
)
from .loop import Job, Submitted
from .middleware import arrival, log_fields
from .protocol import ErrorResponse, PromptTokensDetails, SamplingFields, Usage
from .state import ServerState

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)}
STREAM = {"text/event-stream": {"description": "with stream=true: one chunk per event, then [DONE]"}}


def check_sampling(body: SamplingFields, state: ServerState, max_tokens: int) -> None:
    """The checks of the sampling fields that pydantic's bounds cannot make (they need the vocabulary or another
    field), as 400s naming the field, before anything reaches the engine."""
    if body.min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})",
                                  param="min_tokens")
    vocab = state.engine.config.vocab_size
    for name, ids in (("logit_bias", body.logit_bias or ()), ("stop_token_ids", body.stop_token_ids or ())):
        if any(t >= vocab for t in ids):
            raise InvalidRequestError(f"{name}: token ids must lie in [0, {vocab})", param=name)


def sampling_params(body: SamplingFields, max_tokens: int, choice: int, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's :class:`SamplingParams` for choice ``choice`` of a request (checked by pydantic's bounds and
    :func:`check_sampling`, so the engine's own checks pass)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=None if body.seed is None else (body.seed + choice) % 2**63,
            stop=[s for s in stop if s],
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=dict(body.logit_bias or {}),
            min_p=body.min_p or 0.0,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as e:  # a backstop: the request's bounds are the engine's
        raise InvalidRequestError(str(e)) from e


@dataclass
class Delta:
    """What one chunk of a stream adds to choice ``index``: the new text, the tokens since the choice's previous
    chunk with their log-probabilities (when asked for), and the finish. Tokens whose text is held back (part of a
    character, a possible stop string) wait for the next chunk, so each chunk carries the tokens of its text."""

    index: int
    first: bool
    """The choice's first chunk (where ``echo`` puts the prompt)."""
    text: str = ""
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


GONE = 499
"""The status of a request whose client left before the response (nginx's "client closed request"): nothing is
sent, the log line says it."""


class Generation:
    """The engine requests of one HTTP request: submitted together, awaited or streamed, counted in
    ``pending`` until they end, cancelled if the client leaves first, accounted in the request's log line.
    ``discard_tokens``: the completions are not returned (``echo`` with ``max_tokens`` 0) and count 0 in
    ``usage``."""

    def __init__(self, state: ServerState, request: Request, submitted: Submitted, n: int,
                 discard_tokens: bool = False):
        self.state, self.request, self.n = state, request, n
        self.discard_tokens = discard_tokens
        self.results, self.timings, self.events = submitted.results, submitted.timings, submitted.events
        self.open = {r.request_id for r in self.results}
        self._closed = False

    @classmethod
    async def start(cls, state: ServerState, request: Request, jobs: list[Job], n: int,
                    discard_tokens: bool = False, constraint_param: str | None = None) -> Generation:
        """Submit ``jobs``. ``constraint_param``: the request field whose grammar constraint an engine that
        refuses constraints (a speculative one) is named for in the 400 (the engine says ``"constraint"``)."""
        loop = state.loop
        if not loop.alive:
            raise UnavailableError("the engine is not running")
        count = sum(len(job.params) for job in jobs)
        if state.max_pending is not None and loop.pending + count > state.max_pending:
            raise OverloadedError("too many requests in flight; retry later")
        loop.pending += count  # before awaiting: concurrent requests see it at once
        try:
            submitted = await loop.submit(jobs, arrival(request))
        except BaseException as e:
            loop.pending -= count
            if isinstance(e, CacheFullError):
                raise ContextLengthError(str(e), param="max_tokens") from e
            if isinstance(e, UnsupportedOptionError):  # e.g. penalties on a speculative engine
                if e.options[0] == "constraint" and constraint_param:
                    raise UnsupportedParameterError(f"{constraint_param} needs a grammar constraint, and {e}",
                                                    param=constraint_param) from e
                raise UnsupportedParameterError(str(e), param=e.options[0]) from e
            if isinstance(e, ValueError):  # the engine's own prompt checks (ours ran first; this is a backstop)
                raise InvalidPromptError(str(e), param="prompt") from e
            raise
        return cls(state, request, submitted, n, discard_tokens)

    def usage(self) -> Usage:
        """OpenAI's usage: each prompt counted once (not once per choice), its cached tokens those the first
        choice found in the prefix cache."""
        firsts = self.results[::self.n]
        prompt = sum(r.prompt_tokens for r in firsts)
        completion = 0 if self.discard_tokens else sum(r.completion_tokens for r in self.results)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.cached_tokens for r in firsts)))

    def close(self) -> None:
        """Once, however the request ends: cancel what still runs, release ``pending``, fill the log line."""
        if self._closed:
            return
        self._closed = True
        if self.open:
            self.state.loop.cancel(list(self.open))
        self.state.loop.pending -= len(self.results)
        usage = self.usage()
        firsts = [t.first_token for t in self.timings if t.first_token is not None]
        reasons = [r.finish_reason or "cancelled" for r in self.results]
        log_fields(self.request).update(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.prompt_tokens_details.cached_tokens,
            ttft_s=round(min(firsts) - arrival(self.request), 6) if firsts else None,
            finish_reason=reasons[0] if len(reasons) == 1 else reasons)

    async def wait(self) -> bool:
        """Until every request has ended (True), or the client disconnects first (False: they are cancelled)."""
        gone = asyncio.ensure_future(_disconnected(self.request))
        try:
            while self.open:
                getter = asyncio.ensure_future(self.events.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return False
                event = getter.result()
                if event.finish_reason == "error":
                    raise ServerError(event.text)
                if event.finish_reason is not None:
                    self.open.discard(event.request_id)
            return True
        finally:
            gone.cancel()
            self.close()

    def stream(self, chunk: Callable[[Delta], BaseModel | list[BaseModel]], first: list[BaseModel],
               usage_chunk: Callable[[Usage], BaseModel] | None) -> StreamingResponse:
        """Server-sent events: ``first``, then ``chunk(delta)`` whenever a choice has new text or finishes (its
        :class:`Delta` since its previous chunk; one chunk, or several, e.g. content and then tool-call pieces,
        or none while a parser holds the text back), then ``usage_chunk(usage)`` when asked for, then
        ``[DONE]``."""
        index = {r.request_id: i for i, r in enumerate(self.results)}

        async def body() -> AsyncIterator[str]:
            for c in first:
                yield _sse(c)
            waiting: dict[int, Delta] = {}  # per choice, the tokens since its last chunk
            started: set[int] = set()
            while self.open:
                event = await self.events.get()
                if event.finish_reason == "error":
                    self.open.discard(event.request_id)
                    yield _sse(ServerError(event.text).body())
                    continue
                if event.finish_reason is not None:
                    self.open.discard(event.request_id)
                i = index[event.request_id]
                delta = waiting.setdefault(i, Delta(i, first=i not in started))
                if event.token is not None:
                    delta.tokens.append(event.token)
                    if event.logprobs is not None:
                        delta.logprobs.append(event.logprobs)
                if event.text or event.finish_reason is not None:
                    delta.text, delta.finish_reason = event.text, event.finish_reason
                    del waiting[i]
                    started.add(i)
                    out = chunk(delta)
                    for c in out if isinstance(out, list) else [out]:
                        yield _sse(c)
            if usage_chunk is not None:
                yield _sse(usage_chunk(self.usage()))
            yield "data: [DONE]\n\n"

        return _EventStream(body(), self.close)


def client_gone() -> Response:
    """The answer to a request whose client has left (:data:`GONE`; nobody reads it)."""
    return Response(status_code=GONE)


class _EventStream(StreamingResponse):
    """A server-sent-event response that runs ``on_close`` however it ends (finished, client gone, error),
    even when the body iterator never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
