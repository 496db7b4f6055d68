"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's generation endpoints over the engine.

A request becomes one engine request per prompt and choice (``n``), submitted together to the
:class:`~dsv3.server.loop.EngineLoop`; the handler then either awaits them all (a JSON response) or streams
their tokens as server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). A client that goes away
cancels the requests still running, streaming or not.

Defaults: ``max_tokens`` is 16 for completions (as OpenAI's) and the rest of the context for chat; ``temperature``
and ``top_p`` 1. Choice i of a request with ``seed`` s samples with seed s + i.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ..inference import CacheFullError, SamplingParams
from .errors import (
    ContextLengthError, InvalidPromptError, InvalidRequestError, OverloadedError, ServerError,
    UnavailableError, UnsupportedParameterError,
)
from .loop import Job, Submitted
from .middleware import arrival, log_fields, request_id
from .protocol import (
    AssistantMessage, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse,
    DeltaMessage, ErrorResponse, PromptTokensDetails, SamplingFields, Usage,
)
from .state import ServerState, get_state

router = APIRouter(tags=["OpenAI"])

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)}
STREAM = {"text/event-stream": {"description": "with stream=true: one chunk per event, then [DONE]"}}


def sampling_params(body: SamplingFields, max_tokens: int | None, default_max: int, choice: int) -> SamplingParams:
    """The engine's :class:`SamplingParams` for choice ``choice`` of a request."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=max_tokens or default_max,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=None if body.seed is None else (body.seed + choice) % 2**63,
        stop=[s for s in stop if s],
        ignore_eos=body.ignore_eos,
    )


def check_supported(body: SamplingFields) -> None:
    """A 400 for the OpenAI parameters that a client would miss if ignored (they change the response)."""
    if body.logprobs:
        raise UnsupportedParameterError("logprobs are not supported yet", param="logprobs")


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's ``prompt``: one string, a list of strings, one token-id list or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


class Generation:
    """The engine requests of one HTTP request: submitted together, awaited or streamed, counted in
    ``pending`` until they end, cancelled if the client leaves first, accounted in the request's log line."""

    def __init__(self, state: ServerState, request: Request, submitted: Submitted, n: int):
        self.state, self.request, self.n = state, request, n
        self.results, self.timings, self.events = submitted.results, submitted.timings, submitted.events
        self.open = {r.request_id for r in self.results}
        self._closed = False

    @classmethod
    async def start(cls, state: ServerState, request: Request, jobs: list[Job], n: int) -> Generation:
        loop = state.loop
        if not loop.alive:
            raise UnavailableError("the engine is not running")
        count = sum(len(params) for _, params in jobs)
        if state.max_pending is not None and loop.pending + count > state.max_pending:
            raise OverloadedError("too many requests in flight; retry later")
        loop.pending += count  # before awaiting: concurrent requests see it at once
        try:
            submitted = await loop.submit(jobs, arrival(request))
        except BaseException as e:
            loop.pending -= count
            if isinstance(e, CacheFullError):
                raise ContextLengthError(str(e), param="max_tokens") from e
            if isinstance(e, ValueError):  # the engine's own prompt checks (ours ran first; this is a backstop)
                raise InvalidPromptError(str(e), param="prompt") from e
            raise
        return cls(state, request, submitted, n)

    def usage(self) -> Usage:
        """OpenAI's usage: each prompt counted once (not once per choice), its cached tokens those the first
        choice found in the prefix cache."""
        firsts = self.results[::self.n]
        prompt = sum(r.prompt_tokens for r in firsts)
        completion = sum(r.completion_tokens for r in self.results)
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

    async def wait(self) -> None:
        """Until every request has ended; cancels them all if the client disconnects first."""
        gone = asyncio.ensure_future(_disconnected(self.request))
        try:
            while self.open:
                getter = asyncio.ensure_future(self.events.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                event = getter.result()
                if event.finish_reason == "error":
                    raise ServerError(event.text)
                if event.finish_reason is not None:
                    self.open.discard(event.request_id)
        finally:
            gone.cancel()
            self.close()

    def stream(self, chunk: Callable[[int, str, str | None], BaseModel], first: list[BaseModel],
               usage_chunk: Callable[[Usage], BaseModel] | None) -> StreamingResponse:
        """Server-sent events: ``first``, then ``chunk(choice, text, finish_reason)`` per event with text or a
        finish, then ``usage_chunk(usage)`` when asked for, then ``[DONE]``."""
        index = {r.request_id: i for i, r in enumerate(self.results)}

        async def body() -> AsyncIterator[str]:
            for c in first:
                yield _sse(c)
            while self.open:
                event = await self.events.get()
                if event.finish_reason == "error":
                    self.open.discard(event.request_id)
                    yield _sse(ServerError(event.text).body())
                    continue
                if event.finish_reason is not None:
                    self.open.discard(event.request_id)
                if event.text or event.finish_reason is not None:
                    yield _sse(chunk(index[event.request_id], event.text, event.finish_reason))
            if usage_chunk is not None:
                yield _sse(usage_chunk(self.usage()))
            yield "data: [DONE]\n\n"

        return _EventStream(body(), self.close)


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


# ----------------------------------------------------------------------------------------------------
# routes

@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, 200: {"content": STREAM}})
async def create_completion(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    """A completion of each prompt (``n`` choices each)."""
    state.check_model(body.model)
    check_supported(body)
    if body.echo:
        raise UnsupportedParameterError("echo is not supported yet", param="echo")
    prompts = split_prompts(body.prompt)
    tokenizer = state.tokenizer
    ids = await state.tokenize(lambda: [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts])
    for prompt in ids:
        state.check_prompt(prompt)
    jobs = [(prompt, [sampling_params(body, body.max_tokens, 16, p * body.n + j) for j in range(body.n)])
            for p, prompt in enumerate(ids)]
    gen = await Generation.start(state, request, jobs, body.n)
    base = {"id": f"cmpl-{request_id(request)}", "created": int(time.time()), "model": state.model_name}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return gen.stream(
            lambda i, text, reason: CompletionStreamResponse(
                **base, choices=[CompletionChoice(index=i, text=text, finish_reason=reason)]),
            [], (lambda usage: CompletionStreamResponse(**base, choices=[], usage=usage)) if include_usage else None)

    await gen.wait()
    choices = [CompletionChoice(index=i, text=r.text or "", finish_reason=r.finish_reason)
               for i, r in enumerate(gen.results)]
    return CompletionResponse(**base, choices=choices, usage=gen.usage())


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERRORS, 200: {"content": STREAM}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: ServerState = Depends(get_state)):
    """The assistant's next message (``n`` choices), the conversation rendered with the chat template."""
    state.check_model(body.model)
    check_supported(body)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    try:
        ids = await state.tokenize(lambda: state.template.encode(messages))
    except ValueError as e:  # the template's checks (roles, content parts) or its own raise_exception
        raise InvalidRequestError(str(e), param="messages") from e
    state.check_prompt(ids, param="messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = [sampling_params(body, max_tokens, state.engine.max_seq_len, j) for j in range(body.n)]
    gen = await Generation.start(state, request, [(ids, params)], body.n)
    base = {"id": f"chatcmpl-{request_id(request)}", "created": int(time.time()), "model": state.model_name}

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(body.n)]
        return gen.stream(
            lambda i, text, reason: ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
                index=i, delta=DeltaMessage(content=text or None), finish_reason=reason)]),
            first,
            (lambda usage: ChatCompletionStreamResponse(**base, choices=[], usage=usage)) if include_usage else None)

    await gen.wait()
    choices = [ChatCompletionChoice(index=i, message=AssistantMessage(content=r.text or ""),
                                    finish_reason=r.finish_reason) for i, r in enumerate(gen.results)]
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage())

