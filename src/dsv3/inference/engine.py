"""The engine: generation on top of the model runner, the scheduler, the sampler and the detokenizer.

One-way layers (as vLLM v1 and gpt-fast): the :class:`~dsv3.inference.runner.ModelRunner` runs prefills and
decode steps on tensors; the :class:`~dsv3.inference.scheduler.Scheduler` owns the requests and decides each
step; :mod:`~dsv3.inference.sampler` chooses the next tokens on the device for the whole batch (inside the
decode step's CUDA graph) and :mod:`~dsv3.inference.speculative` verifies MTP drafts; each request's text comes
from an :class:`~dsv3.inference.detokenize.IncrementalDetokenizer`. :class:`Engine` wires them and offers
``generate`` and ``stream``; none of the parts refers back to it. A step reads the new tokens back to the host
once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence as Seq

import torch

from ..model.transformer import DeepSeekV3
from .config import EngineConfig
from .detokenize import IncrementalDetokenizer
from .prepare import prepare_model
from .runner import ModelRunner
from .sampler import SamplingTensors, needs_filter, sample
from .sampling import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from .scheduler import Plan, Scheduler, Sequence
from .speculative import MTPSpeculator

Prompt = list[int] | str


class Engine:
    """Generation with a :class:`DeepSeekV3` model over a paged latent cache.

    ``config`` (:class:`~dsv3.inference.config.EngineConfig`) or its fields as keyword arguments. The engine
    prepares the model for inference in place (:func:`~dsv3.inference.prepare.prepare_model`: moved and cast
    as asked, eval mode, fused projections, FP32 routers); :meth:`load_weights` replaces its weights later.
    """

    def __init__(self, model: DeepSeekV3, tokenizer=None, config: EngineConfig | None = None, **options):
        if config is not None and options:
            raise TypeError("give an EngineConfig or its fields as keywords, not both")
        self.options = config if config is not None else EngineConfig(**options)
        cfg = self.options
        self.model = prepare_model(model, cfg.device, cfg.torch_dtype, cfg.fuse)
        self.runner = ModelRunner(self.model, cfg)
        self.config = model.config
        self.tokenizer = tokenizer
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.max_batch, self.max_seq_len = cfg.max_batch, self.runner.max_seq_len
        self.cache = self.runner.cache
        self.eos_id: int | None = getattr(tokenizer, "eos_id", None) if tokenizer is not None else \
            self.config.eos_token_id
        self.speculator = MTPSpeculator(self.runner) if cfg.speculative else None
        self.scheduler = Scheduler(self.cache, cfg.max_batch, lookahead=2 if cfg.speculative else 1,
                                   max_prefill_tokens=cfg.max_prefill_tokens)
        """The engine's request queue, stepped by :meth:`step` (:meth:`generate`, :meth:`stream`, the server)."""
        self.host_reads = 0
        """Reads of new tokens back to the host so far (one per plain step; tests count them)."""

    def describe(self) -> str:
        return self.runner.describe() + (", MTP speculative decoding" if self.speculator else "")

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Replace the model's weights in place (e.g. a new policy between post-training rollouts)."""
        self.runner.load_weights(state_dict, strict)

    # ================================================================================================
    # requests
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in max_seq_len = {self.max_seq_len}")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Queue a request; its result fills in place as :meth:`step` runs. Raises ``ValueError`` for a bad
        prompt and :class:`~dsv3.inference.cache.CacheFullError` for one that could never fit the cache."""
        prompt = self.encode_prompt(request.prompt)
        params = request.params
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_id is not None:
            stop_ids.add(self.eos_id)
        seq = Sequence(
            request=request, prompt=prompt,
            result=GenerationResult(request_id=request.request_id, prompt_tokens=len(prompt)),
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            stop_ids=frozenset(stop_ids), max_new_tokens=min(params.max_new_tokens, self.max_seq_len - len(prompt)),
        )
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, stop_ids)
        return self.scheduler.submit(seq)

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    # ================================================================================================
    # one step
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill the admitted prompts (one batched forward, long prompts in chunks), decode one token for
        every running sequence (or verify their drafts), retire the finished. Returns the new tokens' events."""
        plan = self.scheduler.schedule()
        events = plan.events
        if self.speculator is not None:
            events += self._speculative_step(plan)
        else:
            events += self._plain_step(plan)
        for seq in plan.admitted:  # their prompts' full pages, for later requests
            if seq.slot >= 0:
                self.cache.register_prefix(seq.slot, seq.prefill_tokens[:self.cache.lengths[seq.slot]])
        for seq in [s for s in self.scheduler.running if s.finished]:
            self.scheduler.retire(seq)
        return events

    def _plain_step(self, plan: Plan) -> list[TokenEvent]:
        picked: list[torch.Tensor] = []
        emitting: list[Sequence] = []
        if plan.prefill:
            outs, fresh = self._prefill(plan)
            if fresh:
                logits = torch.cat([outs[i][1] for i, _ in fresh])
                seqs = [s for _, s in fresh]
                picked.append(self._sample(logits, seqs, [len(s.prompt) for s in seqs]))
                emitting += seqs
        if plan.decode:
            seqs = plan.decode
            greedy = all(s.params.greedy for s in seqs)
            sampling = None if greedy else SamplingTensors.from_params([s.params for s in seqs],
                                                                       [s.seed for s in seqs], "cpu")
            _, _, nxt = self.runner.decode_step([s.slot for s in seqs], [[s.last_token] for s in seqs], sampling,
                                                needs_filter([s.params for s in seqs]))
            for s in seqs:
                s.result.forward_passes += 1
            picked.append(nxt)
            emitting += seqs
        if not picked:
            return []
        tokens = (picked[0] if len(picked) == 1 else torch.cat(picked)).tolist()  # the step's one read to the host
        self.host_reads += 1
        return [self.emit(seq, token) for seq, token in zip(emitting, tokens)]

    def _prefill(self, plan: Plan) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, Sequence]]]:
        """One forward over the step's prefill chunks (each past its sequence's cached positions). Returns the
        (hidden, last logits) per chunk and the (chunk index, sequence) of new prompts now complete, which
        sample their first token."""
        chunks = [(s, s.prefill_tokens[self.cache.lengths[s.slot]:self.cache.lengths[s.slot] + n])
                  for s, n in plan.prefill]
        outs = self.runner.prefill_batch([s.slot for s, _ in chunks], [tokens for _, tokens in chunks])
        for s, _ in chunks:
            s.result.forward_passes += 1
        fresh = [(i, s) for i, (s, _) in enumerate(chunks)
                 if not s.result.tokens and self.cache.lengths[s.slot] == s.n_prefill]
        return outs, fresh

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int]) -> torch.Tensor:
        """Next tokens (B,) on the device for logits (B, V) of ``seqs`` at token positions ``offsets``."""
        params = [s.params for s in seqs]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        t = SamplingTensors.from_params(params, [s.seed for s in seqs], logits.device)
        return sample(logits, t, torch.tensor(offsets, device=logits.device), needs_filter(params))

    def _speculative_step(self, plan: Plan) -> list[TokenEvent]:
        spec = self.speculator
        events: list[TokenEvent] = []
        if plan.prefill:
            outs, fresh = self._prefill(plan)
            if fresh:
                seqs = [s for _, s in fresh]
                first = self._sample(torch.cat([outs[i][1] for i, _ in fresh]), seqs, [len(s.prompt) for s in seqs])
                self.host_reads += 1
                events += [self.emit(s, t) for s, t in zip(seqs, first.tolist())]
            for (s, _), (hidden, _) in zip(plan.prefill, outs):
                if not s.finished:  # the MTP module over the new positions; a draft once the prompt is done
                    spec.after_prefill(s, hidden, draft=self.cache.lengths[s.slot] == s.n_prefill)
        if plan.decode:
            for seq, new in spec.step(plan.decode):
                for token in new:
                    events.append(self.emit(seq, token))
                    if seq.finished:
                        break
            self.host_reads += 1
        return events

    def emit(self, seq: Sequence, token: int) -> TokenEvent:
        """Append a new token to the sequence and decide whether it finishes it."""
        res = seq.result
        res.tokens.append(token)
        last = len(res.tokens) >= seq.max_new_tokens
        if seq.detokenizer is not None:
            delta, reason = seq.detokenizer.push(token, last=last)
        else:
            delta, reason = "", "stop" if token in seq.stop_ids else None
        res.finish_reason = reason or ("length" if last else None)
        if seq.detokenizer is not None and res.finish_reason is not None:
            res.text = seq.detokenizer.text  # once: building it copies the whole completion
        return TokenEvent(res.request_id, token, delta, res.finish_reason)

    # ================================================================================================
    # generation
    def _requests(self, prompts, params) -> list[GenerationRequest]:
        if isinstance(prompts, (str, GenerationRequest)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (token-id lists or strings)")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        return [
            p if isinstance(p, GenerationRequest) else GenerationRequest(prompt=p, params=sp)
            for p, sp in zip(prompts, params, strict=True)
        ]

    def stream(
        self, prompts: Seq[Prompt | GenerationRequest], params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> Iterator[TokenEvent]:
        """Generate for all prompts with continuous batching, yielding each new token of each request as it
        comes. Abandoning the iterator cancels the requests still running."""
        pending = {self.submit(r).request_id for r in self._requests(prompts, params)}
        try:
            while pending:
                for event in self.step():
                    if event.request_id in pending:
                        if event.finish_reason is not None:
                            pending.discard(event.request_id)
                        yield event
        finally:
            for rid in pending:
                self.cancel(rid)
            if pending:
                self.step()

    def generate(
        self, prompts: Seq[Prompt | GenerationRequest], params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Complete every prompt; results in the order of the prompts. (Steps the engine's scheduler, so
        requests submitted by others advance too.)"""
        results = [self.submit(r) for r in self._requests(prompts, params)]
        while any(r.finish_reason is None for r in results):
            self.step()
        return results

