"""Inference: a paged latent KV cache, prefill and absorbed-MLA decode, sampling on the device, MTP speculative
decoding and continuous batching. No I/O: the CLI and the HTTP server build on :class:`Engine`.

Layers, each importing only those below it: :mod:`.runner` (model, cache, graphs; tensors in, tensors out),
:mod:`.scheduler` (requests, slots and pages), :mod:`.sampler` and :mod:`.speculative` (next tokens on the
device, after :mod:`.penalties`: penalties, biases, constraint masks; with :mod:`.logprobs`), :mod:`.detokenize`
(text), :mod:`.engine` (``generate`` / ``stream`` over all of them).

>>> engine = Engine(dsv3.build_model("tiny"), max_batch=4, max_seq_len=256)
>>> engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8, temperature=0))[0].tokens
"""

from .cache import CacheFullError, PagedLatentCache
from .config import EngineConfig
from .constraint import TokenConstraint
from .engine import Engine, UnsupportedOptionError
from .layers import run_block
from .prepare import prepare_model
from .runner import ModelRunner
from .sampling import (
    GenerationRequest, GenerationResult, SamplingParams, TokenEvent, TokenLogprobs, sample_token, token_probs,
)
from .scheduler import Scheduler, Sequence
from .speculative import MTPSpeculator, speculative_accept

Result = GenerationResult

__all__ = [
    "CacheFullError", "Engine", "EngineConfig", "GenerationRequest", "GenerationResult", "MTPSpeculator",
    "ModelRunner", "PagedLatentCache", "Result", "SamplingParams", "Scheduler", "Sequence", "TokenConstraint",
    "TokenEvent", "TokenLogprobs", "UnsupportedOptionError", "prepare_model", "run_block", "sample_token", "speculative_accept", "token_probs",
]
