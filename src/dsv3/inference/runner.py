"""The model runner: a prepared model, its paged latent cache, compiled blocks and CUDA graphs; prefill and
decode on tensors. It knows nothing of requests (:mod:`dsv3.inference.scheduler` owns those).

Two attention forms over the same cache (report §2.1.1; the block-level math is in
:mod:`dsv3.inference.layers`):

* **prefill** (:meth:`ModelRunner.prefill`, :meth:`ModelRunner.prefill_batch`): the expanded form of training,
  with c^KV and k^R written to the cache. Tokens appended to a cached sequence (a prefix continuation, a
  recomputed sequence) attend over the cached latents too.
* **decode** (:meth:`ModelRunner.decode_step`, a batch of sequences of different lengths): weight absorption,
  W^UK moved into the query and W^UV after the attention, so per cached token only the 576 latent values are
  read; keys and values are never expanded.

Everything else in a block (norms, dense FFN, MoE) is the model's own module; the MoE runs through
:func:`~dsv3.inference.moe.moe_forward`, which counts the tokens per expert without reading anything back to
the host. The batched decode core, :meth:`ModelRunner.forward_cached`, works on tensors of fixed shape (tokens,
slots, positions, a validity mask, a key length): on a GPU, :mod:`dsv3.inference.cuda_graph` pads a batch to a
few fixed sizes and replays one captured CUDA graph per decode step, the next tokens sampled inside it
(:mod:`dsv3.inference.sampler`), and ``torch.compile`` fuses each block's small operations. The plain path
stays the reference (CPU, tests).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence as Seq

import torch

from ..fp8.linear import _hopper_scaled_mm_ok
from ..fp8.quant import TILE, dequantize_blocks
from ..fp8.serving import FP8InferenceExperts, FP8InferenceLinear
from ..model.attention import _prefer_cudnn
from ..model.moe import Experts, Gate, _grouped_mm_ok
from ..model.transformer import DeepSeekV3
from ..model.transformer_block import Block
from .cache import CacheFullError, PagedLatentCache
from .config import EngineConfig
from .cuda_graph import FULL, DecodeGraphs, PrefillGraphs
from .layers import continue_block, decode_block, prefill_block
from .penalties import ProcessingState, ProcessingTensors
from .sampler import SamplingTensors, sample, sample_processed

Blocks = list[tuple[int, Block]]


class ModelRunner:
    """Runs a prepared model (:func:`~dsv3.inference.prepare.prepare_model`) over its own paged latent cache.

    The options are :class:`~dsv3.inference.config.EngineConfig`'s; the runner resolves the automatic ones
    once (:attr:`decode_experts`, :attr:`decode_kernels`, CUDA graphs, compilation) and says which in
    :meth:`describe`. The model's weights and the cache must not be moved or reallocated once graphs are
    captured (:meth:`load_weights` copies in place).
    """

    def __init__(self, model: DeepSeekV3, cfg: EngineConfig):
        param = next(model.parameters())
        self.model, self.config = model, model.config
        self.device, self.dtype = param.device, param.dtype
        c = self.config
        self.max_seq_len = cfg.max_seq_len or min(c.max_position_embeddings, 4096)
        if cfg.speculative and len(model.mtp) == 0:
            raise ValueError("speculative decoding needs a model with MTP modules (num_nextn_predict_layers >= 1)")
        self.spec_slack = 2 * cfg.num_speculative_tokens - 2 if cfg.speculative else 0
        """Cache positions past max_seq_len for a speculative step's further drafts (written, then dropped)."""
        n_main = c.num_hidden_layers
        self.main_blocks: Blocks = list(enumerate(model.layers))
        self.mtp_blocks: Blocks = [(n_main + k, m) for k, m in enumerate(model.mtp)] if cfg.speculative else []
        self.cache = PagedLatentCache(
            n_main + len(self.mtp_blocks), c.kv_lora_rank, c.qk_rope_head_dim, max_seqs=cfg.max_batch,
            max_seq_len=self.max_seq_len + self.spec_slack, page_size=cfg.page_size, num_pages=cfg.num_pages,
            device=self.device, dtype=self.dtype, prefix_caching=cfg.prefix_caching,
        )
        self.processing = ProcessingState(cfg.max_batch, c.vocab_size, self.device)
        """Per-slot token counts, prompt masks, biases and stop tokens of the processed sampling path."""
        grouped = experts_grouped(model, self.device, self.dtype)
        self.fp8 = fp8_served(model)
        """FP8 checkpoint weights kept (:mod:`dsv3.fp8.serving`); on a Hopper GPU their decode steps run the
        few-rows kernels, which read the FP8 weights once (the prefill: FP8 GEMMs)."""
        decode_experts = cfg.decode_experts
        cuda_triton = self.device.type == "cuda" and _has_triton()
        fp8_kernels = self.fp8 and cuda_triton and _fp8_few_rows_ok(model, self.device)
        if decode_experts == "auto":
            decode_experts = "few_rows" if (grouped or fp8_kernels) and cuda_triton else "module"
        if decode_experts == "few_rows" and not cuda_triton:
            raise ValueError("decode_experts='few_rows' is a Triton kernel: it needs a CUDA device and triton")
        if decode_experts == "few_rows" and self.fp8 and not fp8_kernels:
            raise ValueError("decode_experts='few_rows' with FP8 weights needs a Hopper GPU and expert widths "
                             "that are multiples of 128")
        self.decode_experts = decode_experts
        """How the routed experts of a decode step run; a captured step whose experts would need the
        host-syncing loop runs them ``"gathered"`` instead."""
        self._capturable_experts = decode_experts if grouped or decode_experts == "few_rows" else "gathered"
        if self.fp8 and self._capturable_experts == "gathered" and cfg.cuda_graph:
            raise ValueError("CUDA graphs of an FP8-served model need decode_experts='few_rows' (a Hopper GPU)")
        pow2 = all(v & (v - 1) == 0 for v in (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim))
        self.decode_kernels = (decode_experts == "few_rows" and self.dtype == torch.bfloat16 and pow2
                               and c.num_attention_heads <= 32)
        """Absorbed attention of a decode step through the Triton kernels of :mod:`dsv3.inference.triton_mla`
        (with the ``few_rows`` experts, in bf16, for latent and head sizes that are powers of two and up to
        32 heads on one program's tile); else einsums and softmax."""
        cuda_graph = cfg.cuda_graph if cfg.cuda_graph is not None else self.device.type == "cuda" and (
            grouped or (fp8_kernels and decode_experts == "few_rows"))
        self.graphs = self.prefill_graphs = None
        if cuda_graph:
            self.graphs = DecodeGraphs(self._graph_decode, cfg.graph_batch_sizes, cfg.max_batch, self.cache)
            # a prefill runs the model's own experts: capturable as grouped GEMMs only (not the loop)
            if cfg.max_prefill_graph_tokens > 0 and (grouped or self.device.type != "cuda"):
                self.prefill_graphs = PrefillGraphs(self._graph_prefill, cfg.graph_batch_sizes, cfg.max_batch,
                                                    self.device, cfg.max_prefill_graph_tokens)
        compile = cfg.compile if cfg.compile is not None else self.graphs is not None and self.device.type == "cuda"
        self.compiled = compile
        self._decode_block = torch.compile(decode_block, dynamic=None) if compile else decode_block
        # Prefill runs the experts through the model's own module: compiled only where that is a grouped GEMM
        # (the reference loop splits by counts read to the host: a recompilation per split).
        compiled = compile and grouped
        self._prefill_block = torch.compile(prefill_block, dynamic=True) if compiled else prefill_block
        self._continue_block = torch.compile(continue_block, dynamic=True) if compiled else continue_block

    def describe(self) -> str:
        """The paths chosen, in one line (the CLI and the server print it)."""
        return (f"{self.device} {str(self.dtype).removeprefix('torch.')}"
                f"{' (checkpoint FP8 weights kept)' if self.fp8 else ''}, decode experts {self.decode_experts}"
                f"{', Triton MLA' if self.decode_kernels else ''}, CUDA graphs "
                f"{'on' if self.graphs is not None else 'off'}, torch.compile {'on' if self.compiled else 'off'}, "
                f"{self.cache.num_pages} pages of {self.cache.page_size} tokens, prefix caching "
                f"{'on' if self.cache.prefix_caching else 'off'}")

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Replace the model's weights in place (a post-training rollout's new policy): the fused stacks, the
        FP32 routers and captured graphs read the same storage, so they follow."""
        model_sd = self.model.state_dict()
        state_dict = _dequantize_absorbed(state_dict, model_sd)
        unknown = sorted(set(state_dict) - set(model_sd))
        missing = sorted(set(model_sd) - set(state_dict))
        if unknown or (strict and missing):
            raise KeyError(f"load_weights: unknown {unknown[:5]}, missing {missing[:5] if strict else []}")
        for name, value in state_dict.items():
            target = model_sd[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(target.shape)}")
            target.copy_(value)  # casts to the stored dtype (FP32 routers stay FP32)
        self.cache.clear_prefixes()  # their latents came from the old weights

    # ================================================================================================
    # forwards through blocks
    def run_prefill(
        self, x: torch.Tensor, blocks: Blocks, slots: Seq[int] | torch.Tensor, starts: Seq[int] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, n, d) through ``blocks`` (expanded attention): row b holds tokens at positions starts[b] ..
        starts[b]+n-1 of ``slots[b]``, right-padded where ``valid`` (B, n) is False (the padding writes to the
        scratch page). The latents are written to the cache, whose pages must already cover these positions.
        ``starts`` ``None``: every row is a new prompt (causal attention over the new tokens only); else rows
        continue their cached positions."""
        n = x.shape[1]
        slots = torch.as_tensor(slots, device=x.device).reshape(-1)
        positions = torch.arange(n, device=x.device)[None]  # (1, n): no host-to-device copy (graph capture)
        if starts is not None:
            positions = torch.tensor(list(starts), device=x.device)[:, None] + positions  # (B, n)
        cos, sin = self.model.rotary(positions)
        index = self.cache.flat_index(slots[:, None], positions, valid)
        pages = visible = None
        if starts is not None:
            pages = self.cache.block_table[slots, :self.cache.pages_for(max(starts) + n)]
            visible = torch.arange(pages.shape[1] * self.cache.page_size, device=x.device) <= positions[..., None]
        with _prefer_cudnn(x):
            for layer, block in blocks:
                if pages is None:
                    x = self._prefill_block(block, x, cos, sin, self.cache.latent[layer], index)
                else:
                    x = self._continue_block(block, x, cos, sin, self.cache.latent[layer], index, pages, visible)
        return x

    def forward_cached(
        self, x: torch.Tensor, blocks: Blocks, slots: torch.Tensor, positions: torch.Tensor,
        valid: torch.Tensor | None, max_len: int, capturable: bool = False,
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
    # prefill
    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Seq[int], all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens`` to the sequence in ``slot`` (empty, or a cached prefix to continue) and run them
        through the main model. Returns the final normalised hidden states (n, d) and the logits of the
        last token (1, V), or of every token (n, V) with ``all_logits``."""
        if not tokens:
            raise ValueError("prefill needs at least one token")
        if not all_logits:
            return self.prefill_batch([slot], [tokens])[0]
        start = self.cache.extend(slot, len(tokens))
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        h = self.model.norm(self.run_prefill(self.model.embed_tokens(ids), self.main_blocks, [slot], [start]))[0]
        return h, self.model.lm_head(h)

    @torch.inference_mode()
    def prefill_batch(self, slots: Seq[int], prompts: Seq[Seq[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`prefill` of several sequences in one forward: new prompts into empty slots, or tokens that
        continue a slot's cached positions (a cached prefix, a recomputed sequence), right-padded to the longest
        (the padding writes to the scratch page and stays out of every real token's view). New prompts only:
        through a captured CUDA graph when the runner has them. Returns (hidden (n_i, d), last-token logits
        (1, V)) per sequence."""
        lengths = [len(p) for p in prompts]
        if len(slots) != len(prompts) or min(lengths, default=1) == 0:
            raise ValueError("prefill_batch needs one non-empty prompt per slot")
        starts = self.extend_all(slots, lengths)
        fresh = not any(starts)
        if fresh and self.prefill_graphs is not None and self.prefill_graphs.covers_prompts(lengths):
            h, logits = self.prefill_graphs.run(slots, prompts)  # views of the graph's buffers: copy out
            return [(h[i, :m].clone(), logits[i:i + 1].clone()) for i, m in enumerate(lengths)]
        n = max(lengths)
        ids = torch.tensor([list(p) + [0] * (n - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        valid = torch.arange(n, device=self.device) < torch.tensor(lengths, device=self.device)[:, None]
        slots_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        h, logits = self.prefill_padded(ids, slots_t, valid, None if fresh else starts)
        return [(h[i, :m], logits[i:i + 1]) for i, m in enumerate(lengths)]

    def prefill_padded(
        self, tokens: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, starts: Seq[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens right-padded to (B, n) (``valid`` marks the real ones) through the main model into ``slots``
        (B,) (empty, or continued from ``starts``), on the device: final hidden states (B, n, d) and the
        logits of each row's last real token (B, V)."""
        h = self.model.norm(self.run_prefill(self.model.embed_tokens(tokens), self.main_blocks, slots, starts,
                                             valid))
        last = (valid.sum(dim=1) - 1).clamp(min=0)
        return h, self.model.lm_head(h[torch.arange(h.shape[0], device=h.device), last])

    def _graph_prefill(self, ints: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.prefill_padded(ints[0], ints[1, :, 0], ints[2].bool())

    def extend_all(self, slots: Seq[int], counts: Seq[int]) -> list[int]:
        """Grow every slot by its count of positions, all or none; returns their first new positions."""
        starts: list[int] = []
        try:
            for slot, k in zip(slots, counts):
                starts.append(self.cache.extend(slot, k))
        except CacheFullError:
            for slot, start in zip(slots, starts):
                self.cache.truncate(slot, start)
            raise
        return starts

    # ================================================================================================
    # decode
    @torch.inference_mode()
    def decode(
        self, slots: Seq[int], tokens: torch.Tensor | Seq[int] | Seq[Seq[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S new tokens to each of the B sequences ``slots`` (of any lengths) and run them through the
        main model with absorbed attention. ``tokens`` (B,) or (B, S). Returns the final normalised hidden
        states (B, S, d) and the logits (B, S, V) (copies: they outlive the next step)."""
        h, logits, _ = self.decode_step(slots, tokens)
        return (h.clone(), logits.clone()) if self.graphs is not None else (h, logits)

    @torch.inference_mode()
    def decode_step(
        self, slots: Seq[int], tokens: torch.Tensor | Seq[int] | Seq[Seq[int]],
        sampling: SamplingTensors | None = None, filtered: bool = True,
        processing: ProcessingTensors | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`decode`, plus the next tokens (B,) chosen on the device from the last position's logits:
        drawn by ``sampling`` (one row per sequence, host tensors; ``filtered``: some row uses top-k / top-p)
        with the token's position as its random offset, or the argmax when ``None``. With ``processing`` (host
        tensors; ``sampling`` required) the full path instead (:func:`~dsv3.inference.sampler.sample_processed`):
        the third output is then the packs (B, 3 + 2K) of the new tokens (token in column 0). Through a captured
        CUDA graph when the runner has them: the outputs are then views of the graph's buffers, valid until the
        next step."""
        if processing is not None and sampling is None:
            raise ValueError("the processed path needs the rows' sampling tensors")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        b, s = tokens.shape
        if b != len(slots):
            raise ValueError(f"{len(slots)} slots but {b} rows of tokens")
        starts = self.extend_all(slots, [s] * b)
        if self.graphs is not None and self.graphs.covers(b):
            return self.graphs.run(list(slots), tokens, starts, sampling, filtered, processing)
        start_t = torch.tensor(starts, dtype=torch.long, device=self.device)
        positions = start_t[:, None] + torch.arange(s, device=self.device)
        slots_t = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        if sampling is not None:
            sampling = SamplingTensors(**{f.name: getattr(sampling, f.name).to(self.device)
                                          for f in dataclasses.fields(sampling)})
        if processing is not None:
            processing = processing.to(self.device)
        return self.decode_forward(tokens.to(self.device), slots_t, positions, None, max(starts) + s, sampling,
                                   filtered, processing=processing)

    def decode_forward(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
        max_len: int, sampling: SamplingTensors | None = None, filtered: bool = True, capturable: bool = False,
        processing: ProcessingTensors | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding, :meth:`forward_cached` through the main blocks, norm, head and the next tokens, all on
        the device: hidden (B, S, d), logits (B, S, V), next tokens (B,) (with ``processing``: their packs)."""
        x = self.forward_cached(self.model.embed_tokens(tokens), self.main_blocks, slots, positions, valid, max_len,
                                capturable)
        h = self.model.norm(x)
        logits = self.model.lm_head(h)
        last = logits[:, -1]
        offset = positions[:, -1] + 1
        if processing is not None:
            weight = None if valid is None else valid[:, -1].long()
            nxt = sample_processed(last, sampling, offset, processing, self.processing, slots, weight)
        else:
            nxt = last.argmax(dim=-1) if sampling is None else sample(last, sampling, offset, filtered)
        return h, logits, nxt

    def _graph_decode(self, inputs: tuple[torch.Tensor, ...], n_keys: int, mode: str) -> tuple[torch.Tensor, ...]:
        """A captured decode step as a function of its input buffers (:class:`DecodeGraphs`): ints (4, 6 or 8,
        B, S) tokens, slot, position, valid[, top-k, seed[, block-stop, use-bias]]; floats (2 or 6, B)
        temperature, top-p[, presence, frequency, repetition, min-p] (none when greedy); the full mode's bitmask."""
        ints = inputs[0]
        tokens, slots, positions, valid = ints[0], ints[1, :, 0], ints[2], ints[3].bool()
        sampling = processing = None
        if mode != "greedy":
            floats = inputs[1]
            sampling = SamplingTensors(temperature=floats[0], top_k=ints[4, :, 0], top_p=floats[1],
                                       seed=ints[5, :, 0])
        if mode == FULL:
            processing = ProcessingTensors(
                presence=floats[2], frequency=floats[3], repetition=floats[4], min_p=floats[5],
                block_stop=ints[6, :, 0].bool(), use_bias=ints[7, :, 0].bool(), bitmask=inputs[2])
        return self.decode_forward(tokens, slots, positions, valid, n_keys, sampling, mode == "filtered",
                                   capturable=True, processing=processing)


def experts_grouped(model: DeepSeekV3, device: torch.device, dtype: torch.dtype) -> bool:
    """Every weight is in ``dtype`` (FP8-served models keep the plain path) and every MoE layer's experts run as
    a grouped GEMM (bf16 on Hopper: no host sync)."""
    probe = torch.empty(0, 8, device=device, dtype=dtype)
    routers = {id(m.weight) for m in model.modules() if isinstance(m, Gate)}  # may be FP32 (fusion.py)
    return all(p.dtype == dtype for p in model.parameters() if id(p) not in routers) and all(
        m.implementation == "grouped" or (m.implementation == "auto" and _grouped_mm_ok(probe, m.gate_up_proj))
        for m in model.modules() if isinstance(m, Experts))


def _dequantize_absorbed(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
                         ) -> Mapping[str, torch.Tensor]:
    """FP8 weights with their block factors for layers the engine holds dequantised (``kv_b_proj``,
    :func:`~dsv3.inference.prepare.prepare_model`): replaced by the dequantised weight."""
    pairs = [n for n in state_dict if n.endswith(".weight_scale_inv") and n not in model_sd
             and n.removesuffix("_scale_inv") in model_sd and n.removesuffix("_scale_inv") in state_dict]
    if not pairs:
        return state_dict
    out = dict(state_dict)
    for scale in pairs:
        name = scale.removesuffix("_scale_inv")
        out[name] = dequantize_blocks(out[name], out.pop(scale), dtype=model_sd[name].dtype)
    return out


def fp8_served(model: DeepSeekV3) -> bool:
    """Whether some of the model's layers keep FP8 checkpoint weights (:mod:`dsv3.fp8.serving`)."""
    return any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in model.modules())


def _fp8_few_rows_ok(model: DeepSeekV3, device: torch.device) -> bool:
    """FP8 experts run the few-rows kernels: a Hopper GPU, expert widths in whole 128-row blocks."""
    return _hopper_scaled_mm_ok(device) and all(
        m.inter_dim % TILE == 0 for m in model.modules() if isinstance(m, FP8InferenceExperts))


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
