"""Training with the report's recipe: schedules, aux-loss-free balancing, MTP loss, exact resume."""

from .config import TrainConfig
from .schedules import Schedules
from .trainer import RunResult, train

__all__ = ["RunResult", "Schedules", "TrainConfig", "train"]
