"""Inference: a paged latent KV cache, prefill and absorbed-MLA decode, sampling, MTP speculative decoding
and continuous batching. No I/O: the CLI and the HTTP server build on :class:`Engine`.

>>> engine = Engine(dsv3.build_model("tiny"), max_batch=4, max_seq_len=256)
>>> engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
"""

from .cache import CacheFullError, PagedLatentCache
from .engine import Engine, Sequence
from .layers import run_block
from .sampling import (
    GenerationRequest, GenerationResult, SamplingParams, TokenEvent, sample_token, token_probs,
)
from .scheduler import Scheduler
from .speculative import MTPSpeculator, speculative_accept

Result = GenerationResult

__all__ = [
    "CacheFullError", "Engine", "GenerationRequest", "GenerationResult", "MTPSpeculator", "PagedLatentCache",
    "Result", "SamplingParams", "Scheduler", "Sequence", "TokenEvent", "run_block", "sample_token",
    "speculative_accept", "token_probs",
]
