#!/usr/bin/env bash
# FP8 vs BF16 training of the same small model on the same data and seed (FP8 issue, point a), for several
# seeds: each seed gives a BF16 and an FP8 run with the same initialisation and data order (a paired
# comparison); the spread of BF16 across seeds is the run-to-run noise the difference is judged against.
# Usage: bash scripts/fp8_vs_bf16.sh OUT_DIR [STEPS] [SEEDS] [DATA]
#   SEEDS: e.g. "0 1 2" (the default); DATA: a corpus for --data (default: the Python standard library, which a
#   1000-step run reads more than once; a corpus of more than STEPS x 16,384 tokens is read at most once)
set -euo pipefail
out=${1:-runs/fp8_vs_bf16}; steps=${2:-1000}; seeds=${3:-"0 1 2"}; data=${4:-}
common=(--preset tiny ${data:+--data "$data"} --steps "$steps" --seq-len 512 --batch-size 32 --micro-batch-size 32 --lr 2e-3
        --eval-every 100 --save-every 0 --set eval_batches=16 --cache-dir "$out/cache"
        --set model.hidden_size=256 --set model.intermediate_size=768 --set model.moe_intermediate_size=128
        --set model.q_lora_rank=128 --set model.kv_lora_rank=128)
mkdir -p "$out"
dsv3 train "${common[@]}" --steps 1 --out "$out/warmup" --eval-every 0 > "$out/warmup.log" 2>&1
for s in $seeds; do  # all runs at once: they share the GPU, so their tokens/s are not single-run speeds
  dsv3 train "${common[@]}" --seed "$s" --out "$out/bf16_seed$s" > "$out/bf16_seed$s.log" 2>&1 &
  dsv3 train "${common[@]}" --seed "$s" --fp8 --out "$out/fp8_seed$s" > "$out/fp8_seed$s.log" 2>&1 &
done
wait
python - "$out" $seeds <<'PY'
import json, statistics as st, sys
out, seeds = sys.argv[1], sys.argv[2:]
load = lambda name: [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
runs = {(mode, s): load(f"{mode}_seed{s}") for mode in ("bf16", "fp8") for s in seeds}
n = min(len(r) for r in runs.values())
last = min(100, n)
tail = lambda rs: sum(r["loss"] for r in rs[n - last:n]) / last
val = lambda rs: [r["val_loss"] for r in rs if "val_loss" in r][-1]
print(f"steps {n}, seeds {' '.join(seeds)}; train loss = mean of the last {last} steps\n")
print("| seed | train loss: BF16 | FP8 | FP8 vs BF16 | final val loss: BF16 | FP8 | FP8 vs BF16 |")
print("|---|---|---|---|---|---|---|")
d_train, d_val = [], []
for s in seeds:
    a, b = runs["bf16", s], runs["fp8", s]
    d_train.append((tail(b) - tail(a)) / tail(a))
    d_val.append((val(b) - val(a)) / val(a))
    print(f"| {s} | {tail(a):.4f} | {tail(b):.4f} | {d_train[-1]:+.2%} | {val(a):.4f} | {val(b):.4f} | {d_val[-1]:+.2%} |")
def summary(d):
    if len(d) < 2:
        return f"{d[0]:+.2%}"
    return f"mean {st.mean(d):+.2%}, std {st.stdev(d):.2%}, standard error {st.stdev(d) / len(d) ** 0.5:.2%}"
print(f"\nFP8 vs BF16 (paired by seed): train {summary(d_train)}; val {summary(d_val)}")
if len(seeds) > 1:
    for what, f in (("train", tail), ("val", val)):
        for mode in ("bf16", "fp8"):
            xs = [f(runs[mode, s]) for s in seeds]
            print(f"seed-to-seed spread, {mode} {what}: std {st.stdev(xs) / st.mean(xs):.2%} of the mean {st.mean(xs):.4f}")
print("tokens/s (median of each run, all runs sharing the GPU): " + ", ".join(
    f"{m} seed {s} {sorted(r['tokens_per_s'] for r in runs[m, s])[n // 2]:.0f}" for m, s in runs))
try:  # curves, where matplotlib is installed (the `plot` extra)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for (mode, s), rs in runs.items():
    loss = [r["loss"] for r in rs]
    smooth = [sum(loss[max(0, i - 19):i + 1]) / len(loss[max(0, i - 19):i + 1]) for i in range(len(loss))]
    style = dict(color=f"C{seeds.index(s)}", linestyle="-" if mode == "bf16" else "--", label=f"{mode} seed {s}")
    ax1.plot([r["step"] for r in rs], smooth, **style)
    vals = [(r["step"], r["val_loss"]) for r in rs if "val_loss" in r]
    ax2.plot(*zip(*vals), marker="o", **style)
low = min(min(r["loss"] for r in rs[n - last:n]) for rs in runs.values())
ax1.set(xlabel="step", ylabel="train loss (20-step mean)", ylim=(0.9 * low, 4)); ax1.legend()
ax2.set(xlabel="step", ylabel="validation loss", ylim=(0.9 * min(val(rs) for rs in runs.values()), 3)); ax2.legend()
fig.tight_layout(); fig.savefig(f"{out}/compare.png", dpi=110)
print(f"curves: {out}/compare.png")
PY
