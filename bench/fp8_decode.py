"""Decode with FP8-kept weights against the BF16 engine (report §3.3; official checkpoints are FP8).

Builds the given preset (default the full "16b") with random weights on the GPU and rounds every projection
weight through the official FP8 layout (E4M3, one factor per 128x128 block), so that the BF16 model is the
FP8 checkpoint dequantised, the path ``fp8=False`` loads. It times greedy decoding through ``Engine`` at
each batch size (prompts of --prompt tokens, --new new tokens, EOS ignored, the prefill and first token
excluded: dsv3 steps 2 .. new), then re-quantises the same weights in place
(:func:`dsv3.fp8.serving.quantize_for_serving`: FP8-kept, the path ``fp8=True`` loads) and times the same
requests. Prints tokens/s of both, their ratio, the weight bytes, and how many of the FP8 engine's greedy
tokens equal the BF16 engine's (the two differ by rounding: BF16 activations against FP8-widened weights).

    python bench/fp8_decode.py [--preset 16b] [--layers N] [--batches 1,32] [--prompt 128] [--new 64]
                               [--kernels | --skip-engine]

``--kernels`` first times each GEMM of a decode step alone (:func:`kernel_table`).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import dsv3
from dsv3.fp8 import dequantize_blocks, quantize_blocks
from dsv3.fp8 import serving as _serving
from dsv3.fp8.serving import apply_fp8_serving, quantize_for_serving
from dsv3.inference import Engine

sys.path.insert(0, str(Path(__file__).parent))
from inference import copy_bandwidth, dsv3_decode  # noqa: E402  (the same bench directory)


@torch.no_grad()
def round_trip_fp8(model: dsv3.DeepSeekV3) -> None:
    """Every weight FP8 serving would convert, replaced by its FP8 block quantisation dequantised."""
    names = {name for name, m in apply_fp8_serving(_probe(model)).named_modules() if "FP8" in type(m).__name__}
    for name, module in model.named_modules():
        if name not in names:
            continue
        for p in module.parameters(recurse=False):
            if p.dim() == 2:
                p.copy_(dequantize_blocks(*quantize_blocks(p.float()), dtype=p.dtype))
            else:
                for m in p:
                    m.copy_(dequantize_blocks(*quantize_blocks(m.float()), dtype=p.dtype))


def _probe(model: dsv3.DeepSeekV3) -> torch.nn.Module:
    """An empty copy of the model on the meta device (which modules FP8 serving converts)."""
    with torch.device("meta"):
        return dsv3.DeepSeekV3(model.config)


def weight_gib(model: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30


def run(engine: Engine, prompts: list[list[int]], batches: list[int], new: int) -> dict[int, tuple[float, list]]:
    out = {}
    for b in batches:
        dsv3_decode(engine, prompts[:b], new)  # captures the graphs and tunes the kernels of this batch size
        seconds, tokens = min((dsv3_decode(engine, prompts[:b], new) for _ in range(2)), key=lambda r: r[0])
        out[b] = (b * (new - 1) / seconds, tokens)
        print(f"  batch {b}: {out[b][0]:.1f} tok/s ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="16b")
    ap.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--kernels", action="store_true", help="time the decode GEMMs one at a time first")
    ap.add_argument("--skip-engine", action="store_true", help="only the kernel table")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = dsv3.preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {datetime.date.today()}")
    print(f"device-to-device copy: {copy_bandwidth() / 1e12:.2f} TB/s (read + write)")
    if args.kernels or args.skip_engine:
        kernel_table(config)
    if args.skip_engine:
        return
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    round_trip_fp8(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(max(batches))]
    options = dict(max_batch=max(batches), max_seq_len=args.prompt + args.new + 16)
    engine = Engine(model, **options)
    print(f"bf16: {engine.runner.describe()}; weights {weight_gib(model):.1f} GiB", flush=True)
    bf16 = run(engine, prompts, batches, args.new)
    del engine
    torch.cuda.empty_cache()
    quantize_for_serving(model)
    torch.cuda.empty_cache()
    engine = Engine(model, **options)
    print(f"fp8: {engine.runner.describe()}; weights {weight_gib(model):.1f} GiB", flush=True)
    fp8 = run(engine, prompts, batches, args.new)
    goals = {1: 1.3, 32: 1.6}
    print(f"\n{args.preset}{f' cut to {args.layers} layers' if args.layers else ''}, {args.prompt}-token prompts, "
          f"{args.new} greedy new tokens\n")
    print("| batch | BF16 engine tok/s | FP8-kept tok/s | FP8 / BF16 | goal | greedy tokens equal to BF16's |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        same = sum(x == y for a, c in zip(bf16[b][1], fp8[b][1]) for x, y in zip(a, c))
        total = sum(len(a) for a in bf16[b][1])
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), len(a))
                     for a, c in zip(bf16[b][1], fp8[b][1])) / b
        goal = f">= {goals[b]}x" if b in goals else ""
        print(f"| {b} | {bf16[b][0]:.1f} | {fp8[b][0]:.1f} | {fp8[b][0] / bf16[b][0]:.2f}x | {goal} | "
              f"{same}/{total} (first difference after {prefix:.1f} tokens on average) |")



def kernel_table(config: dsv3.ModelConfig) -> None:
    """The GEMMs of a decode step at the preset's shapes, one at a time (CUDA-graph timing): each weight in
    BF16 (cuBLAS for a Linear, the few-rows kernel) and FP8-kept (the few-rows kernel, and the
    activation-quantised ``torch._scaled_mm`` path). TB/s = weight bytes read / time."""
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    from dsv3.fp8.serving import _fp8_gemm_ok, fp8_linear
    from dsv3.inference.triton_moe import moe_decode_experts
    from dsv3.kernels import few_rows

    c, d = config, config.hidden_size
    h = c.num_attention_heads
    q_out = h * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    kv_a = c.kv_lora_rank + c.qk_rope_head_dim
    shared = c.n_shared_experts * c.moe_intermediate_size
    linears = {"o_proj": (d, h * c.v_head_dim), "shared gate+up": (2 * shared, d), "shared down": (d, shared)}
    if c.q_lora_rank:
        linears.update({"q_a + kv_a": (c.q_lora_rank + kv_a, d), "q_b": (q_out, c.q_lora_rank)})
    else:
        linears["q + kv_a"] = (q_out + kv_a, d)
    print("\n| GEMM | rows | BF16 cuBLAS us | BF16 few-rows us | FP8 few-rows us | FP8 scaled_mm us | "
          "FP8 best TB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in linears.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, s = quantize_blocks(w.float())
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            times = [do_bench_cudagraph(lambda: F.linear(x, w)),
                     do_bench_cudagraph(lambda: few_rows.linear_few_rows(x, w)),
                     do_bench_cudagraph(lambda: few_rows.linear_few_rows(x, q, s))]
            if _fp8_gemm_ok(x):
                few_rows_max, _serving.FEW_ROWS_MAX = _serving.FEW_ROWS_MAX, 0  # force the GEMM path
                times.append(do_bench_cudagraph(lambda: fp8_linear(x, q, s)))
                _serving.FEW_ROWS_MAX = few_rows_max
            best = min(times[2:])
            cells = " | ".join(f"{t * 1e3:.1f}" for t in times)
            print(f"| {name} {n}x{k} | {m} | {cells} | {n * k / (best * 1e-3) / 1e12:.2f} |", flush=True)
    e, inter, top_k = c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok
    w13 = torch.randn(e, 2 * inter, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    w2 = torch.randn(e, d, inter, device="cuda", dtype=torch.bfloat16) / inter ** 0.5
    q13, s13 = quantize_blocks(w13.float())
    q2, s2 = quantize_blocks(w2.float())
    print("\n| experts | tokens | BF16 us | FP8 us | FP8 / BF16 time | FP8 TB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in (1, 32):
        ids = torch.stack([torch.randperm(e, device="cuda")[:top_k] for _ in range(t)])
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        touched = ids.unique().numel()
        if t <= 16:
            label = "fused routed (gate-up + down)"
            bf16 = do_bench_cudagraph(lambda: moe_decode_experts(x, ids, w13, w2, None, None, []))
            fp8 = do_bench_cudagraph(lambda: moe_decode_experts(x, ids, q13, q2, None, None, [s13, s2]))
        else:
            label = "sorted few-rows (gate-up + down)"
            flat = ids.flatten()
            counts = torch.bincount(flat, minlength=e)
            ends = counts.cumsum(0).to(torch.int32)
            xs = x[flat.argsort(stable=True) // top_k]
            a = torch.randn(xs.shape[0], inter, device="cuda", dtype=torch.bfloat16)
            bf16 = do_bench_cudagraph(lambda: (few_rows.grouped_mm_few_rows(xs, w13, ends),
                                               few_rows.grouped_mm_few_rows(a, w2, ends)))
            fp8 = do_bench_cudagraph(lambda: (few_rows.grouped_mm_few_rows(xs, q13, ends, s13),
                                              few_rows.grouped_mm_few_rows(a, q2, ends, s2)))
        gbytes = touched * 3 * inter * d  # FP8 bytes of the experts read
        print(f"| {label}, {touched} experts | {t} | {bf16 * 1e3:.1f} | {fp8 * 1e3:.1f} | {fp8 / bf16:.2f} | "
              f"{gbytes / (fp8 * 1e-3) / 1e12:.2f} |", flush=True)


if __name__ == "__main__":
    main()
