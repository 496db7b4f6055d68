"""``POST /v1/chat/completions``: OpenAI's chat completions over the checkpoint's chat template, with ``logprobs``
(and ``top_logprobs``) in OpenAI's chat shape. ``max_tokens`` (or ``max_completion_tokens``) defaults to the rest
of the context."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ..inference import TokenLogprobs
from .errors import InvalidRequestError
from .generation import ERRORS, STREAM, Delta, Generation, check_sampling, client_gone, sampling_params
from .logprobs import chat_logprobs
from .middleware import request_id
from .protocol import (
    AssistantMessage, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, ChatLogprobs, DeltaMessage,
)
from .state import ServerState, get_state

router = APIRouter(tags=["OpenAI"])


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={**ERRORS, 200: {"content": STREAM}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 state: ServerState = Depends(get_state)):
    """The assistant's next message (``n`` choices), the conversation rendered with the chat template."""
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or state.engine.max_seq_len
    check_sampling(body, state, max_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    try:
        ids = await state.tokenize(lambda: state.template.encode(messages))
    except ValueError as e:  # the template's checks (roles, content parts) or its own raise_exception
        raise InvalidRequestError(str(e), param="messages") from e
    state.check_prompt(ids, param="messages")
    n_top = (body.top_logprobs or 0) if body.logprobs else None
    params = [sampling_params(body, max_tokens, j, logprobs=n_top) for j in range(body.n)]
    gen = await Generation.start(state, request, [(ids, params)], body.n)
    base = {"id": f"chatcmpl-{request_id(request)}", "created": int(time.time()), "model": state.model_name}
    texts = state.token_texts

    def logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs | None:
        return None if n_top is None else ChatLogprobs(content=chat_logprobs(texts, entries))

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(body.n)]

        def chunk(d: Delta) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
                index=d.index, delta=DeltaMessage(content=d.text or None), logprobs=logprobs(d.logprobs),
                finish_reason=d.finish_reason)])

        return gen.stream(chunk, first, (lambda usage: ChatCompletionStreamResponse(**base, choices=[], usage=usage))
                          if include_usage else None)

    if not await gen.wait():
        return client_gone()
    choices = [ChatCompletionChoice(index=i, message=AssistantMessage(content=r.text or ""),
                                    logprobs=logprobs(r.logprobs or []), finish_reason=r.finish_reason)
               for i, r in enumerate(gen.results)]
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage())
