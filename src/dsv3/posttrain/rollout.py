"""Completions from the policy by dsv3's own inference engine (batched decode over the paged latent cache, CUDA
graphs on the GPU), never a token-by-token loop over the training model. The engine holds its own copy of the
model in the inference dtype; :meth:`Rollouts.push` copies the trained weights in after each update (the
engine's ``load_weights``: in place, so captured graphs follow)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from ..inference.chat import ChatTemplate
from ..inference.config import EngineConfig
from ..inference.engine import Engine
from ..inference.sampling import GenerationRequest, GenerationResult, SamplingParams
from .common import TaskScore, score_completions
from .tasks import ArithmeticTask, Problem


class Rollouts:
    def __init__(self, model: torch.nn.Module, tokenizer, template: ChatTemplate, device: torch.device, *,
                 max_batch: int = 64, max_seq_len: int = 512, compile: bool | None = None):
        self.template = template
        self.tokenizer = tokenizer
        sizes = tuple(sorted({min(2 ** k, max_batch) for k in range(max_batch.bit_length() + 1)}))
        # bf16 on a GPU: the engine's fast paths (grouped-GEMM experts, CUDA graphs of every batch size a
        # rollout reaches, the Triton decode kernels) need it; the training forward runs in bf16 autocast too
        config = EngineConfig(device=str(device), max_batch=max_batch, max_seq_len=max_seq_len, compile=compile,
                              dtype="bfloat16" if torch.device(device).type == "cuda" else None,
                              graph_batch_sizes=sizes)
        self.engine = Engine(copy.deepcopy(model), tokenizer, config)

    def describe(self) -> str:
        return self.engine.describe()

    @torch.no_grad()
    def push(self, state: Mapping[str, torch.Tensor]) -> None:
        """The engine's weights := ``state``, the whole policy's state dict (after an update)."""
        self.engine.load_weights(state)

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.template.encode(ArithmeticTask.messages(problem), add_generation_prompt=True)

    def complete(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """One completion per (prompt, params), all submitted at once so the engine batches them."""
        return self.engine.generate([GenerationRequest(list(p), sp) for p, sp in zip(prompts, params)])

    def score(self, task: ArithmeticTask, problems: Sequence[Problem], max_new_tokens: int = 32) -> TaskScore:
        """Greedy accuracy of the engine's current weights on ``problems``."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        results = self.complete([self.prompt_ids(p) for p in problems], [params] * len(problems))
        return score_completions(task, problems, [r.text or "" for r in results], [len(r.tokens) for r in results])
