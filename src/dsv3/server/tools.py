"""Tools on ``/v1/chat/completions``: OpenAI's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` over
DeepSeek-V3's tool-call format (:mod:`dsv3.inference.tool_calls`).

What ``tool_choice`` does (default ``auto`` when ``tools`` are given, else ``none``):

* ``none``: the model is not to call tools, so the tools are left out of the prompt and the output is returned
  as content, unparsed (earlier calls and results in the conversation are still rendered);
* ``auto``: the tools are rendered into the prompt (by the chat template, or dsv3's description as a system
  message) and the model writes freely; its output is parsed for DeepSeek-V3 tool calls;
* ``required`` or ``{"type": "function", "function": {"name": ...}}``: as ``auto``, and the output is
  grammar-constrained to tool calls (any of the tools, several when ``parallel_tool_calls``; or exactly one call
  of the named one) whose arguments are valid against the function's ``parameters`` schema, finished within
  ``max_tokens``: even a weak model returns calls that parse.

Parsed calls become ``message.tool_calls`` (the content before them ``content``, ``None`` when empty) and the
finish reason ``tool_calls``; streamed, :class:`ToolStream` turns the text deltas into content deltas and
``delta.tool_calls`` pieces with the same parser, so a stream and a whole response agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..inference.tool_calls import ToolCallStreamParser, function_specs, parse_tool_calls
from .errors import InvalidRequestError
from .protocol import (
    AssistantMessage, ChatCompletionRequest, ChatMessage, DeltaFunction, DeltaMessage, DeltaToolCall,
    FunctionCallOut, NamedToolChoice, ToolCallOut,
)


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict]:
    """The request's messages as the chat template takes them (``developer`` as ``system``; ``tool_calls``
    and ``tool_call_id`` kept)."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        d["role"] = "system" if m.role == "developer" else m.role
        d.setdefault("content", None)
        out.append(d)
    return out


@dataclass
class ToolPlan:
    """What a request's tool fields mean for the prompt, the constraint and the response."""

    tools: list[dict] | None = None
    """The OpenAI tools rendered into the prompt (``None``: none)."""
    parse: bool = False
    """Parse the output for tool calls."""
    forced: str | dict | None = None
    """``"required"`` or the named choice: the output is constrained to calls (:meth:`GrammarFactory.tool_call`)."""
    parallel: bool = True


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` (400s naming the field at fault) and decide what they do."""
    choice = body.tool_choice
    parallel = body.parallel_tool_calls is not False
    if not body.tools:
        if choice is not None and choice != "none":
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    try:
        names = {spec["name"] for spec in function_specs(tools)}
    except ValueError as e:
        raise InvalidRequestError(str(e), param="tools") from e
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        return ToolPlan(tools, parse=True, parallel=parallel)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise InvalidRequestError(f"tool_choice names the function {name!r}, which is not among the tools",
                                      param="tool_choice")
        return ToolPlan(tools, parse=True, forced=choice.model_dump(), parallel=False)
    return ToolPlan(tools, parse=True, forced="required", parallel=parallel)


def finish_reason(reason: str | None, has_calls: bool, named: bool = False) -> str | None:
    """``tool_calls`` for a message that ended ("stop") with calls; otherwise the engine's reason. A call forced
    by a named ``tool_choice`` ends with ``stop``, as OpenAI's API answers it."""
    return "tool_calls" if has_calls and reason == "stop" and not named else reason


def chat_message(text: str, parse: bool) -> tuple[AssistantMessage, bool]:
    """The assistant message of a whole completion, and whether it has tool calls: with ``parse``, DeepSeek-V3
    tool calls become ``tool_calls`` and the text before them the content (``None`` when empty)."""
    if not parse:
        return AssistantMessage(content=text), False
    content, calls = parse_tool_calls(text)
    if not calls:
        return AssistantMessage(content=content), False
    return AssistantMessage(content=content or None, tool_calls=[
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]), True


class ToolStream:
    """One choice's stream parsed for tool calls: text deltas in, OpenAI delta messages out."""

    def __init__(self):
        self.parser = ToolCallStreamParser()

    @property
    def has_calls(self) -> bool:
        return bool(self.parser.calls)

    def feed(self, text: str, final: bool) -> list[DeltaMessage]:
        """The delta messages of the next text (``final``: the completion has ended; flush what was held)."""
        deltas = self.parser.feed(text) if text else []
        if final:
            deltas += self.parser.finish()
        return [_delta_message(d) for d in deltas]


def _delta_message(delta: dict) -> DeltaMessage:
    if "content" in delta:
        return DeltaMessage(content=delta["content"])
    return DeltaMessage(tool_calls=[
        DeltaToolCall(index=c["index"], id=c.get("id"), type=c.get("type"),
                      function=DeltaFunction(name=c["function"].get("name"), arguments=c["function"]["arguments"]))
        for c in delta["tool_calls"]])
