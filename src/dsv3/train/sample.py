"""Plain full-sequence decoding for a quick look at a model (the fast cached engine is dsv3.inference)."""

from __future__ import annotations

import torch

from ..data import Tokenizer
from ..model import DeepSeekV3


@torch.no_grad()
def generate(model: DeepSeekV3, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> str:
    """Complete ``prompt``: each new token re-runs the whole sequence (no cache). Greedy at temperature 0."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    tokens = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    limit = model.config.max_position_embeddings
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -limit:]).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        new.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
    model.train(was_training)
    return tokenizer.decode(new)
