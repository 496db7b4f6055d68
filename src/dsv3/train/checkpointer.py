"""Training checkpoints over the run's stateful parts, with two backends.

What a checkpoint holds: the model (weights and routing biases), the optimiser, and a JSON part (the step and
tokens seen, the data loader's position, the configs, optimiser hyperparameters). Each part is restored with
``load_state_dict`` (model, optimiser, loader) or read from the meta. Two ways to write the tensors:

* ``safetensors`` (one process): ``model.safetensors`` + ``optimizer.safetensors``, checksummed
  (:mod:`dsv3.train.state`);
* ``dcp`` (under torchrun): PyTorch Distributed Checkpoint shards, one set per rank, resharded on load
  (:mod:`dsv3.train.dcp_state`).

Both write into a temporary directory renamed when complete, so a process killed mid-save (any rank) leaves the
previous checkpoint as ``latest``. A checkpoint of either kind loads in one process (export, sampling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..config import ModelConfig
from ..model import DeepSeekV3
from .parallel import Distributed
from .state import (
    FORMAT,
    latest_checkpoint,
    new_checkpoint_dir,
    publish_checkpoint,
    read_checkpoint,
    read_meta,
    restore,
    save_checkpoint,
    write_meta,
)


class Checkpointer:
    """Saves and restores a run's training state: ``safetensors`` in one process, ``dcp`` under torchrun."""

    def __init__(self, run_dir: str | Path, env: Distributed, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.env = env
        self.keep_last = keep_last
        self.backend = "dcp" if env.dims.distributed else "safetensors"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
        """Write checkpoint ``step`` (collective under torchrun); ``meta``: the JSON part, rank 0's."""
        if self.backend == "safetensors":
            save_checkpoint(self.run_dir, step, model, optimizer, meta, keep_last=self.keep_last)
            return
        from .dcp_state import save_dcp

        env = self.env
        tmp = final = None
        if env.is_main:
            tmp, final = new_checkpoint_dir(self.run_dir, step, writer="dcp")
        env.barrier()  # the directory exists before any rank writes
        tmp = tmp or self.run_dir / "checkpoints" / f".tmp-step_{step:07d}-dcp"
        save_dcp(tmp, model, optimizer, env)
        env.barrier()  # every rank's shards are written
        if env.is_main:
            write_meta(tmp, {"format": FORMAT, "backend": "dcp", "world_size": env.dims.world, "step": step, **meta})
            publish_checkpoint(tmp, final, self.keep_last)
        env.barrier()

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model and optimiser in place from checkpoint ``path``; returns its meta."""
        meta = read_meta(path)
        if meta.get("backend", "safetensors") == "dcp":
            from .dcp_state import load_dcp

            load_dcp(path, model, optimizer, self.env if self.env.dims.distributed else None)
            return meta
        if self.env.dims.distributed:
            raise CheckpointError(f"{path}: a one-process checkpoint cannot resume under torchrun yet; continue it "
                                  f"in one process, or start the sharded run afresh")
        model_t, opt_t, meta = read_checkpoint(path)
        restore(model, optimizer, model_t, opt_t, meta)
        return meta


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> DeepSeekV3:
    """The model of a training checkpoint of either backend, whole, in one process (float32, eval mode)."""
    from .. import build_model

    path = Path(path)
    meta = read_meta(path)
    config = ModelConfig.from_hf_dict(meta["model_config"])
    model = build_model(config, device=device, dtype=torch.float32, seed=None)
    if meta.get("backend", "safetensors") == "dcp":
        from .dcp_state import load_dcp

        load_dcp(path, model, None, None)
    else:
        model_t, _, _ = read_checkpoint(path)
        model.load_state_dict(model_t)
    return model.eval()
