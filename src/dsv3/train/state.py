"""Training checkpoints of one process: model, optimiser, schedule position, routing biases, data position and
RNG states, in safetensors files (the single-file backend; sharded runs use :mod:`dsv3.train.dcp_state`).

Layout of a run directory (both backends)::

    RUN/checkpoints/step_0000100/{model.safetensors, optimizer.safetensors, meta.json}
    RUN/checkpoints/latest           (name of the newest complete checkpoint)

A checkpoint is written into a temporary directory and renamed when complete, so a crash mid-write leaves
the previous one usable. Tensors go to safetensors; everything else (step, tokens, loader state, optimiser
hyperparameters, configs) to JSON. Nothing is unpickled on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError

FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("state."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def new_checkpoint_dir(run_dir: str | Path, step: int, writer: str | None = None) -> tuple[Path, Path]:
    """(temporary directory to write checkpoint ``step`` into, its final name); the temporary one is empty.
    ``writer`` names the temporary directory (default: this process's id; ranks writing one checkpoint
    together agree on a name)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = root / f".tmp-{name}-{writer or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp, root / name


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    with open(directory / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename a complete checkpoint into place, point ``latest`` at it, drop all but the newest ``keep_last``
    and what dead writers left behind."""
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a process that died mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    meta: dict[str, Any], keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically and drop all but the newest ``keep_last``."""
    tmp, final = new_checkpoint_dir(run_dir, step)
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_state, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    opt_tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            opt_tensors[f"rng.cuda.{i}"] = s
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    write_meta(tmp, {
        "format": FORMAT, "step": step, **meta, "optimizer": opt_meta,
        "sha256": {f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")},
    })
    return publish_checkpoint(tmp, final, keep_last)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``latest`` pointer, else the highest step), or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    steps = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    return steps[-1] if steps else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint (either backend); :class:`CheckpointError` if absent or unreadable."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupted meta.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this dsv3 reads {FORMAT}")
    return meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, optimiser/RNG tensors, meta) of a single-file checkpoint; :class:`CheckpointError` if it
    is incomplete or corrupted (checksums are verified)."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("backend", "safetensors") != "safetensors":
        raise CheckpointError(f"{path}: a sharded ({meta['backend']}) checkpoint: read it with dsv3.train.checkpointer")
    for fname, digest in meta.get("sha256", {}).items():
        file = path / fname
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {fname}")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: {fname} is corrupted (checksum mismatch)")
    try:
        model_tensors = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable tensors ({e})") from None
    return model_tensors, opt_tensors, meta


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_tensors: dict[str, torch.Tensor],
            opt_tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load model, optimiser and RNG states (in place). Shapes are checked by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(model_tensors))
    extra = sorted(set(model_tensors) - set(own))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in model_tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{k}: shape {tuple(v.shape)} in checkpoint, model has {tuple(own[k].shape)}")
    model.load_state_dict(model_tensors)
    optimizer.load_state_dict(_optimizer_from_flat(opt_tensors, meta["optimizer"]))
    torch.set_rng_state(opt_tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [opt_tensors[k] for k in sorted(k for k in opt_tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
