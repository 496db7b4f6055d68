"""The engine: generation on top of the model runner, the scheduler, the sampler and the detokenizer.

One-way layers (as vLLM v1 and gpt-fast): the :class:`~dsv3.inference.runner.ModelRunner` runs prefills and
decode steps on tensors; the :class:`~dsv3.inference.scheduler.Scheduler` owns the requests and decides each
step; :mod:`~dsv3.inference.sampler` chooses the next tokens on the device for the whole batch (inside the
decode step's CUDA graph) and :mod:`~dsv3.inference.speculative` verifies MTP drafts; each request's text comes
from an :class:`~dsv3.inference.detokenize.IncrementalDetokenizer`. :class:`Engine` wires them and offers
``generate`` and ``stream``; none of the parts refers back to it. A step reads the new tokens back to the host
once (with their log-probabilities, and the prompt log-probabilities of the step's prefills, when asked).

A batch in which some row uses penalties, ``logit_bias``, ``min_tokens``, ``min_p``, a constraint or ``logprobs``
samples through the full path (:func:`~dsv3.inference.sampler.sample_processed`, one more CUDA graph mode);
the other rows of that batch get neutral options and keep their tokens. Constrained rows fill their bitmask
rows on the host before the step and accept their token after its read.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence as Seq

import torch

from ..model.transformer import DeepSeekV3
from .config import EngineConfig
from .detokenize import IncrementalDetokenizer
from .logprobs import pack_width, prompt_logprob_pack, read_step, unpack
from .penalties import ProcessingTensors
from .prepare import prepare_model
from .runner import ModelRunner
from .sampler import SamplingTensors, needs_filter, sample, sample_processed
from .sampling import GenerationRequest, GenerationResult, SamplingParams, TokenEvent, TokenLogprobs
from .scheduler import Plan, Scheduler, Sequence
from .speculative import MTPSpeculator

Prompt = list[int] | str
Read = tuple[torch.Tensor, Callable[[list], list[TokenEvent]]]
"""A device tensor the step reads back to the host, and what to do with its rows once read."""

_NOT_SPECULATIVE = {
    "presence_penalty": lambda p: p.presence_penalty != 0, "frequency_penalty": lambda p: p.frequency_penalty != 0,
    "repetition_penalty": lambda p: p.repetition_penalty != 1, "logit_bias": lambda p: bool(p.logit_bias),
    "min_p": lambda p: p.min_p > 0, "min_tokens": lambda p: p.min_tokens > 0,
}
"""Options the speculative step does not apply: its verification would need them at the draft's position too
(penalty counts and masks that depend on whether the draft is accepted)."""


class UnsupportedOptionError(ValueError):
    """A request option this engine cannot apply as configured (e.g. penalties with speculative decoding).
    ``options`` names them (:class:`SamplingParams` field names, or ``"constraint"``), so that callers such as the
    HTTP server can say which parameter is at fault without reading the message."""

    def __init__(self, options: Seq[str], why: str):
        self.options = tuple(options)
        verb = "is" if len(self.options) == 1 else "are"
        super().__init__(f"{', '.join(self.options)} {verb} not supported {why}")


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
        k = cfg.num_speculative_tokens
        self.speculator = MTPSpeculator(self.runner, k) if cfg.speculative else None
        # a speculative step writes k + 1 verified positions, and its further drafts k - 1 beyond the last kept
        self.scheduler = Scheduler(self.cache, cfg.max_batch, lookahead=2 * k if cfg.speculative else 1,
                                   max_prefill_tokens=cfg.max_prefill_tokens)
        """The engine's request queue, stepped by :meth:`step` (:meth:`generate`, :meth:`stream`, the server)."""
        self.host_reads = 0
        """Reads of new tokens back to the host so far (one per plain step; tests count them)."""

    def describe(self) -> str:
        spec = self.speculator
        return self.runner.describe() + (f", MTP speculative decoding ({spec.k} draft{'s' * (spec.k > 1)} a step)"
                                         if spec else "")

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
        prompt, :class:`UnsupportedOptionError` (a ``ValueError``) for options this engine cannot apply, and
        :class:`~dsv3.inference.cache.CacheFullError` for a prompt that could never fit the cache."""
        prompt = self.encode_prompt(request.prompt)
        params = request.params
        vocab = self.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab})")
        if self.speculator is not None:
            names = [n for n, used in _NOT_SPECULATIVE.items() if used(params)]
            names += ["constraint"] if request.constraint is not None else []
            if names:
                raise UnsupportedOptionError(names, "with speculative decoding")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_id is not None:
            stop_ids.add(self.eos_id)
        seq = Sequence(
            request=request, prompt=prompt,
            result=GenerationResult(request_id=request.request_id, prompt_tokens=len(prompt),
                                    logprobs=None if params.logprobs is None else [],
                                    prompt_logprobs=None if params.prompt_logprobs is None else [None]),
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
        reads: list[Read] = []
        if plan.prefill:
            outs, fresh, reads = self._prefill(plan)
            if fresh:
                seqs = [s for _, s in fresh]
                logits = torch.cat([outs[i][1] for i, _ in fresh])
                reads.append(self._tokens_read(self._sample(logits, seqs, [len(s.prompt) for s in seqs]), seqs))
        if plan.decode:
            seqs = plan.decode
            params = [s.params for s in seqs]
            full = any(self._full(s) for s in seqs)
            sampling = None if all(p.greedy for p in params) and not full else \
                SamplingTensors.from_params(params, [s.seed for s in seqs], "cpu")
            _, _, nxt = self.runner.decode_step([s.slot for s in seqs], [[s.last_token] for s in seqs], sampling,
                                                needs_filter(params), self._processing(seqs) if full else None)
            for s in seqs:
                s.result.forward_passes += 1
            reads.append(self._tokens_read(nxt, seqs))
        return self._read(reads)

    def _read(self, reads: list[Read]) -> list[TokenEvent]:
        """The step's one read of everything it produced for the host, then the events."""
        if not reads:
            return []
        rows = read_step([t for t, _ in reads], pack_width(self.config.vocab_size))
        self.host_reads += 1
        return [event for (_, handle), r in zip(reads, rows) for event in handle(r)]

    def _tokens_read(self, picked: torch.Tensor, seqs: list[Sequence]) -> Read:
        """Next tokens (b,) or packs (b, width) of ``seqs``, emitted once read."""
        return picked, lambda rows: [self.emit(s, *self._token(s, r)) for s, r in zip(seqs, rows)]

    @staticmethod
    def _token(seq: Sequence, row: int | list[float]) -> tuple[int, TokenLogprobs | None]:
        if isinstance(row, int):
            return row, None
        n = seq.params.logprobs
        return int(row[0]), None if n is None else unpack(row, n)

    @staticmethod
    def _full(seq: Sequence) -> bool:
        """Whether the sequence samples through the full path (processed logits and log-probabilities)."""
        return seq.params.processed or seq.params.logprobs is not None or seq.constraint is not None

    def _processing(self, seqs: list[Sequence], device: torch.device | str | None = None) -> ProcessingTensors:
        """The full path's per-row options; constrained rows fill their bitmask rows now."""
        return ProcessingTensors.from_rows(
            [s.params for s in seqs], [len(s.result.tokens) for s in seqs], [s.constraint for s in seqs],
            self.config.vocab_size, device, pin=self.device.type == "cuda")

    def _prefill(self, plan: Plan) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[int, Sequence]],
                                            list[Read]]:
        """One forward over the step's prefill chunks (each past its sequence's cached positions). Returns the
        (hidden, last logits) per chunk, the (chunk index, sequence) of new prompts now complete, which sample
        their first token, and the prompt log-probabilities of the chunks whose requests ask for them."""
        starts = [self.cache.lengths[s.slot] for s, _ in plan.prefill]
        chunks = [(s, s.prefill_tokens[a:a + n]) for (s, n), a in zip(plan.prefill, starts)]
        outs = self.runner.prefill_batch([s.slot for s, _ in chunks], [tokens for _, tokens in chunks])
        reads = []
        for (s, tokens), a, (hidden, _) in zip(chunks, starts, outs):
            s.result.forward_passes += 1
            if self.cache.lengths[s.slot] == s.n_prefill and s.params.processed:
                # the prompt is in the cache: the per-slot rows of the penalties, biases and stop tokens
                stops = [t for t in s.stop_ids if t < self.config.vocab_size]
                self.runner.processing.reset(s.slot, s.params, s.prompt, s.result.tokens, stops)
            if s.needs_prompt_logits:
                reads += self._prompt_logprobs(s, a, hidden)
        fresh = [(i, s) for i, (s, _) in enumerate(chunks)
                 if not s.result.tokens and self.cache.lengths[s.slot] == s.n_prefill]
        return outs, fresh, reads

    def _prompt_logprobs(self, seq: Sequence, start: int, hidden: torch.Tensor) -> list[Read]:
        """Packs of the prompt tokens that follow the chunk's positions start .. start + n - 1."""
        targets = seq.prompt[start + 1:start + 1 + hidden.shape[0]]
        if not targets:
            return []
        ids = torch.tensor(targets, dtype=torch.long).to(self.device, non_blocking=True)
        n = seq.params.prompt_logprobs
        packs = prompt_logprob_pack(self.model.lm_head, hidden, ids)
        return [(packs, lambda rows: seq.result.prompt_logprobs.extend(unpack(r, n) for r in rows) or [])]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int]) -> torch.Tensor:
        """Next tokens (B,) on the device for logits (B, V) of ``seqs`` at token positions ``offsets`` (packs
        (B, width) when some row takes the full path)."""
        params = [s.params for s in seqs]
        dev = logits.device
        if any(self._full(s) for s in seqs):
            t = SamplingTensors.from_params(params, [s.seed for s in seqs], dev)
            slots = torch.tensor([s.slot for s in seqs]).to(dev, non_blocking=True)
            return sample_processed(logits, t, torch.tensor(offsets).to(dev, non_blocking=True),
                                    self._processing(seqs, dev), self.runner.processing, slots)
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        t = SamplingTensors.from_params(params, [s.seed for s in seqs], dev)
        return sample(logits, t, torch.tensor(offsets, device=dev), needs_filter(params))

    def _speculative_step(self, plan: Plan) -> list[TokenEvent]:
        spec = self.speculator
        events: list[TokenEvent] = []
        if plan.prefill:
            outs, fresh, reads = self._prefill(plan)
            if fresh:
                seqs = [s for _, s in fresh]
                first = self._sample(torch.cat([outs[i][1] for i, _ in fresh]), seqs, [len(s.prompt) for s in seqs])
                reads.append(self._tokens_read(first, seqs))
            events += self._read(reads)
            for (s, _), (hidden, _) in zip(plan.prefill, outs):
                if not s.finished:  # the MTP module over the new positions; a draft once the prompt is done
                    spec.after_prefill(s, hidden, draft=self.cache.lengths[s.slot] == s.n_prefill)
        if plan.decode:
            for seq, new, logprobs in spec.step(plan.decode):
                for token, lp in zip(new, logprobs):
                    events.append(self.emit(seq, token, lp))
                    if seq.finished:
                        break
            self.host_reads += 1
        return events

    def emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> TokenEvent:
        """Append a new token (and its log-probabilities) to the sequence and decide whether it finishes it: a
        stop token or string, the length limit, or its constraint complete."""
        res = seq.result
        res.tokens.append(token)
        if res.logprobs is not None and logprobs is not None:
            res.logprobs.append(logprobs)
        complete = False
        if seq.constraint is not None:
            seq.constraint.accept(token)
            complete = seq.constraint.is_finished()
        last = len(res.tokens) >= seq.max_new_tokens or complete
        if seq.detokenizer is not None:
            delta, reason = seq.detokenizer.push(token, last=last)
        else:
            delta, reason = "", "stop" if token in seq.stop_ids else None
        res.finish_reason = reason or ("stop" if complete else "length" if last else None)
        if seq.detokenizer is not None and res.finish_reason is not None:
            res.text = seq.detokenizer.text  # once: building it copies the whole completion
        return TokenEvent(res.request_id, token, delta, res.finish_reason, logprobs)

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

