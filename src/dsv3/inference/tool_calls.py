"""DeepSeek-V3's tool-call text: rendering tool calls, tool results and tool definitions, and parsing a
completion (whole or streamed) back into OpenAI-shaped tool calls.

The official chat template (``tokenizer_config.json`` of deepseek-ai/DeepSeek-V3) writes an assistant turn
that calls tools as::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME2 ... ```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>

(calls separated by one newline, text before ``<｜tool▁calls▁begin｜>`` being the message content), and tool
results as ``<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>`` (more results each
after a newline) ``<｜tool▁outputs▁end｜>``, after which the model writes its answer directly. The official
tokenizer has each marker as one special token; a tokenizer trained by ``dsv3 tokenizer train`` does not,
and encodes the same strings as plain text -- the text, and therefore everything in this module, is the same.

The official template does not describe the available tools to the model; :func:`tools_prompt` is dsv3's own
description, which :mod:`dsv3.inference.chat` adds to the system prompt when a template does not render
``tools`` itself.

Parsing is one state machine, :class:`ToolCallStreamParser`, fed text deltas; :func:`parse_tool_calls` feeds
it the whole text, so a streamed parse and a whole parse agree by construction, however the text is split.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"

ARGS_BEGIN = "\n```json\n"
"""Between a call's function name and its JSON arguments."""
ARGS_END = "\n```"
"""After the arguments, before ``<｜tool▁call▁end｜>``."""
CALL_SEPARATOR = "\n"
"""Between two calls of one turn, and between two tool outputs."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: ``arguments`` is the JSON text exactly as the model wrote it."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict:
        """The OpenAI ``message.tool_calls[i]`` object."""
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id(index: int = 0) -> str:
    """A fresh OpenAI-style call id (``call_`` and 24 hex digits); ``index`` is unused."""
    return "call_" + uuid.uuid4().hex[:24]


def arguments_text(arguments: object) -> str:
    """A call's arguments as JSON text: strings pass through unchanged (OpenAI sends JSON text), anything else
    (some clients send an object) is serialised compactly."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def format_tool_call(name: str, arguments: object, type: str = "function") -> str:
    """One call in DeepSeek-V3's format, from ``<｜tool▁call▁begin｜>`` to ``<｜tool▁call▁end｜>``."""
    return f"{TOOL_CALL_BEGIN}{type}{TOOL_SEP}{name}{ARGS_BEGIN}{arguments_text(arguments)}{ARGS_END}{TOOL_CALL_END}"


def format_tool_calls(calls: Sequence[ToolCall | Mapping]) -> str:
    """The tool-call block of an assistant turn (without the EOS that ends the turn); ``calls`` are
    :class:`ToolCall` or OpenAI ``tool_calls`` items."""
    parts = []
    for call in calls:
        if isinstance(call, ToolCall):
            parts.append(format_tool_call(call.name, call.arguments, call.type))
        else:
            function = call["function"]
            parts.append(format_tool_call(function["name"], function.get("arguments", "{}"),
                                          call.get("type", "function")))
    return TOOL_CALLS_BEGIN + CALL_SEPARATOR.join(parts) + TOOL_CALLS_END


def function_specs(tools: Sequence[Mapping]) -> list[dict]:
    """The ``function`` objects of OpenAI ``tools`` (``[{"type": "function", "function": {...}}]``), checked:
    a valid unique ``name``, ``parameters`` a JSON-schema object (default: an object with no properties).
    Raises ``ValueError``."""
    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise ValueError("tools must be a non-empty list")
    specs, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"tools[{i}].function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _, ., -")
        if name in names:
            raise ValueError(f"tools[{i}]: function name {name!r} is used twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        specs.append({**function, "parameters": dict(parameters)})
    return specs


def tools_prompt(tools: Sequence[Mapping]) -> str:
    """dsv3's description of the available tools for the system prompt (the official DeepSeek-V3 template has
    none): each function's name, description and parameter schema, and the exact call format."""
    lines = ["## Tools", "", "You can call these functions:", ""]
    for spec in function_specs(tools):
        lines.append(f"### {spec['name']}")
        if spec.get("description"):
            lines.append(str(spec["description"]))
        lines.append("Parameters (JSON schema): " + json.dumps(spec["parameters"], ensure_ascii=False))
        lines.append("")
    example = format_tool_call("NAME", "ARGUMENTS")
    lines.append(f"To call functions, answer with {TOOL_CALLS_BEGIN}, then each call as {example} (one newline "
                 f"between calls, ARGUMENTS a JSON object), then {TOOL_CALLS_END}.")
    return "\n".join(lines)


def _held(text: str, *markers: str) -> int:
    """Length of the longest tail of ``text`` that is a proper start of one of ``markers`` (it must be held
    back: the next delta may complete the marker)."""
    for n in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in markers):
            return n
    return 0


class ToolCallStreamParser:
    """Incremental parse of a completion in DeepSeek-V3's tool-call format into OpenAI ``delta`` objects.

    ``feed(text)`` returns the deltas the new text completes, ``finish()`` those of the held-back rest:
    ``{"content": str}``; ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}]}`` when a call's name is complete; ``{"tool_calls": [{"index", "function":
    {"arguments": str}}]}`` for argument text as it arrives. Text that may be the start of a marker is held
    back until it is decided.

    How text is read: everything before ``<｜tool▁calls▁begin｜>`` is content; after it, each
    ``<｜tool▁call▁begin｜>TYPE<｜tool▁sep｜>NAME\\n```json\\n`` starts a call whose arguments run to the next
    ``\\n```<｜tool▁call▁end｜>`` (or to the end of the text, when it was cut off); text between calls is
    ignored, and so is everything after ``<｜tool▁calls▁end｜>``.
    """

    def __init__(self, make_id: Callable[[int], str] = new_call_id):
        self._make_id = make_id
        self._state = "content"  # content -> calls <-> header -> arguments; done
        self._buf = ""  # text not yet consumed by the state machine
        self.content = ""
        """The content so far (text before the tool calls)."""
        self._names: list[str] = []
        self._ids: list[str] = []
        self._args: list[str] = []
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        """The calls started so far (the last one's arguments may still grow)."""
        return [ToolCall(i, n, a) for i, n, a in zip(self._ids, self._names, self._args)]

    def feed(self, text: str) -> list[dict]:
        """The deltas of ``text``, the next piece of the completion."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[dict]:
        """The deltas of the text still held back: the completion has ended."""
        if self._finished:
            return []
        self._finished = True
        return self._run(final=True)

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        while self._step(out, final):
            pass
        return _merge(out)

    def _step(self, out: list[dict], final: bool) -> bool:
        """Consume what can be decided; True when the state changed (run again)."""
        buf = self._buf
        if self._state == "content":
            at = buf.find(TOOL_CALLS_BEGIN)
            if at >= 0:
                self._content(out, buf[:at])
                self._buf, self._state = buf[at + len(TOOL_CALLS_BEGIN):], "calls"
                return True
            keep = 0 if final else _held(buf, TOOL_CALLS_BEGIN)
            self._content(out, buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        if self._state == "calls":
            begin, end = buf.find(TOOL_CALL_BEGIN), buf.find(TOOL_CALLS_END)
            if end >= 0 and (begin < 0 or end < begin):
                self._buf, self._state = "", "done"
                return False
            if begin >= 0:
                self._buf, self._state = buf[begin + len(TOOL_CALL_BEGIN):], "header"
                return True
            keep = 0 if final else _held(buf, TOOL_CALL_BEGIN, TOOL_CALLS_END)
            self._buf = buf[len(buf) - keep:]  # text between calls is dropped
            return False
        if self._state == "header":
            at = buf.find(ARGS_BEGIN)
            if at < 0:
                if final:
                    self._buf = ""  # a call cut off before its arguments: no call
                return False
            header = buf[:at]
            name = header.split(TOOL_SEP, 1)[1] if TOOL_SEP in header else header
            index = len(self._names)
            self._names.append(name)
            self._ids.append(self._make_id(index))
            self._args.append("")
            out.append({"tool_calls": [{"index": index, "id": self._ids[-1], "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
            self._buf, self._state = buf[at + len(ARGS_BEGIN):], "arguments"
            return True
        if self._state == "arguments":
            terminator = ARGS_END + TOOL_CALL_END
            at = buf.find(terminator)
            if at >= 0:
                self._arguments(out, buf[:at])
                self._buf, self._state = buf[at + len(terminator):], "calls"
                return True
            keep = 0 if final else _held(buf, terminator)
            self._arguments(out, buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        self._buf = ""  # done: the rest is ignored
        return False

    def _content(self, out: list[dict], text: str) -> None:
        if text:
            self.content += text
            out.append({"content": text})

    def _arguments(self, out: list[dict], text: str) -> None:
        if text:
            index = len(self._args) - 1
            self._args[index] += text
            out.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})


def _merge(deltas: list[dict]) -> list[dict]:
    """Adjacent content deltas, and adjacent argument deltas of one call, joined (fewer, larger chunks)."""
    merged: list[dict] = []
    for d in deltas:
        last = merged[-1] if merged else None
        if last is not None and "content" in d and "content" in last:
            last["content"] += d["content"]
        elif (last is not None and "tool_calls" in d and "tool_calls" in last
              and d["tool_calls"][0]["index"] == last["tool_calls"][0]["index"] and "id" not in d["tool_calls"][0]):
            last["tool_calls"][0]["function"]["arguments"] += d["tool_calls"][0]["function"]["arguments"]
        else:
            merged.append(d)
    return merged


def parse_tool_calls(text: str, make_id: Callable[[int], str] = new_call_id) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of a whole completion (see :class:`ToolCallStreamParser` for how it is read);
    ``calls`` is empty when the text has no tool-call block, and ``content`` then is the whole text."""
    parser = ToolCallStreamParser(make_id)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
