"""Loading a model and its tokenizer for generation: :func:`dsv3.load`, used alike by the commands and the server.

One rule for every entry point: ``device="auto"`` is the GPU when there is one, else the CPU, and the dtype
follows the device unless given (float32 on a CPU, bfloat16 on a GPU). The training-side modules (run
directories, checkpoints) are imported when a run directory is loaded, not before: ``import dsv3`` stays
light and the package's ``__init__`` keeps no import cycle with :mod:`dsv3.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import build_empty, load_pretrained
from .config import ConfigError
from .data import Tokenizer
from .model import DeepSeekV3

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DeviceOptions:
    """Where and how a command runs its checkpoint (flags of ``dsv3 sample / generate / chat / serve``)."""

    device: str = "auto"
    """auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N: where the weights are loaded and
    the model runs."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (default: float32 on a CPU, bfloat16 on a GPU)."""
    threads: int | None = None
    """CPU intra-op threads (default 1 for models under 50M parameters, else torch's; no effect on a GPU)."""
    fp8: str = "auto"
    """An FP8 checkpoint's weights (the official release): keep (FP8 in memory, half the bytes), dequantize
    (to --dtype) or auto (keep only on a Hopper GPU whose memory cannot hold them dequantised)."""

    def __post_init__(self) -> None:
        if self.fp8 not in _FP8_MODES:
            raise ConfigError(f"fp8 must be one of {sorted(_FP8_MODES)}, got {self.fp8!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} or None, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def fp8_weights(self) -> bool | str:
        """``fp8`` as :func:`dsv3.load_pretrained` takes it (True, False or "auto")."""
        return _FP8_MODES[self.fp8]

    def cpu_threads(self, model: torch.nn.Module) -> int | None:
        """Intra-op threads to run ``model`` with: ``threads``, else :func:`default_cpu_threads` for a model on
        the CPU; ``None`` (leave torch's) on a GPU."""
        if next(model.parameters()).device.type != "cpu":
            return None
        return self.threads or default_cpu_threads(model)


_FP8_MODES = {"auto": "auto", "keep": True, "dequantize": False}


def default_cpu_threads(model: torch.nn.Module) -> int:
    """Intra-op threads for decoding on a CPU: 1 for small models (< 50M parameters), whose many tiny matmuls
    run far slower when threads contend; torch's default otherwise."""
    n_params = sum(p.numel() for p in model.parameters())
    return 1 if n_params < 50_000_000 else torch.get_num_threads()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: ``cuda`` when a GPU is visible, else ``cpu``; anything else as ``torch.device`` reads it.
    Raises :class:`~dsv3.config.ConfigError` for a CUDA device on a machine without one (rather than failing
    later, mid-load)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available (use auto or cpu)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; ``None``: float32 on a CPU (fast there, and exact), bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    fp8: bool | str = "auto",
) -> tuple[DeepSeekV3, Tokenizer]:
    """A model (in eval mode) and its tokenizer from a ``dsv3 train`` run directory (its latest checkpoint,
    one process or sharded; the tokenizer from ``tokenizer/``) or a Hugging Face layout directory (with
    tokenizer.json beside the weights).

    ``device``: see :func:`resolve_device`; ``dtype``: see :func:`resolve_dtype`. ``fp8`` applies to
    Hugging Face checkpoints with FP8 weights (:func:`dsv3.load_pretrained`). The routers' score-correction
    bias stays float32 whatever ``dtype``.
    """
    p = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from .train.state import latest_checkpoint  # training-side: only now

    ckpt = latest_checkpoint(p) if p.is_dir() else None
    if ckpt is not None:
        from .train.checkpointer import load_checkpoint_model

        trained = load_checkpoint_model(ckpt, "cpu" if dt != torch.float32 else dev)  # as trained: float32
        if dt == torch.float32:
            model = trained
        else:  # copy into a model built in the target dtype: load_state_dict casts and keeps FP32 buffers FP32
            model = build_empty(trained.config, dev, dt)
            model.load_state_dict(trained.state_dict())
            del trained
        return model.eval(), Tokenizer.load(p / "tokenizer")
    model = load_pretrained(p, device=dev, dtype=dt, fp8=fp8)
    return model.eval(), Tokenizer.load(p)
