"""Multi-head Latent Attention (report §2.1.1, eq. 1-11).

Names follow the checkpoint; the report's matrices are:

=====================  ==========================================================================
``q_a_proj``           W^DQ, eq. 6: h -> c^Q (d_c' = q_lora_rank), followed by ``q_a_layernorm``
``q_b_proj``           [W^UQ; W^QR], eq. 7-8: c^Q -> per head [q^C (d_h); q^R (d_h^R)]
``q_proj``             used instead of the two above when ``q_lora_rank`` is None (no query compression)
``kv_a_proj_with_mqa`` [W^DKV; W^KR], eq. 1 and 3: h -> [c^KV (d_c); k^R (d_h^R, shared by all heads)]
``kv_a_layernorm``     RMSNorm on c^KV
``kv_b_proj``          [W^UK; W^UV], eq. 2 and 5: c^KV -> per head [k^C (d_h); v^C]
``o_proj``             W^O, eq. 11
=====================  ==========================================================================

Only c^KV and k^R need caching (576 values per token and layer for V3). Two forms of the same attention:

* **expanded** (:meth:`MLA.forward`, training and prefill): keys and values expanded per head from the latents
  with ``kv_b_proj`` (eq. 2, 5), then softmax attention;
* **absorbed** (:meth:`MLA.absorbed`, decoding from a cache): since k^C_{t,i} = W^UK_i c^KV_t and
  v^C_{t,i} = W^UV_i c^KV_t, the score q^C_i . k^C_{t,i} equals (q^C_i W^UK_i) . c^KV_t and the output
  sum_t a_t v^C_{t,i} equals W^UV_i (sum_t a_t c^KV_t): W^UK moves into the query and W^UV after the
  attention, and per cached token only [c^KV; k^R] is read (what the report's "only the blue-boxed vectors
  need to be cached" buys at inference). The engine (:mod:`dsv3.inference.layers`) runs it over its paged
  cache.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .doc_mask import DocumentMask, flex_attention
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        d, h = config.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=False)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6-9: x (b, s, d) -> q^C (b, s, h, d_h) and RoPE'd q^R (b, s, h, d_h^R)."""
        return self.query_from(self.q_proj(x) if self.q_lora_rank is None else self.q_a_proj(x), cos, sin)

    def query_from(
        self, q0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`query` from the first query projection of x (``q_proj``, or ``q_a_proj`` = c^Q before its
        norm), for callers that compute it fused with other projections of x. ``rotate=False`` leaves q^R
        unrotated (for a kernel that applies RoPE itself)."""
        b, s, _ = q0.shape
        q = q0 if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(q0))
        q = q.view(b, s, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin) if rotate else q_pe

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 and 3: x (b, s, d) -> normalised c^KV (b, s, d_c) and RoPE'd shared key k^R (b, s, d_h^R)."""
        return self.latent_from(self.kv_a_proj_with_mqa(x), cos, sin)

    def latent_from(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`latent` from ``kv_a_proj_with_mqa(x)`` = [c^KV before its norm; k^R before RoPE]."""
        kv, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_a_layernorm(kv), k_pe

    def expand_kv(self, kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2, 4, 5: latents -> per-head keys [k^C; k^R] (b, t, h, d_h + d_h^R) and values (b, t, h, d_v)."""
        b, t, _ = kv.shape
        kv = self.kv_b_proj(kv).view(b, t, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        return k, v

    def absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """The absorbed form (module docstring) for queries q^C (b, s, h, d_h) and RoPE'd q^R (b, s, h, d_h^R)
        over cached latents ``latent`` (b, t, d_c + d_h^R) = [c^KV; k^R] per position; ``visible`` (b, s, t)
        bool says which positions each query may attend. Returns the attention output after W^O, (b, s, d);
        equal to the expanded form over the same keys up to rounding."""
        b, s, h, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(h, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.qk_nope_head_dim].to(q_nope.dtype), w[:, self.qk_nope_head_dim:].to(q_nope.dtype)
        q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, w_uk), q_pe], dim=-1)  # [q^C W^UK; q^R]
        scores = torch.einsum("bshc,btc->bsht", q, latent.to(q.dtype))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.softmax_scale  # softmax in >= FP32
        probs = scores.masked_fill(~visible[:, :, None, :], float("-inf")).softmax(dim=-1).to(q.dtype)
        o_latent = torch.einsum("bsht,btc->bshc", probs, latent[..., :self.kv_lora_rank].to(q.dtype))
        o = torch.einsum("bshc,hvc->bshv", o_latent, w_uv)  # W^UV after the attention
        return self.o_proj(o.reshape(b, s, h * self.v_head_dim))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over x (b, s, d); ``mask`` also keeps packed documents apart (:mod:`.doc_mask`:
        a FlexAttention block mask, or the dense reference mask for SDPA)."""
        b, s, _ = x.shape
        q_nope, q_pe = self.query(x, cos, sin)
        k, v = self.expand_kv(*self.latent(x, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (torch.cat([q_nope, q_pe], dim=-1), k, v))
        if mask is not None and mask.block is not None:
            o = flex_attention(q, k, v, mask.block, self.softmax_scale)
        else:
            with _prefer_cudnn(q):
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if mask is None else mask.dense, is_causal=mask is None,
                    scale=self.softmax_scale,
                )
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.n_heads * self.v_head_dim))


def _prefer_cudnn(q: torch.Tensor):
    """On the GPU, try cuDNN attention first: with q/k dim 192 != v dim 128 no flash kernel exists, and
    cuDNN is ~3.5x faster than the memory-efficient kernel SDPA picks by default (shared/benchmarks.md)."""
    if not q.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without set_priority: keep the default order
        return contextlib.nullcontext()
