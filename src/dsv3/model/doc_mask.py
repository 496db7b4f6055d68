"""Attention kept within packed documents: packed SFT samples "remain isolated and mutually invisible" (report
§5.1). With RoPE the score of q_m and k_n depends only on m - n, so the block-diagonal causal mask ("causal and
same document") is all isolation needs: a sample packed at any offset sees what it sees alone.

Two backends build and apply the same mask:

* ``"sdpa"``, the reference: a dense (B, 1, S, S) bool mask for ``F.scaled_dot_product_attention``. Plain, but
  O(S^2) memory (1 GiB at 32K) and it takes cuDNN off its fast causal path (43.3 ms at 16K on an H200 vs 9.2 ms
  causal; shared/posttraining.md).
* ``"flex"``: a FlexAttention :class:`BlockMask` (per-block lists of the visible key blocks, O(S^2 / 128^2))
  whose ``mask_mod`` reads the document ids, run by ``flex_attention``, which skips the blocks no query of a
  block sees (6.3 ms at 16K). On CUDA both ``create_block_mask`` and ``flex_attention`` run compiled, once per
  process (uncompiled, flex materialises the scores and the mask build the (B, S, S) mask). On the CPU both run
  eagerly, unfused: a test path for the forward only, since FlexAttention has no backward on the CPU.

The backend is chosen once, by :func:`set_document_attention` (``"auto"``, the default: flex on CUDA, sdpa
elsewhere), and :func:`describe` says which one runs. The model only sees a :class:`DocumentMask`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention

BACKENDS = ("auto", "flex", "sdpa")
_backend = "auto"


def set_document_attention(backend: str) -> None:
    """Choose how document masks are built and applied, for the whole process: ``"flex"``, ``"sdpa"``, or
    ``"auto"`` (flex on CUDA, sdpa elsewhere)."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"document attention backend must be one of {BACKENDS}, got {backend!r}")
    _backend = backend


def document_attention(device: torch.device | str) -> str:
    """The backend document masks on ``device`` use: ``"flex"`` or ``"sdpa"``."""
    if _backend != "auto":
        return _backend
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def describe(device: torch.device | str) -> str:
    """One line for logs: which document-mask path runs on ``device``."""
    if document_attention(device) == "sdpa":
        return "document mask: sdpa (dense (B, 1, S, S) bool mask, the reference path)"
    if torch.device(device).type == "cuda":
        return "document mask: flex (FlexAttention BlockMask, compiled create_block_mask and flex_attention)"
    return "document mask: flex, eager on the CPU (unfused, forward only)"


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The dense reference: (B, S) document ids -> (B, 1, S, S) bool, True where query i may attend key j
    (j <= i and the same document)."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc).unsqueeze(1)


def same_document_causal(doc_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The flex ``mask_mod`` of :func:`document_mask`, over the document ids it closes over (attention-gym's
    document mask). A new closure per batch compiles once: dynamo treats the captured tensor as an input."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """``fn`` compiled once per process (a compiled function per call site would compile again and again).
    Shapes start static and turn dynamic at the first new length, as torch.compile does by default: a
    ``dynamic=False`` function would hit the recompile limit after 8 lengths and then run eagerly, unfused."""
    return torch.compile(fn)


def block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The flex form of :func:`document_mask`: one mask per batch row, broadcast over heads."""
    b, s = doc_ids.shape
    build = _compiled(create_block_mask) if doc_ids.is_cuda else create_block_mask
    return build(same_document_causal(doc_ids), b, None, s, s, device=doc_ids.device)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """Softmax attention of q, k (B, H, S, d_qk) and v (B, H, S, d_v) under ``mask``; d_v may differ from d_qk
    (MLA: 192 and 128), which FlexAttention supports as is. Compiled on CUDA, eager on the CPU."""
    # Copy v, a slice of kv_b_proj's output in MLA: when the slice is made inside the same compiled graph,
    # inductor's flex template ignores its storage offset (wrong outputs, seen on the CPU with torch 2.13). The
    # copy costs little next to the attention and keeps either device safe.
    v = v.contiguous()
    if q.is_cuda:
        return _compiled(_flex_attention)(q, k, v, block_mask=mask, scale=scale)
    if any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"FlexAttention has no backward on the CPU (torch {torch.__version__}): train on the CPU with "
            "set_document_attention('sdpa') or 'auto'")
    return _flex_attention(q, k, v, block_mask=mask, scale=scale)


@dataclass(frozen=True)
class DocumentMask:
    """Causal attention within packed documents, built once per forward for every layer. Exactly one of
    ``dense`` (the sdpa backend) and ``block`` (flex) is set."""

    doc_ids: torch.Tensor
    """(B, S) document index of each position."""
    dense: torch.Tensor | None = None
    """(B, 1, S, S) bool, True = may attend."""
    block: BlockMask | None = None

    @classmethod
    def build(cls, doc_ids: torch.Tensor, backend: str | None = None) -> DocumentMask:
        """The mask for ``doc_ids`` (B, S) with ``backend`` (default: :func:`document_attention`'s choice)."""
        backend = backend or document_attention(doc_ids.device)
        if backend == "flex":
            return cls(doc_ids, block=block_mask(doc_ids))
        if backend == "sdpa":
            return cls(doc_ids, dense=document_mask(doc_ids))
        raise ValueError(f"document attention backend must be 'flex' or 'sdpa', got {backend!r}")

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    def first(self, n: int) -> DocumentMask:
        """The mask of the first ``n`` positions (an MTP module that predicts at fewer positions): the top-left
        n x n corner, since a query never sees later keys."""
        if n == self.seq_len:
            return self
        if self.dense is not None:
            return DocumentMask(self.doc_ids[:, :n], dense=self.dense[:, :, :n, :n])
        return DocumentMask.build(self.doc_ids[:, :n], "flex")  # cheap, and public API (BlockMask slices only B, H)
