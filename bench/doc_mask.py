"""Document-masked attention (report §5.1: packed SFT samples "isolated and mutually invisible"): FlexAttention
with a document BlockMask against SDPA with the dense (B, 1, S, S) mask, and SDPA causal without isolation as
the peer baseline (what the report's pre-training needs, and the speed a document mask should keep).

    python bench/doc_mask.py [--seqs 4096,16384] [--docs 8] [--iters 20] [--step-seq 4096]
    python bench/doc_mask.py --smoke          # CPU-sized shapes, a few seconds; FlexAttention forward only

1. **layer**: one MLA layer at the ``16b`` preset's sizes (hidden 2048, 16 heads, q/k 192, v 128; bf16), B = 1,
   ``--docs`` equal documents: the mask build, the attention alone (q, k, v given) forward + backward, the whole
   layer (projections, RoPE, attention, W^O) forward + backward, and the attention's peak memory above its
   inputs (mask build included);
2. **step**: a training step (forward with MTP, backward, AdamW) of the ``tiny`` preset (4 layers, hidden 128,
   bf16) at ``--step-seq`` per backend.

Medians of ``--iters`` timings (CUDA events on the GPU) after warm-up. Compiled code is reset before each
sequence length so that every length runs statically compiled kernels, as a training run at one length does.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import dsv3
from dsv3.model import MLA, RotaryEmbedding
from dsv3.model.attention import _prefer_cudnn
from dsv3.model.doc_mask import DocumentMask, flex_attention, set_document_attention

BACKENDS = {"causal": "SDPA causal, no doc mask", "sdpa": "SDPA + dense doc mask", "flex": "Flex + BlockMask"}


def median_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on the GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def equal_docs(batch: int, seq: int, docs: int, device: torch.device) -> torch.Tensor:
    """(batch, seq) document ids of ``docs`` equal documents (the last one takes the remainder)."""
    return (torch.arange(seq, device=device) * docs // seq).expand(batch, seq).contiguous()


def attend(backend: str, q, k, v, mask: DocumentMask | None, scale: float) -> torch.Tensor:
    if backend == "flex":
        return flex_attention(q, k, v, mask.block, scale)
    with _prefer_cudnn(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.dense,
                                              is_causal=mask is None, scale=scale)


def backward_ok(backend: str, device: torch.device) -> bool:
    """FlexAttention has no backward on the CPU: there the flex rows time the forward only."""
    return not (backend == "flex" and device.type == "cpu")


def layer_table(config: dsv3.ModelConfig, seqs: list[int], docs: int, iters: int, device: torch.device,
                dtype: torch.dtype) -> None:
    h, dqk, dv = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    torch.manual_seed(0)
    attn = MLA(config).to(device, dtype)
    rotary = RotaryEmbedding(config).to(device)
    print(f"\n**One MLA layer**: hidden {config.hidden_size}, {h} heads, q/k {dqk}, v {dv}, {dtype}, B = 1, "
          f"{docs} equal documents; ms, forward + backward unless marked\n")
    print("| S | backend | mask build ms | attention ms | MLA layer ms | attention peak MiB |")
    print("|---:|---|---:|---:|---:|---:|")
    for s in seqs:
        torch._dynamo.reset()  # static kernels for this length (module docstring)
        doc_ids = equal_docs(1, s, docs, device)
        cos, sin = rotary(torch.arange(s, device=device))
        x = torch.randn(1, s, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
        q, k, v = (torch.randn(1, s, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
                   for d in (dqk, dqk, dv))
        for backend, label in BACKENDS.items():
            grad = backward_ok(backend, device)
            build = (lambda: None) if backend == "causal" else (lambda b=backend: DocumentMask.build(doc_ids, b))
            build_ms = median_ms(build, iters, warmup=2)
            mask = build()

            def core():
                if not grad:
                    return attend(backend, q.detach(), k.detach(), v.detach(), mask, attn.softmax_scale)
                attend(backend, q, k, v, mask, attn.softmax_scale).sum().backward()

            def layer():
                if not grad:
                    with torch.no_grad():
                        return attn(x, cos, sin, mask)
                attn(x, cos, sin, mask).sum().backward()

            core_ms, layer_ms = median_ms(core, iters, warmup=3), median_ms(layer, iters, warmup=3)
            peak = "-"
            if device.type == "cuda":
                del mask
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                mask = build()
                core()
                torch.cuda.synchronize()
                peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f}"
            mark = "" if grad else " (fwd only)"
            print(f"| {s} | {label}{mark} | {'-' if backend == 'causal' else f'{build_ms:.2f}'} | {core_ms:.2f} | "
                  f"{layer_ms:.2f} | {peak} |", flush=True)
            q.grad = k.grad = v.grad = x.grad = None
            attn.zero_grad(set_to_none=True)


def step_table(seq: int, docs: int, iters: int, device: torch.device, dtype: torch.dtype) -> None:
    config = dsv3.preset("tiny")
    torch._dynamo.reset()
    print(f"\n**Training step**: preset tiny ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_nextn_predict_layers} MTP), {dtype}, B = 1, S = {seq}, {docs} equal documents; "
          f"forward + backward + AdamW\n")
    print("| backend | step ms |")
    print("|---|---:|")
    tokens = torch.randint(2, config.vocab_size, (1, seq + 2), device=device)
    doc_ids = equal_docs(1, seq, docs, device)
    for backend, label in BACKENDS.items():
        if not backward_ok(backend, device):
            print(f"| {label} | n/a (no CPU backward) |")
            continue
        model = dsv3.build_model(config, device=device, dtype=dtype, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if backend != "causal":
            set_document_attention(backend)

        def step():
            out = model(tokens[:, :seq], future_tokens=tokens[:, seq:seq + 1], with_mtp=True,
                        doc_ids=None if backend == "causal" else doc_ids)
            loss = sum(F.cross_entropy(lg.flatten(0, 1).float(), tokens[:, 1 + d:seq + 1 + d].flatten())
                       for d, lg in enumerate([out.logits, *out.mtp_logits]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        print(f"| {label} | {median_ms(step, iters, warmup=3):.2f} |", flush=True)
    set_document_attention("auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--step-seq", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="CPU-sized shapes (the tiny preset's attention), 2 iterations")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, date {datetime.date.today()}")
    if args.smoke:
        layer_table(dsv3.preset("tiny"), [100, 256], 4, 2, device, torch.float32)
        step_table(256, 4, 2, device, torch.float32)
        return
    if device.type != "cuda":
        raise SystemExit("the full benchmark needs a CUDA GPU (use --smoke on the CPU)")
    layer_table(dsv3.preset("16b"), [int(s) for s in args.seqs.split(",")], args.docs, args.iters, device,
                torch.bfloat16)
    step_table(args.step_seq, args.docs, args.iters, device, torch.bfloat16)


if __name__ == "__main__":
    main()
