"""Where the time of FP8 training goes: CUDA kernel time by kernel, against wall time.

    python bench/profile_fp8.py [--rows 20] [--tokens 8192] [--skip-step | --skip-gemms] [--shape 16b-4l|v3-slice]
                                [--sweep [--quick]] [--sweep-quant]

Profiles, on the "16b" shapes: one routed-experts grouped GEMM (gate_up: 64 experts, 6 copies per token) forward +
backward in FP8 and in BF16 (``torch._grouped_mm``), one FP8Linear forward + backward (q_proj), and (unless
--skip-step) one training step of a model of bench/train_throughput.py (``--shape``; default the benchmark model,
16b cut to 4 layers; bf16 weights) with and without ``--fp8``, then both steps' kernel time by category and the
most FP8 could gain on that step (its GEMM share, the output head's GEMMs excluded as the recipe keeps them BF16).
Wall time is the median of timed calls; "kernel time" is the sum of CUDA kernel times in a torch.profiler trace
of the same call, so wall >> kernel means the CPU (launches, Python) is the limit.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import dsv3
from dsv3.fp8 import FP8Linear, apply_fp8_training
from dsv3.fp8.transform import TRITON_LAUNCH, fp8_grouped_linear
from profile_inference import median_ms  # bench/ is the script's directory, on sys.path
from train_throughput import SHAPES, bench_config

TRITON_DEFAULT = dict(TRITON_LAUNCH)


def report(name: str, fn, rows: int) -> tuple[float, dict[str, float]]:
    """Print wall time and the top kernels of one call; return the wall time (ms) and kernel time by name (us)."""
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
    return wall, {e.key: e.self_device_time_total for e in events}


# Kernel categories of a training step, by kernel name; the first that matches wins.
CATEGORIES = (
    ("GEMM, grouped FP8 (Triton)", ("_grouped_fp8",)),
    ("FP8 quantisers (Triton)", ("quant_kernel",)),
    ("GEMM, cuBLAS / CUTLASS", ("nvjet", "gemm", "xmma")),
    ("attention core (cuDNN SDPA)", ("sdpa", "fmha", "flash")),
    ("optimiser (fused AdamW)", ("multi_tensor_apply", "adam")),
    ("softmax + cross-entropy (102,400 or 32,768 classes)", ("softmax", "nll_loss", "cross_entropy")),
)
OTHER = "other (norms, RoPE, SwiGLU, routing, dispatch, copies, gradient sums)"


def category(kernel: str) -> str:
    k = kernel.lower()
    return next((label for label, keys in CATEGORIES if any(key in k for key in keys)), OTHER)


def by_category(kernels: dict[str, float]) -> dict[str, float]:
    out = dict.fromkeys([label for label, _ in CATEGORIES] + [OTHER], 0.0)
    for name, us in kernels.items():
        out[category(name)] += us / 1e3
    return out


def step_budget(bf16: tuple[float, dict], fp8: tuple[float, dict], head_gemm_ms: float) -> None:
    """Both steps' kernel time by category, and what FP8 could gain at most: the BF16 step with every GEMM the
    recipe runs in FP8 (all but the output head's) made s times faster and the quantisation free."""
    (wall_b, kb), (wall_f, kf) = bf16, fp8
    cb, cf = by_category(kb), by_category(kf)
    print("\n### Step budget, ms of kernel time\n\n| category | BF16 | FP8 |\n|---|---|---|")
    for label in cb:
        print(f"| {label} | {cb[label]:.1f} | {cf[label]:.1f} |")
    kern_b, kern_f = sum(cb.values()), sum(cf.values())
    print(f"| all kernels | {kern_b:.1f} | {kern_f:.1f} |\n| wall time of the step | {wall_b:.1f} | {wall_f:.1f} |")
    gemm = cb["GEMM, cuBLAS / CUTLASS"]
    fp8able = gemm - head_gemm_ms
    bound = {s: wall_b / (wall_b - fp8able + fp8able / s) for s in (1.6, 2.0)}
    print(f"\nBF16 step: GEMMs {gemm:.1f} ms ({gemm / wall_b:.0%} of the wall time), of which the output head's "
          f"{head_gemm_ms:.1f} ms stay BF16 in the recipe; the {fp8able:.1f} ms FP8 can take are "
          f"{fp8able / wall_b:.0%} of the step. With them s x faster and quantisation free, FP8 / BF16 tokens/s "
          f"would be at most {bound[1.6]:.2f}x at s = 1.6 (cuBLAS block-scaled vs BF16 at large shapes) and "
          f"{bound[2.0]:.2f}x at s = 2 (the FP8 : BF16 peak ratio). Measured here: {wall_b / wall_f:.2f}x of wall "
          f"time and {kern_b / kern_f:.2f}x of kernel time (one step at a time, synchronised, so the FP8 step's "
          "host time shows in its wall time; bench/train_throughput.py runs steps back to back).")


def head_gemm_ms(config, tokens: int) -> float:
    """Kernel time of the output head's GEMMs (forward, input and weight gradients) at the step's size."""
    dev, bf = "cuda", torch.bfloat16
    h = torch.randn(tokens, config.hidden_size, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(config.vocab_size, config.hidden_size, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(tokens, config.vocab_size, device=dev, dtype=bf)
    _, kernels = report(f"output head f+b, BF16 ({tokens} x {config.hidden_size} -> {config.vocab_size})",
                        lambda: F.linear(h, w).backward(g), 4)
    return by_category(kernels)["GEMM, cuBLAS / CUTLASS"]


# (label, experts, routed rows, K, N) of the sweep: the benchmark shape's two expert GEMMs and V3's per GPU.
SWEEP_SHAPES = (("16b gate_up", 64, 8192 * 6, 2048, 2816), ("16b down", 64, 8192 * 6, 1408, 2048),
                ("v3 EP8 gate_up", 32, 8192, 7168, 4096), ("v3 EP8 down", 32, 8192, 2048, 7168),
                ("v3-slice gate_up", 32, 4096 * 8, 7168, 4096))


# The "16b" dense projections at the training step's 8192 tokens, as one-expert groups: cuBLAS's block-scaled FP8
# GEMM against BF16 and against the grouped Triton kernel on the shapes FP8Linear runs.
DENSE_SHAPES = (("16b q_proj", 1, 8192, 2048, 3072), ("16b kv_a_proj", 1, 8192, 2048, 576),
                ("16b kv_b_proj", 1, 8192, 512, 4096), ("16b o_proj", 1, 8192, 2048, 2048),
                ("16b shared gate/up", 1, 8192, 2048, 2816), ("16b shared down", 1, 8192, 2816, 2048),
                ("16b dense gate/up", 1, 8192, 2048, 10944), ("16b dense down", 1, 8192, 10944, 2048))


def grouped_operands(e: int, m: int, k: int, n: int):
    """Random operands of one grouped expert GEMM (m rows over e experts, k -> n), quantised as training does:
    counts, x, w, the padded layout, X's and W's FP8 forms, and dY's token-tiled form for the weight gradient."""
    from dsv3.fp8 import transform as T

    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.bincount(torch.randint(0, e, (m,), device="cuda", generator=g), minlength=e)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k**-0.5
    gy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    layout = T._PaddedLayout(counts, m)
    xq, xs = T._TritonGrouped.quant_rows(x, layout)
    wq, ws = T.quantize_blocks(w)
    _, _, gt = T._TritonGrouped.quant_grad(gy, layout, False, True)
    return counts, x, w, layout, xq, xs, wq, ws, gt


def dense_wgrad(gt, xq, xs, n_padded):
    """cuBLAS's 1x128 x 1x128 GEMM over all rows (FP8Linear's weight gradient), X^T's quantisation included."""
    from dsv3.fp8 import transform as T

    _, _, xtq, xts = T.quantize_rows(xq, n_padded, x_scale=xs, rowwise=False, colwise=True)
    return T.fp8_matmul_nt(gt[0], gt[1].t(), xtq, xts.t(), b_blocks=False, out_dtype=torch.bfloat16,
                           backend="scaled_mm")


def sweep_quick() -> None:
    """One row per shape (SWEEP_SHAPES, then DENSE_SHAPES), kernels at their production launch settings, GPU time
    of back-to-back calls: BF16 ``torch._grouped_mm`` and one dense BF16 GEMM of the same total size, cuBLAS's
    block-scaled FP8 GEMM on that dense matrix, the Triton grouped FP8 forward GEMM and weight gradient (operands
    pre-quantised), and cuBLAS's weight-gradient GEMM over all rows."""
    from dsv3.fp8 import transform as T

    print("\n| shape (experts, rows, K -> N) | BF16 grouped | BF16 dense | FP8 cuBLAS dense | FP8 Triton grouped "
          "fwd | FP8 Triton grouped wgrad | FP8 cuBLAS dense wgrad |\n"
          "|---|---|---|---|---|---|---|")
    for label, e, m, k, n in SWEEP_SHAPES + DENSE_SHAPES:
        counts, x, w, layout, xq, xs, wq, wsc, gt = grouped_operands(e, m, k, n)
        dq, ds = T.quantize_tiles(x)
        offs = counts.cumsum(0).to(torch.int32)
        flops = 2 * m * n * k
        cases = (lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs),
                 lambda: F.linear(x, w[0]),
                 lambda: T.fp8_matmul_nt(dq, ds, wq[0], wsc[0], b_blocks=True, out_dtype=torch.bfloat16,
                                         backend="scaled_mm"),
                 lambda: T._TritonGrouped.mm(xq, xs, wq, wsc, layout, torch.bfloat16),
                 lambda: T._TritonGrouped.wgrad(gt, xq, xs, layout, torch.bfloat16),
                 lambda: dense_wgrad(gt, xq, xs, layout.n_padded))
        cells = []
        for fn in cases:
            try:
                ms = gpu_ms(fn)
                cells.append(f"{ms * 1e3:.0f} us ({flops / ms / 1e9:.0f})")
            except Exception as exc:  # noqa: BLE001 - report and go on
                cells.append(f"failed: {str(exc).splitlines()[0][:60]}")
        print(f"| {label} ({e}, {m}, {k} -> {n}) | " + " | ".join(cells) + " |", flush=True)
        x = w = xq = wq = gt = dq = None


def sweep() -> None:
    """The grouped FP8 kernels alone (operands pre-quantised) per launch setting, on each of SWEEP_SHAPES;
    the defaults are restored afterwards."""
    from dsv3.fp8 import transform as T

    long_k = dict(T.TRITON_LAUNCH_LONG_K)
    T.TRITON_LAUNCH_LONG_K.clear()  # the settings swept apply at every K

    def table(title, settings, target, fn, flops):
        print(f"\n| {title} | us | TF/s |\n|---|---|---|")
        default = dict(target)
        for setting in settings:
            target.update(setting)
            try:
                ms = median_ms(fn, reps=20)
                print(f"| {setting} | {ms * 1e3:.0f} | {flops / ms / 1e9:.0f} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: report and go on
                print(f"| {setting} | failed: {str(exc)[:80]} | |", flush=True)
        target.clear()
        target.update(default)

    forward = [dict(TRITON_DEFAULT)] + [  # TRITON_DEFAULT: the setting below K = LONG_K
        dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, TMA=True, num_warps=nw, num_stages=ns)
        for bm, bn, nw, ns in ((64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 4), (64, 128, 8, 3))]
    # Two stages leave shared memory for two programs per SM, so one's epilogue (the weight gradient's output
    # is large against its short token loop) can overlap another's main loop.
    wgrad = [dict(BLOCK_N=128, BLOCK_K=128, TMA=False, num_warps=8, num_stages=3)] + [
        dict(BLOCK_N=bn, BLOCK_K=bk, TMA=True, num_warps=nw, num_stages=ns)
        for bn, bk, nw, ns in ((128, 256, 8, 3), (128, 256, 8, 2), (128, 128, 8, 2), (128, 128, 4, 3),
                               (128, 128, 4, 2), (64, 256, 4, 2))]
    for label, e, m, k, n in SWEEP_SHAPES:
        counts, x, w, layout, xq, xs, wq, ws, gt = grouped_operands(e, m, k, n)
        flops = 2 * m * n * k
        ref = T._TritonGrouped.mm(xq, xs, wq, ws, layout, torch.float32)
        T.TRITON_LAUNCH.update(forward[1])
        if (T._TritonGrouped.mm(xq, xs, wq, ws, layout, torch.float32) - ref).abs().max() > 1e-3 * ref.abs().max():
            print("WARNING: launch settings disagree")  # the sweep times kernels that compute the same thing
        T.TRITON_LAUNCH.update(TRITON_DEFAULT)
        offs = counts.cumsum(0).to(torch.int32)
        bf16 = median_ms(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), reps=20)
        # cuBLAS's block-scaled FP8 GEMM on one matrix of the same total size: what the grouped kernel could reach
        dq, ds = T.quantize_tiles(x)
        dense = median_ms(lambda: T.fp8_matmul_nt(dq, ds, wq[0], ws[0], b_blocks=True,
                                                  out_dtype=torch.bfloat16, backend="scaled_mm"), reps=20)
        print(f"\n### {label}: {e} experts, {m} rows, {k} -> {n}; BF16 torch._grouped_mm {bf16 * 1e3:.0f} us "
              f"({flops / bf16 / 1e9:.0f} TF/s); dense FP8 torch._scaled_mm (one {m} x {k} -> {n} GEMM) "
              f"{dense * 1e3:.0f} us ({flops / dense / 1e9:.0f} TF/s)")
        table("grouped forward GEMM", forward, T.TRITON_LAUNCH,
              lambda: T._TritonGrouped.mm(xq, xs, wq, ws, layout, torch.bfloat16), flops)
        table("grouped wgrad GEMM (with X's transposed quantisation)", wgrad, T.WGRAD_LAUNCH,
              lambda: T._TritonGrouped.wgrad(gt, xq, xs, layout, torch.bfloat16), flops)
        x = w = xq = wq = gt = ref = None
    T.TRITON_LAUNCH_LONG_K.update(long_k)


def gpu_ms(fn, reps: int = 30) -> float:
    """GPU time per call from CUDA events around back-to-back calls (launches overlap the kernels)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def sweep_quant() -> None:
    """The row-layout quantiser (quantize_rows) per launch setting on the operands of a training step: the
    experts' X (gathered into the padded layout), dY (both layouts) and X^T from X's FP8 cache, and a
    dense layer's dY and X^T (8192 tokens); then the weight-block quantiser per warp count."""
    from dsv3.fp8 import transform as T
    from dsv3.fp8 import triton_quant as TQ

    dev, bf = "cuda", torch.bfloat16
    e, m, k, n = 64, 49152, 2048, 2816
    counts = torch.bincount(torch.randint(0, e, (m,), device=dev), minlength=e)
    lay = T._PaddedLayout(counts, m)
    x, gy = torch.randn(m, k, device=dev, dtype=bf), torch.randn(m, n, device=dev, dtype=bf)
    xq, xs = T._TritonGrouped.quant_rows(x, lay)
    gl, xl = torch.randn(8192, 3072, device=dev, dtype=bf), torch.randn(8192, 2048, device=dev, dtype=bf)
    xlq, xls = TQ.quantize_tiles(xl, 128, False)
    q = TQ.quantize_rows
    cases = {  # name: (call, bytes read + written)
        "experts X (gather, rows)": (lambda: q(x, lay.n_padded, src_row=lay.src_row), x.numel() * 3),
        "experts dY (gather, rows + cols)": (
            lambda: q(gy, lay.n_padded, src_row=lay.src_row, rowwise=True, colwise=True), gy.numel() * 4),
        "experts X^T from FP8 (cols)": (
            lambda: q(xq, lay.n_padded, x_scale=xs, rowwise=False, colwise=True), xq.numel() * 2),
        "dense dY 8192x3072 (rows + cols)": (lambda: q(gl, 8192, rowwise=True, colwise=True), gl.numel() * 4),
        "dense X^T from FP8 8192x2048 (cols)": (
            lambda: q(xlq, 8192, x_scale=xls.t(), rowwise=False, colwise=True), xlq.numel() * 2),
    }
    default = dict(TQ.LAUNCH)
    # cols_block 128: rows and columns in one 128x128 program; else the column pass in programs of its own
    settings = [dict(cols_block=128)] + [dict(cols_block=cb, cols_warps=w) for cb in (64, 32) for w in (4, 8)]
    print("\n| quantize_rows, GPU time (GB/s) | " + " | ".join(
        ", ".join(f"{k}={v}" for k, v in st.items()) for st in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for name, (fn, nbytes) in cases.items():
        cells = []
        for st in settings:
            TQ.LAUNCH.update(default)
            TQ.LAUNCH.update(st)
            ms = gpu_ms(fn)
            cells.append(f"{ms * 1e3:.0f} us ({nbytes / ms / 1e6:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    TQ.LAUNCH.update(default)
    w = torch.randn(e, n, k, device=dev, dtype=bf)
    print("\n| quantize_blocks with W^T, 16b gate_up experts (64 x 2816 x 2048), GPU time (GB/s) | "
          "block_warps=4 | 8 | 16 |\n|---|---|---|---|")
    cells = []
    for warps in (4, 8, 16):
        TQ.LAUNCH.update(block_warps=warps)
        ms = gpu_ms(lambda: T.quantize_blocks(w, with_transpose=True))
        cells.append(f"{ms * 1e3:.0f} us ({w.numel() * 4 / ms / 1e6:.0f})")
    print("| | " + " | ".join(cells) + " |")
    TQ.LAUNCH.update(default)


def profile_gemms(tokens: int, n_rows: int) -> None:
    """One grouped expert GEMM (16b gate_up) and one FP8Linear, forward + backward, FP8 against BF16."""
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    e, k, n, top = 64, 2048, 2816, 6
    rows = tokens * top
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

    report(f"experts gate_up f+b, FP8 ({rows} rows, {k} -> {n}, {e} experts)", grouped_fp8, n_rows)
    report("experts gate_up f+b, BF16 torch._grouped_mm", grouped_bf16, n_rows)

    lin = FP8Linear(2048, 3072, bias=False, device=dev, dtype=bf)
    xl = torch.randn(tokens, 2048, device=dev, dtype=bf, requires_grad=True)
    gl = torch.randn(tokens, 3072, device=dev, dtype=bf)
    report(f"FP8Linear f+b ({tokens} x 2048 -> 3072)", lambda: lin(xl).backward(gl), n_rows)
    ref = torch.nn.Linear(2048, 3072, bias=False, device=dev, dtype=bf)
    report("nn.Linear f+b, BF16", lambda: ref(xl).backward(gl), n_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--shape", default="16b-4l", choices=sorted(SHAPES), help="model of the training steps")
    ap.add_argument("--skip-gemms", action="store_true", help="only the training steps")
    ap.add_argument("--sweep", action="store_true", help="only time the grouped kernels per launch setting")
    ap.add_argument("--sweep-quant", action="store_true", help="only time the row-layout quantiser per launch setting")
    ap.add_argument("--quick", action="store_true", help="with --sweep: the production launch settings only, one "
                    "row per shape against BF16 and cuBLAS, dense projections of 16b included")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.sweep:
        sweep_quick() if args.quick else sweep()
        return
    if args.sweep_quant:
        sweep_quant()
        return
    if not args.skip_gemms:
        profile_gemms(args.tokens, args.rows)
    if args.skip_step:
        return
    dev, bf = "cuda", torch.bfloat16
    config = bench_config(args.shape)
    tokens = torch.randint(0, config.vocab_size, (max(1, args.tokens // 4096), 4097), device=dev)
    results = []
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

        results.append(report(f"training step, {args.shape}, {'FP8' if fp8 else 'BF16'}", step, args.rows))
        model = opt = None
        torch.cuda.empty_cache()
    step_budget(*results, head_gemm_ms(config, tokens[:, :-1].numel()))


if __name__ == "__main__":
    main()
