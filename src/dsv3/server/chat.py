"""``POST /v1/chat/completions``: OpenAI's chat completions over the checkpoint's chat template, with ``logprobs``
(and ``top_logprobs``) in OpenAI's chat shape. ``max_tokens`` (or ``max_completion_tokens``) defaults to the rest
of the context.

``response_format`` constrains the message to JSON (:mod:`.structured`); ``tools`` / ``tool_choice`` render the
tools into the prompt, parse the output for tool calls and, for ``required`` or a named function, constrain it
to calls (:mod:`.tools`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ..inference import TokenLogprobs
from ..inference.chat import message_text
from .errors import InvalidRequestError, UnsupportedParameterError
from .generation import ERRORS, STREAM, Delta, Generation, check_sampling, client_gone, sampling_params
from .logprobs import chat_logprobs
from .loop import Job
from .middleware import request_id
from .protocol import (
    ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamChoice,
    ChatCompletionStreamResponse, ChatLogprobs, DeltaMessage,
)
from .state import ServerState, get_state
from .structured import response_format_constraints, token_budget, wants_constraint
from .tools import ToolPlan, ToolStream, chat_message, finish_reason, message_dicts, plan_tools

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
    plan = plan_tools(body)
    if plan.forced is not None and wants_constraint(body.response_format):
        raise InvalidRequestError("response_format cannot constrain a message that tool_choice forces to be tool "
                                  "calls", param="response_format")
    messages = message_dicts(body.messages)
    if body.continue_final_message and body.add_generation_prompt:
        raise InvalidRequestError("continue_final_message needs add_generation_prompt set to false",
                                  param="continue_final_message")
    try:
        ids = await state.tokenize(lambda: state.template.encode(
            messages, body.add_generation_prompt, plan.tools, body.continue_final_message))
    except ValueError as e:  # the template's checks (roles, content parts) or its own raise_exception
        raise InvalidRequestError(str(e), param="messages") from e
    # echo: the reply repeats the last message first when it is the assistant's (the part being continued)
    echoed = message_text(messages[-1]["content"]) if body.echo and messages[-1]["role"] == "assistant" else ""
    state.check_prompt(ids, param="messages")
    n_top = (body.top_logprobs or 0) if body.logprobs else None
    params = [sampling_params(body, max_tokens, j, logprobs=n_top) for j in range(body.n)]
    constraints, param = await _constraints(state, body, plan, token_budget(state, max_tokens, ids))
    gen = await Generation.start(state, request, [Job(ids, params, constraints)], body.n, constraint_param=param)
    base = {"id": f"chatcmpl-{request_id(request)}", "created": int(time.time()), "model": state.model_name}
    texts = state.token_texts

    def logprobs(entries: list[TokenLogprobs]) -> ChatLogprobs | None:
        return None if n_top is None else ChatLogprobs(content=chat_logprobs(texts, entries))

    named = isinstance(plan.forced, dict)  # tool_choice named one function
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        first = [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
            index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(body.n)]

        streams = [ToolStream() for _ in range(body.n)] if plan.parse else None
        if echoed:
            if streams is None:
                first += [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
                    index=i, delta=DeltaMessage(content=echoed))]) for i in range(body.n)]
            else:  # the echoed text goes through the tool-call parser like the rest
                first += [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
                    index=i, delta=delta)]) for i in range(body.n) for delta in streams[i].feed(echoed, False)]

        def chunk(d: Delta) -> list[ChatCompletionStreamResponse]:
            """The delta's content (and, parsing tool calls, its call pieces), its tokens' log-probabilities on
            the first chunk, the finish on the last."""
            if streams is None:
                deltas, reason = [DeltaMessage(content=d.text or None)], d.finish_reason
            else:
                stream = streams[d.index]
                deltas = stream.feed(d.text, d.finish_reason is not None)
                reason = finish_reason(d.finish_reason, stream.has_calls, named)
                if not deltas and (reason is not None or d.logprobs):
                    deltas = [DeltaMessage()]
            return [ChatCompletionStreamResponse(**base, choices=[ChatCompletionStreamChoice(
                index=d.index, delta=delta, logprobs=logprobs(d.logprobs) if k == 0 else None,
                finish_reason=reason if k == len(deltas) - 1 else None)]) for k, delta in enumerate(deltas)]

        return gen.stream(chunk, first, (lambda usage: ChatCompletionStreamResponse(**base, choices=[], usage=usage))
                          if include_usage else None)

    if not await gen.wait():
        return client_gone()
    choices = []
    for i, r in enumerate(gen.results):
        message, has_calls = chat_message(echoed + (r.text or ""), plan.parse)
        choices.append(ChatCompletionChoice(index=i, message=message, logprobs=logprobs(r.logprobs or []),
                                            finish_reason=finish_reason(r.finish_reason, has_calls, named)))
    return ChatCompletionResponse(**base, choices=choices, usage=gen.usage())


async def _constraints(state: ServerState, body: ChatCompletionRequest, plan: ToolPlan,
                       budget: int) -> tuple[list | None, str | None]:
    """Each choice's constraint (forced tool calls, else ``response_format``; ``None``: unconstrained) and the
    request field it comes from."""
    if plan.forced is not None:
        tools, forced, parallel = plan.tools, plan.forced, plan.parallel
        constraints = await state.grammars.make("tools", lambda f: [
            f.tool_call(tools, forced, parallel=parallel, max_tokens=budget) for _ in range(body.n)])
        return constraints, "tool_choice"
    if plan.parse and plan.tools and not wants_constraint(body.response_format):
        guided = await _guided_auto(state, body, plan, budget)
        if guided is not None:
            return guided, "tools"
    constraints = await response_format_constraints(state, body.response_format, [budget] * body.n)
    return constraints, "response_format" if constraints else None


async def _guided_auto(state: ServerState, body: ChatCompletionRequest, plan: ToolPlan, budget: int) -> list | None:
    """``tool_choice: "auto"``: free text, or tool calls valid against their schemas once the model opens them
    (:meth:`GrammarFactory.tool_call` "auto"). ``None`` (unconstrained, calls parsed as written) where it cannot
    be guided: no grammar library, a speculative engine, or a schema the grammar compiler does not take (a
    forced choice would answer 400 there; auto stays usable)."""
    if state.engine.speculator is not None:
        return None
    try:
        tools, parallel = plan.tools, plan.parallel
        return await state.grammars.make("tools", lambda f: [
            f.tool_call(tools, "auto", parallel=parallel, max_tokens=budget) for _ in range(body.n)])
    except (InvalidRequestError, UnsupportedParameterError):
        return None
