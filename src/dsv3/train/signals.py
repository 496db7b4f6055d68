"""Stopping a run cleanly: SIGTERM / SIGINT ask the loop to stop after the current step, with a checkpoint."""

from __future__ import annotations

import signal
from typing import Any

import torch


class StopFlag:
    """Catches SIGTERM and SIGINT while the loop runs; a second signal stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, env) -> bool:
        """Whether to stop after this step: under torchrun the ranks may see a signal at different steps, so they
        stop together once any of them has seen one (a one-element all-reduce per step)."""
        flag = torch.tensor([0 if self.signal is None else int(self.signal)], device=env.device)
        if env.dims.distributed:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if self.signal is None and flag.item():
                self.signal = int(flag.item())
        return self.signal is not None
