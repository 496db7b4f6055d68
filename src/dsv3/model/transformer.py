"""The DeepSeek-V3 model: embedding, decoder blocks, final norm, output head and the MTP modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .doc_mask import DocumentMask
from .init import init_weights
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .transformer_block import Block


@dataclass
class ModelOutput:
    """``logits`` (B, S, V); ``mtp_logits[k-1]`` the depth-k predictions (of t_{i+k+1} at position i);
    ``hidden`` the final normalised hidden state (B, S, d). (The routing load of training is counted in the
    gates, not returned: ``Gate.tokens_per_expert``.)"""

    logits: torch.Tensor
    hidden: torch.Tensor
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class DeepSeekV3(nn.Module):
    """Main model (report §2.1) plus ``num_nextn_predict_layers`` MTP modules (§2.2).

    ``model(tokens)`` returns a :class:`ModelOutput`. Parameter names follow the Hugging Face checkpoint
    without its ``model.`` prefix; the MTP modules are ``mtp.{k}`` here and layer ``num_hidden_layers + k``
    there (see :mod:`dsv3.checkpoint`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.rotary = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix and the embedding (§4.2: 0.006), ones for norms,
        zero routing bias; with ``seed``, each tensor from a generator seeded by its name (:mod:`.init`)."""
        init_weights(self, self.config.initializer_range, seed)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        future_tokens: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        with_mtp: bool = False,
    ) -> ModelOutput:
        """tokens (B, S) -> :class:`ModelOutput`.

        ``with_mtp`` also runs the MTP modules. Module k needs the tokens t_{i+k} for every position i:
        pass the D tokens that follow the window as ``future_tokens`` (B, D) to predict at all S positions
        (training); without them module k predicts at the first S - k positions only.
        ``doc_ids`` (B, S) restricts attention to the same packed document (optional; the report uses none).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        cos, sin, mask = self.position_inputs(tokens.shape[1], tokens.device, doc_ids)
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        h = self.norm(h)
        out = ModelOutput(logits=self.lm_head(h), hidden=h)
        if with_mtp and len(self.mtp) > 0:
            window = tokens if future_tokens is None else torch.cat([tokens, future_tokens], dim=1)
            out.mtp_logits = self.mtp_forward(h, window, cos, sin, mask)
        return out

    def position_inputs(self, seq_len: int, device: torch.device, doc_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, DocumentMask | None]:
        """RoPE's cos and sin for positions 0..seq_len-1, and the document mask, built once for all layers in
        the backend :mod:`.doc_mask` chose (None without ``doc_ids``)."""
        cos, sin = self.rotary(torch.arange(seq_len, device=device))
        return cos, sin, DocumentMask.build(doc_ids) if doc_ids is not None else None

    def mtp_forward(self, h: torch.Tensor, window: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: DocumentMask | None) -> list[torch.Tensor]:
        """The MTP modules' logits (eq. 21-23) from the main model's final hidden state ``h`` (B, S, d) and the
        tokens ``window`` (B, >= S): module k at position i embeds t_{i+k} and predicts t_{i+k+1}."""
        s = h.shape[1]
        logits, h_prev = [], h
        for k, module in enumerate(self.mtp, start=1):
            n = min(s, window.shape[1] - k)  # positions i whose token t_{i+k} is known
            if n <= 0:
                break
            sub_mask = mask.first(n) if mask is not None else None
            h_prev, normed = module(h_prev[:, :n], self.embed_tokens(window[:, k:k + n]), cos[:n], sin[:n], sub_mask)
            logits.append(self.lm_head(normed))
        return logits

    def num_parameters(self, include_mtp: bool = True) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))
        return n
