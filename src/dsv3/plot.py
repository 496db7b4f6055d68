"""PNG plots of a training run (``dsv3 plot RUN_DIR``): loss curves, expert-load heatmap, MaxVio, and for a GRPO
run its reward, accuracy, KL, clipping, response length and the time split of a step."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png, expert_load.png and maxvio.png (and grpo.png for a GRPO run); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty")
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in records], label="train loss (main head)", lw=1)
    if any(r.get("mtp_loss") for r in records):
        ax.plot(steps, [r["mtp_loss"] for r in records], label="MTP loss", lw=1, alpha=0.8)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{Path(run_dir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if any("reward" in r for r in records):
        written.append(_plot_grpo(plt, records, run_dir, out / "grpo.png"))

    loads = [r["expert_load"] for r in records if r.get("expert_load")]
    if loads:
        arr = np.asarray(loads, dtype=float)  # (steps, layers, experts)
        share = arr / arr.sum(axis=2, keepdims=True).clip(min=1) * arr.shape[2]  # 1 = perfectly balanced
        n_layers = arr.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(9, 1.6 * n_layers + 1), squeeze=False, sharex=True)
        for i in range(n_layers):
            im = axes[i, 0].imshow(share[:, i, :].T, aspect="auto", cmap="magma", vmin=0, vmax=3,
                                   extent=[steps[0], steps[-1], arr.shape[2] - 0.5, -0.5], interpolation="nearest")
            axes[i, 0].set_ylabel(f"MoE {i}\nexpert")
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / mean load")
        fig.suptitle("expert load per MoE layer over training (1 = balanced)")
        written.append(out / "expert_load.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

        maxvio = np.asarray([r["maxvio"] for r in records if r.get("maxvio")])
        if maxvio.ndim != 2:  # records without MaxVio
            return written
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i in range(maxvio.shape[1]):
            ax.plot(steps[: len(maxvio)], maxvio[:, i], lw=0.8, alpha=0.6, label=f"MoE layer {i}")
        ax.plot(steps[: len(maxvio)], maxvio.mean(axis=1), color="black", lw=1.5, label="mean")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio (global batch)")
        ax.set_title("load balance: (max load - mean) / mean")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out / "maxvio.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _plot_grpo(plt, records: list[dict], run_dir, path: Path) -> Path:
    """Reward and accuracy, KL to the reference, clip fraction, response length, seconds per step."""
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax = axes[0, 0]
    reward = [r["reward"] for r in records]
    std = [r.get("reward_std", 0) for r in records]
    ax.plot(steps, reward, label="mean reward", lw=1.2)
    ax.fill_between(steps, [m - s for m, s in zip(reward, std)], [m + s for m, s in zip(reward, std)], alpha=0.15)
    ax.plot(steps, [r["accuracy"] for r in records], label="rollout accuracy", lw=1)
    held = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    if held:
        ax.plot(*zip(*held), "o-", color="black", label="held-out accuracy (greedy)")
    ax.set_title("reward and accuracy")
    ax.legend(fontsize=8)
    panels = [(axes[0, 1], "kl", "KL to the reference (k3, per token)"),
              (axes[0, 2], "clip_fraction", "clipped token fraction"),
              (axes[1, 0], "response_length", "completion length (tokens)"),
              (axes[1, 1], "loss", "GRPO loss")]
    for ax, key, title in panels:
        ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1.2)
        ax.set_title(title)
    ax = axes[1, 2]
    rollout = [r.get("rollout_s", 0) for r in records]
    ax.bar(steps, rollout, label="rollouts (engine)", width=1.0)
    ax.bar(steps, [r.get("train_s", 0) for r in records], bottom=rollout, label="policy update", width=1.0)
    ax.set_title("seconds per step")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).name}: GRPO")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
