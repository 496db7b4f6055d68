"""Read and write the official Hugging Face checkpoint layout (config.json + safetensors shards).

The mapping between this project's parameter names and the checkpoint's lives here and nowhere else:

==============================================  =================================================================
dsv3 (``DeepSeekV3``)                           checkpoint
==============================================  =================================================================
``embed_tokens.weight``, ``layers.*``, ``norm``  the same under ``model.``
``lm_head.weight``                              ``lm_head.weight``
``layers.i.mlp.experts.gate_up_proj[j]``        ``model.layers.i.mlp.experts.j.gate_proj.weight`` (rows :I) and
                                                ``...experts.j.up_proj.weight`` (rows I:)
``layers.i.mlp.experts.down_proj[j]``           ``model.layers.i.mlp.experts.j.down_proj.weight``
``mtp.k.*``                                     ``model.layers.{num_hidden_layers + k}.*``, plus copies of the
                                                shared ``embed_tokens`` and head (``shared_head.head``)
==============================================  =================================================================

FP8 checkpoints store a Linear weight as float8_e4m3fn with a float32 ``weight_scale_inv`` holding one factor per
128x128 block (ragged at the edges); loading dequantises them, or keeps them in FP8 (``fp8=``, see
:mod:`dsv3.fp8.serving`: by default on a Hopper GPU). Only safetensors is read: nothing is unpickled.
Loading streams one tensor at a time into a model built on the meta device, so a full second copy of the
weights never exists in memory.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .fp8.serving import apply_fp8_serving, wants_fp8_serving
from .model import DeepSeekV3
from .model.moe import Gate
from .model.rope import RotaryEmbedding


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model: the message names the tensor."""


# --------------------------------------------------------------------------------------------------------
# name mapping

def _hf_prefix(name: str, config: ModelConfig) -> str:
    """dsv3 module path -> checkpoint module path (no expert splitting)."""
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    if m:
        return f"model.layers.{config.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def hf_tensors(model: DeepSeekV3) -> Iterator[tuple[str, str, torch.Tensor, tuple[slice, ...] | None]]:
    """Yield (checkpoint name, dsv3 name, dsv3 tensor, index into it) for every checkpoint tensor of the model.

    ``index`` selects the part of a stacked expert tensor that one checkpoint tensor holds; ``None`` = all.
    The MTP modules' copies of the embedding and head are included (they point at the shared tensors).
    """
    config = model.config
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        # FP8-served experts also hold their block factors, stacked the same way, as ``..._scale_inv``
        m = re.search(r"experts\.(gate_up_proj|down_proj)(_scale_inv)?$", name)
        if m:
            prefix = _hf_prefix(name.rsplit(".", 1)[0], config)
            n_exp, rows = tensor.shape[0], tensor.shape[1]
            weight = "weight" + (m.group(2) or "")
            for j in range(n_exp):
                if m.group(1) == "gate_up_proj":
                    half = rows // 2
                    yield f"{prefix}.{j}.gate_proj.{weight}", name, tensor, (j, slice(0, half))
                    yield f"{prefix}.{j}.up_proj.{weight}", name, tensor, (j, slice(half, rows))
                else:
                    yield f"{prefix}.{j}.down_proj.{weight}", name, tensor, (j,)
            continue
        if name.startswith("lm_head.") and config.tie_word_embeddings:
            continue
        yield _hf_prefix(name, config), name, tensor, None
    for k in range(len(model.mtp)):
        layer = f"model.layers.{config.num_hidden_layers + k}"
        yield f"{layer}.embed_tokens.weight", "embed_tokens.weight", state["embed_tokens.weight"], None
        yield f"{layer}.shared_head.head.weight", "lm_head.weight", state["lm_head.weight"], None


# --------------------------------------------------------------------------------------------------------
# loading

def _parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DeepSeekV3(config).parameters())


def _weight_map(path: Path) -> dict[str, str]:
    """Checkpoint tensor name -> shard file name."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {k: single.name for k in f.keys()}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no safetensors files in {path} (expected model.safetensors.index.json and shards)")
    out = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            out.update({k: shard.name for k in f.keys()})
    return out


def _has_mtp_weights(weight_map: dict[str, str], config: ModelConfig) -> bool:
    return any(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in weight_map)


def _dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    from .fp8 import dequantize_blocks

    n, k = weight.shape
    expected = (-(-n // 128), -(-k // 128))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, expected {expected} for "
                              f"128x128 blocks of a {n}x{k} weight")
    return dequantize_blocks(weight, scale_inv.float(), block=128, dtype=torch.float32)


def _num_labels(path: Path, weight_map: dict[str, str]) -> int:
    """A sequence classifier's label count: the rows of its ``score.weight`` (transformers leaves the count out
    of config.json when it is its default, 2)."""
    if "score.weight" not in weight_map:
        raise CheckpointError(f"{path}: no score.weight: not a sequence classifier (a reward model)")
    with safe_open(path / weight_map["score.weight"], framework="pt") as f:
        return f.get_slice("score.weight").get_shape()[0]


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    progress: bool = False,
    fp8: bool | str = "auto",
    head: str = "lm",
) -> DeepSeekV3:
    """Load a Hugging Face-layout checkpoint directory (config.json, safetensors shards) into a DeepSeekV3.

    FP8 weights are dequantised to ``dtype``, unless ``fp8`` keeps them: ``True`` keeps the float8 weights and
    their ``weight_scale_inv`` in FP8 inference modules (:mod:`dsv3.fp8.serving`; half the memory of BF16),
    ``"auto"`` does so on a Hopper GPU only when the dequantised weights would not fit its free memory (FP8
    decoding is the slower path today), ``False`` never. The routing bias stays float32. Raises :class:`CheckpointError`
    naming any missing, unexpected or misshapen tensor. A checkpoint whose config declares MTP modules that
    its files lack (transformers drops them when saving) loads without MTP, with a warning.

    ``head="score"`` loads a sequence classifier, transformers' ``DeepseekV3ForSequenceClassification`` (a reward
    model: one label): its ``score.weight`` (labels, hidden) becomes ``lm_head``, so that the logits are each
    position's scores; MTP tensors are not loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if head not in ("lm", "score"):
        raise ValueError(f"head: must be 'lm' or 'score', got {head!r}")
    config = ModelConfig.from_json(path / "config.json")
    weight_map = _weight_map(path)
    if head == "score":  # a classifier has no use for MTP: its tensors, if any, are left in the files
        mtp_layers = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
        weight_map = {k: v for k, v in weight_map.items() if not k.startswith(mtp_layers)} if mtp_layers else weight_map
        config = config.replace(num_nextn_predict_layers=0)
    if config.num_nextn_predict_layers > 0 and not _has_mtp_weights(weight_map, config):
        warnings.warn(
            f"{path}: config.json declares {config.num_nextn_predict_layers} MTP module(s) but the checkpoint has no "
            f"layer {config.num_hidden_layers} weights; loading without MTP",
            stacklevel=2,
        )
        config = config.replace(num_nextn_predict_layers=0)
    dequantized = _parameter_count(config) * torch.finfo(dtype).bits // 8 \
        if fp8 == "auto" and config.quantization_config else None

    def keep_fp8(meta_model: DeepSeekV3) -> None:  # modules whose checkpoint weights are FP8 stay FP8
        names = {ours.rsplit(".", 1)[0] for hf, ours, _, _ in hf_tensors(meta_model)
                 if hf + "_scale_inv" in weight_map}
        apply_fp8_serving(meta_model, names)
    fp8_kept = wants_fp8_serving(fp8, config.quantization_config, device, dequantized)

    def transform(meta_model: DeepSeekV3) -> None:
        if fp8_kept:
            keep_fp8(meta_model)
        if head == "score":
            meta_model.lm_head = nn.Linear(config.hidden_size, _num_labels(path, weight_map), bias=False,
                                           device="meta", dtype=dtype)

    model = build_empty(config, device, dtype, transform=transform)

    head_name = "score.weight" if head == "score" else "lm_head.weight"
    targets: dict[str, tuple[str, torch.Tensor, tuple | None]] = {
        (head_name if hf == "lm_head.weight" else hf): (ours, t, idx) for hf, ours, t, idx in hf_tensors(model)
    }
    scale_names = {k for k in weight_map if k.endswith("_scale_inv")}
    unexpected = sorted(k for k in weight_map if k not in targets and k not in scale_names)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint: {', '.join(unexpected[:5])}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    missing = sorted(k for k in targets if k not in weight_map)
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))

    handles: dict[str, object] = {}

    def tensor(name: str) -> torch.Tensor:
        file = weight_map[name]
        if file not in handles:
            handles.clear()  # one shard mapped at a time: release the previous one first
            handles[file] = safe_open(path / file, framework="pt", device="cpu")
        return handles[file].get_tensor(name)

    by_file: dict[str, list[str]] = {}
    for name in targets:
        by_file.setdefault(weight_map[name], []).append(name)
    names = [n for file in sorted(by_file) for n in by_file[file]]  # shard by shard
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="loading", unit="tensor")
    with torch.no_grad():
        for name in iterator:
            ours, dest, index = targets[name]
            if ours == "embed_tokens.weight" and name != "model.embed_tokens.weight":
                continue  # an MTP module's copy of the shared embedding
            if ours == "lm_head.weight" and name != head_name:
                continue  # an MTP module's copy of the shared head
            src = tensor(name)
            view = dest if index is None else dest[index]
            if src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and src.dtype != view.dtype:
                scale = name + "_scale_inv"
                if scale not in weight_map:
                    raise CheckpointError(f"{name}: float8 weight without its {scale}")
                src = _dequantize(src, tensor(scale), name)
            if tuple(src.shape) != tuple(view.shape):
                raise CheckpointError(f"{name}: shape {tuple(src.shape)} in checkpoint, expected {tuple(view.shape)}")
            view.copy_(src)
            del src
    handles.clear()
    return model


def build_empty(config: ModelConfig, device: str | torch.device, dtype: torch.dtype, transform=None) -> DeepSeekV3:
    """A DeepSeekV3 with uninitialised storage on ``device``: built on meta, then allocated once.
    ``transform(model)``, if given, may swap modules while the model is still on meta (after the dtype cast)."""
    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to(dtype)
    if transform is not None:
        transform(model)
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, Gate):
            module.tokens_per_expert.zero_()
            if module.e_score_correction_bias is not None:
                module.e_score_correction_bias = module.e_score_correction_bias.float()
    model.rotary = RotaryEmbedding(config).to(device)  # non-persistent buffers are not in the checkpoint
    return model


# --------------------------------------------------------------------------------------------------------
# saving

def save_pretrained(
    model: DeepSeekV3,
    path: str | os.PathLike,
    *,
    max_shard_size: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` in the official layout (config.json, sharded safetensors, index), loadable by
    transformers' DeepseekV3ForCausalLM and by :func:`load_pretrained`. ``dtype`` casts floating weights
    (the routing bias stays float32). Files are written under temporary names and renamed when complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if config.quantization_config is not None:  # weights are saved dequantised
        config = config.replace(quantization_config=None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for hf, ours, t, index in hf_tensors(model):
        v = (t if index is None else t[index]).detach()
        if dtype is not None and v.is_floating_point() and not ours.endswith("e_score_correction_bias"):
            v = v.to(dtype)
        v = v.to("cpu").contiguous().clone()
        nbytes = v.numel() * v.element_size()
        if sizes[-1] > 0 and sizes[-1] + nbytes > max_shard_size:
            shards.append({})
            sizes.append(0)
        shards[-1][hf] = v
        sizes[-1] += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tmp = path / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json_atomic(path / "model.safetensors.index.json", index)
    cfg = config.to_hf_dict()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json_atomic(path / "config.json", cfg)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "build_empty", "hf_tensors"]
