"""The built-in verifiable task: multi-digit arithmetic with the answer in ``\\boxed{}``.

A from-scratch tiny model can learn it by SFT and then improve on it by GRPO within minutes on one GPU
(shared/posttraining.md: a small model needs a task it can first learn by imitation, with an exact-match reward
and a small format reward). Problems are a pure function of (seed, split, index); the held-out split is a fixed
tenth of all operand pairs (by a hash of the problem), so no test problem is ever a training problem.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .answers import last_boxed, same_number

FORMAT_REWARD = 0.1
"""Reward of a well-formed but wrong answer (TinyZero's format reward); a correct one earns 1.0."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    """The user's message."""
    answer: str
    """The expected final answer."""


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class ArithmeticTask:
    """``a op b`` for operands of ``min_digits``..``max_digits`` digits and ``op`` in ``ops``."""

    min_digits: int = 1
    max_digits: int = 3
    ops: str = "+-"
    seed: int = 0
    name: str = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"digits: need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops: a non-empty string of '+', '-', '*', got {self.ops!r}")

    def _operands(self, key: int) -> tuple[int, str, int]:
        digits = lambda h: self.min_digits + h % (self.max_digits - self.min_digits + 1)  # noqa: E731
        d1, d2 = digits(key), digits(key >> 8)
        a = 10 ** (d1 - 1) + (key >> 16) % (9 * 10 ** (d1 - 1)) if d1 > 1 else (key >> 16) % 10
        b = 10 ** (d2 - 1) + (key >> 40) % (9 * 10 ** (d2 - 1)) if d2 > 1 else (key >> 40) % 10
        return a, self.ops[(key >> 12) % len(self.ops)], b

    @staticmethod
    def held_out(a: int, op: str, b: int) -> bool:
        """Whether ``a op b`` belongs to the test split (a fixed tenth of all problems)."""
        return _hash("heldout", a, op, b) % 10 == 0

    def problem(self, index: int, split: str = "train") -> Problem:
        """Problem ``index`` of ``split`` ("train" or "test"): deterministic, test problems never in train."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        attempt = 0
        while True:
            a, op, b = self._operands(_hash(self.seed, split, index, attempt))
            if self.held_out(a, op, b) == (split == "test"):
                break
            attempt += 1
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"Compute {a} {op} {b}. Put the answer in \\boxed{{}}.", str(value))

    def problems(self, n: int, split: str = "train", start: int = 0) -> list[Problem]:
        return [self.problem(i, split) for i in range(start, start + n)]

    @staticmethod
    def messages(problem: Problem) -> list[dict]:
        """The conversation that asks ``problem`` (OpenAI-style messages)."""
        return [{"role": "user", "content": problem.prompt}]

    @staticmethod
    def solution(problem: Problem) -> str:
        """The reference assistant answer, as SFT teaches it."""
        expr = problem.prompt.removeprefix("Compute ").split(".")[0]
        return f"{expr} = \\boxed{{{problem.answer}}}"

    @staticmethod
    def reward(problem: Problem, completion: str) -> float:
        """1.0 for the right number in the last box, FORMAT_REWARD for a box with another answer, else 0."""
        boxed = last_boxed(completion)
        if boxed is None:
            return 0.0
        return 1.0 if same_number(boxed, problem.answer) else FORMAT_REWARD
