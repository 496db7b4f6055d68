"""Chat messages -> prompt token ids, in DeepSeek-V3's chat format.

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}`` messages. The
official checkpoints ship a Jinja ``chat_template`` in ``tokenizer_config.json``; when one is present it is
rendered (with ``jinja2``, in a sandbox, the way ``transformers`` renders it) and the text is encoded with
special-token strings turned into their ids. Without one, :data:`DEFAULT_FORMAT` is used -- the same layout
as the official template for plain text messages:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜><｜User｜>{user}<｜Assistant｜>

There is no separator between the parts (no newlines). Only the last system message is used (as the official
template does); the prompt ends with ``<｜Assistant｜>`` so the model writes the next assistant turn, which it
ends with ``<｜end▁of▁sentence｜>`` (the EOS the engine stops on). The default format encodes the message
contents as plain text, so a user cannot inject special tokens; the markers are special tokens where the
tokenizer has them (the official one does; a BPE trained by ``dsv3 tokenizer train`` has only BOS / EOS, and
encodes the other markers as ordinary text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

DEFAULT_FORMAT = "{bos}{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>...<｜Assistant｜>"
"""The fallback layout (see the module docstring)."""

Message = Mapping[str, object]


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


def check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Validated copies ``{"role", "content"}`` with text content; raises ``ValueError``."""
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}")
        out.append({"role": role, "content": message_text(m.get("content"))})
    return out


class ChatTemplate:
    """Renders conversations for one tokenizer: with a Jinja ``template`` (from tokenizer_config.json) or,
    when ``template`` is ``None``, with :data:`DEFAULT_FORMAT`."""

    def __init__(self, tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.bos_token = tokenizer.hf.id_to_token(tokenizer.bos_id)
        self.eos_token = tokenizer.hf.id_to_token(tokenizer.eos_id)
        self._compiled = _compile(template) if template is not None else None

    @classmethod
    def load(cls, tokenizer, directory: str | Path | None) -> ChatTemplate:
        """The template of the tokenizer_config.json in ``directory`` (or its ``tokenizer/`` sub-directory,
        as in a ``dsv3 train`` run), else the default."""
        return cls(tokenizer, find_chat_template(directory) if directory is not None else None)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as text (special tokens as their strings)."""
        messages = check_messages(messages)
        if self._compiled is not None:
            from jinja2.exceptions import TemplateError

            try:
                return self._compiled.render(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token, eos_token=self.eos_token,
                )
            except TemplateError as e:
                raise ValueError(f"chat template: {e}") from e
        return "".join(text for text, _ in self._default_parts(messages, add_generation_prompt))

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids. A Jinja template's text is encoded with special tokens recognised (as
        ``transformers`` does); the default format encodes markers and contents separately."""
        messages = check_messages(messages)
        if self._compiled is not None:
            return self.tokenizer.encode(self.render(messages, add_generation_prompt), allow_special=True)
        ids: list[int] = []
        for text, special in self._default_parts(messages, add_generation_prompt):
            if text:
                ids += self.tokenizer.encode(text, allow_special=special)
        return ids

    def _default_parts(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """(text, is_marker) pieces of :data:`DEFAULT_FORMAT`."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        parts = [(self.bos_token, True), (system[-1] if system else "", False)]
        for m in messages:
            if m["role"] == "user":
                parts += [(USER, True), (m["content"], False)]
            elif m["role"] == "assistant":
                parts += [(ASSISTANT, True), (m["content"], False), (self.eos_token, True)]
        if add_generation_prompt:
            parts.append((ASSISTANT, True))
        return parts


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
    """A Jinja template compiled in a sandbox with the helpers chat templates expect."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is in the serve extra
        raise ImportError("rendering a tokenizer's chat_template needs jinja2: pip install 'dsv3[serve]'") from e

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
