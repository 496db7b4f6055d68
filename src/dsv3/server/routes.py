"""The routes around generation: the model list (under /v1, behind the API key like generation), and the
operations routes outside /v1 as vLLM has them: ``/health``, ``/metrics``, ``/version``, ``/tokenize``,
``/detokenize``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from .. import __version__
from .errors import InvalidPromptError, InvalidRequestError, UnavailableError
from .generation import ERRORS
from .protocol import (
    DetokenizeRequest, DetokenizeResponse, HealthResponse, ModelCard, ModelList, TokenizeChatRequest,
    TokenizeRequest, TokenizeResponse, VersionResponse,
)
from .state import ServerState, get_state
from .tools import message_dicts

models_router = APIRouter(tags=["OpenAI"])
"""Mounted under /v1."""
router = APIRouter(tags=["operations"])


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created, max_model_len=state.engine.max_seq_len)


@models_router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(state: ServerState = Depends(get_state)):
    return ModelList(data=[_model_card(state)])


@models_router.get("/models/{name:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(name: str, state: ServerState = Depends(get_state)):
    state.check_model(name)
    return _model_card(state)


@router.get("/health", response_model=HealthResponse, responses={503: ERRORS[503]})
async def health(state: ServerState = Depends(get_state)):
    """200 while the engine thread runs (503 otherwise), with the scheduler's and the cache's load."""
    if not state.loop.alive:
        raise UnavailableError("the engine thread is not running")
    engine, error = state.engine, state.loop.error
    return HealthResponse(running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
                          pending=state.loop.pending, free_pages=engine.cache.num_free_pages,
                          num_pages=engine.cache.num_pages, last_error=None if error is None else repr(error))


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def metrics(state: ServerState = Depends(get_state)):
    """Prometheus metrics, with vLLM's names (``vllm:...``)."""
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/version", response_model=VersionResponse)
async def version():
    return VersionResponse(version=__version__)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, state: ServerState = Depends(get_state)):
    """The token ids the generation endpoints would feed the model: a completion's ``prompt`` encoded as
    /v1/completions does (no BOS added), or ``messages`` rendered with the chat template."""
    state.check_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        messages = message_dicts(body.messages)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            ids = await state.tokenize(lambda: state.template.encode(messages, body.add_generation_prompt, tools,
                                                                     body.continue_final_message))
        except ValueError as e:
            raise InvalidRequestError(str(e), param="messages") from e
    else:
        ids = await state.tokenize(lambda: state.tokenizer.encode(body.prompt))
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_seq_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, state: ServerState = Depends(get_state)):
    """The text of token ids (special tokens kept as their strings)."""
    state.check_model(body.model)
    vocab = state.engine.config.vocab_size
    if body.tokens and max(body.tokens) >= vocab:
        raise InvalidPromptError(f"token ids must lie in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
