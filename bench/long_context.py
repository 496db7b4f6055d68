"""Decode at long contexts: the latent-attention kernel's effective bandwidth and batch-1 decode speed against
the context length (report §2.1.1: the cache holds 576 values per token per layer; the report's model serves
128K tokens).

    python bench/long_context.py [--contexts 512,4096,16384,65536,131072] [--batches 1,8]
                                 [--decode-contexts 512,4096,16384] [--skip-decode] [--sweep]

1. **kernel**: ``dsv3.inference.triton_mla.latent_attention`` at the ``16b`` preset's attention sizes (16 heads,
   d_c 512, d_r 64, pages of 16 tokens in random order), one decode token per sequence, timed with CUDA
   graphs (``triton.testing.do_bench_cudagraph``): microseconds and effective TB/s = cache bytes read
   (batch x keys x 576 x 2) / time, against the plain PyTorch reference measured in the same run (page gather,
   einsum, softmax, einsum: ``dsv3.inference.layers.absorbed_attention``'s math) and against the split policy
   of 2026-12-02 (one program per multiprocessor, at most 32 splits per token);
2. **decode**: the full ``16b`` model (random weights, bf16) through ``Engine`` at batch 1: tokens/s after a
   prompt of each context length (64 new greedy tokens, CUDA graphs), and the fraction of the shortest
   context's speed.
Prints the device-to-device copy bandwidth for scale.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

import dsv3
from dsv3.inference import Engine, GenerationRequest, SamplingParams

PREVIOUS = {"waves": 1, "max_splits": 32, "keys_per_split": 32}
"""The launch settings before 2026-12-03 (about 128 programs, at most 32 splits: 25% of the SMs at batch 1)."""


def kernel_table(contexts: list[int], batches: list[int]) -> None:
    from triton.testing import do_bench_cudagraph

    from dsv3.inference import triton_mla
    from dsv3.model.rope import apply_rope

    config = dsv3.preset("16b")
    h, d_c, d_r, page = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim, 16
    base = dict(triton_mla.LAUNCH)
    print("\n| batch | keys | dsv3 us | dsv3 TB/s | previous split policy us | TB/s | PyTorch reference us | TB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        for keys in contexts:
            n_pages = keys // page
            latent = torch.randn(b * n_pages + 1, page, d_c + d_r, device="cuda", dtype=torch.bfloat16)
            pages = torch.randperm(b * n_pages, device="cuda").view(b, n_pages)
            positions = torch.full((b, 1), keys - 1, device="cuda")
            q_lat = torch.randn(b, 1, h, d_c, device="cuda", dtype=torch.bfloat16)
            q_pe = torch.randn(b, 1, h, d_r, device="cuda", dtype=torch.bfloat16)
            cos, sin = torch.randn(2, b, 1, d_r // 2, device="cuda").unbind(0)
            gbytes = b * keys * (d_c + d_r) * 2 / 1e9

            def kernel():
                return triton_mla.latent_attention(q_lat, q_pe, latent, pages, positions, cos, sin, 0.1)

            def reference():
                lat = latent[pages].flatten(1, 2)
                q = torch.cat([q_lat, apply_rope(q_pe, cos, sin)], -1)
                scores = torch.einsum("bshc,btc->bsht", q, lat).float() * 0.1
                return torch.einsum("bsht,btc->bshc", scores.softmax(-1).to(lat.dtype), lat[..., :d_c])

            torch.testing.assert_close(kernel().float(), reference().float(), atol=2e-2, rtol=2e-2)
            times = [do_bench_cudagraph(kernel) * 1e3]
            triton_mla.LAUNCH.update(PREVIOUS)
            times.append(do_bench_cudagraph(kernel) * 1e3)
            triton_mla.LAUNCH.update(base)
            times.append(do_bench_cudagraph(reference) * 1e3)
            cells = " | ".join(f"{us:.1f} | {gbytes / us * 1e3:.2f}" for us in times)
            print(f"| {b} | {keys} | {cells} |", flush=True)


SWEEP = [{"waves": 2}, {"waves": 8}, {"keys_per_split": 128}, {"block_t": 64}, {"num_stages": 3},
         {"combine_block": 512}, {"combine_block": 64}, {"num_warps": 8}]
"""Launch changes ``--sweep`` times against the defaults."""


def sweep(contexts: list[int], batches: list[int]) -> None:
    from triton.testing import do_bench_cudagraph

    from dsv3.inference import triton_mla

    config = dsv3.preset("16b")
    h, d_c, d_r, page = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim, 16
    base = dict(triton_mla.LAUNCH)
    print("\n| LAUNCH change | " + " | ".join(f"b{b} {k // 1024}K us" for b in batches for k in contexts) + " |")
    print("|---|" + "---:|" * (len(batches) * len(contexts)))
    inputs = []
    for b in batches:
        for keys in contexts:
            n_pages = keys // page
            inputs.append((torch.randn(1, 1, h, d_c, device="cuda", dtype=torch.bfloat16).expand(b, 1, h, d_c),
                           torch.randn(b, 1, h, d_r, device="cuda", dtype=torch.bfloat16),
                           torch.randn(b * n_pages + 1, page, d_c + d_r, device="cuda", dtype=torch.bfloat16),
                           torch.randperm(b * n_pages, device="cuda").view(b, n_pages),
                           torch.full((b, 1), keys - 1, device="cuda"),
                           *torch.randn(2, b, 1, d_r // 2, device="cuda").unbind(0)))
    for change in [{}] + SWEEP:
        triton_mla.LAUNCH.update(base, **change)
        cells = [do_bench_cudagraph(lambda: triton_mla.latent_attention(*x, 0.1)) * 1e3 for x in inputs]
        print(f"| {change or 'default'} | " + " | ".join(f"{us:.1f}" for us in cells) + " |", flush=True)
    triton_mla.LAUNCH.update(base)


def decode_table(contexts: list[int], new: int = 64) -> None:
    config = dsv3.preset("16b")
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    engine = Engine(model, max_batch=1, max_seq_len=max(contexts) + new + 16, page_size=16)
    g = torch.Generator().manual_seed(0)
    print("\n| context | decode tokens/s, batch 1 | of the shortest context's |")
    print("|---:|---:|---:|")
    first = None
    for ctx in contexts:
        prompt = torch.randint(0, config.vocab_size, (ctx,), generator=g).tolist()
        best = 0.0
        for _ in range(2):  # the first run captures this length's graphs
            res = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=new, temperature=0,
                                                                         ignore_eos=True)))
            while not res.tokens:  # chunked prefill: long prompts take several steps
                engine.step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            while engine.scheduler.has_work:
                engine.step()
            torch.cuda.synchronize()
            best = max(best, (new - 1) / (time.perf_counter() - t0))
        first = first or best
        print(f"| {ctx} | {best:.1f} | {best / first:.0%} |", flush=True)


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    from triton.testing import do_bench

    src = torch.empty(n_bytes, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * n_bytes / (do_bench(lambda: dst.copy_(src)) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="512,4096,16384,65536,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode-contexts", default="512,4096,16384")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time launch settings (SWEEP) instead of the tables")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {datetime.date.today()}")
    print(f"device-to-device copy: {copy_bandwidth() / 1e12:.2f} TB/s (read + write)")
    if args.sweep:
        return sweep([16384, 131072], ints(args.batches))
    kernel_table(ints(args.contexts), ints(args.batches))
    if not args.skip_decode:
        decode_table(ints(args.decode_contexts))


if __name__ == "__main__":
    main()
