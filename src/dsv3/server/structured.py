"""Structured output: OpenAI's ``response_format`` (and the grammar of forced tool calls, :mod:`.tools`) as
grammar constraints of the engine's requests.

A :class:`~dsv3.inference.grammar.GrammarFactory` reads the whole vocabulary when built (a second or two for
DeepSeek-V3's 129K tokens) and compiles each new schema once (tens to hundreds of milliseconds): neither may run
on the event loop, where it would stall every stream. :class:`Grammars` builds the factory on first use, on the
tokenizer thread (building encodes a newline, and the tokenizer's special-token switch is shared state), and
makes constraints on a thread of its own (the factory wants one thread making constraints). Apps that never
see a ``response_format`` or forced tool call never build it (nor need xgrammar).

Each choice gets its own constraint object (it holds that sequence's grammar state), told the choice's real
token budget -- ``max_tokens``, lowered to what the context leaves after the prompt, as the engine lowers it --
so that its finishing mode (:mod:`dsv3.inference.finishing`) closes the text in time even for a weak model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from ..inference import TokenConstraint
from .errors import InvalidRequestError, UnsupportedParameterError
from .protocol import ResponseFormat, ResponseFormatText

if TYPE_CHECKING:
    from ..inference.grammar import GrammarFactory
    from .state import ServerState

T = TypeVar("T")


class Grammars:
    """The app's grammar factory, built lazily once, and the thread its constraints are made on."""

    def __init__(self, state: ServerState):
        self._state = state
        self._factory: GrammarFactory | None = None
        self._lock: asyncio.Lock | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-grammar")

    async def factory(self, param: str) -> GrammarFactory:
        """The factory (built on the first call). Without xgrammar: a 400 ``unsupported_parameter`` naming
        ``param``, the field that asked for a constraint."""
        if self._factory is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._factory is None:
                    try:
                        from ..inference.grammar import GrammarFactory
                    except ImportError as e:  # pragma: no cover - xgrammar is in the serve extra
                        raise UnsupportedParameterError(str(e), param=param) from e
                    state = self._state
                    try:
                        self._factory = await state.tokenize(
                            lambda: GrammarFactory(state.tokenizer, state.engine.config.vocab_size))
                    except (ImportError, ValueError) as e:  # no xgrammar, or not a byte-level BPE
                        raise UnsupportedParameterError(f"constrained decoding is not available: {e}",
                                                        param=param) from e
        return self._factory

    async def make(self, param: str, build: Callable[[GrammarFactory], T]) -> T:
        """``build(factory)`` on the grammar thread; its ``ValueError`` (an unsupported schema, a bad tool) is a
        400 naming ``param``."""
        factory = await self.factory(param)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, build, factory)
        except ValueError as e:
            raise InvalidRequestError(str(e), param=param) from e

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def wants_constraint(response_format: ResponseFormat | None) -> bool:
    """Whether ``response_format`` constrains the output (``json_object`` or ``json_schema``)."""
    return response_format is not None and not isinstance(response_format, ResponseFormatText)


async def response_format_constraints(state: ServerState, response_format: ResponseFormat | None,
                                      budgets: list[int]) -> list[TokenConstraint | None] | None:
    """One constraint per choice (``budgets``: each choice's token budget) of ``response_format``, or ``None``
    when it constrains nothing."""
    if not wants_constraint(response_format):
        return None
    spec = response_format.model_dump(by_alias=True)
    return await state.grammars.make(
        "response_format", lambda f: [f.response_format(spec, max_tokens=b) for b in budgets])


def token_budget(state: ServerState, max_tokens: int, prompt: list[int]) -> int:
    """The tokens a choice can really generate: ``max_tokens``, lowered to what the context leaves after the
    prompt (as the engine lowers it)."""
    return max(1, min(max_tokens, state.engine.max_seq_len - len(prompt)))
