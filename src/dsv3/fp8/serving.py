"""Serve an FP8 checkpoint in FP8: weights stay float8_e4m3fn with their 128x128 ``weight_scale_inv``.

The official DeepSeek-V3 release stores every projection weight as E4M3 plus one FP32 factor per 128x128
block. Kept that way in memory the weights take half the bytes of BF16. The modules here hold exactly the
checkpoint's tensors, under the checkpoint's names:

* :class:`FP8InferenceLinear`: ``weight`` (N, K) float8 and ``weight_scale_inv`` (ceil(N/128), ceil(K/128));
* :class:`FP8InferenceExperts`: ``gate_up_proj`` (E, 2I, d) float8 with ``gate_up_proj_scale_inv``
  (E, 2 ceil(I/128), ceil(d/128)) -- the gate's blocks then the up projection's, each grid as stored -- and
  ``down_proj`` (E, d, I) float8 with ``down_proj_scale_inv`` (E, ceil(d/128), ceil(I/128)).

Forward: on a Hopper GPU the activations are quantised online in 1x128 tiles and the GEMM runs in FP8
(``torch._scaled_mm`` with block scales for the Linear layers, the grouped FP8 GEMM of
:mod:`dsv3.fp8.transform` for the experts); a Linear layer given at most :data:`FEW_ROWS_MAX` rows (a
decode step) instead reads its FP8 weight once in a Triton kernel that widens each tile in registers and
multiplies by the block factor, the activations unquantised (:mod:`dsv3.kernels.few_rows`; the engine's
decode experts use the same kernel). Elsewhere each layer dequantises its weight on the fly and runs an
ordinary matmul in the activation dtype, which gives exactly the results of dequantising at load time.

:func:`dsv3.load_pretrained` applies :func:`apply_fp8_serving` to the model while it is still on the meta
device and then copies the checkpoint's float8 weights and scales in unchanged. These modules are for
inference only (no gradients); do not ``.to(dtype)`` such a model, which would cast the FP8 weights.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv3.fp8.linear import _hopper_scaled_mm_ok, fp8_matmul_nt
from dsv3.fp8.quant import FP8_DTYPE, TILE, dequantize_blocks, quantize_blocks, quantize_tiles
from dsv3.fp8.transform import _BACKENDS, _resolve
from dsv3.model.moe import Experts

__all__ = ["FP8InferenceExperts", "FP8InferenceLinear", "apply_fp8_serving", "dequantized_linear", "fp8_linear",
           "quantize_for_serving", "wants_fp8_serving"]

FEW_ROWS_MAX = 64
"""Rows up to which an FP8 Linear on a Hopper GPU runs the few-rows kernel (no activation quantisation)."""


def _blocks(n: int) -> int:
    return -(-n // TILE)


def _fp8_gemm_ok(x: Tensor) -> bool:
    return _hopper_scaled_mm_ok(x)


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _few_rows_ok(x: Tensor) -> bool:
    return _HAS_TRITON and x.numel() <= FEW_ROWS_MAX * x.shape[-1]


def fp8_linear(x: Tensor, weight: Tensor, scale_inv: Tensor) -> Tensor:
    """``x @ W.T`` for an FP8 weight (N, K) with its (ceil(N/128), ceil(K/128)) block factors ``scale_inv``
    (W = weight x factor per block): the few-rows kernel, the FP8 GEMM or the dequantised weight (module
    docstring)."""
    if _fp8_gemm_ok(x):
        if _few_rows_ok(x):
            from dsv3.kernels.few_rows import linear_few_rows

            return linear_few_rows(x, weight, scale_inv)
        xq, xs = quantize_tiles(x.reshape(-1, x.shape[-1]))
        y = fp8_matmul_nt(xq, xs, weight, scale_inv, b_blocks=True, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, dequantize_blocks(weight, scale_inv, dtype=x.dtype))


def _dequantize_stack(q: Tensor, scale_inv: Tensor, dtype: torch.dtype) -> Tensor:
    """(E, N, K) float8 with (E, ceil(N/128), ceil(K/128)) block factors -> (E, N, K) ``dtype``."""
    _, n, k = q.shape
    s = scale_inv.float().repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)[:, :n, :k]
    return (q.float() * s).to(dtype)


class FP8InferenceLinear(nn.Module):
    """A bias-free Linear whose weight is kept in FP8 with 128x128 block factors (inference only)."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.ones(_blocks(out_features), _blocks(in_features),
                                                            dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 128x128"


class FP8InferenceExperts(Experts):
    """Routed experts with FP8 weights and per-expert 128x128 block factors (inference only)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, device=None):
        nn.Module.__init__(self)
        self.n_experts, self.inter_dim, self.implementation = n_experts, inter_dim, "auto"
        fp8 = dict(dtype=FP8_DTYPE, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter_dim, dim, **fp8), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim, **fp8), requires_grad=False)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("gate_up_proj_scale_inv", torch.ones(n_experts, 2 * _blocks(inter_dim), _blocks(dim),
                                                                  **f32))
        self.register_buffer("down_proj_scale_inv", torch.ones(n_experts, _blocks(dim), _blocks(inter_dim), **f32))

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x (N, d) sorted by expert with ``counts`` (E,) rows each -> (N, d)."""
        # The fused FP8 path needs one regular block grid over [gate; up]: I a multiple of 128 (V3: 2048).
        if _fp8_gemm_ok(x) and self.inter_dim % TILE == 0:
            ops = _BACKENDS[_resolve("auto", x)]
            layout = ops.layout(counts, x.shape[0])
            h = ops.mm(*ops.quant_rows(x, layout), self.gate_up_proj, self.gate_up_proj_scale_inv, layout, x.dtype)
            gate, up = h.split(self.inter_dim, dim=-1)
            a = F.silu(gate) * up
            return ops.mm(*ops.quant_rows(a, layout), self.down_proj, self.down_proj_scale_inv, layout, x.dtype)
        w13, w2 = self.dequantized(x.dtype)
        out = []
        for e, chunk in enumerate(x.split(counts.tolist())):
            if chunk.shape[0]:
                gate, up = F.linear(chunk, w13[e]).split(self.inter_dim, dim=-1)
                chunk = F.linear(F.silu(gate) * up, w2[e])
            out.append(chunk)
        return torch.cat(out) if out else x

    def dequantized(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The real weights: gate_up (E, 2I, d) and down (E, d, I) in ``dtype``."""
        i, nb = self.inter_dim, self.gate_up_proj_scale_inv.shape[1] // 2
        s = self.gate_up_proj_scale_inv
        w13 = torch.cat([_dequantize_stack(self.gate_up_proj[:, :i], s[:, :nb], dtype),
                         _dequantize_stack(self.gate_up_proj[:, i:], s[:, nb:], dtype)], dim=1)
        return w13, _dequantize_stack(self.down_proj, self.down_proj_scale_inv, dtype)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, inter_dim={self.inter_dim}, fp8=e4m3 128x128"


def dequantized_linear(module: FP8InferenceLinear, dtype: torch.dtype) -> nn.Linear:
    """A plain bias-free ``nn.Linear`` holding ``module``'s weight dequantised to ``dtype`` (same device)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=False, device=module.weight.device,
                       dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantize_blocks(module.weight, module.weight_scale_inv, dtype=dtype))
    return linear.requires_grad_(False)


def apply_fp8_serving(model: nn.Module, names: set[str] | None = None) -> nn.Module:
    """Replace Linear and routed-experts modules by their FP8 inference versions (empty, same device).

    ``names``: the module paths to convert (those whose checkpoint weights are FP8); ``None`` converts every
    ``nn.Linear`` but ``lm_head`` and every ``Experts``. Weights must be loaded afterwards.
    """
    for name, module in list(model.named_modules()):
        if names is not None and name not in names or name == "lm_head":
            continue
        if type(module) is nn.Linear and module.bias is None:
            new = FP8InferenceLinear(module.in_features, module.out_features, device=module.weight.device)
        elif type(module) is Experts:
            new = FP8InferenceExperts(module.n_experts, module.gate_up_proj.shape[2], module.inter_dim,
                                      device=module.gate_up_proj.device)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


@torch.no_grad()
def quantize_for_serving(model: nn.Module) -> nn.Module:
    """In place: quantise the weights of every module :func:`apply_fp8_serving` converts (bias-free Linear
    layers but ``lm_head``, routed experts) to E4M3 with 128x128 block factors, as the official checkpoints
    store them, and serve them FP8 (the weights in the activations' dtype are freed). Returns the model."""
    old = {name: m for name, m in model.named_modules()}
    apply_fp8_serving(model)
    for name, new in model.named_modules():
        if isinstance(new, FP8InferenceLinear):
            new.weight.data, new.weight_scale_inv.data = quantize_blocks(old[name].weight.float())
        elif isinstance(new, FP8InferenceExperts):
            src = old[name]
            for w, scale in (("gate_up_proj", "gate_up_proj_scale_inv"), ("down_proj", "down_proj_scale_inv")):
                q, s = quantize_blocks(getattr(src, w).float())
                getattr(new, w).data, getattr(new, scale).data = q, s
    return model


def wants_fp8_serving(fp8: bool | str, quantization_config: dict | None, device: str | torch.device,
                      dequantized_bytes: int | None = None) -> bool:
    """Whether :func:`dsv3.load_pretrained` keeps FP8 weights: only for FP8 checkpoints; ``True``/``False``
    force it. ``"auto"`` keeps them only where they must be: on a Hopper (or newer) GPU whose free memory
    cannot hold the weights dequantised (``dequantized_bytes``). Kept FP8 weights halve the memory but do not
    decode faster than BF16 yet (0.88x at batch 1, docs/inference.md), so "auto" dequantises whenever that
    fits."""
    if fp8 not in (True, False, "auto"):
        raise ValueError(f"fp8 must be True, False or 'auto', got {fp8!r}")
    if not quantization_config or quantization_config.get("quant_method") != "fp8":
        return False
    if fp8 == "auto":
        device = torch.device(device)
        if not (device.type == "cuda" and torch.cuda.is_available()
                and torch.cuda.get_device_capability(device) >= (9, 0)):
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return dequantized_bytes is not None and dequantized_bytes > 0.9 * free
    return bool(fp8)
