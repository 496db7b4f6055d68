"""What a user points a command at: a ``dsv3 train`` run directory or a Hugging Face layout directory.

Used by ``dsv3 sample`` / ``generate`` / ``chat`` / ``serve`` and by :func:`dsv3.server.serve`, so that each
names a checkpoint and sizes its CPU threads the same way; loading one is :func:`dsv3.load`
(:mod:`dsv3.loading`, which also has :func:`default_cpu_threads`, imported here for its callers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, save_pretrained
from .data import Tokenizer
from .loading import default_cpu_threads, load
from .model import DeepSeekV3
from .train.checkpointer import load_checkpoint_model
from .train.state import latest_checkpoint


def is_run_dir(path: str | Path) -> bool:
    """A directory written by ``dsv3 train`` (its config, metrics or checkpoints are there)."""
    p = Path(path)
    return (p / "train_config.json").is_file() or latest_checkpoint(p) is not None


def load_run_or_checkpoint(path: str | Path, device: str = "auto") -> tuple[DeepSeekV3, Tokenizer]:
    """The former name of :func:`dsv3.load` (kept for callers of it)."""
    return load(path, device)


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write a run's model in the Hugging Face layout (loads in transformers and :func:`dsv3.load_pretrained`)
    with its tokenizer, from its latest checkpoint (or ``checkpoint``), whichever backend wrote it."""
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export (not a dsv3 train run directory?)")
    model = load_checkpoint_model(ckpt)
    save_pretrained(model, out, dtype=dtype)
    Tokenizer.load(run_dir / "tokenizer").save(out)
    return Path(out)


def model_name(path: str | Path) -> str:
    """The name a checkpoint goes by (the server's model id): its directory's name, or the run's name for a
    run's ``export/`` directory."""
    p = Path(path).resolve()
    if p.name == "export" and is_run_dir(p.parent):
        return p.parent.name
    return p.name


__all__ = ["default_cpu_threads", "export_run", "is_run_dir", "load", "load_run_or_checkpoint", "model_name"]
