"""Batched token sampling on the device: greedy, temperature, min-p, top-k, top-p and speculative verification.

Everything works on whole-batch tensors of fixed shapes and never reads a value back to the host (no
``.item()``, ``nonzero``, ``multinomial``), so a decode step that samples can be captured in a CUDA graph or
compiled with ``torch.compile(fullgraph=True)``. The plain per-row references are
:func:`~dsv3.inference.sampling.token_probs` (:func:`probs` equals it row by row) and
:func:`~dsv3.inference.speculative.speculative_accept` (:func:`verify` applies the same rule to a batch).

Randomness is counter-based: the noise of a token is an integer hash of (row seed, token position, vocabulary
column, salt) instead of the state of a generator. A seeded request therefore gets the same noise alone or in
any batch, at any row, on CPU or GPU (bit for bit), and its tokens depend only on its logits, params, seed
and positions. Salts keep independent draws apart: callers use small salts (0 for the main model, 1 for a
draft model, ...); :func:`verify` uses two large private ones.

:func:`sample_processed` is the full path of a step in which some row uses penalties, biases, ``min_tokens``,
``min_p``, a constraint or log-probabilities: :mod:`~dsv3.inference.penalties` first, then :func:`sample` with
min-p, the counts of the new tokens and their log-probability packs (:mod:`~dsv3.inference.logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .logprobs import logprob_pack
from .penalties import ProcessingState, ProcessingTensors, process_logits
from .sampling import SamplingParams

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: keeps zero inputs away from the hash's fixed point 0
_ACCEPT_SALT = 0xACCE97
_RESIDUAL_SALT = 0x2E51D0


def needs_filter(params: Sequence[SamplingParams]) -> bool:
    """Whether any sampled (non-greedy) row uses top-k or top-p. When not, pass ``filtered=False`` to
    :func:`sample`, :func:`probs` and :func:`verify` to skip the sort; decided on the host from the params,
    so picking the cheaper graph costs no device sync."""
    return any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params)


def _int64(x: int) -> int:
    """A Python int as the signed 64-bit value with the same low 64 bits (seeds may be unsigned)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a batch, as tensors on the device (row b = sequence b)."""

    temperature: torch.Tensor
    """(B,) float32; 0 = greedy (argmax)."""
    top_k: torch.Tensor
    """(B,) int64; 0 = off."""
    top_p: torch.Tensor
    """(B,) float32; 1 = off."""
    seed: torch.Tensor
    """(B,) int64; the seed of the row's counter-based noise (see :func:`uniform`)."""

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        device: torch.device | str | None = None,
        size: int | None = None,
    ) -> SamplingTensors:
        """The tensors of ``params`` with one seed per row; ``params.greedy`` rows get temperature 0.
        ``size`` (>= ``len(params)``) pads the batch with greedy rows, e.g. to a CUDA graph's batch size."""
        size = len(params) if size is None else size
        if len(seeds) != len(params) or size < len(params):
            raise ValueError(f"{len(params)} params, {len(seeds)} seeds, size {size}")
        pad = size - len(params)
        host = cls(
            temperature=torch.tensor([0.0 if p.greedy else p.temperature for p in params] + [0.0] * pad),
            top_k=torch.tensor([p.top_k for p in params] + [0] * pad, dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params] + [1.0] * pad),
            seed=torch.tensor([_int64(s) for s in seeds] + [0] * pad, dtype=torch.int64),
        )
        # non_blocking: a host-to-device copy that does not wait for the stream (CUDA stages pageable memory)
        return cls(*(getattr(host, f.name).to(device, non_blocking=True) for f in fields(cls)))

    def copy_(self, other: SamplingTensors) -> SamplingTensors:
        """Copy ``other`` (same batch size) into these tensors in place, e.g. into a CUDA graph's input
        buffers; returns self."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name), non_blocking=True)
        return self


# ----------------------------------------------------------------------------------------------------
# counter-based random numbers

def _mul32(x, c: int):
    """x * c mod 2**32 for x in [0, 2**32): the constant is split in 16-bit halves so that no intermediate
    reaches 2**49 (int64 tensors must not overflow: wrapping is not guaranteed by every backend)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A bijective 32-bit hash with full avalanche (Wellons' "lowbias32"), on Python ints or int64 tensors
    holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, offset: torch.Tensor, n: int, salt: int = 0) -> torch.Tensor:
    """Counter-based uniform noise, (*offset.shape, n) float32 strictly inside (0, 1).

    Value [..., j] is a hash of (seed[b], offset[b, ...], j, salt) alone, so it is bit-identical on every
    device and in any batch composition. ``seed`` is (B,) int64, ``offset`` (B,) or (B, S) int64: the
    position of the token the noise is for. For a fixed (seed, salt), distinct offsets below 2**32 give
    distinct row states (each absorption step is a bijection)."""
    seed = seed.reshape(seed.shape + (1,) * (offset.dim() - seed.dim()))
    h = _mix32(((salt & _M32) + _GOLDEN) & _M32)
    for word in (seed & _M32, (seed >> 32) & _M32, offset & _M32, (offset >> 32) & _M32):
        h = _mix32(h ^ word)
    column = _mix32((torch.arange(n, device=offset.device) + _GOLDEN) & _M32)
    h = _mix32(h.unsqueeze(-1) ^ column)
    # the top 23 bits as odd multiples of 2**-24: exact in float32, within [2**-24, 1 - 2**-24]
    return ((h >> 9) * 2 + 1).float() * 2.0**-24


# ----------------------------------------------------------------------------------------------------
# sampling

def _rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) tensor viewed to broadcast against ``like`` (B, ...)."""
    return x.view(x.shape[0], *([1] * (like.dim() - 1)))


def _scores(logits: torch.Tensor, t: SamplingTensors, filtered: bool,
            min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature-scaled float32 logits, -inf below each row's ``min_p`` (B,) share of its top probability
    (when given) and outside its top-k and top-p sets (as ``token_probs``). Greedy rows are scaled by 1; callers
    replace their result by the argmax."""
    temperature = _rows(t.temperature, logits)
    x = logits.float() / torch.where(temperature > 0, temperature, 1.0)
    if min_p is not None:
        p = x.softmax(dim=-1)
        x = x.masked_fill(p < _rows(min_p, x) * p.amax(dim=-1, keepdim=True), float("-inf"))
    if not filtered:
        return x
    v = x.shape[-1]
    # One descending sort serves both filters; stable so that ties are ordered by token id on every device.
    xs, order = x.sort(dim=-1, descending=True, stable=True)
    k = _rows(t.top_k, x)
    # the k-th largest value, as the smallest of the first k (a reduction rather than a gather: inductor's
    # Triton codegen in torch 2.11 failed on the gather here)
    kth = xs.masked_fill(torch.arange(v, device=x.device) >= k, float("inf")).amin(dim=-1, keepdim=True)
    kth = torch.where((k > 0) & (k < v), kth, float("-inf"))
    xs = xs.masked_fill(xs < kth, float("-inf"))  # ties with the k-th value stay, as in token_probs
    p = xs.softmax(dim=-1)
    mass_before = p.cumsum(dim=-1) - p
    top_p = _rows(t.top_p, x)
    # the first token always stays (its mass_before is 0); rows with top_p = 1 are left alone, since the
    # rounded cumsum can reach 1 before the tail
    xs = xs.masked_fill((mass_before >= top_p) & (top_p < 1), float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, xs)


def _gumbel_argmax(scores: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, salt: int) -> torch.Tensor:
    """A draw from softmax(scores) over the last dim by the Gumbel-max trick: argmax(scores - log(-log U))."""
    u = uniform(seed, offset, scores.shape[-1], salt)
    return (scores - (-u.log()).log()).argmax(dim=-1)


def sample(
    logits: torch.Tensor, t: SamplingTensors, offset: torch.Tensor, filtered: bool = True, salt: int = 0,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of every row, (B,) or (B, S) int64, for ``logits`` (B, V) or (B, S, V).

    Greedy rows (temperature 0) take the argmax; the others draw from :func:`probs` with the noise of
    ``uniform(t.seed, offset, V, salt)``; ``offset`` (B,) or (B, S) is each token's position.
    ``filtered=False`` skips the sort and ignores top-k / top-p (the caller guarantees that no sampled row
    sets them: :func:`needs_filter`); ``min_p`` (B,) filters after temperature (``None``: off)."""
    drawn = _gumbel_argmax(_scores(logits, t, filtered, min_p), t.seed, offset, salt)
    return torch.where(_rows(t.temperature, offset) == 0, logits.argmax(dim=-1), drawn)


def probs(logits: torch.Tensor, t: SamplingTensors, filtered: bool = True,
          min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's sampling distribution, (..., V) float32: ``token_probs(logits[b], params_b)`` for every
    row b (one-hot argmax for greedy rows)."""
    p = _scores(logits, t, filtered, min_p).softmax(dim=-1)
    one_hot = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return torch.where(_rows(t.temperature, logits) == 0, one_hot, p)


def sample_processed(
    logits: torch.Tensor, t: SamplingTensors, offset: torch.Tensor, p: ProcessingTensors, state: ProcessingState,
    slots: torch.Tensor, weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full sampling path for raw ``logits`` (B, V) of the sequences in ``slots`` (B,): processed logits
    (masks, biases, penalties), then :func:`sample` (top-k / top-p sort included, and min-p; greedy rows: the
    argmax of the processed logits), the new tokens counted in ``state`` (``weight`` (B,): 0 for padding rows)
    and their log-probability packs under the raw logits. Returns the packs (B, 3 + 2K) float32; the token is
    column 0. No host sync (runs inside the captured decode step)."""
    x = process_logits(logits, p, state, slots)
    tokens = sample(x, t, offset, True, min_p=p.min_p)
    state.record(slots, tokens, torch.ones_like(tokens) if weight is None else weight)
    return logprob_pack(logits, tokens)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`verify` when every row is greedy, without its sampling work (noise, softmax, one-hot
    distributions: at a small width, kernels that cost as much as a forward): a draft is accepted iff it is
    the argmax and every earlier one was; the tokens are the argmaxes, repeated after the first rejection."""
    top = target_logits.argmax(dim=-1)  # (B, k+1)
    accepted = (draft_tokens == top[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    positions = torch.arange(top.shape[1], device=top.device)
    return accepted, top.gather(1, torch.minimum(positions, accepted[:, None]))


def verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    t: SamplingTensors,
    offset: torch.Tensor,
    filtered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for the whole batch.

    ``target_logits`` (B, k+1, V): the main model's logits at the k drafted positions and the one after;
    ``draft_tokens`` (B, k) int64; ``draft_probs`` (B, k, V), the distributions the drafts were drawn from,
    or ``None`` when every draft is one-hot (greedy drafts); ``offset`` (B,) int64: the position of the
    first draft (draft i is the token at position offset + i).

    Draft i is accepted when U_i < p_i(d_i) / q_i(d_i) and all earlier drafts were; p_i = ``probs``
    of the target. Returns (accepted (B,) int64 in [0, k], tokens (B, k+1) int64): ``tokens[:, :accepted]``
    are the accepted drafts and ``tokens[:, accepted]`` the correction, a draw from norm(max(0, p - q)) at
    the first rejected position (p where that is all zero), or the bonus token drawn from p_k when all k were
    accepted. Every entry after ``accepted`` repeats that last token (valid ids, meant to be ignored).
    The emitted tokens are distributed exactly as plain sampling from p; greedy rows accept a draft iff it
    is the argmax and correct with the argmax: plain greedy decoding, token for token."""
    b, k1, v = target_logits.shape
    k = k1 - 1
    p = probs(target_logits, t, filtered)  # (B, k+1, V)
    q = F.one_hot(draft_tokens, v).float() if draft_probs is None else draft_probs.float()
    q = torch.cat([q, q.new_zeros(b, 1, v)], dim=1)  # no draft at position k: its residual is p_k (the bonus)
    d = draft_tokens.unsqueeze(-1)
    p_d = p[:, :k].gather(-1, d).squeeze(-1)
    q_d = q[:, :k].gather(-1, d).squeeze(-1)
    positions = offset.unsqueeze(1) + torch.arange(k1, device=offset.device)
    u = uniform(t.seed, positions[:, :k], 1, _ACCEPT_SALT).squeeze(-1)
    ok = u < torch.where(q_d > 0, p_d / q_d, 0.0)  # u < 1, so ratio >= 1 always accepts
    target = target_logits.argmax(dim=-1)  # (B, k+1)
    greedy = t.temperature == 0
    ok = torch.where(greedy.unsqueeze(1), draft_tokens == target[:, :k], ok)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)  # the number of leading accepted drafts

    # the correction (or bonus) at position `accepted`; Gumbel-max needs no normalisation of the residual
    at = accepted.view(b, 1, 1).expand(b, 1, v)
    p_a, q_a = p.gather(1, at).squeeze(1), q.gather(1, at).squeeze(1)
    residual = (p_a - q_a).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_a)
    drawn = _gumbel_argmax(residual.log(), t.seed, offset + accepted, _RESIDUAL_SALT)
    last = torch.where(greedy, target.gather(1, accepted.unsqueeze(1)).squeeze(1), drawn)
    drafts = F.pad(draft_tokens, (0, 1))
    tokens = torch.where(torch.arange(k1, device=offset.device) < accepted.unsqueeze(1), drafts, last.unsqueeze(1))
    return accepted, tokens
