"""What the routes of one app share: the engine, its loop thread, the chat template, the metrics, the options.

:func:`~dsv3.server.app.create_app` builds one :class:`ServerState` and keeps it on ``app.state.server``; the
routes (module-level, in :class:`fastapi.APIRouter` s) reach it through the :func:`get_state` dependency, so
two apps in one process never share anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

from fastapi import Request

from ..inference import Engine
from ..inference.chat import ChatTemplate
from .errors import ContextLengthError, InvalidPromptError, ModelNotFoundError
from .logprobs import TokenTexts
from .loop import EngineLoop
from .metrics import ServerMetrics
from .structured import Grammars

T = TypeVar("T")


@dataclass
class ServerState:
    engine: Engine
    loop: EngineLoop
    model_name: str
    template: ChatTemplate
    metrics: ServerMetrics
    created: int
    """When the app was made (Unix seconds): the model card's ``created``."""
    max_pending: int | None = None
    api_key: str | None = None
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-tokenizer"))
    """Tokenizing runs here: off the event loop (a long prompt would stall every stream) and off the engine
    thread (it would stall every sequence), on one thread because the tokenizer's special-token switch is
    shared state."""

    @cached_property
    def grammars(self) -> Grammars:
        """Grammar constraints (``response_format``, forced tool calls): the factory is built on first use."""
        return Grammars(self)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @cached_property
    def token_texts(self) -> TokenTexts:
        """Each token's string and bytes for log-probabilities, cached per id."""
        return TokenTexts(self.tokenizer)

    async def tokenize(self, fn: Callable[[], T]) -> T:
        """``fn()`` (which uses the tokenizer or chat template) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn)

    def check_model(self, name: str | None) -> None:
        """A request may name the served model or none; anything else is OpenAI's 404 ``model_not_found``."""
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                                     param="model")

    def check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        """A prompt the engine can take: not empty, ids in the vocabulary, room left for a token."""
        if not ids:
            raise InvalidPromptError("the prompt is empty", param=param)
        limit = self.engine.max_seq_len
        if len(ids) >= limit:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; this model serves {limit} tokens of prompt "
                                     f"and completion together", param=param)
        vocab = self.engine.config.vocab_size
        if max(ids) >= vocab:
            raise InvalidPromptError(f"token ids must lie in [0, {vocab})", param=param)


def get_state(request: Request) -> ServerState:
    """The dependency through which routes reach their app's :class:`ServerState`."""
    return request.app.state.server
