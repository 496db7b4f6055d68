"""Rewards for GRPO: rule-based ones (report §5.2.1: math answers in a box, code checked by test cases), a
user's Python function, and an HTTP service.

Every reward is batched, ``reward(prompts, completions, answers) -> list[float]``, one float per completion, so
that a service or a model can score a whole rollout at once. ``answers[i]`` is what the task knows about item
i: the expected final answer (math), the test code (code), or ``None``.

:func:`make_reward` turns the command line's ``--reward`` spec into one:

=====================  ============================================================================
spec                   reward
=====================  ============================================================================
(none)                 the task's own reward (``ArithmeticTask.reward``: 1.0 right, 0.1 format, 0)
``boxed``              :class:`BoxedAnswerReward`: the last ``\\boxed{}`` against ``answers``
``code``               :class:`CodeReward`: the completion's Python run with ``answers`` as tests
``http://...``         :class:`HTTPReward`: POST the batch as JSON (also ``https://``)
``module:function``    :class:`CallableReward`: an importable function with the batch signature
``rm:PATH``            :class:`~.reward_model.RewardModelReward`: a reward model's score (a checkpoint
                       with a scalar head, transformers' ``DeepseekV3ForSequenceClassification`` layout)
=====================  ============================================================================
"""

from __future__ import annotations

import importlib
import json
import math
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from .answers import last_boxed, same_number
from .sandbox import Limits, SandboxResult, run_python
from .tasks import Problem


class Reward(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        """One reward per completion; the three lists have the same length."""
        ...


def _check(rewards: object, n: int, who: str) -> list[float]:
    """``rewards`` as a list of n finite floats, or a ValueError naming ``who`` returned what."""
    if not isinstance(rewards, (list, tuple)) or len(rewards) != n:
        got = f"{type(rewards).__name__} of length {len(rewards)}" if isinstance(rewards, (list, tuple)) \
            else type(rewards).__name__
        raise ValueError(f"{who}: expected a list of {n} floats, got {got}")
    out = []
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"{who}: reward {i} is {r!r}, not a finite number")
        out.append(float(r))
    return out


def _lengths(prompts: Sequence, completions: Sequence, answers: Sequence) -> int:
    if not len(prompts) == len(completions) == len(answers):
        raise ValueError(f"prompts, completions, answers differ in length: "
                         f"{len(prompts)}, {len(completions)}, {len(answers)}")
    return len(completions)


class BoxedAnswerReward:
    """1.0 when the last ``\\boxed{...}`` holds the expected number (whatever its formatting), ``format_reward``
    when it holds something else, 0.0 without a box or without an expected answer.

    The report's math reward (§5.2.1) checks "the final answer in a designated format (e.g., in a box)". The
    format reward defaults to 0 here; the built-in task keeps its own (TinyZero's 0.1, ``tasks.FORMAT_REWARD``).
    """

    def __init__(self, format_reward: float = 0.0):
        self.format_reward = format_reward

    def score(self, completion: str, answer: str | None) -> float:
        boxed = last_boxed(completion)
        if boxed is None or answer is None:
            return 0.0
        return 1.0 if same_number(boxed, answer) else self.format_reward

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        _lengths(prompts, completions, answers)
        return [self.score(c, a) for c, a in zip(completions, answers)]


def extract_code(completion: str) -> str:
    """The last fenced block tagged ``python`` / ``py`` / ``python3``, else the last untagged fenced block, else
    the whole completion."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in completion.splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```"):
                current = []
                blocks.append((stripped[3:].strip().lower(), current))
        elif stripped == "```":
            current = None
        else:
            current.append(line)
    for wanted in (("python", "py", "python3"), ("",)):
        tagged = [body for tag, body in blocks if tag in wanted]
        if tagged:
            return "\n".join(tagged[-1]) + "\n"
    return completion


class CodeReward:
    """1.0 when the completion's code followed by the item's tests (``answers[i]``, e.g. ``assert`` lines) runs
    to its end with exit status 0 in the sandbox (:mod:`.sandbox`), else 0.0 (report §5.2.1: code checked by
    test cases). A missing test (``None``) scores 0.

    The batch runs on a small thread pool, each item in its own subprocess; ``last_results`` keeps the
    :class:`~.sandbox.SandboxResult` of the last call (truncated output), for logging.
    """

    def __init__(self, timeout: float = 10.0, limits: Limits = Limits(), workers: int = 4,
                 block_network: bool = True, max_output: int = 2048):
        self.timeout, self.limits, self.workers = timeout, limits, workers
        self.block_network, self.max_output = block_network, max_output
        self.last_results: list[SandboxResult | None] = []

    def run(self, completion: str, tests: str | None) -> SandboxResult | None:
        if tests is None:
            return None
        program = f"{extract_code(completion)}\n\n{tests}\n"
        return run_python(program, timeout=self.timeout, limits=self.limits, block_network=self.block_network,
                          max_output=self.max_output)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        _lengths(prompts, completions, answers)
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            self.last_results = list(pool.map(self.run, completions, answers))
        return [1.0 if r is not None and r.passed else 0.0 for r in self.last_results]


class CallableReward:
    """A user's function ``fn(prompts, completions, answers) -> list[float]``; its result is checked (a list of
    as many finite numbers as completions)."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    @classmethod
    def from_spec(cls, spec: str) -> "CallableReward":
        """Import ``"package.module:function"`` (the attribute may be dotted: ``module:Class.method``)."""
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"reward spec {spec!r}: expected 'module:function'")
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:  # not only ImportError: the module may fail while it runs
            raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: "
                             f"{type(e).__name__}: {e}") from e
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as e:
                raise ValueError(f"reward spec {spec!r}: {module_name!r} has no attribute {attr!r}") from e
        if not callable(obj):
            raise ValueError(f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
        return cls(obj, spec)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        n = _lengths(prompts, completions, answers)
        return _check(self.fn(list(prompts), list(completions), list(answers)), n, f"reward {self.name!r}")


class HTTPReward:
    """POSTs ``{"prompts": [...], "completions": [...], "answers": [...]}`` as JSON to ``url`` and expects
    ``{"rewards": [...]}`` back (a 2xx status, as many finite numbers as completions). Errors name the URL and the
    status or the cause."""

    def __init__(self, url: str, timeout: float = 60.0, headers: dict[str, str] | None = None):
        self.url, self.timeout, self.headers = url, timeout, dict(headers or {})

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        n = _lengths(prompts, completions, answers)
        body = json.dumps({"prompts": list(prompts), "completions": list(completions),
                           "answers": list(answers)}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(500).decode("utf-8", errors="replace")
            except OSError:
                detail = ""
            raise RuntimeError(f"reward service {self.url}: HTTP {e.code} {e.reason}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:  # refused, unresolvable, timed out
            raise RuntimeError(f"reward service {self.url}: {getattr(e, 'reason', e)}") from e
        try:
            rewards = json.loads(payload)["rewards"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"reward service {self.url}: expected JSON {{\"rewards\": [...]}}, got "
                             f"{payload[:200]!r}") from e
        return _check(rewards, n, f"reward service {self.url}")


class TaskReward:
    """A task's per-item reward, ``task.reward(Problem, completion)``, in the batch form. The Problem is rebuilt
    from the prompt and the expected answer (``answers[i]``), which is all the built-in task's reward reads."""

    def __init__(self, task):
        self.task = task

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        _lengths(prompts, completions, answers)
        return [0.0 if a is None else float(self.task.reward(Problem(p, a), c))
                for p, c, a in zip(prompts, completions, answers)]


def make_reward(spec: str | None, task=None, device: str | torch.device = "cpu") -> Reward:
    """The reward a spec names (the grammar is in the module docstring); ``None`` needs ``task``; a reward model
    runs on ``device``."""
    if spec is None or spec == "":
        if task is None or not hasattr(task, "reward"):
            raise ValueError("no reward spec and no task with a reward")
        return TaskReward(task)
    if spec == "boxed":
        return BoxedAnswerReward()
    if spec == "code":
        return CodeReward()
    if spec.startswith(("http://", "https://")):
        return HTTPReward(spec)
    if spec.startswith("rm:"):
        path = Path(spec[len("rm:"):])
        if not path.is_dir():  # perhaps a function of a module named rm
            try:
                return CallableReward.from_spec(spec)
            except ValueError as e:
                raise ValueError(f"reward spec {spec!r}: {path} is not a reward model's directory ({e})") from None
        if not (path / "config.json").is_file():
            raise ValueError(f"reward spec {spec!r}: {path} is not a checkpoint directory (no config.json)")
        from .reward_model import RewardModelReward

        return RewardModelReward(path, device)
    if ":" in spec:
        return CallableReward.from_spec(spec)
    raise ValueError(f"reward spec {spec!r}: expected 'boxed', 'code', an http(s):// URL, 'rm:PATH' or "
                     f"'module:function'")
