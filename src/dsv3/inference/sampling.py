"""Requests, results and the per-row reference of the choice of the next token: greedy, temperature, min-p,
top-k, top-p.

The engine samples on the device for a whole batch (:mod:`dsv3.inference.sampler`, with the penalties, biases and
masks of :mod:`dsv3.inference.penalties` before it); :func:`token_probs` and :func:`sample_token` here are the
plain one-row references of that distribution.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
import torch

from .constraint import TokenConstraint

MAX_LOGPROBS = 20
"""Most alternatives per token that ``logprobs`` and ``prompt_logprobs`` may ask for (OpenAI's cap)."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 128
    """Generate at most this many tokens (fewer when the sequence reaches the engine's ``max_seq_len``)."""
    temperature: float = 1.0
    """Divides the logits; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p; 1 disables."""
    seed: int | None = None
    """Seed of the request's own generator; ``None`` draws one at random."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Finish ("stop") after any of these tokens. The model's EOS is added unless ``ignore_eos``."""
    stop: list[str] = field(default_factory=list)
    """Finish ("stop") once the decoded completion contains one of these strings (needs a tokenizer);
    the text is cut before it."""
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    """In [-2, 2]: subtracted once from the logit of every token already in the completion (OpenAI's
    definition; the prompt does not count). Positive values push towards new tokens."""
    frequency_penalty: float = 0.0
    """In [-2, 2]: subtracted from each token's logit once per occurrence in the completion so far (OpenAI's
    definition). Positive values discourage verbatim repetition."""
    repetition_penalty: float = 1.0
    """> 0 (vLLM's, from CTRL): the logits of tokens seen in the prompt or the completion are divided by it when
    positive and multiplied by it when negative; 1 disables, > 1 discourages repetition."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value in [-100, 100] added to its logit before everything else (OpenAI's); -100 in effect
    bans a token, 100 forces it."""
    min_p: float = 0.0
    """In [0, 1]: after temperature, drop the tokens whose probability is below ``min_p`` times the most likely
    token's; 0 disables."""
    min_tokens: int = 0
    """The stop tokens (EOS unless ``ignore_eos``, and ``stop_token_ids``) are masked until this many tokens
    were generated; at most ``max_new_tokens``."""
    logprobs: int | None = None
    """``None``: no log-probabilities. N in [0, 20]: for every generated token its log-probability and rank
    and the N most likely alternatives (:class:`TokenLogprobs`), from the model's raw distribution (before
    penalties, biases, masks, temperature and top-k / top-p, as vLLM by default)."""
    prompt_logprobs: int | None = None
    """As ``logprobs``, for every prompt token from the second on (e.g. OpenAI's ``echo``); the first has
    none. Such a request computes its whole prompt (no prefix-cache hit: every position's logits are needed)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2 <= v <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], "
                             f"got {self.min_tokens}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on (they need the counts of the tokens seen so far)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before temperature (penalties, ``logit_bias``, ``min_tokens``) or
        filtered by ``min_p``: such rows take the engine's "processed" sampling path."""
        return self.penalised or bool(self.logit_bias) or self.min_tokens > 0 or self.min_p > 0


@dataclass
class GenerationRequest:
    """A prompt (token ids, or text when the engine has a tokenizer) and how to continue it."""

    prompt: list[int] | str
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    constraint: TokenConstraint | None = None
    """Which tokens may come next (:class:`~dsv3.inference.constraint.TokenConstraint`, e.g. a JSON grammar);
    the request finishes ("stop") when the constraint says the text is complete."""


@dataclass
class TokenLogprobs:
    """The log-probability of one token under the model's raw distribution (log-softmax of its logits)."""

    token: int
    logprob: float
    rank: int
    """1 + the number of tokens strictly more likely (1: the most likely)."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The N most likely tokens (``logprobs`` / ``prompt_logprobs`` = N) and their log-probabilities, most
    likely first."""


@dataclass
class GenerationResult:
    """The outcome of one request. ``tokens`` are the completion's ids (a stop token included), filled in as
    they come; ``text`` their decoding when the engine has a tokenizer (stop tokens and strings cut off), set
    when the request finishes (streamed text comes in the :class:`TokenEvent` s)."""

    request_id: str
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    """``"stop"`` (stop token or string), ``"length"`` (max_new_tokens or max_seq_len), ``"cancelled"``."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose latents came from the prefix cache (not computed for this request)."""
    forward_passes: int = 0
    """Forwards of the main model that produced this completion (the prefill included)."""
    draft_tokens: int = 0
    """Tokens proposed by the MTP module (speculative decoding only)."""
    accepted_tokens: int = 0
    """Of those, accepted by the main model."""
    logprobs: list[TokenLogprobs] | None = None
    """With ``params.logprobs``: one entry per token of ``tokens``, filled in as they come."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With ``params.prompt_logprobs``: one entry per prompt token (``None`` for the first), complete before the
    request's first token event."""

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / self.forward_passes if self.forward_passes else 0.0


@dataclass
class TokenEvent:
    """One new token of one request, as the streaming API yields it. ``finish_reason`` is set on the
    request's last event (for a cancelled request that last event carries ``token = None``)."""

    request_id: str
    token: int | None
    text: str = ""
    """New text since the previous event (empty without a tokenizer, or while a character is incomplete)."""
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None
    """The token's log-probabilities when the request asked for them (``SamplingParams.logprobs``)."""


# ----------------------------------------------------------------------------------------------------
# next-token distribution

def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the request samples from, (..., V) float32: temperature, then min-p, top-k, top-p
    (of logits already penalised and masked: :func:`~dsv3.inference.penalties.process_logits_reference`).
    Greedy is the one-hot distribution of the argmax (so speculative acceptance needs no special case)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.min_p > 0:
        p = logits.softmax(dim=-1)
        logits = logits.masked_fill(p < params.min_p * p.amax(dim=-1, keepdim=True), float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)  # the first always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from probs (V,)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token for logits (V,): argmax when greedy (no random draw), else a draw from
    :func:`token_probs`."""
    if params.greedy:
        return int(logits.argmax())
    return sample_from(token_probs(logits, params), generator)
