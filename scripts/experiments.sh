#!/usr/bin/env bash
# The training experiments of docs/experiments.md: one baseline (aux-loss-free balancing + MTP) and two
# ablations (auxiliary-loss balancing; no MTP), same data, seed and token budget, run side by side on one GPU.
# Usage: bash scripts/experiments.sh OUT_DIR [STEPS] [extra dsv3 train flags...]
set -euo pipefail
out=${1:-runs/experiments}; steps=${2:-1500}; shift $(( $# > 2 ? 2 : $# )) || true
common=(--preset tiny --steps "$steps" --seq-len 512 --batch-size 32 --micro-batch-size 32 --lr 3e-3
        --eval-every 100 --save-every 500 --set eval_batches=32 --cache-dir "$out/cache" "$@")
mkdir -p "$out"
# build the tokenizer and token cache once, before the parallel runs share it
dsv3 train "${common[@]}" --steps 1 --out "$out/warmup" --eval-every 0 > "$out/warmup.log" 2>&1
for run in "aux_free_mtp:--balance aux_free" "aux_loss_mtp:--balance aux_loss" "aux_free_nomtp:--balance aux_free --no-mtp"; do
  name=${run%%:*}; flags=${run#*:}
  # shellcheck disable=SC2086
  dsv3 train "${common[@]}" $flags --out "$out/$name" > "$out/$name.log" 2>&1 &
done
wait
for name in aux_free_mtp aux_loss_mtp aux_free_nomtp; do tail -n 8 "$out/$name.log"; dsv3 plot "$out/$name"; done
