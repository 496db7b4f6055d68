"""Log-probabilities of chosen tokens under the model's raw distribution, computed on the device and read back
with the step's one host read.

The distribution is the log-softmax of the model's logits, before penalties, biases, masks, temperature and
top-k / top-p (vLLM's default): what the model thinks of the token, whatever chose it. For each token the device
computes a *pack*, one float32 row ``[token, logprob, rank, top ids (K), top logprobs (K)]`` with K =
:data:`~dsv3.inference.sampling.MAX_LOGPROBS` (token ids and ranks are below 2**24, exact in float32), so the
packs of a whole step (generated tokens of every row, and the prompt positions of rows asking for
``prompt_logprobs``) concatenate into one tensor and one read (:func:`read_step`); the host then keeps each
row's N alternatives (:func:`unpack`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .sampling import MAX_LOGPROBS, TokenLogprobs

PROMPT_BLOCK = 512
"""Prompt positions whose logits are computed at once for ``prompt_logprobs`` (bounds the (n, V) float32
temporaries of a long prompt)."""


def pack_width(vocab_size: int) -> int:
    """Columns of a pack: token, logprob, rank, then K ids and K logprobs."""
    return 3 + 2 * min(MAX_LOGPROBS, vocab_size)


def logprob_pack(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Packs (..., 3 + 2K) float32 of ``tokens`` (...) under raw ``logits`` (..., V); on the device, fixed
    shapes, no host sync (runs inside captured steps)."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, tokens.unsqueeze(-1))
    rank = (lp > chosen).sum(dim=-1, keepdim=True) + 1
    top, ids = lp.topk(min(MAX_LOGPROBS, lp.shape[-1]), dim=-1)
    return torch.cat([tokens.unsqueeze(-1).float(), chosen, rank.float(), ids.float(), top], dim=-1)


def prompt_logprob_pack(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """Packs (m, 3 + 2K) of the prompt tokens ``targets`` (m,) that follow the positions of the final hidden
    states ``hidden`` (>= m, d) (``head`` gives their logits), :data:`PROMPT_BLOCK` positions at a time."""
    m = targets.shape[0]
    return torch.cat([logprob_pack(head(hidden[i:min(i + PROMPT_BLOCK, m)]), targets[i:i + PROMPT_BLOCK])
                      for i in range(0, m, PROMPT_BLOCK)])


def read_step(pieces: Sequence[torch.Tensor], width: int) -> list[list]:
    """The step's one read back to the host: ``pieces`` are next tokens (b,) int64 or packs (b, width); returns
    each piece's rows (a token: an int; a pack: a list of floats). When no piece is a pack the tokens are read as
    int64, exactly as before logprobs existed; else everything is read as float64 packs (tokens exact)."""
    packed = any(p.dim() == 2 for p in pieces)
    if packed:
        flat = torch.cat([p.double() if p.dim() == 2 else F.pad(p.double()[:, None], (0, width - 1))
                          for p in pieces]).tolist()
    else:
        flat = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).tolist()
    out, i = [], 0
    for p in pieces:
        rows = flat[i:i + p.shape[0]]
        out.append([int(r[0]) for r in rows] if packed and p.dim() == 1 else rows)
        i += p.shape[0]
    return out


def unpack(row: list[float], n: int) -> TokenLogprobs:
    """The :class:`TokenLogprobs` of a pack row read to the host, with its ``n`` most likely alternatives."""
    k = (len(row) - 3) // 2
    ids, values = row[3:3 + n], row[3 + k:3 + k + n]
    return TokenLogprobs(int(row[0]), row[1], int(row[2]), [(int(t), v) for t, v in zip(ids, values)])
