"""Post-training evidence on one GPU: pre-train a base model with `dsv3 train` (built-in corpus), SFT on the
built-in set, GRPO on the built-in arithmetic task; held-out accuracy of each, the GRPO curves (PNG), the time
split of a GRPO step, and the rollout throughput of dsv3's engine against plain uncached generation of the same
model measured in the same run.

    PYTHONPATH=src python bench/posttrain.py --out runs/posttrain [--pretrain-steps 600] [--grpo-steps 60]
    PYTHONPATH=src python bench/posttrain.py --out /tmp/pt --smoke     # CPU, a minute: the pipeline runs

Prints a markdown table; writes RUN/summary.json and the runs' plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def dsv3(*args: str) -> float:
    """Run ``python -m dsv3 ARGS`` (output through), returning the seconds it took."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "dsv3", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def accuracy(run: Path) -> dict:
    return json.loads((run / "task_accuracy.json").read_text())


@torch.no_grad()
def plain_generate(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy without a cache: every step runs the model over the whole sequence so far (a generation loop over
    the training model without a KV cache), batched over the prompts of each length (no padding)."""
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for idx in by_length.values():
        rows = torch.tensor([prompts[i] for i in idx], device=device)
        for _ in range(max_new):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(rows).logits[:, -1]
            rows = torch.cat([rows, logits.argmax(-1, keepdim=True)], dim=1)
        for i, row in zip(idx, rows[:, -max_new:].tolist()):
            out[i] = row
    return [out[i] for i in range(len(prompts))]


def rollout_throughput(checkpoint: Path, task_args: list[str], n_prompts: int, group: int, max_new: int,
                       device: str) -> dict:
    """Tokens/s of G greedy completions per question: the engine (as GRPO's rollouts) vs plain uncached."""
    from dsv3.posttrain.common import load_start, parse_task
    from dsv3.posttrain.rollout import Rollouts
    from dsv3.inference.sampling import SamplingParams

    dev = torch.device(device)
    model, tokenizer, template = load_start(checkpoint, dev)
    model.eval()
    task = parse_task(task_args[1], task_args[3])
    rollouts = Rollouts(model, tokenizer, template, dev, max_batch=n_prompts * group, max_seq_len=256)
    prompts = [rollouts.prompt_ids(p) for p in task.problems(n_prompts, "test") for _ in range(group)]
    params = [SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)] * len(prompts)
    rollouts.complete(prompts[:8], params[:8])  # warm-up: graphs
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    results = rollouts.complete(prompts, params)
    sync()
    engine_s = time.perf_counter() - t0
    plain_generate(model, prompts[:8], 2)
    sync()
    t0 = time.perf_counter()
    plain = plain_generate(model, prompts, max_new)
    sync()
    plain_s = time.perf_counter() - t0
    same = sum(r.tokens == p for r, p in zip(results, plain))
    n_tokens = len(prompts) * max_new
    return {"completions": len(prompts), "new_tokens": max_new, "engine_tok_s": n_tokens / engine_s,
            "plain_tok_s": n_tokens / plain_s, "speedup": plain_s / engine_s, "greedy_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--sft-arithmetic", type=int, default=20000)
    ap.add_argument("--sft-epochs", default="2")
    ap.add_argument("--sft-lr", default="1e-3")
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--grpo-lr", default="1e-4")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--eval-problems", type=int, default=500)
    ap.add_argument("--digits", default="1-2")
    ap.add_argument("--ops", default="+-")
    ap.add_argument("--beta", default="0.04")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the pipeline runs)")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.pretrain_steps, args.sft_arithmetic, args.sft_epochs = "cpu", 3, 200, "0.05"
        args.grpo_steps, args.prompts, args.group, args.max_new, args.eval_problems = 2, 2, 4, 6, 4
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = ["--task-digits", args.digits, "--task-ops", args.ops]
    model = ["--set", "model.num_hidden_layers=2"] if args.smoke else []
    times = {}
    times["pretrain"] = dsv3("train", "--steps", str(args.pretrain_steps), "--out", str(out / "base"),
                             "--device", device, *model, "--eval-every", "0")
    base_score = dsv3_score(out / "base", task, args.eval_problems, device)
    times["sft"] = dsv3("sft", str(out / "base"), "--out", str(out / "sft"), "--device", device,
                        "--builtin-arithmetic", str(args.sft_arithmetic), "--epochs", args.sft_epochs,
                        "--lr", args.sft_lr, "--eval-problems", str(args.eval_problems), *task,
                        *(["--seq-len", "128", "--batch-size", "4", "--micro-batch-size", "4"] if args.smoke else []))
    times["grpo"] = dsv3("grpo", str(out / "sft" / "export"), "--out", str(out / "grpo"), "--device", device,
                         "--steps", str(args.grpo_steps), "--lr", args.grpo_lr, "--prompts-per-step",
                         str(args.prompts), "--group-size", str(args.group), "--max-new-tokens", str(args.max_new),
                         "--eval-problems", str(args.eval_problems), "--eval-every", "10", "--beta", args.beta, *task)
    dsv3("plot", str(out / "grpo"))
    records = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    split = {"rollout_s": sum(r["rollout_s"] for r in steady) / len(steady),
             "train_s": sum(r["train_s"] for r in steady) / len(steady)}
    throughput = rollout_throughput(out / "grpo" / "export", task, args.prompts, args.group, args.max_new, device)
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "date": str(datetime.date.today()), "args": vars(args), "seconds": times,
               "accuracy": {"base": base_score, "sft": accuracy(out / "sft")["accuracy"],
                            "grpo": accuracy(out / "grpo")["accuracy"]},
               "grpo_first": {k: records[0].get(k) for k in ("reward", "accuracy", "kl")},
               "grpo_last": {k: records[-1].get(k) for k in ("reward", "accuracy", "kl", "eval_accuracy")},
               "grpo_step_split": split, "rollout_throughput": throughput}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndevice: {summary['device']}, torch {summary['torch']}, date {summary['date']}")
    print(f"held-out {args.eval_problems} arithmetic problems ({args.digits} digits, {args.ops}), greedy:\n")
    print("| model | accuracy | wall time of the stage (s) |\n|---|---:|---:|")
    for stage, key in (("base (dsv3 train)", "pretrain"), ("after SFT", "sft"), ("after GRPO", "grpo")):
        acc = summary["accuracy"][{"pretrain": "base", "sft": "sft", "grpo": "grpo"}[key]]
        print(f"| {stage} | {acc:.1%} | {times[key]:.0f} |")
    print(f"\nGRPO step (mean of steps 2..{len(records)}): rollouts {split['rollout_s']:.2f} s, "
          f"policy update {split['train_s']:.2f} s")
    t = throughput
    print(f"rollouts of {t['completions']} completions x {t['new_tokens']} tokens: engine {t['engine_tok_s']:.0f} "
          f"tok/s, plain uncached generation {t['plain_tok_s']:.0f} tok/s ({t['speedup']:.1f}x); greedy "
          f"equal for {t['greedy_equal']}/{t['completions']}")


def dsv3_score(run: Path, task: list[str], n: int, device: str) -> float:
    from dsv3.posttrain.common import load_start, parse_task
    from dsv3.posttrain.rollout import Rollouts

    dev = torch.device(device)
    model, tokenizer, template = load_start(run, dev)
    rollouts = Rollouts(model.eval(), tokenizer, template, dev, max_batch=min(n, 64), max_seq_len=256)
    return rollouts.score(parse_task(task[1], task[3]), parse_task(task[1], task[3]).problems(n, "test")).accuracy


if __name__ == "__main__":
    main()
