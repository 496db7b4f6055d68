"""Built-in GPU specifications for ``dsv3 plan``: peak dense FLOP/s, HBM, and the links a GPU talks over.

Every number is per GPU, dense (no 2:4 sparsity), and per direction for links. Sources:

* H100 SXM5 and H200 SXM: NVIDIA H100 / H200 Tensor Core GPU datasheets: BF16 1,979 and FP8 3,958 TFLOP/s
  *with sparsity*, so 989.5 and 1,979 dense; 80 GB HBM3 at 3.35 TB/s (H100), 141 GB HBM3e at 4.8 TB/s (H200);
  NVLink 900 GB/s total (both directions), so 450 GB/s each way.
* H800 SXM5: the H100's compute and memory with NVLink cut to 400 GB/s total (200 GB/s each way). The report
  (§3.2.2) quotes 160 GB/s NVLink and 50 GB/s InfiniBand on its cluster: the achievable NVLink rate, which is
  what :attr:`~dsv3.plan.assumptions.Assumptions.nvlink_efficiency` = 0.8 reproduces.
* B200 (HGX B200 / DGX B200 datasheets): 8 GPUs give 72 PFLOP/s FP8 and 36 PFLOP/s BF16 with sparsity, so 4.5
  and 2.25 PFLOP/s dense per GPU; 1,440 GB HBM3e at 64 TB/s in all, so 180 GB at 8 TB/s per GPU; NVLink 5
  1.8 TB/s total (900 GB/s each way).
* Network: one 400 Gb/s NIC (ConnectX-7, 50 GB/s) per GPU, as in DGX H100 / H200 / B200 and the report's
  H800 nodes. **Assumption** for rented clusters, which may have fewer or slower NICs.

``hbm_bytes`` is the datasheet capacity in decimal bytes (the driver shows slightly more for 80 GB parts);
the planner keeps a reserve off it (:mod:`dsv3.plan.assumptions`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model's peak numbers (datasheet values, see the module docstring)."""

    name: str
    """Marketing name."""
    bf16_flops: float
    """Dense BF16 tensor-core peak, FLOP/s."""
    fp8_flops: float
    """Dense FP8 (E4M3) tensor-core peak, FLOP/s."""
    hbm_bytes: float
    """HBM capacity, bytes."""
    hbm_bandwidth: float
    """HBM bandwidth, bytes/s."""
    nvlink_bandwidth: float
    """NVLink bandwidth to the other GPUs of the node, bytes/s per direction."""
    network_bandwidth: float
    """Scale-out (InfiniBand / RoCE) bandwidth per GPU, bytes/s per direction."""
    sms: int
    """Streaming multiprocessors (the report reserves 20 of the H800's 132 for communication, §3.2.2)."""

    def to_json(self) -> dict:
        return asdict(self)


GPUS: dict[str, GPUSpec] = {
    "h800": GPUSpec("H800 SXM5", 989.5e12, 1979e12, 80e9, 3.35e12, 200e9, 50e9, 132),
    "h100": GPUSpec("H100 SXM5", 989.5e12, 1979e12, 80e9, 3.35e12, 450e9, 50e9, 132),
    "h200": GPUSpec("H200 SXM", 989.5e12, 1979e12, 141e9, 4.8e12, 450e9, 50e9, 132),
    "b200": GPUSpec("B200 (HGX)", 2250e12, 4500e12, 180e9, 8.0e12, 900e9, 50e9, 148),
}


def gpu(name: str) -> GPUSpec:
    """The spec of ``name`` (case-insensitive); ValueError listing the known ones."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}: choose one of {sorted(GPUS)}")
    return GPUS[key]
