"""Requests, results and the choice of the next token: greedy, temperature, top-k, top-p.

Each request samples with its own ``torch.Generator`` (seeded by ``SamplingParams.seed``), so its tokens
depend only on its own logits and seed: the same request gives the same output alone or in any batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class GenerationRequest:
    """A prompt (token ids, or text when the engine has a tokenizer) and how to continue it."""

    prompt: list[int] | str
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


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


# ----------------------------------------------------------------------------------------------------
# next-token distribution

def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the request samples from, (..., V) float32: temperature, then top-k, then top-p.
    Greedy is the one-hot distribution of the argmax (so speculative acceptance needs no special case)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
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
