"""Finishing a constrained text within its token budget, and the per-request constraint that does it.

A grammar alone does not stop a weak model from writing a string forever. Told the request's ``max_tokens``,
a :class:`GrammarConstraint` plans, from its current state, a short way to complete the text: a fixed
preference over the grammar's allowed tokens, simulated on a fork of the grammar state. The preference
depends on whether the text is inside a JSON string (tracked from the accepted bytes):

* outside strings: stop; closers ``}``/``]``; separators (only allowed after a value, where a number could
  go on instead); whole short values (``0``, ``""``, ``true``, ``{}``); separators with quotes; plain text
  such as a literal's rest (longer first); openers; whitespace;
* inside strings: closing it (``"}`` before ``":`` before ``"``); closing it with a comma; content, longer
  first (a required key's text); escapes; whitespace.

Markers and other added tokens rank just below stop: they are only allowed where the grammar forces them, or
to end tool calls. With ``R`` tokens left and a plan of ``L`` tokens:

* ``R > L + W`` -- "free": the grammar's allowed set, untouched;
* ``L + HARD < R <= L + W`` -- "watch": only the grammar's tokens that cannot open a string, container
  or member (no ``{ [ " , : \\`` or whitespace: each adds fewer than ``HARD`` tokens to the plan), or the
  plan's next token;
* ``R <= L + HARD`` -- "hard": only the plan's next token, so the text completes within the budget.

``W`` is ``WATCH``, enough for what one freely chosen JSON token adds to a plan (a member, a nested value); for
tool calls, where the newline after a call starts another whole call, ``WATCH`` plus the first plan's length
(a whole minimal output: at least one call).

Plans cost a few xgrammar steps each, so they are not made every step in the free zone: there the plan's
length is estimated (``GROWTH`` more per token the model chooses off the plan) and planned again where the
estimate could reach the watch zone. In the watch and hard zones the plan is kept current: it stays valid while
the model takes its tokens; otherwise the last plan is first checked to still complete the text from the new
state (it usually does after a token inside a string or number; accepting tokens is much cheaper than
choosing them), else a new one is simulated.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .constraint import bitmask_words

WATCH = 16
"""Tokens of slack at which free choice is restricted to inert tokens."""
HARD = 4
"""Tokens of slack at which only the plan's next token is allowed."""
GROWTH = 4
"""Assumed growth of the plan per token the model chooses freely (to space out simulations)."""

_CLOSERS, _SEPARATORS, _QUOTE, _BACKSLASH = frozenset(b"}]"), frozenset(b",:"), ord('"'), ord("\\")
_OPENERS, _SPACE = frozenset(b"{[\\"), frozenset(b" \t\n\r")
_LITERALS = frozenset((b"{}", b"[]", b'""', b"true", b"false", b"null"))


def _rank_outside(text: bytes) -> int:
    """Preference (higher first, tiers of 1000) of a token outside JSON strings."""
    n, chars = min(len(text), 999), set(text)
    if chars <= _CLOSERS:
        return 8000 + n
    if chars <= _SEPARATORS:  # after a value (a number could go on with digits instead)
        return 7000 + n
    if text in _LITERALS or text.isdigit():
        return 6999 - n
    if chars <= _SEPARATORS | {_QUOTE}:
        return 5000 + n
    if chars & _SPACE:
        return 1999 - n
    if chars & _OPENERS or _QUOTE in chars:
        return 2999 - n
    return 4000 + n


def _rank_inside(text: bytes) -> int:
    """Preference of a token inside a JSON string: ``",`` ranks below ``"`` as it adds a member, needed only
    while required ones are missing."""
    n, chars = min(len(text), 999), set(text)
    if text[0] == _QUOTE and set(text[1:]) <= _CLOSERS | {_QUOTE, ord(":")}:
        return 8000 + 100 * min(sum(c in _CLOSERS for c in text), 9) + min(n, 99)
    if text[0] == _QUOTE and set(text[1:]) <= _CLOSERS | _SEPARATORS | {_QUOTE}:
        return 7000 + n
    if _QUOTE in chars or _BACKSLASH in chars:
        return 2999 - n
    if chars & _SPACE:
        return 1999 - n
    return 4000 + n


def _inert(text: bytes) -> bool:
    return bool(text) and not set(text) & (_OPENERS | _SEPARATORS | _SPACE | {_QUOTE})


Lexer = tuple[bool, bool, bool]
"""(inside a JSON string, after a backslash there, after a byte ED there: a surrogate may not follow)."""


def in_string(text: bytes, state: Lexer) -> Lexer:
    """The :data:`Lexer` state once ``text`` follows ``state``. Tool-call markers and the text between them
    have no quotes, so this reads a whole tool-call output correctly too."""
    inside, escaped, _ = state
    if _QUOTE not in text and not inside:
        return state
    for c in text:
        if not inside:
            inside = c == _QUOTE
        elif escaped:
            escaped = False
        elif c == _BACKSLASH:
            escaped = True
        elif c == _QUOTE:
            inside = False
    return inside, escaped, inside and text.endswith(b"\xed")


def set_bit(words: np.ndarray, token: int, clear: bool = False) -> None:
    """Allow (with ``clear``: forbid) ``token`` in an int32 bitmask row (bit 31 is the sign bit)."""
    bit = 1 << (token & 31)
    bit = bit - (1 << 32) if bit >= 1 << 31 else bit
    if clear:
        words[token >> 5] &= ~bit
    else:
        words[token >> 5] |= bit


def words_of(allowed: np.ndarray) -> np.ndarray:
    """The int32 bitmask row of a boolean vector."""
    padded = np.zeros(bitmask_words(allowed.shape[0]) * 32, dtype=np.int64)
    padded[:allowed.shape[0]] = allowed
    words = (padded.reshape(-1, 32) << np.arange(32, dtype=np.int64)).sum(1)
    return np.where(words >= 1 << 31, words - (1 << 32), words).astype(np.int32)


class _Order:
    """The best token a bitmask allows under a preference: the top few hundred tokens are checked first
    (closers, values: usually the answer), else all allowed ids are listed (forced text allows few)."""

    TOP = 512

    def __init__(self, rank: np.ndarray):
        self.rank = rank
        self.top = np.argsort(-rank, kind="stable")[:self.TOP]
        self.word, self.bit = self.top >> 5, (self.top & 31).astype(np.int32)

    def first(self, words: np.ndarray) -> int | None:
        hit = np.flatnonzero((words[self.word] >> self.bit) & 1)
        if hit.size:
            return int(self.top[hit[0]])
        nonzero = np.flatnonzero(words)
        bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 32).astype(bool)
        ids = (nonzero[:, None] * 32 + np.arange(32))[bits]
        ids = ids[ids < self.rank.shape[0]]
        return int(ids[np.argmax(self.rank[ids])]) if ids.size else None


_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")
"""UTF-8 bytes of a surrogate code point (U+D800-U+DFFF): not UTF-8, yet xgrammar (0.2.9) lets them into strings
with a ``minLength`` / ``maxLength`` (each decodes to U+FFFD characters, breaking the length). Within a token
the table forbids them; across tokens (one ending in ED, the next starting with A0-BF) the lexer state does."""


def _not_string_content(text: bytes) -> bool:
    return any(c < 0x20 for c in text) or _SURROGATE.search(text) is not None


class TokenTable:
    """Per-token facts of a vocabulary, shared by a factory's constraints: bytes, finishing preferences, the
    inert tokens, and the tokens with control characters -- forbidden inside JSON strings here, as xgrammar
    (0.2.9) lets them into strings with a ``minLength`` / ``maxLength``. ``texts``: each id's bytes (empty for
    added tokens and padding); built in about a second for a 129K vocabulary."""

    def __init__(self, texts: list[bytes], added_ids: frozenset[int], eos_id: int):
        size = len(texts)
        self.texts = texts
        outside, inside = np.zeros(size, dtype=np.int32), np.zeros(size, dtype=np.int32)
        for i, text in enumerate(texts):
            if text:
                outside[i], inside[i] = _rank_outside(text), _rank_inside(text)
        for i in added_ids:
            if i < size:
                outside[i] = inside[i] = 9000
        outside[eos_id] = inside[eos_id] = 10000
        self.outside, self.inside = _Order(outside), _Order(inside)
        self.inert_words = words_of(np.array([_inert(t) for t in texts], dtype=bool))
        self.text_words = ~words_of(np.array([_not_string_content(t) for t in texts], dtype=bool))
        """Tokens that may be JSON string content as far as this table knows (no control characters, no
        UTF-8-encoded surrogates)."""
        self.after_ed_words = ~words_of(np.array([t[:1] >= b"\xa0" and t[:1] <= b"\xbf" for t in texts],
                                                 dtype=bool))
        """Tokens that may follow a byte ED inside a string (not the second byte of a surrogate)."""
        self.eos = eos_id

    def fill(self, driver, lexer: Lexer, bitmask: torch.Tensor) -> np.ndarray:
        """``driver``'s mask into ``bitmask`` (1, words), less control characters and surrogates inside a
        string; its row."""
        driver.fill(bitmask)
        words = bitmask.numpy()[0]
        if lexer[0]:
            words &= self.text_words
        if lexer[2]:
            words &= self.after_ed_words
        return words

    def replay(self, driver, plan: list[int], stop_only: np.ndarray) -> bool:
        """Whether ``plan`` (made from an earlier state) still completes the text from ``driver``'s state:
        usually so after a token inside a string or number, and much cheaper to check than a new plan."""
        driver = driver.fork()
        for token in plan:
            if not driver.accept(token):
                return False
        if driver.terminated():
            return True
        scratch = torch.zeros(1, stop_only.shape[0], dtype=torch.int32)
        driver.fill(scratch)
        return np.array_equal(scratch.numpy()[0], stop_only)

    def plan(self, driver, lexer: Lexer, stop_only: np.ndarray, limit: int) -> list[int]:
        """The tokens the preference picks from ``driver``'s state (``lexer``: its string state) until only
        EOS may follow (the EOS included when it had to be chosen among other tokens), at most ``limit``."""
        driver = driver.fork()
        scratch = torch.zeros(1, stop_only.shape[0], dtype=torch.int32)
        words = scratch.numpy()[0]
        plan: list[int] = []
        while len(plan) < limit and not driver.terminated():
            self.fill(driver, lexer, scratch)
            if np.array_equal(words, stop_only):
                break
            token = (self.inside if lexer[0] else self.outside).first(words)
            if token is None:
                break
            plan.append(token)
            if token == self.eos or not driver.accept(token):
                break
            lexer = in_string(self.texts[token], lexer)
        return plan


class GrammarConstraint:
    """One request's grammar state, a :class:`~dsv3.inference.constraint.TokenConstraint`, finishing within
    ``max_tokens`` when given (module docstring). Made by :class:`~dsv3.inference.grammar.GrammarFactory`.

    ``driver``: the grammar state (``fill(bitmask (1, words))``, ``accept(token) -> bool``, ``fork()``,
    ``terminated()``, ``structured()``: whether the output has entered the constrained part); ``repeats``: one token may start another whole unit of the output (a tool call), so the
    watch zone is wider by the first plan's length."""

    def __init__(self, driver, vocab_size: int, eos_id: int, max_tokens: int | None,
                 table: TokenTable, repeats: bool = False):
        self._driver = driver
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.generated = 0
        """Tokens accepted so far."""
        words = bitmask_words(vocab_size)
        self._mask = torch.zeros(1, words, dtype=torch.int32)  # the grammar's own mask of the current state
        self._mask_fresh = False
        self._stop_only = np.zeros(words, dtype=np.int32)
        set_bit(self._stop_only, eos_id)
        self._table = table
        self._lexer: Lexer = (False, False, False)
        self._plan: list[int] | None = None  # a plan from the current state (kept while the model follows it)
        self._stale: list[int] | None = None  # the last plan, from an earlier state: may still do
        self._estimate: int | None = None  # the plan length: exact with a plan, else an upper estimate
        self._plan_at = 0  # simulate again once this few tokens remain
        self._repeats = repeats
        self._watch = WATCH  # widened by the first plan's length when ``repeats``
        self.zone = "free"
        """Where the last bitmask was made: "free", "watch" or "hard"."""

    def _grammar_mask(self) -> np.ndarray:
        if not self._mask_fresh:
            self._table.fill(self._driver, self._lexer, self._mask)
            self._mask_fresh = True
        return self._mask.numpy()[0]

    def is_finished(self) -> bool:
        if self._plan:  # a plan ends where only EOS may follow: not here yet
            return False
        return self._driver.terminated() or np.array_equal(self._grammar_mask(), self._stop_only)

    def accept(self, token: int) -> None:
        token = int(token)
        if not self._driver.accept(token):
            raise ValueError(f"token {token} is not allowed by the grammar here")
        self.generated += 1
        self._mask_fresh = False
        if not self._driver.structured():  # free text before the structure (tool_choice auto)
            return
        self._lexer = in_string(self._table.texts[token], self._lexer)
        if self.max_tokens is None:
            return
        if self._plan and self._plan[0] == token:
            self._plan = self._plan[1:]
            self._estimate = len(self._plan)
        elif self._estimate is not None:
            self._stale, self._plan = self._plan or self._stale, None
            self._estimate += GROWTH

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self.zone = self._zone()
        out = row.numpy()
        if self.zone == "hard":
            out[:] = 0
            set_bit(out, self._plan[0])
            return
        out[:] = self._grammar_mask()
        if self.zone == "watch":
            out &= self._table.inert_words
            set_bit(out, self._plan[0])

    def _zone(self) -> str:
        if self.max_tokens is None or not self._driver.structured():
            return "free"  # free text ends as it likes ("length" at max_tokens); a structure is finished in time
        remaining = self.max_tokens - self.generated
        if self._plan is None and (self._estimate is None or remaining <= self._plan_at
                                   or remaining <= self._estimate + self._watch):
            self._simulate()  # a plan is kept current in the watch and hard zones
        if self._plan == []:
            return "free"  # the text is complete: only EOS is allowed anyway
        if remaining <= self._estimate + HARD:
            return "hard"
        return "watch" if remaining <= self._estimate + self._watch else "free"

    def _simulate(self) -> None:
        remaining = self.max_tokens - self.generated
        stale, self._stale = self._stale, None
        if stale and self._table.replay(self._driver, stale, self._stop_only):
            self._plan = stale
        else:
            self._plan = self._table.plan(self._driver, self._lexer, self._stop_only, remaining + HARD)
        self._estimate = length = len(self._plan)
        if self._repeats and self._watch == WATCH:  # the first plan, where the structure starts: a whole unit
            self._watch = WATCH + length
        steps = (remaining - length - self._watch) // (GROWTH + 1)  # when the estimate may reach the watch zone
        self._plan_at = remaining - max(1, steps)
