"""Speculative decoding with the MTP module as the draft model (report §2.2: "use them to draft tokens").

Per sequence, with the cache holding positions 0 .. L-1 and t_L the last sampled token:

1. **draft** (done at the end of the previous step): the MTP module at position L-1 combines the main
   model's final hidden state h_{L-1} with Emb(t_L) (eq. 21), runs its block over its own latent cache
   (layer ``num_hidden_layers``) and predicts d = t_{L+1} with the shared head (eq. 23);
2. **verify**: one forward of the main model over [t_L, d] at positions L, L+1 gives p_L (for t_{L+1}) and
   p_{L+1} (for t_{L+2});
3. **accept** d with probability min(1, p_L(d) / q(d)); if accepted, also sample a bonus token from p_{L+1};
   if rejected, sample t_{L+1} from norm(max(0, p_L - q)) and drop position L+1 from the cache. The output
   is distributed exactly as plain sampling from p (Leviathan et al. 2023; Chen et al. 2023). With greedy
   params p and q are one-hot, so a draft is accepted iff it is the argmax and the output is plain greedy
   decoding token for token;
4. the MTP module consumes the new positions (h_L with t_{L+1}, and h_{L+1} with t_{L+2} when accepted) and
   drafts the next token.

One draft per step (V3 has one MTP module). Deeper chains (module k drafting t_{L+k}) need per-module
cache lengths that lag by k and are not implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .sampling import TokenEvent, sample_from, sample_token, token_probs

if TYPE_CHECKING:
    from .engine import Engine, Sequence


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor | None, draft: int, generator: torch.Generator | None
) -> tuple[bool, int]:
    """The speculative-sampling rule for one draft token: target distribution p (V,), draft distribution q
    (V,) or ``None`` for a one-hot q (greedy draft). Returns (accepted, token): the draft itself, or a
    replacement drawn from norm(max(0, p - q))."""
    q_d = 1.0 if q is None else float(q[draft])
    ratio = float(p[draft]) / q_d if q_d > 0 else 0.0
    if ratio >= 1 or (ratio > 0 and float(torch.rand((), generator=generator, device=p.device)) < ratio):
        return True, draft
    if q is None:
        q = torch.zeros_like(p)
        q[draft] = 1.0
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    residual = residual / total if total > 0 else p
    return False, sample_from(residual, generator)


class MTPSpeculator:
    """Drafts with ``model.mtp[0]`` and verifies with the main model, for the engine's running sequences."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.module = engine.model.mtp[0]
        self.blocks = engine.mtp_blocks[:1]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.model.lm_head(self.module.shared_head.norm(x))

    def _set_draft(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.params.greedy:
            seq.draft, seq.draft_probs = int(logits.argmax()), None
        else:
            q = token_probs(logits, seq.params)
            seq.draft, seq.draft_probs = sample_from(q, seq.generator), q

    @torch.inference_mode()
    def draft_after_prefill(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """After a prefill of the positions mtp_len .. L-1 (main hidden states ``hidden`` (n, d)) and the
        sampling of t_L: run the MTP module over these positions (expanded attention) and draft t_{L+1}."""
        eng = self.engine
        length, start = eng.cache.lengths[seq.slot], seq.mtp_len
        if hidden.shape[0] != length - start:
            raise ValueError(f"MTP needs the hidden states of positions {start} .. {length - 1}")
        tokens = seq.prompt + seq.result.tokens
        nxt = torch.tensor(tokens[start + 1:length + 1], dtype=torch.long, device=eng.device)
        x = self.module.combine(hidden[None], eng.model.embed_tokens(nxt)[None])
        x = eng.run_prefill(x, self.blocks, seq.slot, start)
        seq.mtp_len = length
        self._set_draft(seq, self._head(x[0, -1]))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Verify each sequence's draft in one batched forward over [last token, draft], emit 1 or 2 tokens
        per sequence, then draft again for those still running."""
        eng, cache = self.engine, self.engine.cache
        hidden, logits = eng.decode([s.slot for s in seqs], [[s.last_token, s.draft] for s in seqs])
        events: list[TokenEvent] = []
        rows: list[tuple[int, Sequence, int, list[int]]] = []  # (batch row, seq, first position, new tokens)
        for b, seq in enumerate(seqs):
            res, params = seq.result, seq.params
            start = cache.lengths[seq.slot] - 2  # position of the last token
            res.forward_passes += 1
            res.draft_tokens += 1
            accepted, token = speculative_accept(
                token_probs(logits[b, 0], params), seq.draft_probs, seq.draft, seq.generator
            )
            if accepted:
                res.accepted_tokens += 1
                new = [token, sample_token(logits[b, 1], params, seq.generator)]
            else:
                new = [token]
            cache.truncate(seq.slot, start + len(new))  # keep [last token, accepted draft]
            for t in new:
                events.append(eng.emit(seq, t))
                if seq.finished:
                    break
            if not seq.finished:
                rows.append((b, seq, start, new))
        if rows:
            self._draft_batch(hidden, rows)
        return events

    def _draft_batch(self, hidden: torch.Tensor, rows: list[tuple[int, Sequence, int, list[int]]]) -> None:
        """MTP over each row's new positions (absorbed attention, padded to the longest), then draft."""
        eng = self.engine
        dev = eng.device
        s = max(len(new) for *_, new in rows)
        h = hidden[[b for b, *_ in rows], :s]  # main hidden states at positions start .. start+s-1
        nxt = torch.tensor([new + [0] * (s - len(new)) for *_, new in rows], dtype=torch.long, device=dev)
        n_valid = torch.tensor([len(new) for *_, new in rows], device=dev)
        valid = torch.arange(s, device=dev) < n_valid[:, None]
        starts = torch.tensor([start for _, _, start, _ in rows], dtype=torch.long, device=dev)
        positions = starts[:, None] + torch.arange(s, device=dev)
        slots = torch.tensor([seq.slot for _, seq, _, _ in rows], dtype=torch.long, device=dev)
        max_len = max(start + len(new) for _, _, start, new in rows)
        x = self.module.combine(h, eng.model.embed_tokens(nxt))
        x = eng.forward_cached(x, self.blocks, slots, positions, valid, max_len)
        last = x[torch.arange(len(rows), device=dev), n_valid - 1]
        logits = self._head(last)
        for i, (_, seq, start, new) in enumerate(rows):
            seq.mtp_len = start + len(new)
            self._set_draft(seq, logits[i])
