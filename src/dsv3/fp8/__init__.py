"""FP8 mixed-precision primitives, DeepSeek-V3 report §3.3.

E4M3 quantisation with FP32 scales per 1x128 activation tile and per 128x128 weight block
(:mod:`dsv3.fp8.quant`), and an FP8 Linear whose forward, input-gradient and weight-gradient
GEMMs all take FP8 operands (:mod:`dsv3.fp8.linear`); :func:`apply_fp8_training` switches a model's
projections and routed experts to them (:mod:`dsv3.fp8.transform`); :mod:`dsv3.fp8.serving` keeps an FP8
checkpoint's weights in FP8 for inference.
"""

from dsv3.fp8.linear import Backend, FP8Linear, fp8_linear, fp8_matmul_nt, resolve_backend
from dsv3.fp8.transform import (
    FP8Experts,
    apply_fp8_training,
    fp8_backends,
    fp8_grouped_linear,
    resolve_experts_backend,
)
from dsv3.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_rows,
    quantize_tiles,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Backend",
    "FP8Experts",
    "FP8Linear",
    "apply_fp8_training",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_backends",
    "fp8_grouped_linear",
    "fp8_linear",
    "fp8_matmul_nt",
    "quantize_blocks",
    "quantize_rows",
    "quantize_tiles",
    "resolve_backend",
    "resolve_experts_backend",
]
