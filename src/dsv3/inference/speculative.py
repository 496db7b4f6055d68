"""Speculative decoding with the MTP module as the draft model (report §2.2: "use them to draft tokens").

Per sequence, with the cache holding positions 0 .. L-1 and t_L the last sampled token:

1. **draft** (done at the end of the previous step): the MTP module at position L-1 combines the main
   model's final hidden state h_{L-1} with Emb(t_L) (eq. 21), runs its block over its own latent cache
   (layer ``num_hidden_layers``) and predicts d_1 = t_{L+1} with the shared head (eq. 23), drawn from its
   distribution q_1 like any sampled token (greedy: the argmax). With k > 1 drafts the module runs again at
   position L on its own output hidden state there in place of h_L (not computed yet) with Emb(d_1), and
   drafts d_2 = t_{L+2}, and so on to d_k (V3 has one MTP module; reusing it for more drafts is allowed);
2. **verify**: one forward of the main model over [t_L, d_1 .. d_k] at positions L .. L+k gives p_L .. p_{L+k};
3. **accept** d_i with probability min(1, p_{L+i-1}(d_i) / q_i(d_i)) while every earlier one was; after the
   first rejection draw its replacement from norm(max(0, p - q_i)); when all k were accepted draw a bonus
   token from p_{L+k}; drop the rejected positions from the cache. The output is distributed exactly as
   plain sampling from p (Leviathan et al. 2023; Chen et al. 2023). With greedy params p and q are one-hot,
   so a draft is accepted iff it is the argmax and the output is plain greedy decoding token for token. The
   rule runs for the whole batch at once (:func:`~dsv3.inference.sampler.verify`);
4. the MTP module consumes the kept positions (h_{L+i} with t_{L+i+1}, the true hidden states overwriting
   what the chained drafts wrote there) and drafts the next k tokens.

The one-row rule :func:`speculative_accept` stays as the readable reference the tests compare the batched
one with.

Log-probabilities (``SamplingParams.logprobs``) come from the verify forward, which has the main model's logits
at every position: the pack of token i of the step is computed from p_{L+i} (raw logits), for the whole batch
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

    A step is the main model's decode step over [last token, k drafts] (the runner's CUDA graph), the
    batched acceptance rule, and the MTP module's step over the accepted positions with the next k drafts
    drawn on the device (captured in a CUDA graph of its own when the runner has graphs, per padded batch,
    key bucket and sampling mode: no recompilation per length); then one read of accepted counts, tokens and
    drafts.
    """

    def __init__(self, runner: ModelRunner, k: int = 1):
        if k < 1:
            raise ValueError(f"speculative decoding needs k >= 1 drafts a step, got {k}")
        self.runner, self.k = runner, k
        self.module = runner.model.mtp[0]
        self.blocks = runner.mtp_blocks[:1]
        rg = runner.graphs
        self.graphs = None if rg is None else StepGraphs(rg.batch_sizes, rg.batch_sizes[-1], runner.device)
        self.drafted = self.accepted = 0
        """Drafts verified and accepted so far, over all sequences (the CLI and the server report them)."""
        self.accepted_at = [0] * k
        """Per draft position i: how often draft i was accepted (so far, over all sequences)."""

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.model.lm_head(self.module.shared_head.norm(x))

    def _draw(self, logits: torch.Tensor, t: SamplingTensors | None, offsets: torch.Tensor,
              filtered: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts (R,) from the MTP logits (R, V) and the distributions they were drawn from (``None``: greedy)."""
        if t is None:
            return logits.argmax(dim=-1), None
        return sample(logits, t, offsets, filtered, salt=DRAFT_SALT), probs(logits, t, filtered)

    def _drafts(self, x: torch.Tensor, slots: torch.Tensor, position: torch.Tensor, valid: torch.Tensor,
                t: SamplingTensors | None, filtered: bool, n_keys: int, capturable: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The k drafts (R, k) after the MTP module's output x (R, d) at ``position`` (R,) (it predicts the
        token at position + 2), and their distributions (R, k, V) (``None``: greedy): each further draft runs
        the module at the next position on the previous output and draft, writing its MTP latent there."""
        run = self.runner
        draft, q = self._draw(self._head(x), t, position + 2, filtered)
        drafts, qs = [draft], [q]
        for i in range(1, self.k):
            x = self.module.combine(x[:, None], run.model.embed_tokens(draft)[:, None])
            x = run.forward_cached(x, self.blocks, slots, (position + i)[:, None], valid[:, None], n_keys,
                                   capturable)[:, 0]
            draft, q = self._draw(self._head(x), t, position + i + 2, filtered)
            drafts.append(draft)
            qs.append(q)
        return torch.stack(drafts, dim=1), None if t is None else torch.stack(qs, dim=1)

    def _set_drafts(self, seqs: list[Sequence], drafts: list[list[int]], q: torch.Tensor | None) -> None:
        for i, (seq, d) in enumerate(zip(seqs, drafts)):
            seq.draft, seq.draft_probs = d, None if q is None or seq.params.greedy else q[i]

    @torch.inference_mode()
    def after_prefill(self, seq: Sequence, hidden: torch.Tensor, draft: bool = True) -> None:
        """After a prefill of the positions mtp_len .. L-1 (main hidden states ``hidden`` (n, d)): run the MTP
        module over them (expanded attention; position i with the token i+1) and, with ``draft`` (the prompt
        is complete and t_L sampled), draft t_{L+1} .. t_{L+k}."""
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
            dev = run.device
            if self.k > 1:  # the further drafts' MTP latents (positions L .. L+k-2)
                run.extend_all([seq.slot], [self.k - 1])
            drafts, q = self._drafts(x[0, -1:], torch.tensor([seq.slot], device=dev),
                                     torch.tensor([length - 1], device=dev), torch.ones(1, dtype=torch.bool,
                                                                                        device=dev),
                                     t, needs_filter([seq.params]), length + self.k, False)
            cache.truncate(seq.slot, length)
            self._set_drafts([seq], drafts.tolist(), q)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int], list[TokenLogprobs | None]]]:
        """Verify every sequence's drafts and draft the next ones, for the whole batch in one forward (one CUDA
        graph replay when the runner has graphs) and one read; returns each sequence's 1 .. k+1 new tokens
        (the cache keeps [last token, accepted drafts]) and their log-probabilities (``None`` unless asked for)."""
        run, cache, dev, k = self.runner, self.runner.cache, self.runner.device, self.k
        b = len(seqs)
        # positions L (last token) .. L+k (drafts), and k-1 more for the next step's further drafts
        starts = run.extend_all([s.slot for s in seqs], [2 * k] * b)
        params = [s.params for s in seqs]
        greedy, filtered = all(p.greedy for p in params), needs_filter(params)
        logprobs = any(p.logprobs is not None for p in params)
        graphed = self.graphs is not None and self.graphs.covers(b)
        size = self.graphs.padded_batch(b) if graphed else b
        ints = torch.zeros(6, size, k + 1, dtype=torch.long)
        ints[0, :b] = torch.tensor([[s.last_token, *s.draft] for s in seqs])
        ints[1, :b] = torch.tensor([s.slot for s in seqs])[:, None]
        ints[2, :b] = torch.tensor(starts)[:, None] + torch.arange(k + 1)
        ints[3, :b] = 1
        floats = torch.zeros(2, size)
        q = None
        if not greedy:
            t = SamplingTensors.from_params(params, [s.seed for s in seqs], "cpu")
            floats[0, :b], floats[1, :b] = t.temperature, t.top_p
            ints[4, :b], ints[5, :b] = t.top_k[:, None], t.seed[:, None]
            one_hot = torch.nn.functional.one_hot(ints[0, :b, 1:].to(dev), self.runner.config.vocab_size).float()
            q = torch.stack([s.draft_probs if s.draft_probs is not None else one_hot[i] for i, s in enumerate(seqs)])
            if size > b:
                q = torch.cat([q, q.new_zeros(size - b, *q.shape[1:])])
        mode = "greedy" if greedy else "filtered" if filtered else "sample"
        max_len = max(starts) + 2 * k
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
        pieces = [torch.cat([accepted[:b], tokens[:b].flatten(), drafts[:b].flatten()])]
        if logprobs:  # the packs of every position of every row, ((k+1) b, width)
            pieces.append(packs[:b].flatten(0, 1))
        host = read_step(pieces, packs.shape[-1])  # the step's one read
        n_acc = host[0][:b]
        rows = host[0][b:b + (k + 1) * b]
        new_drafts = host[0][b + (k + 1) * b:]
        out = []
        for i, seq in enumerate(seqs):
            res = seq.result
            new = rows[(k + 1) * i:(k + 1) * i + 1 + n_acc[i]]
            n = seq.params.logprobs
            lps = [None if n is None else unpack(host[1][(k + 1) * i + j], n) for j in range(len(new))]
            res.forward_passes += 1
            res.draft_tokens += k
            res.accepted_tokens += n_acc[i]
            self.drafted += k
            self.accepted += n_acc[i]
            for j in range(n_acc[i]):
                self.accepted_at[j] += 1
            cache.truncate(seq.slot, starts[i] + len(new))  # keep [last token, accepted drafts]
            seq.mtp_len = starts[i] + len(new)
            out.append((seq, new, lps))
        self._set_drafts(seqs, [new_drafts[k * i:k * (i + 1)] for i in range(b)],
                         None if greedy else next_q[:b].clone())
        return out

    def _forward(
        self, ints: torch.Tensor, floats: torch.Tensor, q: torch.Tensor | None = None, *, n_keys: int, mode: str,
        capturable: bool, logprobs: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """One speculative step on the device, a function of its inputs (captured as a CUDA graph): ints (6, B,
        k+1) tokens [last, drafts], slot, positions L .. L+k, valid, top-k, seed; floats (2, B) temperature and
        top-p; q (B, k, V) the drafts' distributions (``None``: every row greedy). Returns accepted (B,),
        tokens (B, k+1), the next drafts (B, k), their distributions (B, k, V) (empty when greedy) and, with
        ``logprobs``, the packs (B, k+1, width) of the tokens under the main model's raw logits (else empty)."""
        run = self.runner
        tokens, slots, positions, valid = ints[0], ints[1, :, 0], ints[2], ints[3].bool()
        t = SamplingTensors(temperature=floats[0], top_k=ints[4, :, 0], top_p=floats[1], seed=ints[5, :, 0])
        filtered = mode == "filtered"
        # 1. the main model over [t_L, d_1 .. d_k]: p_L .. p_{L+k}
        h = run.model.norm(run.forward_cached(run.model.embed_tokens(tokens), run.main_blocks, slots, positions,
                                              valid, n_keys, capturable))
        logits = run.model.lm_head(h)
        # 2. accept or correct the drafts, a bonus token when all were accepted
        if mode == "greedy":
            accepted, new = verify_greedy(logits, tokens[:, 1:])
        else:
            accepted, new = verify(logits.float(), tokens[:, 1:], q, t, positions[:, 1], filtered)
        # 3. the MTP module over the kept positions: L+i with t_{L+i+1}, i = 0 .. accepted
        kept = valid & (torch.arange(tokens.shape[1], device=valid.device) <= accepted[:, None])
        x = self.module.combine(h, run.model.embed_tokens(new))
        x = run.forward_cached(x, self.blocks, slots, positions, kept, n_keys, capturable)
        last = (kept.long().sum(dim=1) - 1).clamp(min=0)
        rows = torch.arange(x.shape[0], device=x.device)
        drafts, next_q = self._drafts(x[rows, last], slots, positions[rows, last], valid[:, 0],
                                      None if mode == "greedy" else t, filtered, n_keys, capturable)
        packs = logprob_pack(logits, new) if logprobs else logits.new_zeros(0)
        return accepted, new, drafts, next_q if next_q is not None else drafts.new_zeros(0), packs


def _sampling(seqs: list[Sequence], device: torch.device) -> SamplingTensors | None:
    """The batch's sampling tensors, or ``None`` when every row is greedy."""
    params = [s.params for s in seqs]
    if all(p.greedy for p in params):
        return None
    return SamplingTensors.from_params(params, [s.seed for s in seqs], device)

