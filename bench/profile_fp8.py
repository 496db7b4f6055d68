"""Where the time of FP8 training goes: CUDA kernel time by kernel, against wall time.

    python bench/profile_fp8.py [--rows 20] [--tokens 8192] [--skip-step]

Profiles, on the "16b" shapes: one routed-experts grouped GEMM (gate_up: 64 experts, 6 copies per token)
forward + backward in FP8 and in BF16 (``torch._grouped_mm``), one FP8Linear forward + backward (q_proj),
and (unless --skip-step) one training step of the benchmark model (16b cut to 4 layers, bf16 weights) with and
without ``--fp8``. Wall time is the median of timed calls; "kernel time" is the sum of CUDA kernel times
in a torch.profiler trace of the same call, so wall >> kernel means the CPU (launches, Python) is the limit.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import dsv3
from dsv3.fp8 import FP8Linear, apply_fp8_training
from dsv3.fp8.transform import fp8_grouped_linear
from profile_inference import median_ms  # bench/ is the script's directory, on sys.path


def report(name: str, fn, rows: int) -> None:
    wall = median_ms(fn)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    print(f"\n### {name}\nwall {wall:.2f} ms, kernel time {total / 1e3:.2f} ms, "
          f"kernels {sum(e.count for e in events)}\n\n| kernel | calls | us | share |\n|---|---|---|---|")
    for e in events[:rows]:
        t = e.self_device_time_total
        print(f"| {e.key[:100]} | {e.count} | {t:.0f} | {t / total:.0%} |")


def sweep(x, w, gy, counts) -> None:
    """The grouped FP8 kernels alone (operands pre-quantised) per tile shape and launch setting, and the
    quantisers per warp count; the defaults are restored afterwards."""
    from dsv3.fp8 import transform as T
    from dsv3.fp8 import triton_quant as TQ

    layout = T._PaddedLayout(counts, x.shape[0])
    xq, xs = T._TritonGrouped.quant_rows(x, layout)
    wq, ws = T.quantize_blocks(w)
    _, _, gt = T._TritonGrouped.quant_grad(gy, layout, False, True)
    m, n, k = x.shape[0], w.shape[1], w.shape[2]
    flops = 2 * m * n * k

    def table(title, settings, target, fn, work=flops, unit="TF/s"):
        print(f"\n| {title} | us | {unit} |\n|---|---|---|")
        default = dict(target)
        for setting in settings:
            target.update(setting)
            try:
                ms = median_ms(fn, reps=20)
                rate = work / (ms * 1e-3) / (1e12 if unit == "TF/s" else 1e9)
                print(f"| {setting} | {ms * 1e3:.0f} | {rate:.0f} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
                print(f"| {setting} | failed: {str(exc)[:80]} | |", flush=True)
        target.clear()
        target.update(default)

    table("grouped forward GEMM", [
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3), dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3), dict(BLOCK_M=64, BLOCK_N=256, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=256, num_warps=4, num_stages=3)],
        T.TRITON_LAUNCH, lambda: T._TritonGrouped.mm(xq, xs, wq, ws, layout, torch.bfloat16))
    table("grouped wgrad GEMM", [
        dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4), dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4), dict(BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3),
        dict(BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3), dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)],
        T.WGRAD_LAUNCH, lambda: T._TritonGrouped.wgrad(gt, xq, xs, layout, torch.bfloat16))
    bytes_rows = gy.numel() * 4  # read bf16, write two FP8 copies
    table("quantise dY into both layouts (rows_warps)", [dict(rows_warps=8), dict(rows_warps=4), dict(rows_warps=16)],
          TQ.LAUNCH, lambda: T._TritonGrouped.quant_grad(gy, layout, True, True), work=bytes_rows, unit="GB/s")
    table("quantise the expert weights with W^T (block_warps)", [dict(block_warps=8), dict(block_warps=4),
                                                                  dict(block_warps=16)],
          TQ.LAUNCH, lambda: T.quantize_blocks(w, with_transpose=True), work=w.numel() * 4, unit="GB/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time the grouped wgrad kernel per launch setting")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    e, k, n, top = 64, 2048, 2816, 6
    rows = args.tokens * top
    expert = torch.randint(0, e, (rows,), device=dev, generator=g).sort().values
    counts = torch.bincount(expert, minlength=e)
    x = torch.randn(rows, k, device=dev, dtype=bf, generator=g).requires_grad_()
    w = (torch.randn(e, n, k, device=dev, dtype=bf, generator=g) * k ** -0.5).requires_grad_()
    gy = torch.randn(rows, n, device=dev, dtype=bf, generator=g)
    offs = counts.cumsum(0).to(torch.int32)

    def grouped_fp8():
        fp8_grouped_linear(x, w, counts).backward(gy)

    def grouped_bf16():
        torch._grouped_mm(x, w.transpose(1, 2), offs=offs).backward(gy)

    report(f"experts gate_up f+b, FP8 ({rows} rows, {k} -> {n}, {e} experts)", grouped_fp8, args.rows)
    if args.sweep:
        sweep(x.detach(), w.detach(), gy, counts)
    report("experts gate_up f+b, BF16 torch._grouped_mm", grouped_bf16, args.rows)

    lin = FP8Linear(2048, 3072, bias=False, device=dev, dtype=bf)
    xl = torch.randn(args.tokens, 2048, device=dev, dtype=bf, requires_grad=True)
    gl = torch.randn(args.tokens, 3072, device=dev, dtype=bf)
    report(f"FP8Linear f+b ({args.tokens} x 2048 -> 3072)", lambda: lin(xl).backward(gl), args.rows)
    ref = torch.nn.Linear(2048, 3072, bias=False, device=dev, dtype=bf)
    report("nn.Linear f+b, BF16", lambda: ref(xl).backward(gl), args.rows)
    x = w = gy = xl = gl = None  # free the GEMM operands before the model steps
    if args.skip_step:
        return
    config = dsv3.preset("16b").replace(num_hidden_layers=4, num_nextn_predict_layers=0)
    tokens = torch.randint(0, config.vocab_size, (args.tokens // 4096, 4097), device=dev)
    for fp8 in (False, True):
        model = dsv3.build_model(config, device=dev, dtype=bf, seed=0)
        if fp8:
            apply_fp8_training(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            logits = model(tokens[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        report(f"training step, 16b cut to 4 layers, {'FP8' if fp8 else 'BF16'}", step, args.rows)
        model = opt = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
