"""The API's request and response bodies as pydantic models: they validate what comes in, shape what goes
out and make the OpenAPI schema at ``/openapi.json`` describe the real API.

Requests follow OpenAI's and vLLM's field names. Unknown fields are ignored, as vLLM does
(``extra="ignore"``), so clients that send parameters this server does not know keep working; a value out of
range is a 400 naming the parameter. New sampling parameters are new fields on :class:`SamplingFields` (both
endpoints get them); their mapping to the engine is :func:`dsv3.server.generation.sampling_params`, the checks
pydantic's bounds cannot make :func:`dsv3.server.generation.check_sampling`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from ..inference.sampling import MAX_LOGPROBS

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
    """The fields /v1/completions and /v1/chat/completions share: the model, how to sample, when to stop.
    ``logprobs`` differs between them (an int for completions, a bool for chat), so each declares its own."""

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
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    """Subtracted once from the logit of every token already in the completion (the prompt does not count)."""
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    """Subtracted from a token's logit once per occurrence in the completion so far."""
    repetition_penalty: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None
    """vLLM's extension: the logits of tokens seen in the prompt or the completion are divided by it when positive,
    multiplied when negative (1: off; > 1 discourages repetition)."""
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = None
    """Token id (a string in JSON, as OpenAI sends it) -> bias in [-100, 100] added to its logit before sampling."""
    min_p: Annotated[float | None, Field(ge=0, le=1)] = None
    """vLLM's extension: drop the tokens less likely than min_p times the most likely one (after temperature)."""
    min_tokens: Annotated[int, Field(ge=0)] = 0
    """vLLM's extension: the stop tokens (EOS, stop_token_ids) are masked until this many tokens were generated
    (at most max_tokens). Stop strings still apply."""
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    """vLLM's extension: finish ("stop") after any of these tokens (the EOS always, unless ignore_eos)."""
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


class JSONSchemaFormat(Request):
    """``response_format.json_schema``: OpenAI's named schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, serialize_by_alias=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON schema the output must satisfy (the features constrained decoding cannot enforce are a 400)."""
    strict: bool | None = None
    """OpenAI's strict mode: properties and items the schema leaves open are forbidden."""


class ResponseFormatText(Request):
    type: Literal["text"]


class ResponseFormatJSONObject(Request):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]
"""OpenAI's ``response_format``: free text, any JSON object, or JSON valid against a schema (grammar-constrained
decoding, finished within ``max_tokens``: :mod:`dsv3.server.structured`)."""


class StructuredFields(Request):
    """What both generation endpoints take to constrain the output (vLLM accepts ``response_format`` on
    completions too)."""

    response_format: ResponseFormat | None = None


class CompletionRequest(StructuredFields, SamplingFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    """A string, a list of strings, a list of token ids, or a list of token-id lists: each entry of a list of
    prompts is completed on its own (choice index = prompt index x n + sample)."""
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    """Tokens to generate (default 16); 0 only with ``echo`` (the prompt and its log-probabilities alone)."""
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    """N: each token's log-probability and the N most likely alternatives plus the chosen token (OpenAI's legacy
    format; OpenAI allows up to 5, vLLM and this server 20)."""
    echo: bool = False
    """Prepend the prompt to each choice's text (and, with ``logprobs``, its tokens' log-probabilities, the first
    token's ``None``)."""


class FunctionCall(Request):
    name: str
    arguments: str | dict[str, Any] = "{}"
    """JSON text (OpenAI's); an object is accepted too."""


class ToolCallItem(Request):
    """An assistant message's call, as OpenAI's ``tool_calls[i]``."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    """Text, or OpenAI's content parts of type "text"."""
    tool_calls: list[ToolCallItem] | None = None
    """An assistant message's calls (rendered in DeepSeek-V3's tool-call format)."""
    tool_call_id: str | None = None
    """A ``tool`` message's: the call it answers."""
    name: str | None = None


class FunctionDefinition(Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """The arguments' JSON schema (default: an object without properties)."""
    strict: bool | None = None
    """OpenAI's strict mode, applied when the call is grammar-constrained."""


class Tool(Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
"""``none``: no tool calls (tools left out of the prompt, the output not parsed); ``auto``: the model decides
(the output parsed for calls); ``required`` / a named function: the output is grammar-constrained to calls."""


class ChatCompletionRequest(StructuredFields, SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    """OpenAI's newer name of max_tokens (wins when both are given)."""
    logprobs: bool | None = False
    """Each generated token's log-probability in ``choices[i].logprobs.content``."""
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    """With ``logprobs``: the N most likely alternatives of each token."""
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    """Functions the model may call: described in the prompt, its calls parsed into ``message.tool_calls``."""
    tool_choice: ToolChoice | None = None
    """Default ``auto`` with tools, ``none`` without."""
    parallel_tool_calls: bool | None = None
    """Whether ``required`` may make several calls (default true)."""
    add_generation_prompt: bool = True
    """vLLM's: end the prompt with the assistant's turn opening (set false with ``continue_final_message``)."""
    continue_final_message: bool = False
    """vLLM's: the last message is the assistant's, left open, and the model continues it ("prefix
    completion"); needs ``add_generation_prompt`` false."""
    echo: bool = False
    """vLLM's: the reply starts with the last message's content when that message is the assistant's."""


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
    continue_final_message: bool = False
    """Leave the last (assistant) message open, as /v1/chat/completions does with it."""
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    """Rendered into the prompt as /v1/chat/completions does."""


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


class CompletionLogprobs(Response):
    """OpenAI's legacy completions ``logprobs``: one entry per token of the choice's text (the prompt's first with
    ``echo``). Token strings are each token decoded on its own (as vLLM), so a character split over tokens shows
    as U+FFFD in each."""

    tokens: list[str]
    token_logprobs: list[float | None]
    """Under the model's raw distribution (before penalties, biases, temperature, top-k / top-p); ``None`` for the
    first prompt token, which has no context."""
    top_logprobs: list[dict[str, float] | None]
    """The N most likely tokens and the chosen one (up to N + 1 entries); tokens whose strings are equal share
    one key (the later one's value, as vLLM)."""
    text_offset: list[int]
    """Each token's character offset in the choice's text: the sum of the lengths of the token strings before
    it (as vLLM; a stream's chunks continue the count, so they concatenate to the non-streamed object)."""


FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
"""``tool_calls``: the chat message ended with tool calls."""


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


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


class FunctionCallOut(Response):
    name: str
    arguments: str
    """JSON text, as the model wrote it."""


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    """``None`` when the message is only tool calls."""
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda v: v is None)


class TopLogprob(Response):
    token: str
    """The token decoded on its own."""
    logprob: float
    bytes: list[int] | None = None
    """The token's own bytes (for a byte-level BPE; a character split over tokens is whole in their
    concatenation), else the UTF-8 of ``token``."""


class ChatTokenLogprob(TopLogprob):
    """One token of the message, under the model's raw distribution (before penalties, biases, temperature,
    top-k / top-p)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """The ``top_logprobs`` most likely tokens at this position, most likely first."""


class ChatLogprobs(Response):
    """OpenAI's chat ``logprobs``: one entry per generated token (a final stop token, e.g. EOS, included)."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None
    """Always ``None`` (no refusals)."""


class ChatCompletionChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


def _unset(value: Any) -> bool:
    return value is None


class DeltaFunction(Response):
    name: str | None = Field(default=None, exclude_if=_unset)
    """In a call's first delta."""
    arguments: str | None = Field(default=None, exclude_if=_unset)
    """The next piece of the arguments' JSON text ("" in the first delta)."""


class DeltaToolCall(Response):
    """A piece of call ``index``: its first has ``id``, ``type`` and the function's name."""

    index: int
    id: str | None = Field(default=None, exclude_if=_unset)
    type: Literal["function"] | None = Field(default=None, exclude_if=_unset)
    function: DeltaFunction


class DeltaMessage(Response):
    """What a chunk adds to a choice's message; absent fields are left out (``{}`` in the last chunk)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_unset)
    content: str | None = Field(default=None, exclude_if=_unset)
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=_unset)


class ChatCompletionStreamChoice(Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    """The log-probabilities of the tokens since the previous chunk of this choice."""
    finish_reason: FinishReason | None = None


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
