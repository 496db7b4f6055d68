"""Where the time of a decode step and of a prefill goes: CUDA kernel time by kernel, on the "16b" preset.

    python bench/profile_inference.py [--decode 1,32] [--prefill 32] [--prompt 512] [--rows 25]

For each decode batch: the step's wall time through the captured CUDA graph (what generation runs), and a
torch.profiler table of the same step run without a graph (same kernels, launched one by one), so that
the sum of kernel times can be set against the graph's wall time. For the prefill: the kernel table of
one ``prefill_batch`` of that many 512-token prompts. Also times ``torch._grouped_mm`` at the decode
shapes against the bytes of the expert weights it must read.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dsv3
from dsv3.inference import Engine


def kernel_table(fn, rows: int, steps: int = 3) -> str:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / steps
    n = sum(e.count for e in events) / steps
    events.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"kernels per call: {n:.0f}, kernel time per call: {total / 1e3:.2f} ms",
             "| kernel | calls/step | us/step | share |", "|---|---|---|---|"]
    for e in events[:rows]:
        t = e.self_device_time_total / steps
        lines.append(f"| {e.key[:90]} | {e.count / steps:.0f} | {t:.0f} | {t / total:.0%} |")
    return "\n".join(lines)


def kernel_sequence(fn, first: int, count: int) -> str:
    """The kernels of one call of ``fn`` in launch order, from the ``first``-th on: where a step's time goes
    layer by layer (a decode step repeats the same kernels per layer)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    lines = ["| # | kernel | us | gap before us |", "|---|---|---|---|"]
    for i in range(first, min(first + count, len(events))):
        e = events[i]
        gap = e.time_range.start - events[i - 1].time_range.end if i else 0.0
        lines.append(f"| {i} | {e.name[:100]} | {e.time_range.elapsed_us():.1f} | {gap:.1f} |")
    return "\n".join(lines)


def median_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def grouped_mm_probe(config: dsv3.ModelConfig) -> None:
    """The 64 stacked experts on the rows of a decode step: torch._grouped_mm against the Triton few-rows
    kernel, and the bandwidth of reading the weights of the experts hit."""
    from dsv3.kernels.few_rows import grouped_mm_few_rows

    e, d, i, k = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    w1 = torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16) * 0.02
    print("| tokens | experts hit | _grouped_mm gate_up + down us | GB/s | few-rows kernel us | GB/s | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for tokens in (1, 4, 8, 16, 32, 64):
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(tokens)]).flatten().sort().values
        counts = torch.bincount(ids, minlength=e)
        offs = counts.cumsum(0).to(torch.int32)
        x = torch.randn(ids.numel(), d, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(ids.numel(), i, device="cuda", dtype=torch.bfloat16)
        hit = int((counts > 0).sum())
        gb = hit * 3 * d * i * 2 / 1e9
        t_ref = median_ms(lambda: (torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs),
                                   torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)), 50)
        t_new = median_ms(lambda: (grouped_mm_few_rows(x, w1, offs), grouped_mm_few_rows(h, w2, offs)), 50)
        ref = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs).float()
        diff = (grouped_mm_few_rows(x, w1, offs).float() - ref).norm() / ref.norm()
        print(f"| {tokens} | {hit} | {t_ref * 1e3:.0f} | {gb / t_ref * 1e3:.0f} | {t_new * 1e3:.0f} | "
              f"{gb / t_new * 1e3:.0f} | {diff:.1e} |", flush=True)


def attention_sweep(config: dsv3.ModelConfig, prompt: int) -> None:
    """Times dsv3.inference.triton_mla.latent_attention at the 16b preset's sizes for launch settings
    (LAUNCH) at batch 1 and 32, and the per-head products against cuBLAS (torch.einsum)."""
    from triton.testing import do_bench_cudagraph

    from dsv3.inference import triton_mla

    h, d_c, d_r, page = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim, 16
    n_pages = (prompt + 64) // page
    base = dict(triton_mla.LAUNCH)
    variants = [{}, {"keys_per_split": 64, "num_warps": 8}, {"keys_per_split": 16}, {"num_warps": 2}]
    print("| batch | LAUNCH change | us |\n|---|---|---|")
    for b in (1, 32):
        latent = torch.randn(b * n_pages + 1, page, d_c + d_r, device="cuda", dtype=torch.bfloat16)
        pages = torch.randperm(b * n_pages, device="cuda").view(b, n_pages)
        positions = torch.full((b, 1), prompt, device="cuda")
        q_lat = torch.randn(b, 1, h, d_c, device="cuda", dtype=torch.bfloat16)
        q_pe = torch.randn(b, 1, h, d_r, device="cuda", dtype=torch.bfloat16)
        cos, sin = torch.randn(2, b, 1, d_r // 2, device="cuda").unbind(0)
        for change in variants:
            triton_mla.LAUNCH.update(base, **change)
            fn = lambda: triton_mla.latent_attention(q_lat, q_pe, latent, pages, positions, cos, sin, 0.1)  # noqa: E731
            us = do_bench_cudagraph(fn) * 1e3
            print(f"| {b} | {change or 'default'} | {us:.1f} |", flush=True)
        triton_mla.LAUNCH.update(base)
        x = torch.randn(b, h, config.qk_nope_head_dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(h, config.qk_nope_head_dim, d_c, device="cuda", dtype=torch.bfloat16)
        for name, fn in [("head_matmul W^UK", lambda: triton_mla.head_matmul(x, w)),
                         ("einsum W^UK", lambda: torch.einsum("thk,hkn->thn", x, w))]:
            print(f"| {b} | {name} | {do_bench_cudagraph(fn) * 1e3:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", default="1,32")
    ap.add_argument("--prefill", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--sequence", default="", help="FIRST,COUNT: list a decode step's kernels in order")
    ap.add_argument("--attention-sweep", action="store_true", help="time the latent attention kernel's settings")
    ap.add_argument("--no-probe", action="store_true", help="skip the grouped GEMM probe")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--decode-experts", default="auto", help="Engine(decode_experts=...): auto, few_rows, module")
    args = ap.parse_args()
    config = dsv3.preset("16b")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.attention_sweep:
        attention_sweep(config, args.prompt)
    if not args.no_probe:
        grouped_mm_probe(config)
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    batches = [int(b) for b in args.decode.split(",") if b]
    prefills = [int(b) for b in args.prefill.split(",") if b]
    max_batch = max(batches + prefills)
    compiled = not args.no_compile
    kw = dict(max_batch=max_batch, max_seq_len=args.prompt + 64, page_size=16, compile=compiled,
              decode_experts=args.decode_experts)
    graphed = Engine(model, **kw)
    eager = Engine(model, cuda_graph=False, **kw)
    print(f"decode experts: {graphed.runner.decode_experts}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (max_batch, args.prompt), generator=g).tolist()
    for b in batches:
        for eng in (graphed, eager):
            slots = [eng.cache.new_sequence() for _ in range(b)]
            eng.runner.prefill_batch(slots, [p[:-8] for p in prompts[:b]])  # the step's position is mid-page
            tokens = [[p[-1]] for p in prompts[:b]]
            step = lambda: (eng.runner.decode_step(slots, tokens), [eng.cache.truncate(s, args.prompt - 8) for s in slots])
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = median_ms(step)
            kind = "graph" if eng is graphed else "no graph"
            print(f"\n## decode batch {b}, {kind}{' + compile' if compiled else ''}: {ms:.2f} ms/step "
                  f"({b / ms * 1e3:.0f} tok/s; first step {first:.1f} s)", flush=True)
            if eng is eager:
                print(kernel_table(step, args.rows))
                if args.sequence:
                    first, count = (int(v) for v in args.sequence.split(","))
                    print(kernel_sequence(step, first, count))
            for s in slots:
                eng.cache.free(s)
    for b in prefills:
        def run():
            got = [eager.new_sequence() for _ in range(b)]
            eager.prefill_batch(got, prompts[:b])
            for s in got:
                eager.free(s)

        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        ms = median_ms(run, 5)
        print(f"\n## prefill batch {b} x {args.prompt}: {ms:.1f} ms ({b * args.prompt / ms:.1f}K tok/s; "
              f"first {first:.1f} s)", flush=True)
        if b == prefills[-1]:
            print(kernel_table(run, args.rows, steps=2))

if __name__ == "__main__":
    main()
