"""Training with the report's recipe: schedules, aux-loss-free balancing, MTP loss, exact resume, and data /
expert parallelism under torchrun (docs/parallelism.md)."""

from .config import TrainConfig
from .schedules import Schedules
from .trainer import RunResult, Trainer, train

__all__ = ["RunResult", "Schedules", "TrainConfig", "Trainer", "train"]
