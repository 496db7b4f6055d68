"""FP8 mixed-precision primitives, DeepSeek-V3 report §3.3.

E4M3 quantisation with FP32 scales per 1x128 activation tile and per 128x128 weight block
(:mod:`dsv3.fp8.quant`), and an FP8 Linear whose forward, input-gradient and weight-gradient
GEMMs all take FP8 operands (:mod:`dsv3.fp8.linear`).
"""

from dsv3.fp8.linear import Backend, FP8Linear, fp8_linear, fp8_matmul_nt
from dsv3.fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Backend",
    "FP8Linear",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_linear",
    "fp8_matmul_nt",
    "quantize_blocks",
    "quantize_tiles",
]
