"""``POST /v1/completions``: OpenAI's (legacy) completions, with ``logprobs`` in its legacy shape and ``echo``.

Each prompt of the request is completed ``n`` times. With ``echo`` each choice's text starts with the prompt (as
given, or decoded from token ids) and, with ``logprobs``, its log-probabilities with the prompt tokens' (the
engine's ``prompt_logprobs``). ``echo`` with ``max_tokens`` 0 is how evaluation harnesses score a text: the
engine generates at least one token, so the server asks for one (greedy, EOS ignored, nothing else applied),
drops it and answers the prompt alone with ``finish_reason`` "length" and ``completion_tokens`` 0.

``response_format`` (vLLM's extension here) constrains each choice's text as on chat (:mod:`.structured`).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from ..inference import GenerationResult, SamplingParams, TokenLogprobs
from .errors import InvalidRequestError
from .generation import ERRORS, STREAM, Delta, Generation, check_sampling, client_gone, sampling_params
from .logprobs import completion_logprobs
from .middleware import request_id
from .loop import Job
from .protocol import CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse
from .state import ServerState, get_state
from .structured import response_format_constraints, token_budget

router = APIRouter(tags=["OpenAI"])

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` of a completion."""


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's ``prompt``: one string, a list of strings, one token-id list or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def engine_params(body: CompletionRequest, max_tokens: int, choice: int) -> SamplingParams:
    """The engine's parameters of one choice: the request's, or for ``echo`` with ``max_tokens`` 0 one greedy
    token that will be dropped (only the prompt's log-probabilities matter)."""
    prompt_logprobs = body.logprobs if body.echo else None
    if max_tokens == 0:
        return SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    return sampling_params(body, max_tokens, choice, logprobs=body.logprobs, prompt_logprobs=prompt_logprobs)


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, 200: {"content": STREAM}})
async def create_completion(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    """A completion of each prompt (``n`` choices each)."""
    state.check_model(body.model)
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise InvalidRequestError("max_tokens must be >= 1 (0 only with echo: the prompt alone)", param="max_tokens")
    check_sampling(body, state, max_tokens)
    prompts = split_prompts(body.prompt)
    tokenizer = state.tokenizer

    def encode() -> tuple[list[list[int]], list[str]]:
        ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if body.echo else []
        return ids, texts

    ids, prompt_texts = await state.tokenize(encode)
    for prompt in ids:
        state.check_prompt(prompt)
    n, zero = body.n, max_tokens == 0
    constraints = None if zero else await response_format_constraints(
        state, body.response_format, [token_budget(state, max_tokens, prompt) for prompt in ids for _ in range(n)])
    jobs = [Job(prompt, [engine_params(body, max_tokens, p * n + j) for j in range(n)],
                constraints[p * n:(p + 1) * n] if constraints else None) for p, prompt in enumerate(ids)]
    gen = await Generation.start(state, request, jobs, n, discard_tokens=zero, constraint_param="response_format")
    base = {"id": f"cmpl-{request_id(request)}", "created": int(time.time()), "model": state.model_name}
    texts = state.token_texts

    def choice(i: int, result: GenerationResult, text: str, tokens: list[int], entries: list[TokenLogprobs],
               reason: str | None, first: bool, offset: int) -> tuple[CompletionChoice, int]:
        """Choice ``i`` of ``result``: its text (or the part a chunk adds) and tokens, the prompt's first when
        echoed, with their log-probabilities; returns it and the text offset after it."""
        if zero:  # the one greedy token is dropped (its finish is "length": one token asked for, EOS ignored)
            text, tokens, entries = "", [], []
        if body.echo and first:
            text, tokens = prompt_texts[i // n] + text, ids[i // n] + tokens
            entries = (result.prompt_logprobs or []) + entries
        logprobs = None
        if body.logprobs is not None:
            logprobs, offset = completion_logprobs(texts, tokens, entries, body.logprobs, offset)
        return CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reason), offset

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        offsets = [0] * len(gen.results)

        def chunk(d: Delta) -> CompletionStreamResponse:
            c, offsets[d.index] = choice(d.index, gen.results[d.index], d.text, d.tokens, d.logprobs,
                                         d.finish_reason, d.first, offsets[d.index])
            return CompletionStreamResponse(**base, choices=[c])

        return gen.stream(chunk, [], (lambda usage: CompletionStreamResponse(**base, choices=[], usage=usage))
                          if include_usage else None)

    if not await gen.wait():
        return client_gone()
    choices = [choice(i, r, r.text or "", r.tokens, r.logprobs or [], r.finish_reason, True, 0)[0]
               for i, r in enumerate(gen.results)]
    return CompletionResponse(**base, choices=choices, usage=gen.usage())
