"""``dsv3 plan``: what a cluster layout costs (memory per GPU, step time, GPU-hours) before anyone rents it.

    from dsv3.plan import plan
    p = plan("v3-671b", gpu="h800", gpus=2048, pp=16, ep=64, schedule="dualpipe", global_batch=15360, fp8=True)
    p.fits, p.gpu_hours_per_trillion_tokens   # True, ~137K (the report: 180K H800 GPU-hours per trillion tokens)

Modules, one concept each: :mod:`~dsv3.plan.gpus` (datasheet numbers), :mod:`~dsv3.plan.assumptions` (every
assumed efficiency), :mod:`~dsv3.plan.layout` (ranks, checks), :mod:`~dsv3.plan.model_costs` (parameters and
FLOPs of each piece), :mod:`~dsv3.plan.memory`, :mod:`~dsv3.plan.timing`, :mod:`~dsv3.plan.planner`
(``plan()``), :mod:`~dsv3.plan.measure` (``--measure``), :mod:`~dsv3.plan.report` (the table),
:mod:`~dsv3.plan.cli` (the sub-command).
"""

from .assumptions import DEFAULT, Assumptions
from .gpus import GPUS, GPUSpec, gpu
from .layout import Layout, PlanError, make_layout, parse_recompute
from .memory import Memory
from .planner import Plan, Timing, plan
from .report import format_table
from .timing import ChunkTimes

__all__ = [
    "DEFAULT", "GPUS", "Assumptions", "ChunkTimes", "GPUSpec", "Layout", "Memory", "Plan", "PlanError", "Timing",
    "format_table", "gpu", "make_layout", "parse_recompute", "plan",
]
