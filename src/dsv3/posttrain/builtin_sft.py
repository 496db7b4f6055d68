"""The built-in SFT data, so that ``dsv3 sft RUN`` needs nothing else: questions about the Python standard
library answered from its docstrings, and the arithmetic task (:mod:`.tasks`) with its reference solutions.

A model pre-trained by ``dsv3 train`` on the standard library's source has read these docstrings; SFT teaches it
the chat format (report §5.1: instruction data in the conversation template) and the boxed-answer format that
GRPO then rewards. Everything is a pure function of the Python version and the arguments.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import zlib

from .tasks import ArithmeticTask

STDLIB_MODULES = (
    "builtins", "string", "textwrap", "json", "os.path", "math", "cmath", "itertools", "functools", "operator",
    "collections", "heapq", "bisect", "statistics", "fractions", "decimal", "random", "re", "shlex", "fnmatch",
    "difflib", "base64", "binascii", "zlib", "struct", "html", "urllib.parse", "calendar", "datetime", "copy",
    "pprint", "unicodedata", "keyword", "ipaddress", "dataclasses", "contextlib", "csv",
)
"""Pure modules whose public functions and classes are asked about, in this order."""

BUILTIN_TYPES = (str, bytes, int, float, list, tuple, dict, set)
"""Built-in types whose public methods are asked about too (``str.split``)."""

QUESTIONS = (
    "What does `{name}` do?",
    "Explain `{name}` in Python.",
    "What is `{name}` for?",
    "Describe `{name}` from the Python standard library.",
)

MAX_ANSWER_CHARS = 480
"""Longer first paragraphs are cut at a sentence end (or the entry left out)."""
MAX_SIGNATURE_CHARS = 100
"""Longer signatures are left out of the answer."""

_USAGE = re.compile(r"^[\w.]+\(.*\)")  # old C docstrings open with usage lines: "name(args) -> result"
_FUNCTION_REPR = re.compile(r"<function ([\w.]+) at 0x[0-9a-f]+>")


def _public(module) -> list[tuple[str, object]]:
    """(name, object) of the module's public routines and classes (not exceptions), sorted by name. Without an
    ``__all__``, only objects defined there (or in its C accelerator ``_module``), not re-exports."""
    names = getattr(module, "__all__", None)
    if names is None:
        home = (module.__name__, "_" + module.__name__)
        names = [n for n in dir(module) if getattr(getattr(module, n), "__module__", None) in home]
    out = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue  # exception classes: one-line docstrings that say little
        out.append((name, obj))
    return out


def _first_paragraph(doc: str) -> str | None:
    """The docstring's first descriptive paragraph on one line, at most MAX_ANSWER_CHARS (cut at a sentence), or
    None. Paragraphs of usage lines or examples are passed over; a paragraph that mixes usage lines and their
    continuations (``dict``'s) gives None."""
    paragraphs = [p.strip().splitlines() for p in doc.strip().split("\n\n") if p.strip()]
    while len(paragraphs) > 1 and (all(_USAGE.match(line) for line in paragraphs[0])
                                   or paragraphs[0][0].startswith(">>>")):
        paragraphs.pop(0)
    if not paragraphs or (len(paragraphs[0]) > 1 and _USAGE.match(paragraphs[0][0])):
        return None
    text = " ".join(" ".join(paragraphs[0]).split())
    if len(text) > MAX_ANSWER_CHARS:
        end = text.rfind(". ", 0, MAX_ANSWER_CHARS)
        if end < 0:
            return None
        text = text[: end + 1]
    return text if len(text) >= 10 else None


def _signature(obj: object) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):  # many C functions have none
        return ""
    # defaults printed with their memory address would make the data differ from one process to the next
    sig = _FUNCTION_REPR.sub(r"\1", sig)
    return sig if len(sig) <= MAX_SIGNATURE_CHARS and " at 0x" not in sig else ""


def _entries() -> list[tuple[str, object]]:
    """(qualified name, object) of everything asked about, in a fixed order."""
    entries = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        prefix = "" if module_name == "builtins" else module_name + "."
        entries += [(prefix + name, obj) for name, obj in _public(module)]
    for cls in BUILTIN_TYPES:
        for name in sorted(vars(cls)):
            if not name.startswith("_") and inspect.isroutine(vars(cls)[name]):
                entries.append((f"{cls.__name__}.{name}", getattr(cls, name)))
    return entries


def stdlib_conversations() -> list[list[dict]]:
    """One user question and assistant answer per documented public function or class of
    :data:`STDLIB_MODULES` and method of :data:`BUILTIN_TYPES`: the first paragraph of its docstring, after its
    signature where ``inspect`` knows one."""
    conversations, seen = [], set()
    for name, obj in _entries():
        paragraph = _first_paragraph(inspect.getdoc(obj) or "")
        if paragraph is None or name in seen:
            continue
        seen.add(name)
        question = QUESTIONS[zlib.crc32(name.encode()) % len(QUESTIONS)].format(name=name)
        signature = _signature(obj)
        answer = f"`{name}{signature}`: {paragraph}" if signature else f"`{name}`: {paragraph}"
        conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return conversations


def arithmetic_conversations(n: int, task: ArithmeticTask = ArithmeticTask()) -> list[list[dict]]:
    """The first ``n`` training problems of ``task`` (never a test problem) with their reference solutions."""
    return [task.messages(p) + [{"role": "assistant", "content": task.solution(p)}]
            for p in task.problems(n, split="train")]


def builtin_conversations(n_arithmetic: int = 4000, seed: int = 0, task: ArithmeticTask = ArithmeticTask()
                          ) -> list[list[dict]]:
    """The built-in SFT set: :func:`stdlib_conversations` and ``n_arithmetic`` arithmetic problems, in an order
    shuffled by ``seed``."""
    conversations = stdlib_conversations() + arithmetic_conversations(n_arithmetic, task)
    random.Random(seed).shuffle(conversations)
    return conversations
