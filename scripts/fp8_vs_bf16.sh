#!/usr/bin/env bash
# FP8 vs BF16 training of the same small model on the same data and seed (FP8 issue, point a).
# A third run, BF16 with another seed (initialisation and data order), measures the run-to-run noise.
# Usage: bash scripts/fp8_vs_bf16.sh OUT_DIR [STEPS]
set -euo pipefail
out=${1:-runs/fp8_vs_bf16}; steps=${2:-1000}
common=(--preset tiny --steps "$steps" --seq-len 512 --batch-size 32 --micro-batch-size 32 --lr 2e-3
        --eval-every 100 --save-every 0 --set eval_batches=16 --cache-dir "$out/cache"
        --set model.hidden_size=256 --set model.intermediate_size=768 --set model.moe_intermediate_size=128
        --set model.q_lora_rank=128 --set model.kv_lora_rank=128)
mkdir -p "$out"
dsv3 train "${common[@]}" --steps 1 --out "$out/warmup" --eval-every 0 > "$out/warmup.log" 2>&1
dsv3 train "${common[@]}" --out "$out/bf16" > "$out/bf16.log" 2>&1 &
dsv3 train "${common[@]}" --fp8 --out "$out/fp8" > "$out/fp8.log" 2>&1 &
dsv3 train "${common[@]}" --seed 1 --out "$out/bf16_seed1" > "$out/bf16_seed1.log" 2>&1 &
wait
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
runs = {n: [json.loads(l) for l in open(f"{out}/{n}/metrics.jsonl")] for n in ("bf16", "fp8", "bf16_seed1")}
a, b, c = runs["bf16"], runs["fp8"], runs["bf16_seed1"]
n = min(len(a), len(b))
tail = lambda rs: sum(r["loss"] for r in rs[n - 100:n]) / 100
rel = [abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(a[:n], b[:n])]
print(f"steps {n}; train loss, mean of last 100 steps: bf16 {tail(a):.4f}, fp8 {tail(b):.4f}, "
      f"relative difference {abs(tail(b) - tail(a)) / tail(a):.4%}")
print(f"per-step relative difference: mean {sum(rel) / n:.4%}, over the last 100 steps {sum(rel[-100:]) / 100:.4%}")
va = [r["val_loss"] for r in a if "val_loss" in r]; vb = [r["val_loss"] for r in b if "val_loss" in r]
print(f"final val loss: bf16 {va[-1]:.4f}, fp8 {vb[-1]:.4f}, relative difference {abs(vb[-1] - va[-1]) / va[-1]:.4%}")
tc = sum(r["loss"] for r in c[n - 100:n]) / 100
vc = [r["val_loss"] for r in c if "val_loss" in r]
print(f"noise: bf16 seed 1 vs seed 0: last-100 train loss {tc:.4f} ({abs(tc - tail(a)) / tail(a):.4%}), "
      f"final val loss {vc[-1]:.4f} ({abs(vc[-1] - va[-1]) / va[-1]:.4%})")
print(f"tokens/s (median): bf16 {sorted(r['tokens_per_s'] for r in a)[n // 2]:.0f}, fp8 {sorted(r['tokens_per_s'] for r in b)[n // 2]:.0f}")
try:  # curves, where matplotlib is installed (the `plot` extra)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for name, rs in runs.items():
    loss = [r["loss"] for r in rs]
    smooth = [sum(loss[max(0, i - 19):i + 1]) / len(loss[max(0, i - 19):i + 1]) for i in range(len(loss))]
    ax1.plot([r["step"] for r in rs], smooth, label=name)
    vals = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r]
    ax2.plot(*zip(*vals), marker="o", label=name)
ax1.set(xlabel="step", ylabel="train loss (20-step mean)", ylim=(1.5, 4)); ax1.legend()
ax2.set(xlabel="step", ylabel="validation loss", ylim=(1.2, 3)); ax2.legend()
fig.tight_layout(); fig.savefig(f"{out}/compare.png", dpi=110)
print(f"curves: {out}/compare.png")
PY
