"""Speculative decoding with the MTP module as the draft model (report §2.2: "use them to draft tokens").

Per sequence, with the cache holding positions 0 .. L-1 and t_L the last sampled token:

1. **draft** (done at the end of the previous step): the MTP module at position L-1 combines the main
   model's final hidden state h_{L-1} with Emb(t_L) (eq. 21), runs its block over its own latent cache
   (layer ``num_hidden_layers``) and predicts d = t_{L+1} with the shared head (eq. 23), drawn from its
   distribution q like any sampled token (greedy: the argmax);
2. **verify**: one forward of the main model over [t_L, d] at positions L, L+1 gives p_L (for t_{L+1}) and
   p_{L+1} (for t_{L+2});
3. **accept** d with probability min(1, p_L(d) / q(d)); if accepted, also draw a bonus token from p_{L+1};
   if rejected, draw t_{L+1} from norm(max(0, p_L - q)) and drop position L+1 from the cache. The output is
   distributed exactly as plain sampling from p (Leviathan et al. 2023; Chen et al. 2023). With greedy
   params p and q are one-hot, so a draft is accepted iff it is the argmax and the output is plain greedy
   decoding token for token. The rule runs for the whole batch at once (:func:`~dsv3.inference.sampler.verify`);
4. the MTP module consumes the new positions (h_L with t_{L+1}, and h_{L+1} with t_{L+2} when accepted) and
   drafts the next token.

One draft per step (V3 has one MTP module). The one-row rule :func:`speculative_accept` stays as the readable
reference the tests compare the batched one with.
"""

from __future__ import annotations

import torch

from .runner import ModelRunner
from .sampler import SamplingTensors, needs_filter, probs, sample, verify
from .sampling import sample_from
from .scheduler import Sequence

DRAFT_SALT = 1
"""Keeps the drafts' random numbers apart from the verification's (:func:`~dsv3.inference.sampler.uniform`)."""


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
    """Drafts with ``model.mtp[0]`` and verifies with the main model, for a batch of running sequences."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.module = runner.model.mtp[0]
        self.blocks = runner.mtp_blocks[:1]
        self._pending: dict[int, tuple[torch.Tensor, int, list[int]]] = {}  # id(seq) -> (hidden, start, new)
        self.drafted = self.accepted = 0
        """Drafts verified and accepted so far, over all sequences (the CLI and the server report them)."""

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.model.lm_head(self.module.shared_head.norm(x))

    def _set_drafts(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Draw each sequence's draft from the MTP logits (R, V), at the position of the token it drafts."""
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            drafts, q = logits.argmax(dim=-1), None
        else:
            t = SamplingTensors.from_params(params, [s.seed for s in seqs], logits.device)
            offsets = torch.tensor([len(s.tokens) for s in seqs], device=logits.device)
            filtered = needs_filter(params)
            q = probs(logits, t, filtered)
            drafts = sample(logits, t, offsets, filtered, salt=DRAFT_SALT)
        for i, (seq, d) in enumerate(zip(seqs, drafts.tolist())):
            seq.draft, seq.draft_probs = d, None if q is None or seq.params.greedy else q[i]

    @torch.inference_mode()
    def draft_after_prefill(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """After a prefill of the positions mtp_len .. L-1 (main hidden states ``hidden`` (n, d)) and the
        sampling of t_L: run the MTP module over these positions (expanded attention) and draft t_{L+1}."""
        run, cache = self.runner, self.runner.cache
        length, start = cache.lengths[seq.slot], seq.mtp_len
        if hidden.shape[0] != length - start:
            raise ValueError(f"MTP needs the hidden states of positions {start} .. {length - 1}")
        nxt = torch.tensor(seq.tokens[start + 1:length + 1], dtype=torch.long, device=run.device)
        x = self.module.combine(hidden[None], run.model.embed_tokens(nxt)[None])
        x = run.run_prefill(x, self.blocks, [seq.slot], [start] if start else None)
        seq.mtp_len = length
        self._set_drafts([seq], self._head(x[0, -1:]))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Verify every sequence's draft in one batched forward over [last token, draft] and the batched
        acceptance rule; returns each sequence's 1 or 2 new tokens (the cache keeps [last token, accepted
        draft]). Call :meth:`draft_next` once they are emitted."""
        run, cache = self.runner, self.runner.cache
        params = [s.params for s in seqs]
        hidden, logits = run.decode([s.slot for s in seqs], [[s.last_token, s.draft] for s in seqs])
        t = SamplingTensors.from_params(params, [s.seed for s in seqs], logits.device)
        drafts = torch.tensor([[s.draft] for s in seqs], device=logits.device)
        q = None
        if any(s.draft_probs is not None for s in seqs):
            one_hot = torch.nn.functional.one_hot(drafts[:, 0], logits.shape[-1]).float()
            q = torch.stack([s.draft_probs if s.draft_probs is not None else one_hot[i]
                             for i, s in enumerate(seqs)])[:, None]
        offsets = torch.tensor([len(s.tokens) for s in seqs], device=logits.device)  # the draft's position
        accepted, tokens = verify(logits.float(), drafts, q, t, offsets, needs_filter(params))
        out = []
        for b, (seq, n_acc, row) in enumerate(zip(seqs, accepted.tolist(), tokens.tolist())):
            res = seq.result
            start = cache.lengths[seq.slot] - 2  # position of the last token
            res.forward_passes += 1
            res.draft_tokens += 1
            res.accepted_tokens += n_acc
            self.drafted += 1
            self.accepted += n_acc
            new = row[:n_acc + 1]
            cache.truncate(seq.slot, start + len(new))  # keep [last token, accepted draft]
            self._pending[id(seq)] = (hidden[b], start, new)
            out.append((seq, new))
        return out

    @torch.inference_mode()
    def draft_next(self, seqs: list[Sequence]) -> None:
        """After :meth:`step`: the MTP module over each still-running sequence's new positions (absorbed
        attention, padded to the longest), then the next drafts."""
        pending = [(s, *self._pending.pop(id(s))) for s in seqs]
        self._pending.clear()
        if not pending:
            return
        run = self.runner
        dev = run.device
        s = max(len(new) for *_, new in pending)
        h = torch.stack([hid[:s] for _, hid, _, _ in pending])  # main hidden states at positions start ..
        nxt = torch.tensor([new + [0] * (s - len(new)) for *_, new in pending], dtype=torch.long, device=dev)
        n_valid = torch.tensor([len(new) for *_, new in pending], device=dev)
        valid = torch.arange(s, device=dev) < n_valid[:, None]
        starts = torch.tensor([start for _, _, start, _ in pending], dtype=torch.long, device=dev)
        positions = starts[:, None] + torch.arange(s, device=dev)
        slots = torch.tensor([seq.slot for seq, *_ in pending], dtype=torch.long, device=dev)
        max_len = max(start + len(new) for _, _, start, new in pending)
        x = self.module.combine(h, run.model.embed_tokens(nxt))
        x = run.forward_cached(x, self.blocks, slots, positions, valid, max_len)
        last = x[torch.arange(len(pending), device=dev), n_valid - 1]
        for seq, _, start, new in pending:
            seq.mtp_len = start + len(new)
        self._set_drafts([seq for seq, *_ in pending], self._head(last))
