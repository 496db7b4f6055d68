#!/usr/bin/env bash
# The distributed training paths on one GPU (NCCL world of 1): the same dsv3 train run in one process, under
# torchrun with FSDP2 and under torchrun with ZeRO-1; prints each run's losses and median tokens/s.
#   bash scripts/parallel_one_gpu.sh OUT [PRESET_ARGS...]
# e.g. bash scripts/parallel_one_gpu.sh /tmp/p --preset tiny --steps 40
set -euo pipefail
out=$1; shift
export PYTHONPATH=${PYTHONPATH:-src}
common=(train --device cuda --eval-every 0 --save-every 0 --set sample_tokens=8 --set batch_ramp=false "$@")
torchrun=(python -m torch.distributed.run --standalone --nproc_per_node 1 -m dsv3)
python -m dsv3 "${common[@]}" --out "$out/one" > "$out.one.log" 2>&1
rm -rf "$out/one/checkpoints" "$out/one/export"  # a large model's checkpoints would fill the disk
"${torchrun[@]}" "${common[@]}" --out "$out/fsdp" > "$out.fsdp.log" 2>&1
rm -rf "$out/fsdp/checkpoints" "$out/fsdp/export"
"${torchrun[@]}" "${common[@]}" --dp-shard zero1 --out "$out/zero1" > "$out.zero1.log" 2>&1
rm -rf "$out/zero1/checkpoints" "$out/zero1/export"
python - "$out" <<'PY'
import json, statistics, sys
root = sys.argv[1]
runs = {name: [json.loads(x) for x in open(f"{root}/{name}/metrics.jsonl")] for name in ("one", "fsdp", "zero1")}
print("| run | loss step 1 | loss last | max rel. loss diff vs one | median tokens/s (steps 3+) |")
print("|---|---:|---:|---:|---:|")
for name, recs in runs.items():
    diff = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(recs, runs["one"]))
    tps = statistics.median(r["tokens_per_s"] for r in recs[2:])
    print(f"| {name} | {recs[0]['loss']:.6f} | {recs[-1]['loss']:.6f} | {diff:.2e} | {tps:,.0f} |")
PY
