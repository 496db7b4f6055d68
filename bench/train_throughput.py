"""Training throughput on the benchmark shape of shared/benchmarks.md: the "16b" preset cut to 4 layers
(1 dense + 3 MoE), sequence 4096, forward + backward + AdamW step, against transformers'
DeepseekV3ForCausalLM with the same weights layout, measured in one run.

    python bench/train_throughput.py [--batch 2] [--steps 10] [--skip-peer] [--shape 16b-4l|v3-slice]

``--shape v3-slice`` runs V3's layer sizes instead (see SHAPES), where GEMMs are a larger share of a step.

Prints a markdown table: tokens/s, MFU (FLOPs/token = 3 x (2 x activated matmul params + causal attention),
of the 989 TFLOP/s dense bf16 peak), peak memory.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

import dsv3
from dsv3.info import model_stats

PEAK = 989e12


SHAPES = {
    "16b-4l": "the benchmark shape of shared/benchmarks.md: 16b cut to 4 layers (1 dense + 3 MoE)",
    "v3-slice": "V3's layer sizes (hidden 7168, 128 heads, experts 7168 -> 2048, top-8, dense FFN 18432) in 3 "
                "layers (1 dense + 2 MoE) with 32 routed experts (one EP8 rank's share of 256), vocab 32768",
}


def bench_config(shape: str = "16b-4l") -> dsv3.ModelConfig:
    if shape == "v3-slice":
        return dsv3.preset("v3-671b").replace(num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=0,
                                              n_routed_experts=32, n_group=1, topk_group=1, vocab_size=32768)
    return dsv3.preset("16b").replace(num_hidden_layers=4, num_nextn_predict_layers=0)


def timed_steps(step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def run_dsv3(mode: str, batch: int, seq: int, steps: int, shape: str = "16b-4l") -> dict:
    config = bench_config(shape)
    master = torch.float32 if mode.startswith("amp") else torch.bfloat16
    model = dsv3.build_model(config, device="cuda", dtype=master, seed=0)
    if mode.endswith("fp8"):
        from dsv3.fp8 import apply_fp8_training

        apply_fp8_training(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=master == torch.float32):
            logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": timed_steps(step, steps)}


def run_transformers(batch: int, seq: int, steps: int, shape: str = "16b-4l") -> dict:
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**bench_config(shape).to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    try:
        hf_cfg._experts_implementation = "grouped_mm"
    except Exception:
        pass
    with torch.device("cuda"):
        model = transformers.DeepseekV3ForCausalLM(hf_cfg).to(torch.bfloat16)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, hf_cfg.vocab_size, (batch, seq + 1), device="cuda")

    def step():
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"step_s": timed_steps(step, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--modes", default="bf16,bf16+fp8,amp,amp+fp8")
    ap.add_argument("--shape", default="16b-4l", choices=sorted(SHAPES), help="; ".join(f"{k}: {v}" for k, v in SHAPES.items()))
    args = ap.parse_args()
    stats = model_stats(bench_config(args.shape), seq_len=args.seq)
    flops_tok = 3 * stats.forward_flops_per_token
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.shape} "
          f"({stats.total_params / 1e9:.2f}B params, {stats.activated_matmul_params / 1e9:.2f}B activated matmul), "
          f"batch {args.batch} x seq {args.seq}, {flops_tok / 1e9:.1f} GFLOP/token (training)\n")
    runs = [(m, lambda m=m: run_dsv3(m, args.batch, args.seq, args.steps, args.shape)) for m in args.modes.split(",")]
    if not args.skip_peer:
        runs.append(("transformers (grouped_mm, sdpa)",
                     lambda: run_transformers(args.batch, args.seq, args.steps, args.shape)))
    labels = {"bf16": "dsv3, bf16 weights", "bf16+fp8": "dsv3, bf16 weights, FP8 GEMMs (--fp8)",
              "amp": "dsv3, fp32 master + bf16 autocast (trainer default)",
              "amp+fp8": "dsv3, fp32 master + autocast, FP8 GEMMs (--fp8)"}
    print("| implementation | tokens/s | MFU | peak memory |")
    print("|---|---|---|---|")
    results = {}
    for name, fn in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            r = fn()
        except Exception as e:  # report and go on: one failing mode must not hide the others
            print(f"| {labels.get(name, name)} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
            continue
        finally:
            gc.collect()
        tps = args.batch * args.seq / r["step_s"]
        results[name] = tps
        print(f"| {labels.get(name, name)} | {tps / 1e3:.1f}K | {tps * flops_tok / PEAK:.1%} | "
              f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB |", flush=True)
    if "bf16" in results and "bf16+fp8" in results:
        print(f"\nFP8 / BF16 (bf16 weights): {results['bf16+fp8'] / results['bf16']:.2f}x")
    if "amp" in results and "amp+fp8" in results:
        print(f"FP8 / BF16 (fp32 master): {results['amp+fp8'] / results['amp']:.2f}x")
    peer = next((v for k, v in results.items() if k.startswith("transformers")), None)
    if peer and "bf16" in results:
        print(f"dsv3 bf16 / transformers: {results['bf16'] / peer:.2f}x")


if __name__ == "__main__":
    main()
