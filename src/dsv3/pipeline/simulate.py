"""Replay a pipeline schedule on a clock: when each rank runs each step, the bubble, and a picture (Fig. 5).

Each rank runs its steps in order; a step starts when the rank is free and its inputs have arrived:

* F on a stage waits for F of the stage before it on the micro-batch's path (``p2p`` seconds later when that
  stage is on another rank);
* B or I waits for the backward of the stage after it (or for its own F at the last stage, where the loss is);
* W waits for its I; an overlapped pair waits for both of its halves' inputs.

If no rank can start its next step the schedule deadlocks, which :func:`simulate` reports. With measured chunk
times (``dsv3 plan --measure``) the makespan predicts a real step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schedule import Action, Schedule, Step, flat_actions


@dataclass(frozen=True)
class Costs:
    """Seconds (or any unit) per chunk of one stage."""

    F: float = 1.0
    """Forward of one micro-batch."""
    B: float = 2.0
    """Full backward (input and weight gradients)."""
    W: float = 1.0
    """The weight-gradient part of B; the input-gradient part I is B - W."""
    FB: float | None = None
    """An overlapped forward + backward pair (default F + B: no overlap gain)."""
    p2p: float = 0.0
    """Transfer of one activation or gradient between ranks."""

    def of(self, step: Step) -> float:
        if isinstance(step, tuple):
            return self.F + self.B if self.FB is None else self.FB
        return {"F": self.F, "B": self.B, "W": self.W, "I": self.B - self.W}[step.kind]


@dataclass
class Timeline:
    schedule: Schedule
    costs: Costs
    intervals: list[list[tuple[float, float, Step]]] = field(default_factory=list)
    """Per rank: (start, end, step) in the order run."""

    @property
    def makespan(self) -> float:
        return max((iv[-1][1] for iv in self.intervals if iv), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(end - start for start, end, _ in self.intervals[rank])

    @property
    def bubble(self) -> float:
        """Idle time of the busiest rank: makespan minus its work (Table 2's "bubble")."""
        return self.makespan - max(self.busy(r) for r in range(len(self.intervals)))

    @property
    def bubble_fraction(self) -> float:
        """Mean idle share of the ranks over the makespan."""
        span = self.makespan
        n = len(self.intervals)
        return 0.0 if span == 0 else 1.0 - sum(self.busy(r) for r in range(n)) / (n * span)


class Deadlock(RuntimeError):
    """No rank can start its next step."""


def simulate(schedule: Schedule, costs: Costs | None = None) -> Timeline:
    """The time each step of ``schedule`` starts and ends under ``costs``; :class:`Deadlock` if it cannot run."""
    costs = costs or Costs()
    done: dict[tuple[str, int, int], tuple[float, int]] = {}  # (kind, stage, mb) -> (end time, rank)
    position = [0] * schedule.n_ranks
    free = [0.0] * schedule.n_ranks
    timeline = Timeline(schedule, costs, [[] for _ in range(schedule.n_ranks)])

    def ready(a: Action, rank: int) -> float | None:
        """When the inputs of ``a`` are on ``rank`` (None: not produced yet)."""
        needs: list[tuple[str, int]] = []
        if a.kind == "F":
            prev = schedule.previous(a.stage, a.microbatch)
            if prev is not None:
                needs.append(("F", prev))
        elif a.kind in ("B", "I"):
            nxt = schedule.next(a.stage, a.microbatch)
            needs.append(("F", a.stage) if nxt is None else ("BI", nxt))
        else:  # W
            needs.append(("I", a.stage))
        t = 0.0
        for kind, stage in needs:
            kinds = ("B", "I") if kind == "BI" else (kind,)
            hit = next((done[(k, stage, a.microbatch)] for k in kinds if (k, stage, a.microbatch) in done), None)
            if hit is None:
                return None
            end, where = hit
            t = max(t, end + (costs.p2p if where != rank else 0.0))
        return t

    remaining = sum(len(s) for s in schedule.steps)
    while remaining:
        progressed = False
        for rank in range(schedule.n_ranks):
            while position[rank] < len(schedule.steps[rank]):
                step = schedule.steps[rank][position[rank]]
                times = [ready(a, rank) for a in flat_actions(step)]
                if any(t is None for t in times):
                    break
                start = max([free[rank], *times])
                end = start + costs.of(step)
                for a in flat_actions(step):
                    done[(a.kind, a.stage, a.microbatch)] = (end, rank)
                timeline.intervals[rank].append((start, end, step))
                free[rank] = end
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: schedule.steps[r][position[r]] for r in range(schedule.n_ranks)
                     if position[r] < len(schedule.steps[r])}
            raise Deadlock(f"{schedule.name}: no rank can go on; next steps {stuck}")
    return timeline


def table2_bubble(name: str, n_stages: int, costs: Costs) -> float:
    """The report's Table 2 bubble for ``n_stages`` pipeline stages (DualPipeV: 2 x ranks)."""
    fb = costs.F + costs.B if costs.FB is None else costs.FB
    if name == "1f1b":
        return (n_stages - 1) * (costs.F + costs.B)
    return (n_stages / 2 - 1) * (fb + costs.B - 3 * costs.W)


def plot_timeline(timeline: Timeline, path: str, title: str | None = None) -> None:
    """Draw ranks x time as the report's Fig. 5: forward chunks light, backward dark, weight chunks grey, overlapped
    pairs outlined; the micro-batch number in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sched = timeline.schedule
    colours = {"F": "#f6c87a", "B": "#6fa8dc", "I": "#9fc5e8", "W": "#b7b7b7"}
    fig, ax = plt.subplots(figsize=(max(8.0, timeline.makespan * 0.35), 0.5 * sched.n_ranks + 1.2))
    for rank, intervals in enumerate(timeline.intervals):
        for start, end, step in intervals:
            parts = flat_actions(step)
            width = (end - start) / len(parts)
            for i, a in enumerate(parts):
                x = start + i * width
                second = sched.paths[a.microbatch][0] != sched.paths[0][0] or (
                    a.stage >= sched.n_ranks and sched.name == "dualpipev")
                ax.add_patch(plt.Rectangle((x, rank), width, 0.9, facecolor=colours[a.kind],
                                           edgecolor="black" if len(parts) > 1 else "white", lw=0.8,
                                           hatch="//" if second else None))
                ax.text(x + width / 2, rank + 0.45, str(a.microbatch), ha="center", va="center", fontsize=6)
    ax.set_xlim(0, timeline.makespan)
    ax.set_ylim(sched.n_ranks, 0)
    ax.set_yticks([r + 0.45 for r in range(sched.n_ranks)], [f"rank {r}" for r in range(sched.n_ranks)])
    ax.set_xlabel("time (chunks)")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c) for c in colours.values()]
    ax.legend(handles, ["F", "B", "I (input grad)", "W (weight grad)"], loc="upper center",
              bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=7, frameon=False)
    ax.set_title(title or f"{sched.name}: {sched.n_ranks} ranks, {sched.n_microbatches} micro-batches, "
                 f"bubble {timeline.bubble:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
