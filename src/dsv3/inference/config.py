"""The inference engine's options, one dataclass used unchanged by Python callers, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """How an :class:`~dsv3.inference.Engine` runs a model (flags of ``dsv3 generate / chat / serve``)."""

    max_batch: int = 8
    """Sequences decoded together (the cache's slots)."""
    max_seq_len: int | None = None
    """Tokens of prompt + completion per sequence (default min(max_position_embeddings, 4096))."""
    page_size: int = 16
    """Tokens per cache page."""
    num_pages: int | None = None
    """Cache pages shared by all sequences (default: max_batch full-length sequences). Pages are taken as
    sequences grow; when none is left the latest admitted sequence is preempted and recomputed later."""
    device: str | None = None
    """Where the model runs (default: where its weights are); the model is moved there."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (default: the weights' dtype); the model is cast to it."""
    prefix_caching: bool = True
    """Reuse the cached latents of prompt prefixes seen before (whole pages; a shared system prompt is
    computed once): a request's usage reports its cached prompt tokens."""
    speculative: bool = False
    """Draft tokens with the model's MTP module and verify them with the main model (report §2.2): the same
    outputs (greedy: token for token) in fewer forwards."""
    num_speculative_tokens: int = 1
    """Drafts per speculative step (k). The MTP module drafts the first; each further draft runs the module
    again on its own output and the draft before (the report's module predicts one token; reusing it is
    allowed). All k are verified in one forward: more pay where the acceptance is high."""
    max_prefill_tokens: int = 8192
    """Prompt tokens prefilled in one step at most: longer prompts (and more admitted prompts) are prefilled in
    chunks over several steps, between the decode steps of the running sequences."""
    cuda_graph: bool | None = None
    """Replay captured CUDA graphs for decode steps and short prefills (auto: on with CUDA where the experts
    run as grouped GEMMs, or FP8-kept on Hopper through the few-rows kernels). On the CPU, ``on`` runs the
    same padded fixed-shape steps eagerly (tests)."""
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """Batch sizes captured; a batch is padded up to the nearest."""
    max_prefill_graph_tokens: int = 16384
    """Padded prompt tokens up to which a prefill of new prompts replays a CUDA graph (0: prefill eagerly)."""
    compile: bool | None = None
    """torch.compile each decode and prefill block (auto: on with CUDA graphs on a GPU; the first steps of
    each new shape compile, seconds to minutes)."""
    decode_experts: str = "auto"
    """Routed experts of a decode step: few_rows (Triton kernels), module (the model's own experts) or auto
    (few_rows on a CUDA device with Triton where the experts run as grouped GEMMs or are FP8-kept on Hopper)."""
    fuse: bool = True
    """Stack the projections that read the same input into one GEMM each (MLA's first projections, SwiGLU's
    gate and up)."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "page_size", "max_prefill_tokens", "num_speculative_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("max_seq_len", "num_pages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {self.dtype!r}")
        if self.decode_experts not in ("auto", "few_rows", "module"):
            raise ValueError(f"decode_experts must be 'auto', 'few_rows' or 'module', got {self.decode_experts!r}")
        if not self.graph_batch_sizes or min(self.graph_batch_sizes) < 1:
            raise ValueError(f"graph_batch_sizes must be positive integers, got {self.graph_batch_sizes!r}")
        self.graph_batch_sizes = tuple(int(b) for b in self.graph_batch_sizes)
        if self.max_prefill_graph_tokens < 0:
            raise ValueError("max_prefill_graph_tokens must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The :attr:`EngineConfig.dtype` string of a torch dtype."""
    return {v: k for k, v in _DTYPES.items()}[dtype]
