"""The inference engine: prefill and absorbed-MLA decode over a paged latent cache, plus generation.

Two attention forms over the same cache (report §2.1.1; the block-level math is in
:mod:`dsv3.inference.layers`):

* **prefill** (:meth:`Engine.prefill`, :meth:`Engine.prefill_batch`): the expanded form of training, with
  c^KV and k^R written to the cache. A prompt appended to a cached sequence (prefix continuation) attends
  over the cached latents too.
* **decode** (:meth:`Engine.decode`, a batch of sequences of different lengths): weight absorption, W^UK
  moved into the query and W^UV after the attention, so per cached token only the 576 latent values are
  read; keys and values are never expanded.

Everything else in a block (norms, dense FFN, MoE) is the model's own module; the MoE runs through
:func:`~dsv3.inference.moe.moe_forward`, which counts the tokens per expert without reading anything
back to the host. The batched decode core, :meth:`Engine.forward_cached`, works on tensors of fixed shape (tokens, slots,
positions, a validity mask, a key length): on a GPU, :mod:`dsv3.inference.cuda_graph` pads a batch to a
few fixed sizes and replays one captured CUDA graph per decode step (``Engine(cuda_graph=...)``), and
``torch.compile`` fuses each block's small operations (``Engine(compile=...)``). The plain path stays the
reference (CPU, tests). Generation (:meth:`Engine.generate`, :meth:`Engine.stream`) runs on
the continuous-batching :class:`~dsv3.inference.scheduler.Scheduler`; the engine itself does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field

import torch

from ..model.attention import _prefer_cudnn
from ..model.moe import Experts, Gate, _grouped_mm_ok
from ..model.transformer import DeepSeekV3
from ..model.transformer_block import Block
from .cache import CacheFullError, PagedLatentCache
from .fusion import fuse_projections
from .layers import decode_block, prefill_block
from .sampling import GenerationRequest, GenerationResult, SamplingParams, TokenEvent, sample_token

Prompt = list[int] | str


@dataclass(eq=False)
class Sequence:
    """A request being generated: its cache slot, its tokens and its sampling state.

    Invariant between steps: the cache holds positions 0 .. n-2 of the n tokens prompt + completion; the
    last sampled token (:attr:`last_token`) is the input of the next step.
    """

    request: GenerationRequest
    prompt: list[int]
    slot: int
    generator: torch.Generator
    stop_ids: frozenset[int]
    max_new_tokens: int
    """``params.max_new_tokens``, lowered so that prompt + completion fits ``max_seq_len``."""
    result: GenerationResult
    text_sent: int = 0
    """Characters of the completion text already streamed."""
    draft: int | None = None
    """Speculative decoding: the MTP module's proposal for the token after :attr:`last_token`."""
    draft_probs: torch.Tensor | None = field(default=None, repr=False)
    """Its draft distribution q (V,); ``None`` for greedy (one-hot)."""
    mtp_len: int = 0
    """Positions of this sequence already in the MTP block's cache."""

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def last_token(self) -> int:
        return self.result.tokens[-1]

    @property
    def finished(self) -> bool:
        return self.result.finish_reason is not None


class Engine:
    """Generation with a :class:`DeepSeekV3` model and a paged latent cache.

    ``max_batch`` bounds the sequences in flight (the cache's slots), ``max_seq_len`` the tokens of one
    sequence (prompt + completion); ``num_pages`` pages of ``page_size`` tokens are shared by all sequences
    (default: enough for ``max_batch`` sequences of ``max_seq_len``). ``device`` / ``dtype`` default to the
    model's; when given, the model is moved there. ``speculative`` drafts one token per step with the
    model's first MTP module (report §2.2) and verifies it with the main model
    (:mod:`dsv3.inference.speculative`).

    ``cuda_graph``: replay captured CUDA graphs for the decode steps and (where the experts run as grouped
    GEMMs) for prefills of new prompts of at most ``max_prefill_graph_tokens`` padded tokens (0: prefill
    eagerly) (:mod:`dsv3.inference.cuda_graph`),
    batches padded up to the nearest of ``graph_batch_sizes``. ``None`` (default): on when the model is on
    a CUDA device and its experts run as grouped GEMMs (bf16 on Hopper). ``True`` on the CPU runs the same
    padded fixed-shape step eagerly (for tests). The model's weights and the cache must not be moved or
    reallocated once graphs are captured.

    ``compile``: run each decode and prefill block through ``torch.compile`` (one compiled function serves
    every layer; the first steps of each new shape compile, which takes a while). ``None`` (default): on
    with CUDA graphs on a CUDA device. It leaves the numbers as they are up to floating-point rounding.

    ``decode_experts``: how the routed experts of a decode step run (:func:`~dsv3.inference.moe.moe_forward`):
    ``"few_rows"`` (Triton kernels for a few rows per expert; the absorbed attention then also runs through
    the Triton kernels of :mod:`~dsv3.inference.triton_mla`), ``"module"`` (the model's own experts,
    ``torch._grouped_mm`` on Hopper) or ``"auto"`` (default: ``few_rows`` on a CUDA device with Triton where
    the experts run as grouped GEMMs, else ``module``).

    ``fuse``: stack the projections that read the same input into one GEMM each (MLA's first query and latent
    projections, the SwiGLU gate and up; :func:`~dsv3.inference.fusion.fuse_projections`). The model's Linear
    weights become views of the stacks (no extra memory, same plain forward) and its routers' weights FP32.
    """

    def __init__(
        self,
        model: DeepSeekV3,
        tokenizer=None,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        speculative: bool = False,
        cuda_graph: bool | None = None,
        graph_batch_sizes: Seq[int] = (1, 2, 4, 8, 16, 32),
        compile: bool | None = None,
        decode_experts: str = "auto",
        max_prefill_graph_tokens: int = 16384,
        fuse: bool = True,
    ):
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype if dtype is not None else param.dtype
        if device is not None or dtype is not None:
            model.to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        if speculative and len(model.mtp) == 0:
            raise ValueError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers >= 1)")
        self.speculative = speculative
        n_main = self.config.num_hidden_layers
        self.main_blocks: list[tuple[int, Block]] = list(enumerate(model.layers))
        self.mtp_blocks: list[tuple[int, Block]] = [(n_main + k, m) for k, m in enumerate(model.mtp)]
        self.cache = PagedLatentCache(
            n_main + (len(model.mtp) if speculative else 0),
            self.config.kv_lora_rank,
            self.config.qk_rope_head_dim,
            max_seqs=max_batch,
            max_seq_len=self.max_seq_len,
            page_size=page_size,
            num_pages=num_pages,
            device=self.device,
            dtype=self.dtype,
        )
        eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else self.config.eos_token_id
        self.eos_id: int | None = eos
        from .scheduler import Scheduler  # the scheduler drives the engine; imported here to avoid a cycle
        from .speculative import MTPSpeculator

        self.speculator = MTPSpeculator(self) if speculative else None
        grouped = self._experts_grouped()
        if fuse:
            fuse_projections(model)
        if decode_experts == "auto":
            decode_experts = "few_rows" if grouped and self.device.type == "cuda" and _has_triton() else "module"
        if decode_experts not in ("few_rows", "module"):
            raise ValueError(f"decode_experts must be 'auto', 'few_rows' or 'module', got {decode_experts!r}")
        if decode_experts == "few_rows" and not (self.device.type == "cuda" and _has_triton()):
            raise ValueError("decode_experts='few_rows' is a Triton kernel: it needs a CUDA device and triton")
        self.decode_experts = decode_experts
        """How the routed experts of a decode step run; a captured step whose experts would need the
        host-syncing loop runs them ``"gathered"`` instead."""
        self._capturable_experts = decode_experts if grouped or decode_experts == "few_rows" else "gathered"
        c = self.config
        pow2 = all(v & (v - 1) == 0 for v in (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim))
        self.decode_kernels = (decode_experts == "few_rows" and self.dtype == torch.bfloat16 and pow2
                               and c.num_attention_heads <= 32)
        """Absorbed attention of a decode step through the Triton kernels of :mod:`dsv3.inference.triton_mla`
        (with the ``few_rows`` experts, in bf16, for latent and head sizes that are powers of two and up to
        32 heads on one program's tile); else einsums and softmax."""
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and grouped
        self.graphs = self.prefill_graphs = None
        if cuda_graph:
            from .cuda_graph import DecodeGraphs, PrefillGraphs

            self.graphs = DecodeGraphs(self, graph_batch_sizes)
            # a prefill runs the model's own experts: capturable as grouped GEMMs only (not the loop)
            if max_prefill_graph_tokens > 0 and (grouped or self.device.type != "cuda"):
                self.prefill_graphs = PrefillGraphs(self, graph_batch_sizes, max_prefill_graph_tokens)
        if compile is None:
            compile = self.graphs is not None and self.device.type == "cuda"
        self._decode_block = torch.compile(decode_block, dynamic=None) if compile else decode_block
        # Prefill runs the experts through the model's own module: compiled only where that is a grouped GEMM
        # (the reference loop splits by counts read to the host: a recompilation per split).
        compile_prefill = compile and grouped
        self._prefill_block = torch.compile(prefill_block, dynamic=True) if compile_prefill else prefill_block
        self.scheduler = Scheduler(self)
        """The engine's own request queue, used by :meth:`generate` and :meth:`stream`."""

    def _experts_grouped(self) -> bool:
        """Every weight is in the engine's dtype (FP8-served models keep the plain path) and every MoE
        layer's experts run as a grouped GEMM (bf16 on Hopper: no host sync)."""
        probe = torch.empty(0, 8, device=self.device, dtype=self.dtype)
        routers = {id(m.weight) for m in self.model.modules() if isinstance(m, Gate)}  # may be FP32 (fusion.py)
        return all(p.dtype == self.dtype for p in self.model.parameters() if id(p) not in routers) and all(
            m.implementation == "grouped" or (m.implementation == "auto" and _grouped_mm_ok(probe, m.gate_up_proj))
            for m in self.model.modules() if isinstance(m, Experts))

    # ================================================================================================
    # forwards through blocks
    def run_prefill(
        self, x: torch.Tensor, blocks: list[tuple[int, Block]], slot: int | torch.Tensor, start: int,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (1, n, d) through ``blocks`` at positions start .. start+n-1 of ``slot`` (expanded attention);
        the latents are written to the cache, whose pages must already cover these positions. Several
        prompts at once (start 0): ``slot`` (B,) and x (B, n, d) right-padded, ``valid`` (B, n) marking the
        real tokens (the padding writes to the scratch page)."""
        n = x.shape[1]
        slots = torch.as_tensor(slot, device=x.device).reshape(-1)
        positions = torch.arange(start, start + n, device=x.device)
        cos, sin = self.model.rotary(positions)
        index = self.cache.flat_index(slots[:, None], positions[None], valid)
        pages = self.cache.block_table[slots, :self.cache.pages_for(start + n)] if start > 0 else None
        with _prefer_cudnn(x):
            for layer, block in blocks:
                x = self._prefill_block(block, x, cos, sin, self.cache.latent[layer], index, start, pages)
        return x

    def forward_cached(
        self,
        x: torch.Tensor,
        blocks: list[tuple[int, Block]],
        slots: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        max_len: int,
        capturable: bool = False,
    ) -> torch.Tensor:
        """The batched decode core: x (B, S, d) through ``blocks`` with absorbed attention.

        ``slots`` (B,) cache slot of each row; ``positions`` (B, S) position of each new token; ``valid``
        (B, S) bool or ``None`` (all valid): invalid (padding) tokens write to the scratch page and their
        outputs are meaningless; ``max_len`` bounds the keys read (every valid position < max_len). All
        shapes are fixed by (B, S, max_len), and nothing is read back to the host: padded to constants, one
        step is captured in a CUDA graph (``capturable`` also keeps the experts off the host-syncing loop).
        """
        cos, sin = self.model.rotary(positions)
        index = self.cache.flat_index(slots[:, None], positions, valid)
        pages = self.cache.block_table[slots, :self.cache.pages_for(max_len)]  # (B, P)
        experts = self._capturable_experts if capturable else self.decode_experts
        for layer, block in blocks:
            x = self._decode_block(block, x, cos, sin, self.cache.latent[layer], index, pages, positions, experts,
                                   self.decode_kernels)
        return x

    # ================================================================================================
    # sequence-level API
    def new_sequence(self) -> int:
        """An empty cache slot (raises :class:`CacheFullError` when all are taken)."""
        return self.cache.new_sequence()

    def free(self, slot: int) -> None:
        """Release a slot and its pages."""
        self.cache.free(slot)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Seq[int], all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens`` to the sequence in ``slot`` (empty, or a cached prefix to continue) and run them
        through the main model. Returns the final normalised hidden states (n, d) and the logits of the
        last token (1, V), or of every token (n, V) with ``all_logits``."""
        n = len(tokens)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if not all_logits and self.cache.lengths[slot] == 0:
            return self.prefill_batch([slot], [tokens])[0]
        start = self.cache.extend(slot, n)
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        x = self.run_prefill(self.model.embed_tokens(ids), self.main_blocks, slot, start)
        h = self.model.norm(x)[0]
        return h, self.model.lm_head(h if all_logits else h[-1:])

    @torch.inference_mode()
    def prefill_batch(self, slots: Seq[int], prompts: Seq[Seq[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`prefill` of several prompts into empty slots, in one forward: the prompts are right-padded
        to the longest (causal attention keeps the padding out of the real tokens; it writes to the scratch
        page), through a captured CUDA graph when the engine has them. Returns (hidden (n_i, d), last-token
        logits (1, V)) per prompt. Slots holding a prefix are prefilled one at a time."""
        lengths = [len(p) for p in prompts]
        if len(slots) != len(prompts) or min(lengths, default=1) == 0:
            raise ValueError("prefill_batch needs one non-empty prompt per slot")
        if any(self.cache.lengths[slot] for slot in slots):
            return [self.prefill(slot, tokens) for slot, tokens in zip(slots, prompts)]
        self._extend_all(slots, lengths)
        if self.prefill_graphs is not None and self.prefill_graphs.covers_prompts(lengths):
            h, logits = self.prefill_graphs.run(slots, prompts)  # views of the graph's buffers: copy out
            return [(h[i, :m].clone(), logits[i:i + 1].clone()) for i, m in enumerate(lengths)]
        n = max(lengths)
        ids = torch.tensor([list(p) + [0] * (n - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        valid = torch.arange(n, device=self.device) < torch.tensor(lengths, device=self.device)[:, None]
        slots_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        h, logits = self.prefill_padded(ids, slots_t, valid)
        return [(h[i, :m], logits[i:i + 1]) for i, m in enumerate(lengths)]

    def prefill_padded(
        self, tokens: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New prompts right-padded to tokens (B, n) (``valid`` marks the real ones) through the main model
        into the empty ``slots`` (B,), on the device: final hidden states (B, n, d) and the logits of each
        row's last real token (B, V)."""
        h = self.model.norm(self.run_prefill(self.model.embed_tokens(tokens), self.main_blocks, slots, 0, valid))
        last = (valid.sum(dim=1) - 1).clamp(min=0)
        return h, self.model.lm_head(h[torch.arange(h.shape[0], device=h.device), last])

    def _extend_all(self, slots: Seq[int], counts: Seq[int]) -> list[int]:
        """Grow every slot by its count of positions, all or none; returns their first new positions."""
        starts = []
        try:
            for slot, k in zip(slots, counts):
                starts.append(self.cache.extend(slot, k))
        except CacheFullError:
            for slot, start in zip(slots, starts):
                self.cache.truncate(slot, start)
            raise
        return starts

    @torch.inference_mode()
    def decode(
        self, slots: Seq[int], tokens: torch.Tensor | Seq[int] | Seq[Seq[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S new tokens to each of the B sequences ``slots`` (of any lengths) and run them through the
        main model with absorbed attention. ``tokens`` (B,) or (B, S). Returns the final normalised hidden
        states (B, S, d) and the logits (B, S, V)."""
        h, logits, _ = self.decode_step(slots, tokens)
        if self.graphs is not None:  # the graphs' output buffers are overwritten by the next step
            h, logits = h.clone(), logits.clone()
        return h, logits

    @torch.inference_mode()
    def decode_step(
        self, slots: Seq[int], tokens: torch.Tensor | Seq[int] | Seq[Seq[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode`, plus the greedy tokens (B, S) (argmax on the device). Through a captured CUDA graph
        when the engine has them: then the outputs are views of the graph's buffers, valid until the next
        step."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        b, s = tokens.shape
        if b != len(slots):
            raise ValueError(f"{len(slots)} slots but {b} rows of tokens")
        starts = self._extend_all(slots, [s] * b)
        if self.graphs is not None and self.graphs.covers(b):
            return self.graphs.run(list(slots), tokens, starts)
        start_t = torch.tensor(starts, dtype=torch.long, device=self.device)
        positions = start_t[:, None] + torch.arange(s, device=self.device)
        slots_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        return self.decode_forward(tokens.to(self.device), slots_t, positions, None, max(starts) + s)

    def decode_forward(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
        max_len: int, capturable: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding, :meth:`forward_cached` through the main blocks, norm, head and greedy argmax, all on the
        device: hidden (B, S, d), logits (B, S, V), greedy tokens (B, S)."""
        x = self.forward_cached(self.model.embed_tokens(tokens), self.main_blocks, slots, positions, valid, max_len,
                                capturable)
        h = self.model.norm(x)
        logits = self.model.lm_head(h)
        return h, logits, logits.argmax(dim=-1)

    # ================================================================================================
    # requests: start, advance, finish (driven by the scheduler)
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

    def max_new_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        return min(params.max_new_tokens, self.max_seq_len - n_prompt)

    def pages_needed(self, n_prompt: int, params: SamplingParams) -> int:
        """Pages a request may hold at most: prompt and completion (the verify step of speculative decoding
        writes at most one position past the last token, which this covers)."""
        return self.cache.pages_for(n_prompt + self.max_new_tokens(n_prompt, params))

    @torch.inference_mode()
    def start(
        self, request: GenerationRequest, prompt: list[int], result: GenerationResult
    ) -> tuple[Sequence, list[TokenEvent]]:
        """Admit a request: take a slot, prefill its prompt, sample its first token (and draft the next one
        when speculative)."""
        params = request.params
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_id is not None:
            stop_ids.add(self.eos_id)
        seq = Sequence(
            request=request, prompt=prompt, slot=self.new_sequence(), generator=generator,
            stop_ids=frozenset(stop_ids), max_new_tokens=self.max_new_tokens(len(prompt), params), result=result,
        )
        try:
            hidden, logits = self.prefill(seq.slot, prompt)
        except Exception:
            self.free(seq.slot)
            raise
        result.forward_passes += 1
        events = [self.emit(seq, sample_token(logits[-1], params, generator))]
        if self.speculator is not None and not seq.finished:
            self.speculator.draft_after_prefill(seq, hidden)
        return seq, events

    @torch.inference_mode()
    def advance(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """One decode step for every running sequence (plain, or draft-and-verify when speculative)."""
        if not seqs:
            return []
        if self.speculator is not None:
            return self.speculator.step(seqs)
        _, logits, greedy = self.decode_step([seq.slot for seq in seqs], [[seq.last_token] for seq in seqs])
        greedy = greedy[:, -1].tolist() if all(seq.params.greedy for seq in seqs) else None  # one read-back
        events = []
        for row, seq in enumerate(seqs):
            seq.result.forward_passes += 1
            token = greedy[row] if greedy is not None else sample_token(logits[row, -1], seq.params, seq.generator)
            events.append(self.emit(seq, token))
        return events

    def release(self, seq: Sequence) -> None:
        """Free a finished or cancelled sequence's slot and pages."""
        self.free(seq.slot)
        seq.draft_probs = None

    def emit(self, seq: Sequence, token: int) -> TokenEvent:
        """Append a sampled token to the sequence and decide whether it finishes it."""
        res = seq.result
        res.tokens.append(token)
        reason = "stop" if token in seq.stop_ids else None
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(res.tokens[:-1] if reason == "stop" else res.tokens)
            cut = [i for i in (text.find(s) for s in seq.params.stop if s) if i >= 0]
            if cut:
                text, reason = text[:min(cut)], "stop"
        if reason is None and len(res.tokens) >= seq.max_new_tokens:
            reason = "length"
        delta = ""
        if text is not None:
            safe = len(text) if reason is not None else _streamable(text, seq.params.stop)
            if safe > seq.text_sent:
                delta = text[seq.text_sent:safe]
                seq.text_sent = safe
            res.text = text
        res.finish_reason = reason
        return TokenEvent(res.request_id, token, delta, reason)

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
        self,
        prompts: Seq[Prompt | GenerationRequest],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> Iterator[TokenEvent]:
        """Generate for all prompts with continuous batching, yielding each new token of each request as it
        comes. Abandoning the iterator cancels the requests still running."""
        requests = self._requests(prompts, params)
        pending = set()
        for r in requests:
            self.scheduler.submit(r)
            pending.add(r.request_id)
        try:
            while pending:
                for event in self.scheduler.step():
                    if event.request_id in pending:
                        if event.finish_reason is not None:
                            pending.discard(event.request_id)
                        yield event
        finally:
            for rid in pending:
                self.scheduler.cancel(rid)
            if pending:
                self.scheduler.step()

    def generate(
        self,
        prompts: Seq[Prompt | GenerationRequest],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Complete every prompt; results in the order of the prompts. (Steps the engine's scheduler, so
        requests submitted to it by others advance too.)"""
        requests = self._requests(prompts, params)
        results = [self.scheduler.submit(r) for r in requests]
        while any(r.finish_reason is None for r in results):
            self.scheduler.step()
        return results


def _streamable(text: str, stops: Seq[str]) -> int:
    """How much of an unfinished completion can be sent: hold back an incomplete UTF-8 character (decoded
    as U+FFFD) and any tail that may be the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                hold = max(hold, k)
                break
    return end - hold


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
