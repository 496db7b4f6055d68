"""What SFT and GRPO share: the starting checkpoint (model, tokenizer, chat template), the task settings, the
learning-rate schedule of post-training, and the export (Hugging Face layout with the chat template)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import save_pretrained
from ..config import ConfigError, ModelConfig
from ..data.tokenizer import Tokenizer
from ..inference.chat import ChatTemplate
from ..train.config import TrainConfig
from ..train.schedules import Schedules
from .tasks import ArithmeticTask

REPORT_PRETRAIN_PEAK_LR = 2.2e-4
"""Report §4.2: the pre-training peak learning rate of DeepSeek-V3."""
REPORT_SFT_PEAK_LR, REPORT_SFT_MIN_LR = 5e-6, 1e-6
"""Report §5.1: SFT decays from 5e-6 to 1e-6 (cosine)."""


@dataclass
class PostTrainConfig(TrainConfig):
    """What SFT and GRPO runs share on top of the trainer's settings."""

    checkpoint: str | None = None
    """The model to post-train: a `dsv3 train` run directory or a Hugging Face layout directory."""
    lr: float = 0.0
    """Peak learning rate; 0 = derived from the report (see the command's help)."""
    batch_ramp: bool = False
    gamma: float = 0.0
    """Routing biases stay frozen (the report stops their updates before the end of pre-training)."""
    task_digits: str = "1-3"
    """Operand digits of the built-in arithmetic task ("1-3": one to three)."""
    task_ops: str = "+-"
    """Operators of the built-in arithmetic task."""
    eval_problems: int = 200
    """Held-out arithmetic problems whose greedy accuracy is measured (0 = none)."""
    eval_every: int = 0
    save_every: int = 200

    def validate(self) -> None:
        if self.checkpoint is None:
            raise ConfigError("checkpoint: required (a `dsv3 train` run directory or a Hugging Face directory)")
        super().validate()
        if self.eval_problems < 0:
            raise ConfigError(f"eval_problems: must be >= 0, got {self.eval_problems!r}")
        parse_task(self.task_digits, self.task_ops)

    def derived_when_zero(self) -> frozenset[str]:
        return frozenset({"lr"})

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        return checkpoint_model_config(self.checkpoint)


def tokenizer_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint's tokenizer lies: ``tokenizer/`` of a ``dsv3 train`` run, else the directory."""
    p = Path(checkpoint)
    return p / "tokenizer" if (p / "tokenizer" / "tokenizer.json").is_file() else p


def checkpoint_model_config(checkpoint: str | Path) -> ModelConfig:
    """The model configuration of a run directory or a Hugging Face directory (``config.json``)."""
    p = Path(checkpoint)
    if not p.is_dir():
        raise ConfigError(f"checkpoint: {p} is not a directory (a `dsv3 train` run, or a Hugging Face layout)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"checkpoint: {p} has no config.json")
    return ModelConfig.from_json(p / "config.json")


def load_start(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, Tokenizer, ChatTemplate]:
    """The model to post-train (float32 master weights, train mode), its tokenizer and its chat template."""
    from ..loading import load

    model, tokenizer = load(checkpoint, device, torch.float32)
    template = ChatTemplate.load(tokenizer, tokenizer_dir(checkpoint))
    return model.train(), tokenizer, template


def pretrain_peak_lr(checkpoint: str | Path) -> float | None:
    """The peak learning rate of the ``dsv3 train`` run behind ``checkpoint`` (a run directory, its export, or a
    post-training run on one of them), or None if unknown."""
    p = Path(checkpoint)
    for record in (p / "train_config.json", p.parent / "train_config.json"):
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("checkpoint"):  # a post-training run: follow it to the pre-training run
                return pretrain_peak_lr(saved["checkpoint"]) if Path(saved["checkpoint"]) != p else None
            lr = saved.get("lr")
            return float(lr) if isinstance(lr, (int, float)) and lr > 0 else None
    return None


def post_training_lr(checkpoint: str | Path) -> float:
    """The report's SFT peak scaled to this model: 5e-6 x (this run's pre-training peak / 2.2e-4), or 5e-6 when
    the checkpoint has no training record (a Hugging Face checkpoint)."""
    peak = pretrain_peak_lr(checkpoint)
    return REPORT_SFT_PEAK_LR if peak is None else REPORT_SFT_PEAK_LR * peak / REPORT_PRETRAIN_PEAK_LR


def cosine_schedules(total_tokens: int, peak_lr: float, min_ratio: float, warmup: float, batch_size: int,
                     mtp_weight: float) -> Schedules:
    """Linear warm-up over ``warmup`` of the run, then cosine from ``peak_lr`` to ``min_ratio x peak_lr`` at the
    end; a constant batch, routing biases frozen (gamma 0: the report stops the bias updates before the end of
    pre-training), a constant MTP weight."""
    return Schedules(total_tokens=total_tokens, peak_lr=peak_lr, warmup_tokens=warmup * total_tokens,
                     constant_until=warmup * total_tokens, decay_until=total_tokens, decay_ratio=min_ratio,
                     final_until=math.inf, batch_start=batch_size, batch_end=batch_size, gamma=0.0,
                     mtp_weight_first=mtp_weight, mtp_weight_second=mtp_weight)


def parse_task(digits: str, ops: str, seed: int = 0) -> ArithmeticTask:
    """The built-in arithmetic task from ``digits`` ("1-3" or "2") and ``ops`` ("+-*")."""
    lo, _, hi = digits.partition("-")
    try:
        return ArithmeticTask(int(lo), int(hi or lo), ops, seed)
    except ValueError as e:
        raise ConfigError(f"task: {e} (task_digits {digits!r}, task_ops {ops!r})") from None


def export(model: torch.nn.Module, tokenizer: Tokenizer, template: ChatTemplate, out: Path) -> Path:
    """``out`` in the Hugging Face layout with the tokenizer and, when the starting checkpoint had one, its chat
    template (without one, dsv3's chat and server use the DeepSeek-V3 format SFT rendered with)."""
    save_pretrained(model, out)
    tokenizer.save(out)
    if template.template is not None:
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["chat_template"] = template.template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


@dataclass
class TaskScore:
    problems: int
    accuracy: float
    """Share of completions with the right answer in the last box."""
    formatted: float
    """Share of completions with a box at all."""
    mean_length: float
    """Mean completion length in tokens."""


def write_score(run_dir: Path, score: TaskScore) -> Path:
    """``RUN/task_accuracy.json``: the held-out score of the run's final model."""
    path = Path(run_dir) / "task_accuracy.json"
    path.write_text(json.dumps(dataclasses.asdict(score)) + "\n")
    return path


def score_completions(task: ArithmeticTask, problems, completions: list[str], lengths: list[int]) -> TaskScore:
    rewards = [task.reward(p, c) for p, c in zip(problems, completions)]
    n = max(len(problems), 1)
    return TaskScore(len(problems), sum(r == 1.0 for r in rewards) / n, sum(r > 0 for r in rewards) / n,
                     sum(lengths) / n)
