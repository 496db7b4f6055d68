"""SFT conversations -> token ids with a per-token "trained" mask (report §5.1's instruction data).

A conversation is rendered whole by the run's :class:`~dsv3.inference.chat.ChatTemplate` (a Jinja template or the
DeepSeek fallback format), exactly as the model will see it at inference time. By default only the assistant's
tokens are targets: each assistant turn from the first token after its generation prompt (``<｜Assistant｜>``,
or the end of tool results) through its closing ``<｜end▁of▁sentence｜>``, so the model learns to stop. System,
user and tool tokens, and the generation prompts, are context only. The report does not say whether its SFT
loss covers prompts; masking them is the common choice (``loss_on="all"`` trains on every token).

Assistant spans are found by incremental rendering, which works for any template: the tokens of assistant
message i are those between ``encode(messages[:i], add_generation_prompt=True)`` and
``encode(messages[:i + 1])``. Where a template does not render a conversation as a growing prefix (one that
rewrites earlier turns, or a tokenizer that merges a marker with the next word), the span is ambiguous and
:func:`encode_conversation` refuses the conversation rather than guess.

Files are JSON Lines, one conversation a line: ``{"messages": [...], "tools": [...]}`` (``tools`` optional, the
OpenAI shapes of :mod:`dsv3.inference.chat`) or ``{"prompt": "...", "completion": "..."}`` (one user turn, one
assistant turn).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.corpus import DataError
from ..inference.chat import ChatTemplate, check_messages

LossOn = Literal["assistant", "all"]


@dataclass
class SFTSample:
    """One conversation's tokens and which of them the loss learns."""

    tokens: list[int]
    trained: list[bool]
    """Same length as ``tokens``: True where the token is a target (it is learnt from the tokens before it)."""

    def __post_init__(self):
        if len(self.tokens) != len(self.trained):
            raise ValueError(f"tokens ({len(self.tokens)}) and trained ({len(self.trained)}) differ in length")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_targets(self) -> int:
        """Tokens that are learnt: trained ones after the first (the first has nothing before it to learn from)."""
        return sum(self.trained[1:])


@dataclass
class Conversation:
    """A conversation as read from a file: its messages, the request's tools, and where it came from."""

    messages: list[dict]
    tools: list[dict] | None = None
    source: str = ""
    """``file:line`` (for error messages); empty for conversations built in code."""


@dataclass
class SFTStats:
    """What was encoded: conversations turned into samples, their tokens and the trained ones."""

    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: int = 0
    """Conversations refused (only with ``skip_errors``)."""
    errors: list[str] = field(default_factory=list)
    """The first few refusals' messages."""

    def add(self, sample: SFTSample) -> None:
        self.samples += 1
        self.tokens += len(sample)
        self.trained_tokens += sum(sample.trained)

    def __str__(self) -> str:
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return (f"{self.samples} samples, {self.tokens} tokens, {self.trained_tokens} trained "
                f"({share:.1%}){skipped}")


def encode_conversation(template: ChatTemplate, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                        loss_on: LossOn = "assistant") -> SFTSample:
    """The whole conversation's tokens (no generation prompt at the end) and its trained mask: assistant turns,
    end marker included (``loss_on="assistant"``), or every token (``"all"``). Raises ``ValueError`` for a
    conversation whose assistant tokens cannot be told apart (module docstring)."""
    if loss_on not in ("assistant", "all"):
        raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
    messages = check_messages(messages)
    tokens = template.encode(messages, add_generation_prompt=False, tools=tools)
    if loss_on == "all":
        return SFTSample(tokens, [True] * len(tokens))
    trained = [False] * len(tokens)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("messages[0] is an assistant message: nothing before it to condition on")
        try:  # a template may refuse a partial conversation
            prompt = template.encode(messages[:i], add_generation_prompt=True, tools=tools)
            upto = template.encode(messages[: i + 1], add_generation_prompt=False, tools=tools)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: rendering the conversation up to this assistant turn: {e}") from None
        if upto[: len(prompt)] != prompt or tokens[: len(upto)] != upto:
            raise ValueError(f"messages[{i}]: the chat template's encoding does not grow by prefixes here "
                             f"(the conversation before this assistant turn, with its generation prompt, is not a "
                             f"prefix of the conversation through it, or that not of the whole), so its tokens "
                             f"cannot be told from the prompt's")
        trained[len(prompt) : len(upto)] = [True] * (len(upto) - len(prompt))
    return SFTSample(tokens, trained)


def encode_all(template: ChatTemplate, conversations: Iterable[Conversation | Sequence[Mapping]],
               loss_on: LossOn = "assistant", skip_errors: bool = False) -> tuple[list[SFTSample], SFTStats]:
    """Samples of ``conversations`` (read ones or plain message lists) and their statistics. A conversation that
    cannot be encoded raises ``DataError`` naming it, or with ``skip_errors`` is counted and left out."""
    samples, stats = [], SFTStats()
    for n, conv in enumerate(conversations):
        if not isinstance(conv, Conversation):
            conv = Conversation(list(conv), source=f"conversation {n}")
        try:
            sample = encode_conversation(template, conv.messages, conv.tools, loss_on)
        except ValueError as e:
            if not skip_errors:
                raise DataError(f"{conv.source or f'conversation {n}'}: {e}") from None
            stats.skipped += 1
            if len(stats.errors) < 5:
                stats.errors.append(f"{conv.source}: {e}")
            continue
        stats.add(sample)
        samples.append(sample)
    return samples, stats


def read_jsonl(path: str | Path) -> Iterator[Conversation]:
    """The conversations of a JSON Lines file (module docstring), validated as they are read; blank lines are
    skipped. Raises ``DataError`` naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _conversation(record, where)


def _conversation(record: object, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise DataError(f"{where}: no 'messages' (nor 'prompt' and 'completion'); keys: {sorted(record)}")
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list")
    try:
        messages = check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, nothing to learn")
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of objects")
    return Conversation(messages, tools or None, where)
