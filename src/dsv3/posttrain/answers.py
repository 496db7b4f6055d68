"""Reading a final answer out of a completion: the ``\\boxed{...}`` convention of the report's math rewards
(§5.2.1: "the model is required to provide the final answer in a designated format (e.g., in a box)")."""

from __future__ import annotations

import re

_BOX = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` in ``text`` (braces inside balanced), or ``None``."""
    start = text.rfind(_BOX)
    while start != -1:
        depth, i = 1, start + len(_BOX)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOX):i - 1].strip()
        start = text.rfind(_BOX, 0, start)  # unclosed: an earlier, closed box may still count
    return None


_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def normalise_number(answer: str) -> str | None:
    """A numeric answer in one canonical form (``"1,234"`` / ``" +1234.0 "`` -> ``"1234"``), or ``None``."""
    s = answer.replace(",", "").replace(" ", "").replace("$", "")
    if not _NUMBER.match(s):
        return None
    value = float(s)
    return str(int(value)) if value == int(value) else repr(value)


def same_number(answer: str | None, expected: str) -> bool:
    """Whether ``answer`` is the number ``expected``, whatever its formatting."""
    if answer is None:
        return False
    got = normalise_number(answer)
    return got is not None and got == normalise_number(expected)
