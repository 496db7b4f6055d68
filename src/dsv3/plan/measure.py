"""``dsv3 plan --measure``: F, B and W of each pipeline stage timed on the real model, on this machine's device.

Each model stage of the layout's cut (:func:`dsv3.pipeline.stages.split_layers`) is built on its own (its
decoder blocks, and on the last stage the final norm, the output head and the MTP modules with their loss) and
run on one micro-batch of random tokens:

* F: the forward, recording the autograd graph as training does;
* B: the full backward from a random output gradient (the loss at the last stage);
* W: B minus the same backward with the stage's weights frozen (``requires_grad=False``), which computes the
  input gradient only, i.e. the ``I`` chunk of a zero-bubble schedule: W is measured, not assumed.

The stage's input is a hidden state that needs a gradient (the embedding lookup of stage 0 is left out: no FLOPs).
Each time is the fastest of ``repeats`` runs after one warm-up; B and the frozen backward alternate. On a GPU
the clock is the wall clock after a synchronisation; on the CPU the stage runs on one thread (as each rank of a
CPU pipeline run does, ``OMP_NUM_THREADS=1``) and the clock is the process's CPU time, which other work on a
shared machine does not inflate. No communication is timed (one device).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model.init import init_weights
from ..model.mtp import MTPModule
from ..model.norm import RMSNorm
from ..model.rope import RotaryEmbedding
from ..model.transformer_block import Block
from .timing import ChunkTimes


class _Stage(nn.Module):
    """One model stage's own modules (the model's classes, randomly initialised as §4.2 says)."""

    def __init__(self, config: ModelConfig, layers: range, last: bool):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config, i) for i in layers)
        self.rotary = RotaryEmbedding(config)
        self.last = last
        if last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(config, config.num_hidden_layers + k)
                                     for k in range(config.num_nextn_predict_layers))

    def init_weights(self, seed: int) -> None:
        init_weights(self, self.config.initializer_range, seed)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """Hidden state in; the hidden state out, or at the last stage the main + MTP cross-entropy."""
        s = h.shape[1]
        cos, sin = self.rotary(torch.arange(s, device=h.device))
        for block in self.blocks:
            h = block(h, cos, sin, None)
        if not self.last:
            return h
        h = self.norm(h)
        loss = F.cross_entropy(self.head(h).flatten(0, 1).float(), tokens.flatten())
        prev = h
        for k, module in enumerate(self.mtp):  # module k embeds t_{i+k}: random embeddings stand in (a lookup)
            prev, normed = module(prev, future[k], cos, sin, None)
            loss = loss + F.cross_entropy(self.head(normed).flatten(0, 1).float(), tokens.flatten())
        return loss


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cpu":
        return time.process_time

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def measure_stage(stage: _Stage, micro_batch: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                  repeats: int = 5, seed: int = 0) -> ChunkTimes:
    """F, B, W (seconds, fastest of ``repeats``) of ``stage`` on one micro-batch."""
    config = stage.config
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(micro_batch, seq_len, config.hidden_size, generator=g).to(device, dtype)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g).to(device)
    future = torch.randn(max(config.num_nextn_predict_layers, 1), micro_batch, seq_len, config.hidden_size,
                         generator=g).to(device, dtype)
    now = _clock(device)
    params = [p for p in stage.parameters()]

    def run(frozen: bool) -> tuple[float, float]:
        for p in params:
            p.requires_grad_(not frozen)
            p.grad = None
        h = x.detach().requires_grad_(True)
        t0 = now()
        out = stage(h, tokens, future)
        t1 = now()
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(torch.ones_like(out) / out.numel() ** 0.5)
        t2 = now()
        return t1 - t0, t2 - t1

    stage.train()
    try:
        run(False)  # warm-up (allocations, kernel selection)
        run(True)
        forwards, full, input_only = [], [], []
        for _ in range(repeats):
            f, b = run(False)
            _, i = run(True)
            forwards.append(f)
            full.append(b)
            input_only.append(i)
    finally:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
    b, i = min(full), min(input_only)
    return ChunkTimes(F=min(forwards), B=b, W=b - i, a2a=0.0)


def measure_stages(config: ModelConfig, splits: list[range], micro_batch: int, seq_len: int,
                   device: str | torch.device | None = None, repeats: int = 5, cpu_threads: int = 1
                   ) -> tuple[list[ChunkTimes], str]:
    """Time every model stage of ``splits``; returns the times and the device's name. ``device``: default CUDA
    when present (BF16), else the CPU (FP32, ``cpu_threads`` intra-op threads)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads)
    out = []
    try:
        for s, layers in enumerate(splits):
            stage = _Stage(config, layers, last=s == len(splits) - 1).to(device=device, dtype=dtype)
            stage.init_weights(seed=s)
            out.append(measure_stage(stage, micro_batch, seq_len, device, dtype, repeats, seed=s))
            del stage
    finally:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_threads} thread" \
        f"{'s' * (cpu_threads > 1)})"
    return out, name
