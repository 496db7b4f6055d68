"""Supervised fine-tuning (report §5.1): conversations rendered with the checkpoint's chat template, the loss on
the assistant's tokens, samples packed into sequences and kept mutually invisible (document-masked attention,
no target across a sample boundary for the main head or any MTP depth), a cosine schedule from the report's
5e-6 to 1e-6 scaled to the model, two epochs.

:class:`SFTTrainer` is the pre-training :class:`~dsv3.train.trainer.Trainer` with another recipe: it starts from
a checkpoint, reads packed conversations, and exports with the chat template. Data and expert parallelism,
FP8, compilation, checkpoints and exact resume are the trainer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..data import DataError
from ..train.batch import TrainBatch
from ..train.step import cross_entropy_sum
from ..train.trainer import RunResult, Trainer
from .builtin_sft import builtin_conversations
from .common import (PostTrainConfig, checkpoint_model_config, cosine_schedules, export, load_start, parse_task,
                     post_training_lr, tokenizer_dir, write_score)
from .packing import SFTLoader, collate, pack_best_fit, pack_capacity
from .sft_data import encode_all, read_jsonl


@dataclass
class SFTConfig(PostTrainConfig):
    data: str | None = None
    """JSON lines of {"messages": [...]} (OpenAI style, optional "tools") or {"prompt", "completion"}; None = the
    built-in set (questions on the Python standard library's functions and the arithmetic task)."""
    epochs: float = 2.0
    """Passes over the packed data (report: 2); ``steps`` > 0 overrides."""
    steps: int = 0
    """Optimiser steps; 0 = ``epochs`` over the data."""
    seq_len: int = 512
    """Tokens per packed sequence."""
    lr: float = 0.0
    """Peak learning rate; 0 = the report's 5e-6 scaled to the model: x (the checkpoint's pre-training peak /
    the report's 2.2e-4), or 5e-6 for a checkpoint without a training record."""
    min_lr_ratio: float = 0.2
    """The cosine ends at this fraction of the peak (report: 1e-6 / 5e-6)."""
    warmup: float = 0.0
    """Linear warm-up as a fraction of the run (the report gives none for SFT)."""
    loss_on: str = "assistant"
    """``assistant``: the loss on the assistant's tokens only; ``all``: on every token."""
    overflow: str = "split"
    """A sample longer than a sequence: ``split`` into sequence-sized pieces, or ``drop`` it (both counted)."""
    val_fraction: float = 0.02
    """Share of the conversations held out for the validation loss."""
    builtin_arithmetic: int = 4000
    """Arithmetic problems in the built-in set (training split of the task)."""

    def derived_when_zero(self) -> frozenset[str]:
        return frozenset({"lr", "steps"})

    def validate(self) -> None:
        super().validate()
        if self.loss_on not in ("assistant", "all"):
            raise ConfigError(f"loss_on: must be 'assistant' or 'all', got {self.loss_on!r}")
        if self.overflow not in ("split", "drop"):
            raise ConfigError(f"overflow: must be 'split' or 'drop', got {self.overflow!r}")
        if not self.epochs > 0:
            raise ConfigError(f"epochs: must be > 0, got {self.epochs!r}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in (0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction!r}")


def _held_out(index: int, fraction: float) -> bool:
    """Whether conversation ``index`` is validation data: a fixed, spread-out share."""
    return fraction > 0 and (index * 0.6180339887) % 1.0 < fraction


class SFTTrainer(Trainer):
    cfg: SFTConfig
    run_prefix = "sft"

    def __init__(self, cfg: SFTConfig, resume: bool = False, log=print):
        self.model_name = str(cfg.checkpoint)
        super().__init__(cfg, resume=resume, log=log)

    def build_data(self) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        model_config = checkpoint_model_config(cfg.checkpoint)
        self.task = parse_task(cfg.task_digits, cfg.task_ops, cfg.seed)
        self._start = load_start(cfg.checkpoint, self.device)  # model, tokenizer, template
        _, self.tokenizer, self.template = self._start
        if cfg.data is None:
            conversations = builtin_conversations(cfg.builtin_arithmetic, cfg.seed, self.task)
            source = "the built-in set"
        else:
            if not Path(cfg.data).is_file():
                raise DataError(f"data: no file at {cfg.data}")
            conversations, source = list(read_jsonl(cfg.data)), cfg.data
        val = [c for i, c in enumerate(conversations) if _held_out(i, cfg.val_fraction)]
        train = [c for i, c in enumerate(conversations) if not _held_out(i, cfg.val_fraction)]
        samples, stats = encode_all(self.template, train, cfg.loss_on)
        self.packs, self.pack_stats = pack_best_fit(samples, pack_capacity(cfg.seq_len), cfg.overflow)
        val_samples, _ = encode_all(self.template, val, cfg.loss_on)
        self.val_packs, _ = pack_best_fit(val_samples, pack_capacity(cfg.seq_len), cfg.overflow)
        self.log(f"SFT data from {source}: {stats}; packed: {self.pack_stats}; {len(val)} conversations held out")
        if not self.packs:
            raise DataError(f"{source}: no sample has a token to learn")
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        if model_config.vocab_size < self.tokenizer.vocab_size:
            raise DataError(f"the tokenizer has {self.tokenizer.vocab_size} ids, the model only "
                            f"{model_config.vocab_size} embeddings")

    def build_model(self) -> tuple[ModelConfig, torch.nn.Module]:
        model = self._start[0]
        self._start = None
        return model.config, model

    def build_loader(self) -> SFTLoader:
        cfg, env = self.cfg, self.env
        return SFTLoader(self.packs, cfg.seq_len, cfg.micro_batch_size, self.pad_id, depth=self.depth,
                         seed=cfg.seed, rank=env.dp_rank, world_size=env.dims.dp)

    def build_schedules(self):
        cfg = self.cfg
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * self.loader.steps_per_epoch(cfg.batch_size)))
        total = steps * cfg.batch_size * cfg.seq_len
        peak = cfg.lr or post_training_lr(cfg.checkpoint)
        self.log(f"SFT: {steps} steps of {cfg.batch_size} packed sequences, lr {peak:.3g} -> "
                 f"{peak * cfg.min_lr_ratio:.3g} (cosine)")
        return total, cosine_schedules(total, peak, cfg.min_lr_ratio, cfg.warmup, cfg.batch_size, mtp_weight=0.1)

    def next_batches(self, n_micro: int) -> list[TrainBatch]:
        return [next(self.loader).to(self.device, non_blocking=True) for _ in range(n_micro)]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy of the main head over the held-out conversations' trained tokens (every rank takes
        every world-th micro-batch; all run the same number of forwards)."""
        cfg, env = self.cfg, self.env
        if not self.val_packs:
            return float("nan")
        mb = cfg.micro_batch_size
        chunks = [self.val_packs[i:i + mb] for i in range(0, len(self.val_packs), mb)]
        n_forwards = -(-len(chunks) // env.dims.dp)
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(n_forwards):
            k = i * env.dims.dp + env.dp_rank
            counted = k < len(chunks)
            batch = collate(chunks[k if counted else 0], cfg.seq_len, 0, self.pad_id).to(self.device)
            with self.autocast():
                logits = self.forward(batch.inputs, doc_ids=batch.input_doc_ids).logits
            if counted:
                targets = batch.targets(0)
                totals[0] += cross_entropy_sum(logits, targets).double()
                totals[1] += (targets != -100).sum()
        if hasattr(self.model, "reshard"):
            self.model.reshard()
        self.model.train()
        env.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    def export(self) -> str | None:
        """RUN/export in the Hugging Face layout with the tokenizer and chat template; returns a held-out answer."""
        cfg, env = self.cfg, self.env
        sample = None
        if env.is_main:
            from ..train.checkpointer import load_checkpoint_model

            model = self.model if not env.dims.distributed else load_checkpoint_model(self.checkpointer.latest(),
                                                                                       self.device)
            export(model, self.tokenizer, self.template, self.run_dir / "export")
            if cfg.eval_problems:
                score = task_score(model, self.tokenizer, self.template, self.task, cfg.eval_problems, self.device)
                self.log(f"held-out {self.task.name} accuracy after SFT: {score.accuracy:.1%} "
                         f"({score.problems} problems, {score.formatted:.0%} answered in a box)")
                write_score(self.run_dir, score)
                sample = f"accuracy {score.accuracy:.1%}"
        env.barrier()
        return sample


def task_score(model, tokenizer, template, task, n: int, device, max_new_tokens: int = 32):
    """Greedy accuracy of ``model`` on the first ``n`` held-out problems of ``task`` (by the engine)."""
    from .rollout import Rollouts

    rollouts = Rollouts(model, tokenizer, template, device, max_batch=min(64, max(n, 1)), max_seq_len=256)
    return rollouts.score(task, task.problems(n, "test"), max_new_tokens)


def sft(cfg: SFTConfig, resume: bool = False, log=print) -> RunResult:
    """Run (or continue) the fine-tuning ``cfg`` describes."""
    return SFTTrainer(cfg, resume=resume, log=log).fit()


__all__ = ["SFTConfig", "SFTTrainer", "sft", "tokenizer_dir"]
