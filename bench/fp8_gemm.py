"""FP8 block-scaled GEMMs (report §3.3) vs BF16 on the model's real shapes; prints markdown tables.

    PYTHONPATH=src python bench/fp8_gemm.py [--tokens 4096] [--quick]

Tables: (1) dense projections: BF16 ``F.linear`` vs FP8 ``torch._scaled_mm`` with 1x128 activation and
128x128 weight scales, without and with the online activation quantisation (weights pre-quantised, as when
serving); (2) one big shape, ``FP8Linear`` forward+backward vs ``nn.Linear``; (3) routed experts: BF16
``torch._grouped_mm`` vs the FP8 grouped backends of :mod:`dsv3.fp8.transform`, forward and
forward+backward. Timing: CUDA events per call, warm-up first, median of the repeats (METHOD.md).
The grouped kernels' launch-setting sweeps are in ``bench/profile_fp8.py --sweep``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from dsv3.fp8 import FP8Linear, fp8_matmul_nt, quantize_blocks, quantize_tiles
from dsv3.fp8 import transform as T

# (label, in_features, out_features)
SHAPES = {
    "v3-671b": [
        ("q_a_proj", 7168, 1536), ("kv_a_proj_with_mqa", 7168, 576), ("q_b_proj", 1536, 24576),
        ("kv_b_proj", 512, 32768), ("o_proj", 16384, 7168), ("dense gate/up", 7168, 18432),
        ("dense down", 18432, 7168), ("expert gate_up", 7168, 4096), ("expert down", 2048, 7168),
    ],
    "16b": [
        ("q_proj", 2048, 3072), ("kv_a_proj_with_mqa", 2048, 576), ("kv_b_proj", 512, 4096),
        ("o_proj", 2048, 2048), ("dense gate/up", 2048, 10944), ("dense down", 10944, 2048),
        ("expert gate_up", 2048, 2816), ("expert down", 1408, 2048),
    ],
}


def median_ms(fn, warmup: int = 10, reps: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def dense_table(tokens: int, reps: int) -> list[str]:
    rows = ["| model | layer | M x K -> N | BF16 F.linear | FP8 GEMM | FP8 GEMM + act. quant | speed-up (with quant) "
            "| rel. err vs BF16 |", "|---|---|---|---|---|---|---|---|"]
    for model, shapes in SHAPES.items():
        for label, k, n in shapes:
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
            wq, ws = quantize_blocks(w)
            xq, xs = quantize_tiles(x)
            flops = 2 * tokens * k * n
            t_bf16 = median_ms(lambda: F.linear(x, w), reps=reps)
            gemm = lambda: fp8_matmul_nt(xq, xs, wq, ws, b_blocks=True, out_dtype=torch.bfloat16,  # noqa: E731
                                         backend="scaled_mm")
            t_fp8 = median_ms(gemm, reps=reps)
            full = lambda: fp8_matmul_nt(*quantize_tiles(x), wq, ws, b_blocks=True,  # noqa: E731
                                         out_dtype=torch.bfloat16, backend="scaled_mm")
            t_full = median_ms(full, reps=reps)
            err = rel_err(full(), F.linear(x.float(), w.float()))
            rows.append(f"| {model} | {label} | {tokens} x {k} -> {n} | {tflops(flops, t_bf16):.0f} TF/s "
                        f"({t_bf16 * 1e3:.0f} us) | {tflops(flops, t_fp8):.0f} TF/s ({t_fp8 * 1e3:.0f} us) | "
                        f"{tflops(flops, t_full):.0f} TF/s ({t_full * 1e3:.0f} us) | {t_bf16 / t_fp8:.2f}x "
                        f"({t_bf16 / t_full:.2f}x) | {err:.4f} |")
            print(rows[-1], flush=True)
    return rows


def linear_train_table(tokens: int, k: int, n: int, reps: int) -> list[str]:
    rows = ["| module | M x K -> N | forward+backward | TFLOP/s (6MNK) |", "|---|---|---|---|"]
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(base, backend="scaled_mm")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    for name, mod in (("nn.Linear (BF16)", base), ("FP8Linear", fp8)):
        def step():
            x.grad = None
            base.weight.grad = None
            mod(x).backward(gy)
        ms = median_ms(step, reps=reps)
        rows.append(f"| {name} | {tokens} x {k} -> {n} | {ms * 1e3:.0f} us | {tflops(6 * tokens * k * n, ms):.0f} |")
        print(rows[-1], flush=True)
    return rows


def experts_table(reps: int, quick: bool) -> list[str]:
    # (label, experts, routed rows, d, expert inter): 16b = 4096 tokens x top-6 over 64 experts;
    # V3 per GPU with EP: 32 local experts, 8192 routed rows.
    cases = [("16b", 64, 4096 * 6, 2048, 1408), ("v3 EP8 (32 local experts)", 32, 8192, 7168, 2048)]
    rows = ["| case | GEMM | E, rows, K -> N | BF16 _grouped_mm | FP8 " + " | FP8 ".join(_backends()) + " |",
            "|---|---|---|---|" + "---|" * len(_backends())]
    for label, e, m, d, inter in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        counts = torch.bincount(torch.randint(0, e, (m,), device="cuda", generator=g), minlength=e)
        offs = counts.cumsum(0).to(torch.int32)
        for gemm, k, n in (("gate_up", d, 2 * inter), ("down", inter, d)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = (torch.randn(e, n, k, device="cuda") * k**-0.5).bfloat16().requires_grad_()
            gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            flops = 2 * m * k * n
            ref = torch._grouped_mm(x.detach().float().bfloat16(), w.detach().transpose(-2, -1), offs=offs)
            cells = []
            for impl in ["bf16", *_backends()]:
                if impl == "bf16":
                    fwd = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # noqa: E731
                else:
                    fwd = lambda impl=impl: T.fp8_grouped_linear(x, w, counts, backend=impl)  # noqa: E731

                def train(fwd=fwd):
                    x.grad = w.grad = None
                    fwd().backward(gy)
                try:
                    with torch.no_grad():
                        err = rel_err(fwd(), ref)
                        t_f = median_ms(fwd, reps=reps)
                    t_t = median_ms(train, reps=max(5, reps // 2))
                    cells.append(f"fwd {tflops(flops, t_f):.0f} / f+b {tflops(3 * flops, t_t):.0f} TF/s"
                                 + (f" (err {err:.3f})" if impl != "bf16" else ""))
                except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                    cells.append(f"failed: {type(exc).__name__}: {str(exc)[:80]}")
            rows.append(f"| {label} | {gemm} | {e}, {m}, {k} -> {n} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        if quick:
            break
    return rows


def _backends() -> list[str]:
    return ["triton", "scaled_mm"] if T.triton is not None else ["scaled_mm"]


def probe_scaled_grouped_mm() -> str:
    """Does torch's grouped scaled GEMM take DeepSeek 1x128 / 128x128 block scales on this GPU?"""
    try:
        from torch.nn.functional import ScalingType, scaled_grouped_mm
    except ImportError as exc:
        return f"torch.nn.functional.scaled_grouped_mm unavailable ({exc})"
    e, m, k, n = 4, 512, 256, 256
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(e, n, k, device="cuda").to(torch.float8_e4m3fn)
    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * (m // e)
    sa = torch.ones(m, k // 128, device="cuda").t().contiguous().t()
    sb = torch.ones(e, n // 128, k // 128, device="cuda")
    try:
        scaled_grouped_mm(a, b.transpose(-2, -1), sa, ScalingType.BlockWise1x128, sb.transpose(-2, -1),
                          ScalingType.BlockWise128x128, offs=offs, output_dtype=torch.bfloat16)
        return "scaled_grouped_mm accepted BlockWise1x128 x BlockWise128x128"
    except Exception as exc:  # noqa: BLE001
        return f"scaled_grouped_mm with BlockWise1x128 x BlockWise128x128 refused: {str(exc).splitlines()[0][:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"triton {getattr(T.triton, '__version__', 'absent')}; tokens {args.tokens}; medians of CUDA-event "
              f"timings after warm-up; TF/s = 2MNK / time")
    print(header, flush=True)
    probe = probe_scaled_grouped_mm()
    print(probe, flush=True)
    if args.quick:
        SHAPES["v3-671b"] = SHAPES["v3-671b"][:3]
        SHAPES["16b"] = SHAPES["16b"][:2]
    out = [header, "", probe, "", "### Dense projections (forward)", ""]
    out += dense_table(args.tokens, args.reps)
    out += ["", "### FP8Linear vs nn.Linear, forward + backward", ""]
    out += linear_train_table(args.tokens, 7168, 18432, args.reps)
    out += ["", "### Routed experts (grouped), forward and forward+backward (f+b counts 3 GEMMs)", ""]
    out += experts_table(args.reps, args.quick)
    text = "\n".join(out)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
