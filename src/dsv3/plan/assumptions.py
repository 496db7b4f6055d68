"""Every assumed efficiency of ``dsv3 plan``, in one place, with where each number comes from.

Nothing else in :mod:`dsv3.plan` holds a tuning constant: the other modules count bytes and FLOPs from the
configuration and the layout, and divide by a datasheet peak (:mod:`dsv3.plan.gpus`) times one of these
fractions. The values were set from the sources named below *before* the anchors of ``docs/planner.md`` were
computed, and were not changed to move them; ``plan(..., assumptions=Assumptions(...))`` tries others.

Facts of the report that the planner uses as such (not assumptions): FP8 dispatch and BF16 combine (§3.3.2),
at most 4 nodes per token (§2.1.2, §3.2.2), 20 of 132 SMs reserved for communication while it overlaps
computation (§3.2.2), FP32 master weights and gradients with BF16 AdamW moments (§3.3.3), FP8 caching of Linear
and SwiGLU inputs (§3.3.3), recomputation of RMSNorm and the MLA up-projections (§3.2.3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Assumptions:
    """Achievable fractions of peak and other modelling choices (see the module docstring)."""

    gemm_efficiency: float = 0.60
    """Fraction of the dense peak (FP8 or BF16, whichever the GEMM runs in) that the Linear-layer and expert
    GEMMs reach. DeepGEMM (deepseek-ai/DeepGEMM README) reports 1,350+ FP8 TFLOP/s on an H800 for large
    fine-grained-scaled GEMMs (0.68 of 1,979) and less for MoE grouped shapes; cuBLAS BF16 reaches 0.6-0.7 of
    989 on large shapes. V3's expert GEMMs have an inner size of 2,048: the low end, 0.60."""
    attention_efficiency: float = 0.45
    """Fraction of the BF16 peak reached by the attention core (QK^T and PV, forward and backward).
    FlashAttention-3 (Shah et al. 2024) reports 0.5-0.75 of the H100's BF16 peak forward and less backward
    for head dim 128; MLA's 192/128 head dims fit its tiles less well: 0.45."""
    hbm_efficiency: float = 0.80
    """Fraction of HBM bandwidth reached by memory-bound kernels (STREAM-like copies reach 0.8-0.9)."""
    elementwise_passes: float = 2.0
    """Memory-bound work of a block (norms, RoPE, SwiGLU, routing, permutation, quantisation, residual adds)
    as passes over its intermediate tensors in BF16: each written once and read once in the forward
    (backward: twice the forward). An estimate from the list of tensors in :mod:`dsv3.plan.memory`."""
    nvlink_efficiency: float = 0.80
    """Achievable share of NVLink bandwidth for all-to-all and collectives: the report's 160 GB/s on the
    H800's 200 GB/s per direction; DeepEP (deepseek-ai/DeepEP, V1) measures 153-158 GB/s intranode."""
    network_efficiency: float = 0.90
    """Achievable share of the 50 GB/s NIC: DeepEP V1 measures 43-58 GB/s (logical) internode for EP16-64;
    NCCL bus bandwidth on 400 Gb/s InfiniBand is typically 45-48 GB/s."""
    comm_sms: int = 20
    """SMs running the all-to-all while it overlaps computation (report §3.2.2: 20 of 132). Computation then
    runs on the rest; applied to DualPipe / DualPipeV with expert parallelism, where the overlap happens."""
    runtime_reserve_bytes: float = 2.5e9
    """Memory outside the model's tensors: CUDA context, NCCL and all-to-all buffers (DeepEP allocates about
    1 GB). An estimate."""
    allocator_headroom: float = 0.05
    """Share of HBM lost to allocator fragmentation (caching-allocator reports show 3-10%)."""
    grad_reduce_bytes: float = 4.0
    """Bytes per gradient element in the data-parallel reduction: FP32, as the gradients are kept (§3.3.3)."""
    expose_dp_sync: bool = True
    """The data-parallel gradient reduction and parameter gather run after the step's last backward, not
    overlapped with it (the report does not say how it overlaps them): an upper bound."""

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT = Assumptions()
"""The assumptions ``dsv3 plan`` uses."""
