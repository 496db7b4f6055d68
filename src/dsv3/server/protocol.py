"""The API's request and response bodies as pydantic models: they validate what comes in, shape what goes
out and make the OpenAPI schema at ``/openapi.json`` describe the real API.

Requests follow OpenAI's and vLLM's field names. Unknown fields are ignored, as vLLM does
(``extra="ignore"``), so clients that send parameters this server does not know keep working; a value out of
range is a 400 naming the parameter. New sampling parameters are new fields on :class:`SamplingFields` (both
endpoints get them); their mapping to the engine is :func:`dsv3.server.generation.sampling_params`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

TokenId = Annotated[int, Field(ge=0)]


class Request(BaseModel):
    """A request body: unknown fields ignored."""

    model_config = ConfigDict(extra="ignore")


class Response(BaseModel):
    """A response body."""


# ----------------------------------------------------------------------------------------------------
# requests

Stop = str | Annotated[list[str], Field(max_length=16)] | None


class StreamOptions(Request):
    include_usage: bool = False
    """Send a last chunk with the request's usage (and ``choices: []``) before ``[DONE]``."""


class SamplingFields(Request):
    """The fields /v1/completions and /v1/chat/completions share: the model, how to sample, when to stop."""

    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    """vLLM's extension: sample among the k most likely tokens (0: all)."""
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int | None, Field(ge=0, lt=2**63)] = None
    """Choice i samples with seed + i: the same request gives the same choices."""
    ignore_eos: bool = False
    """vLLM's extension: keep generating after the end-of-sequence token (benchmarks)."""
    logprobs: Any = None
    """Not supported yet: a request that asks for log-probabilities is a 400."""
    user: str | None = None


def _check_prompt(value: Any) -> Any:
    """A clear message for a malformed ``prompt`` (the union's own errors name every member it tried)."""
    if isinstance(value, str):
        return value
    form = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
    if not isinstance(value, list):
        raise ValueError(form)
    if not value:
        raise ValueError("prompt must not be an empty list")
    if all(isinstance(p, str) for p in value):
        return value
    lists = value if all(isinstance(p, list) for p in value) else [value]
    for ids in lists:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(form if ids else "prompt must not hold an empty list of token ids")
        if min(ids) < 0:
            raise ValueError("token ids must be >= 0")
    return value


Prompt = Annotated[str | list[str] | list[TokenId] | list[list[TokenId]], BeforeValidator(_check_prompt)]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    """A string, a list of strings, a list of token ids, or a list of token-id lists: each entry of a list of
    prompts is completed on its own (choice index = prompt index x n + sample)."""
    echo: bool = False
    """Not supported yet (400 when true)."""


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    """Text, or OpenAI's content parts of type "text"."""


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    """OpenAI's newer name of max_tokens (wins when both are given)."""


class TokenizeCompletionRequest(Request):
    """``POST /tokenize`` of a prompt: the ids /v1/completions would feed the model."""

    model: str | None = None
    prompt: str


class TokenizeChatRequest(Request):
    """``POST /tokenize`` of a conversation, rendered with the server's chat template."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    """End with the assistant marker, as /v1/chat/completions does."""


def _tokenize_form(body: Any) -> str:
    return "TokenizeChatRequest" if isinstance(body, dict) and "messages" in body else "TokenizeCompletionRequest"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_tokenize_form),
]
"""vLLM's two forms: ``{"model", "prompt"}`` or ``{"model", "messages", "add_generation_prompt"}``."""


class DetokenizeRequest(Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]


# ----------------------------------------------------------------------------------------------------
# responses

class PromptTokensDetails(Response):
    cached_tokens: int = 0
    """Prompt tokens whose cache entries came from the prefix cache (counted once per prompt)."""


class Usage(Response):
    prompt_tokens: int
    """Counted once per prompt, not once per choice."""
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(Response):
    """One server-sent event of a streamed completion (``usage`` only in the last, with ``include_usage``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


def _unset(value: Any) -> bool:
    return value is None


class DeltaMessage(Response):
    """What a chunk adds to a choice's message; absent fields are left out (``{}`` in the last chunk)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_unset)
    content: str | None = Field(default=None, exclude_if=_unset)


class ChatCompletionStreamChoice(Response):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class ChatCompletionStreamResponse(Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv3"
    max_model_len: int
    """Tokens of prompt + completion per sequence (the engine's max_seq_len)."""


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Response):
    """Every error, in OpenAI's shape."""

    error: ErrorInfo


class TokenizeResponse(Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Response):
    prompt: str


class VersionResponse(Response):
    version: str


class HealthResponse(Response):
    status: Literal["ok"] = "ok"
    running: int
    """Sequences in the batch."""
    waiting: int
    """Sequences queued for a slot or pages."""
    pending: int
    """Requests accepted and not finished (compared with max_pending)."""
    free_pages: int
    num_pages: int
    last_error: str | None = None
    """The last failed engine step, if any (its requests were failed; the server kept serving)."""
