"""Pipeline parallelism (report §3.2.1): schedules as per-rank action lists and a simulator of them."""

from .schedule import SCHEDULES, Action, Schedule, build_schedule, check_complete, flat_actions
from .simulate import Costs, Deadlock, Timeline, plot_timeline, simulate, table2_bubble

__all__ = [
    "SCHEDULES", "Action", "Costs", "Deadlock", "Schedule", "Timeline", "build_schedule", "check_complete",
    "flat_actions", "plot_timeline", "simulate", "table2_bubble",
]
