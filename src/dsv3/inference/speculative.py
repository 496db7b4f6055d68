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

Log-probabilities (``SamplingParams.logprobs``) come from the verify forward, which has the main model's logits
at both positions: the pack of token i of the step is computed from p_{L+i} (raw logits), for the whole batch
in the same step. Penalties, biases, ``min_p``, ``min_tokens`` and constraints are refused at submission (the
engine's ``ValueError``): applying them to the draft's position would depend on the draft being accepted.
"""

from __future__ import annotations

import torch

from .cuda_graph import StepGraphs
from .logprobs import logprob_pack, read_step, unpack
from .runner import ModelRunner
from .sampler import SamplingTensors, needs_filter, probs, sample, verify, verify_greedy
from .sampling import TokenLogprobs, sample_from
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
    """Drafts with ``model.mtp[0]`` and verifies with the main model, for a batch of running sequences.

    A step is the main model's decode step over [last token, draft] (the runner's CUDA graph), the batched
    acceptance rule, and the MTP module's step over the accepted positions with the next drafts drawn on the
    device (captured in a CUDA graph of its own when the runner has graphs, per padded batch, key bucket and
    sampling mode: no recompilation per length); then one read of accepted counts, tokens and drafts.
    """

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.module = runner.model.mtp[0]
        self.blocks = runner.mtp_blocks[:1]
        rg = runner.graphs
        self.graphs = None if rg is None else StepGraphs(rg.batch_sizes, rg.batch_sizes[-1], runner.device)
        self.drafted = self.accepted = 0
        """Drafts verified and accepted so far, over all sequences (the CLI and the server report them)."""

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.model.lm_head(self.module.shared_head.norm(x))

    def _draw(self, logits: torch.Tensor, t: SamplingTensors | None, offsets: torch.Tensor,
              filtered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts (R,) from the MTP logits (R, V) and the distributions they were drawn from (``None``: greedy)."""
        if t is None:
            return logits.argmax(dim=-1), None
        return sample(logits, t, offsets, filtered, salt=DRAFT_SALT), probs(logits, t, filtered)

    def _set_drafts(self, seqs: list[Sequence], drafts: list[int], q: torch.Tensor | None) -> None:
        for i, (seq, d) in enumerate(zip(seqs, drafts)):
            seq.draft, seq.draft_probs = d, None if q is None or seq.params.greedy else q[i]

    @torch.inference_mode()
    def after_prefill(self, seq: Sequence, hidden: torch.Tensor, draft: bool = True) -> None:
        """After a prefill of the positions mtp_len .. L-1 (main hidden states ``hidden`` (n, d)): run the MTP
        module over them (expanded attention; position i with the token i+1) and, with ``draft`` (the prompt
        is complete and t_L sampled), draft t_{L+1}."""
        run, cache = self.runner, self.runner.cache
        length, start = cache.lengths[seq.slot], seq.mtp_len
        if hidden.shape[0] != length - start:
            raise ValueError(f"MTP needs the hidden states of positions {start} .. {length - 1}")
        nxt = torch.tensor(seq.tokens[start + 1:length + 1], dtype=torch.long, device=run.device)
        x = self.module.combine(hidden[None], run.model.embed_tokens(nxt)[None])
        x = run.run_prefill(x, self.blocks, [seq.slot], [start] if start else None)
        seq.mtp_len = length
        if draft:
            t = _sampling([seq], run.device)
            drafts, q = self._draw(self._head(x[0, -1:]), t, torch.tensor([len(seq.tokens)], device=run.device),
                                   needs_filter([seq.params]))
            self._set_drafts([seq], drafts.tolist(), q)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int], list[TokenLogprobs | None]]]:
        """Verify every sequence's draft and draft the next token, for the whole batch in one forward (one CUDA
        graph replay when the runner has graphs) and one read; returns each sequence's 1 or 2 new tokens (the
        cache keeps [last token, accepted draft]) and their log-probabilities (``None`` unless asked for)."""
        run, cache, dev = self.runner, self.runner.cache, self.runner.device
        b = len(seqs)
        starts = run.extend_all([s.slot for s in seqs], [2] * b)  # positions L (last token) and L+1 (draft)
        params = [s.params for s in seqs]
        greedy, filtered = all(p.greedy for p in params), needs_filter(params)
        logprobs = any(p.logprobs is not None for p in params)
        graphed = self.graphs is not None and self.graphs.covers(b)
        size = self.graphs.padded_batch(b) if graphed else b
        ints = torch.zeros(6, size, 2, dtype=torch.long)
        ints[0, :b] = torch.tensor([[s.last_token, s.draft] for s in seqs])
        ints[1, :b] = torch.tensor([s.slot for s in seqs])[:, None]
        ints[2, :b] = torch.tensor(starts)[:, None] + torch.arange(2)
        ints[3, :b] = 1
        floats = torch.zeros(2, size)
        q = None
        if not greedy:
            t = SamplingTensors.from_params(params, [s.seed for s in seqs], "cpu")
            floats[0, :b], floats[1, :b] = t.temperature, t.top_p
            ints[4, :b], ints[5, :b] = t.top_k[:, None], t.seed[:, None]
            one_hot = torch.nn.functional.one_hot(ints[0, :b, 1].to(dev), self.runner.config.vocab_size).float()
            q = torch.stack([s.draft_probs if s.draft_probs is not None else one_hot[i] for i, s in enumerate(seqs)])
            if size > b:
                q = torch.cat([q, q.new_zeros(size - b, q.shape[1])])
        mode = "greedy" if greedy else "filtered" if filtered else "sample"
        max_len = max(starts) + 2
        inputs = (ints, floats) if q is None else (ints, floats, q)
        if graphed:
            n_keys = run.graphs.key_pages(max_len) * cache.page_size
            outs = self.graphs.replay((size, n_keys, mode, logprobs), inputs,
                                      lambda *x: self._forward(*x, n_keys=n_keys, mode=mode, capturable=True,
                                                               logprobs=logprobs))
        else:
            outs = self._forward(*(x.to(dev) for x in inputs), n_keys=max_len, mode=mode, capturable=False,
                                 logprobs=logprobs)
        accepted, tokens, drafts, next_q, packs = outs
        pieces = [torch.cat([accepted[:b], tokens[:b].flatten(), drafts[:b]])]
        if logprobs:  # the packs of both positions of every row, (2b, width)
            pieces.append(packs[:b].flatten(0, 1))
        host = read_step(pieces, packs.shape[-1])  # the step's one read
        n_acc, rows, new_drafts = host[0][:b], host[0][b:3 * b], host[0][3 * b:]
        out = []
        for i, seq in enumerate(seqs):
            res = seq.result
            new = rows[2 * i:2 * i + 1 + n_acc[i]]
            n = seq.params.logprobs
            lps = [None if n is None else unpack(host[1][2 * i + j], n) for j in range(len(new))]
            res.forward_passes += 1
            res.draft_tokens += 1
            res.accepted_tokens += n_acc[i]
            self.drafted += 1
            self.accepted += n_acc[i]
            cache.truncate(seq.slot, starts[i] + len(new))  # keep [last token, accepted draft]
            seq.mtp_len = starts[i] + len(new)
            out.append((seq, new, lps))
        self._set_drafts(seqs, new_drafts, None if greedy else next_q[:b].clone())
        return out

    def _forward(
        self, ints: torch.Tensor, floats: torch.Tensor, q: torch.Tensor | None = None, *, n_keys: int, mode: str,
        capturable: bool, logprobs: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One speculative step on the device, a function of its inputs (captured as a CUDA graph): ints (6, B,
        2) tokens [last, draft], slot, positions L and L+1, valid, top-k, seed; floats (2, B) temperature and
        top-p; q (B, V) the drafts' distributions (``None``: every row greedy). Returns accepted (B,), tokens
        (B, 2), the next drafts (B,), their distributions (B, V) (empty when greedy) and, with ``logprobs``, the
        packs (B, 2, width) of the two tokens under the main model's raw logits (else empty)."""
        run = self.runner
        tokens, slots, positions, valid = ints[0], ints[1, :, 0], ints[2], ints[3].bool()
        t = SamplingTensors(temperature=floats[0], top_k=ints[4, :, 0], top_p=floats[1], seed=ints[5, :, 0])
        filtered = mode == "filtered"
        # 1. the main model over [t_L, d]: p_L and p_{L+1}
        h = run.model.norm(run.forward_cached(run.model.embed_tokens(tokens), run.main_blocks, slots, positions,
                                              valid, n_keys, capturable))
        logits = run.model.lm_head(h)
        # 2. accept or correct the draft, a bonus token when accepted
        if mode == "greedy":
            accepted, new = verify_greedy(logits, tokens[:, 1:])
        else:
            accepted, new = verify(logits.float(), tokens[:, 1:], None if q is None else q[:, None], t,
                                   positions[:, 1], filtered)
        # 3. the MTP module over the kept positions: L with t_{L+1}, L+1 with t_{L+2} if the draft was kept
        kept = valid & (torch.arange(2, device=valid.device) <= accepted[:, None])
        x = self.module.combine(h, run.model.embed_tokens(new))
        x = run.forward_cached(x, self.blocks, slots, positions, kept, n_keys, capturable)
        last = (kept.long().sum(dim=1) - 1).clamp(min=0)
        rows = torch.arange(x.shape[0], device=x.device)
        drafts, next_q = self._draw(self._head(x[rows, last]), None if mode == "greedy" else t,
                                    positions[rows, last] + 2, filtered)
        packs = logprob_pack(logits, new) if logprobs else logits.new_zeros(0)
        return accepted, new, drafts, next_q if next_q is not None else drafts.new_zeros(0), packs


def _sampling(seqs: list[Sequence], device: torch.device) -> SamplingTensors | None:
    """The batch's sampling tensors, or ``None`` when every row is greedy."""
    params = [s.params for s in seqs]
    if all(p.greedy for p in params):
        return None
    return SamplingTensors.from_params(params, [s.seed for s in seqs], device)

