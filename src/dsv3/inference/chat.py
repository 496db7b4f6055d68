"""Chat messages -> prompt token ids, in DeepSeek-V3's chat format, tool calls and tool results included.

A conversation is a list of OpenAI-shaped messages: ``{"role": "system" | "user", "content": str}``,
``{"role": "assistant", "content": str | None, "tool_calls": [{"id", "type": "function", "function":
{"name", "arguments"}}]}`` (``tool_calls`` optional) and ``{"role": "tool", "tool_call_id", "content"}``.
The official checkpoints ship a Jinja ``chat_template`` in ``tokenizer_config.json``; when one is present it
is rendered (with ``jinja2``, in a sandbox, the way ``transformers`` renders it) and the text is encoded with
special-token strings turned into their ids. Without one, the fallback format is used -- the official
template's layout:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>{user}<｜Assistant｜>

with no separator between the parts. System messages are joined with a blank line, as the official template
joins them. An assistant message with tool calls is ``<｜Assistant｜>{content}`` and the calls in
:mod:`dsv3.inference.tool_calls`'s format, then ``<｜end▁of▁sentence｜>``; a run of tool messages is
``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{result}<｜tool▁output▁end｜>`` (each further result after a
newline) ``<｜tool▁outputs▁end｜>``, after which the model answers directly: the generation prompt is empty
there, and an assistant message right after tool results has no ``<｜Assistant｜>``. Where the official
template's bookkeeping misrenders longer conversations (its "first call" and "first output" flags are never
reset, so a second tool-calling turn loses ``<｜tool▁calls▁begin｜>`` and a second run of results
``<｜tool▁outputs▁begin｜>``; a user message after results leaves them unclosed), the fallback renders each
turn as the model writes a turn of that kind. The prompt ends with ``<｜Assistant｜>`` so the model writes the
next assistant turn, which it ends with ``<｜end▁of▁sentence｜>`` (the EOS the engine stops on).

Tools: the official V3 template does not describe the request's ``tools`` to the model. A template that uses
a ``tools`` variable gets them; for one that does not (the official one) and for the fallback, dsv3's
description (:func:`~dsv3.inference.tool_calls.tools_prompt`) is added as one more system message.

The fallback encodes message contents (and tool names and arguments) as plain text, so a user cannot inject
special tokens; the markers are special tokens where the tokenizer has them (the official one does; a BPE
trained by ``dsv3 tokenizer train`` has only BOS / EOS, and encodes the other markers as ordinary text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .tool_calls import (
    ARGS_BEGIN, ARGS_END, CALL_SEPARATOR, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_SEP, arguments_text,
    tools_prompt,
)

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

DEFAULT_FORMAT = "{bos}{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...<｜Assistant｜>"
"""The fallback layout for plain messages (see the module docstring)."""

Message = Mapping[str, object]
ROLES = ("system", "user", "assistant", "tool")


def message_text(content: object) -> str:
    """A message's content as text: a string, or OpenAI-style parts ``[{"type": "text", "text": ...}]``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_calls(calls: object, where: str) -> list[dict]:
    """Validated copies of an assistant message's OpenAI ``tool_calls`` (arguments as JSON text)."""
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise ValueError(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}.tool_calls[{j}] must be {{'type': 'function', 'function': {{'name', "
                             "'arguments'}}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}.tool_calls[{j}].type must be 'function'")
        copy = {"type": "function", "function": {"name": function["name"],
                                                 "arguments": arguments_text(function.get("arguments", "{}"))}}
        if call.get("id") is not None:
            copy["id"] = str(call["id"])
        out.append(copy)
    return out


def check_messages(messages: Sequence[Message]) -> list[dict]:
    """Validated copies: ``{"role", "content"}`` with text content, plus ``tool_calls`` (assistant messages
    that have calls; their content stays ``None`` when it was) and ``tool_call_id`` (tool messages). Raises
    ``ValueError``."""
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(map(repr, ROLES))}, got {role!r}")
        copy: dict = {"role": role, "content": message_text(m.get("content"))}
        if role == "assistant" and m.get("tool_calls"):
            copy["tool_calls"] = _tool_calls(m["tool_calls"], f"messages[{i}]")
            if m.get("content") is None:
                copy["content"] = None  # the official template tells "no content" by None
        if role == "tool" and m.get("tool_call_id") is not None:
            copy["tool_call_id"] = str(m["tool_call_id"])
        out.append(copy)
    return out


class ChatTemplate:
    """Renders conversations for one tokenizer: with a Jinja ``template`` (from tokenizer_config.json) or,
    when ``template`` is ``None``, with the fallback format (module docstring)."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.bos_token = tokenizer.hf.id_to_token(tokenizer.bos_id)
        self.eos_token = tokenizer.hf.id_to_token(tokenizer.eos_id)
        self._compiled, self._renders_tools = _compile(template) if template is not None else (None, False)

    @classmethod
    def load(cls, tokenizer, directory: str | Path | None) -> ChatTemplate:
        """The template of the tokenizer_config.json in ``directory`` (or its ``tokenizer/`` sub-directory,
        as in a ``dsv3 train`` run), else the default."""
        return cls(tokenizer, find_chat_template(directory) if directory is not None else None)

    def _with_tools(self, messages: list[dict], tools: Sequence[Mapping] | None) -> list[dict]:
        """``messages`` with dsv3's tool description as a last system message, unless the template renders
        ``tools`` itself."""
        if not tools or self._renders_tools:
            return messages
        system = [i for i, m in enumerate(messages) if m["role"] == "system"]
        at = system[-1] + 1 if system else 0
        return messages[:at] + [{"role": "system", "content": tools_prompt(tools)}] + messages[at:]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, continue_final_message: bool = False) -> str:
        """The prompt as text (special tokens as their strings). ``tools``: the request's OpenAI tools.
        ``continue_final_message``: the last message, the assistant's, is left open (no end-of-turn after its
        content) for the model to go on with it (vLLM's option; "prefix completion")."""
        messages = self._with_tools(check_messages(messages), tools)
        final = _open_content(messages) if continue_final_message else None
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if self._compiled is None:
            return "".join(t for t, _ in self._default_parts(messages, add_generation_prompt, final is not None))
        if final is None:
            return self._render_jinja(messages, add_generation_prompt, tools)
        # render a marker in place of the content, cut the end of turn after it, then put the content back
        text = self._render_jinja(messages[:-1] + [{**messages[-1], "content": _CONTINUE}], False, tools)
        if text.count(_CONTINUE) != 1:
            raise ValueError("continue_final_message: the chat template does not render the last message's content "
                             "as it is")
        return text[: text.index(_CONTINUE)] + final

    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool, tools) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from e

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, continue_final_message: bool = False) -> list[int]:
        """The prompt's token ids. A Jinja template's text is encoded with special tokens recognised (as
        ``transformers`` does); the default format encodes markers and contents separately."""
        if self._compiled is not None:
            return self.tokenizer.encode(self.render(messages, add_generation_prompt, tools, continue_final_message),
                                         allow_special=True)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
            _open_content(check_messages(messages))
        messages = self._with_tools(check_messages(messages), tools)
        ids: list[int] = []
        for text, special in self._default_parts(messages, add_generation_prompt, continue_final_message):
            if text:
                ids += self.tokenizer.encode(text, allow_special=special)
        return ids

    def _default_parts(self, messages: list[dict], add_generation_prompt: bool,
                       open_last: bool = False) -> list[tuple[str, bool]]:
        """(text, is_marker) pieces of the fallback format; ``open_last``: no end-of-turn after the last
        (assistant) message."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        parts = [(self.bos_token, True), ("\n\n".join(system), False)]
        in_outputs = False  # after tool results, before the model's answer
        for m in messages:
            role, content = m["role"], m["content"] or ""
            if role == "system":
                continue
            if role == "tool":
                parts.append((CALL_SEPARATOR, False) if in_outputs else (TOOL_OUTPUTS_BEGIN, True))
                parts += [(TOOL_OUTPUT_BEGIN, True), (content, False), (TOOL_OUTPUT_END, True)]
                in_outputs = True
                continue
            if role == "user":
                parts += [(TOOL_OUTPUTS_END, True)] if in_outputs else []
                parts += [(USER, True), (content, False)]
            else:  # the model answers right after tool results, else after <｜Assistant｜>
                parts += [(TOOL_OUTPUTS_END if in_outputs else ASSISTANT, True), (content, False)]
                if m.get("tool_calls"):
                    parts.append((TOOL_CALLS_BEGIN, True))
                    for j, call in enumerate(m["tool_calls"]):
                        function = call["function"]
                        parts += [(CALL_SEPARATOR if j else "", False), (TOOL_CALL_BEGIN, True),
                                  (call["type"], False), (TOOL_SEP, True),
                                  (function["name"] + ARGS_BEGIN + function["arguments"] + ARGS_END, False),
                                  (TOOL_CALL_END, True)]
                    parts.append((TOOL_CALLS_END, True))
                if not (open_last and m is messages[-1]):
                    parts.append((self.eos_token, True))
            in_outputs = False
        if in_outputs:
            parts.append((TOOL_OUTPUTS_END, True))
        elif add_generation_prompt:
            parts.append((ASSISTANT, True))
        return parts


_CONTINUE = "\uE000dsv3-continue\uE000"
"""Stands for the continued message's content while a template renders (private-use characters: no template
changes them, no content has them by accident)."""


def _open_content(messages: list[dict]) -> str:
    """The content the model is to continue: the last message's, which must be the assistant's, with text and
    no tool calls."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant" or last.get("tool_calls"):
        raise ValueError("continue_final_message needs the last message to be the assistant's (without tool calls)")
    content = last.get("content")
    if not isinstance(content, str) or not content:
        raise ValueError("continue_final_message needs the last message to have text content to continue")
    return content


def find_chat_template(directory: str | Path) -> str | None:
    """The ``chat_template`` string of ``directory/tokenizer_config.json`` (or of
    ``directory/tokenizer/tokenizer_config.json``), or ``None``. A list of named templates (the newer
    transformers form) gives the one named "default"."""
    d = Path(directory)
    for file in (d / "tokenizer_config.json", d / "tokenizer" / "tokenizer_config.json"):
        if file.is_file():
            template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            return template if isinstance(template, str) else None
    return None


def _compile(template: str):
    """A Jinja template compiled in a sandbox with the helpers chat templates expect, and whether it uses a
    ``tools`` variable."""
    try:
        from jinja2 import meta
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is in the serve extra
        raise ImportError("rendering a tokenizer's chat_template needs jinja2: pip install 'dsv3[serve]'") from e

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    renders_tools = "tools" in meta.find_undeclared_variables(env.parse(template))
    return env.from_string(template), renders_tools
