"""Overlay the metrics of several `dsv3 train` runs: MaxVio of the main model's MoE layers and validation loss.

Usage: python scripts/compare_runs.py OUT.png RUN_DIR [RUN_DIR ...]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dsv3.plot import read_metrics  # noqa: E402


def main(out: str, runs: list[str]) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        rs = read_metrics(run)
        n_main = len(rs[0]["maxvio"]) - (1 if rs[0].get("mtp_weight") else 0)  # drop the MTP block's layer
        mv = np.array([np.mean(r["maxvio"][:n_main]) for r in rs])
        smooth = np.convolve(mv, np.ones(20) / 20, mode="valid")
        ax1.plot(np.arange(len(smooth)) + 20, smooth, label=Path(run).name)
        val = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r]
        ax2.plot(*zip(*val), "o-", ms=3, label=Path(run).name)
    ax1.set(xlabel="step", ylabel="MaxVio (global batch, main MoE layers, 20-step mean)", yscale="log")
    ax2.set(xlabel="step", ylabel="validation loss (main head, nats)")
    ax2.set_ylim(top=min(ax2.get_ylim()[1], 3))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
