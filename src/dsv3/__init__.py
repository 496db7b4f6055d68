"""dsv3: DeepSeek-V3 (arXiv 2412.19437) in plain PyTorch.

>>> import dsv3
>>> model = dsv3.build_model(dsv3.preset("tiny"))
>>> model(torch.randint(0, 4096, (2, 16))).logits.shape
torch.Size([2, 16, 4096])
>>> model, tokenizer = dsv3.load("runs/tiny")   # a run or a Hugging Face directory; the GPU when there is one
"""

from __future__ import annotations

import torch

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import PRESETS, ConfigError, ModelConfig, preset
from .loading import load
from .model import DeepSeekV3, ModelOutput

__version__ = "0.1.0"


def build_model(
    config: ModelConfig | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    transform=None,
) -> DeepSeekV3:
    """A randomly initialised model (report §4.2 initialisation) from a config or a preset name. ``seed``: each
    tensor's values depend on it and the tensor's name only (None: the global generator). ``transform(model)``
    may drop or swap modules while the model is still on the meta device, before any memory is allocated (a
    pipeline rank keeps only its stages); what remains is initialised as in the whole model."""
    from .checkpoint import build_empty

    if isinstance(config, str):
        config = preset(config)
    model = build_empty(config, device, dtype, transform=transform)
    model.init_weights(seed)
    return model


__all__ = [
    "CheckpointError", "ConfigError", "DeepSeekV3", "ModelConfig", "ModelOutput", "PRESETS", "build_model",
    "load", "load_pretrained", "preset", "save_pretrained",
]
