"""DualPipe's overlapped forward-backward on one GPU: each pair's two chunks on two CUDA streams at once, against
the same chunks one after the other, measured in one run (report §3.2.1; :mod:`dsv3.pipeline.overlap`).

    PYTHONPATH=src python bench/pipeline_overlap.py [--layers 4] [--seq 4096] [--micro 1] [--chunks 8] [--iters 8]

The model is the benchmark shape of shared/benchmarks.md (the ``16b`` preset, cut to ``--layers`` layers), fp32
master weights under bf16 autocast as the trainer runs it, cut into two pipeline stages. Rows:

- **pair**: the forward of micro-batch 1 through stage 2 (with the loss) together with the backward of
  micro-batch 0 through stage 1: the unit DualPipe overlaps;
- **DualPipeV step**: a whole step of ``--chunks`` micro-batches by the DualPipeV schedule with P = 1 (the V's two
  stages on this one GPU; every steady-state step is an F&B pair, weight gradients deferred to W chunks), run by
  the trainer's executor with and without :class:`~dsv3.pipeline.overlap.ChunkStreams`;
- **1F1B step** (reference, no pairs): the same micro-batches forward then backward one at a time.

One GPU has no all-to-all and no pipeline peer: what overlaps here is computation with computation (one chunk's
latency-bound kernels, norms, routing, element-wise work, in the gaps of the other's GEMMs). Gradients of the
overlapped and serial runs are compared (largest difference relative to the largest gradient).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsv3
from dsv3.pipeline import build_schedule
from dsv3.pipeline.executor import PipelineExecutor
from dsv3.pipeline.overlap import ChunkStreams
from dsv3.pipeline.stages import PipelineStage, split_layers
from dsv3.pipeline.weight_grad import WeightGradStore, defer_weight_gradients
from dsv3.train.batch import TrainBatch
from dsv3.train.step import cross_entropy_sum


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        return float("inf")
    scale = max(x.abs().max().item() for x in a)
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / scale


def timed(fn, iters: int) -> float:
    """Median wall time of ``fn`` (host enqueue included, the GPU drained at both ends), ms."""
    times = []
    for i in range(iters + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pair_bench(model, stages, batches, iters: int) -> tuple[float, float, float]:
    """(serial ms, overlapped ms, gradient difference) of F(mb 1, stage 2) together with B(mb 0, stage 1)."""
    first, second = stages
    n = batches[1].targets(0).numel()
    with autocast(), torch.no_grad():
        x1 = first(None, batches[1], False).detach()
    g0 = torch.randn_like(x1) * 1e-4
    streams = (torch.cuda.Stream(), torch.cuda.Stream())

    def run(overlap: bool) -> None:
        sf, sb = streams if overlap else (torch.cuda.current_stream(),) * 2
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(sb), autocast():  # set-up: micro-batch 0's forward through stage 1 (its graph)
            out0 = first(None, batches[0], False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(sf), autocast():
            logits = second(x1.requires_grad_(), batches[1], False)
            loss = cross_entropy_sum(logits[0], batches[1].targets(0)) / n
        with torch.cuda.stream(sb):
            out0.backward(g0)
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        times[overlap].append((time.perf_counter() - t0) * 1e3)
        del logits, loss

    times = {False: [], True: []}
    for overlap in (False, True):
        run(overlap)  # warm-up
        times[overlap].clear()
        model.zero_grad(set_to_none=True)
    reference = None
    for i in range(iters):
        for overlap in (False, True):  # interleaved, so clock drift hits both alike
            run(overlap)
            g = grads(model)
            if i == 0:
                if overlap:
                    diff = max_rel_diff(reference, g)
                else:
                    reference = g
    return statistics.median(times[False]), statistics.median(times[True]), diff


def step_bench(model, batches, schedule_name: str, store, overlap: bool, iters: int):
    sched = build_schedule(schedule_name, 1, len(batches))
    splits = split_layers(model.config, sched.n_model_stages)
    stage_map = {v: PipelineStage(model, sched.model_stage[v], sched.n_model_stages, splits[sched.model_stage[v]])
                 for v in sched.stages_of(0)}
    n = sum(b.targets(0).numel() for b in batches)
    d = model.config.hidden_size

    def loss_fn(logits, batch):
        return cross_entropy_sum(logits[0], batch.targets(0)) / n

    def hidden(m):
        return torch.Size((batches[m].tokens.shape[0], batches[m].seq_len, d)), torch.float32, torch.device("cuda")

    executor = PipelineExecutor(sched, 0, stage_map, None, store, ChunkStreams("cuda") if overlap else None)

    def step():
        executor.run(batches, hidden=hidden, loss_fn=loss_fn, with_mtp=False, autocast=autocast)

    ms = timed(step, iters)
    model.zero_grad(set_to_none=True)
    step()
    return ms, grads(model), torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--chunks", type=int, default=8, help="micro-batches per step (even)")
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    config = dsv3.preset("16b").replace(num_hidden_layers=args.layers, num_nextn_predict_layers=0)
    model = dsv3.build_model(config, device="cuda", dtype=torch.float32, seed=0).train()
    store = WeightGradStore()
    defer_weight_gradients(model, store)  # as the trainer does for the DualPipes (at once outside a W chunk)
    splits = split_layers(config, 2)
    stages = [PipelineStage(model, i, 2, splits[i]) for i in range(2)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [TrainBatch.from_window(torch.randint(0, config.vocab_size, (args.micro, args.seq + 1), device="cuda",
                                                    generator=gen), args.seq) for _ in range(args.chunks)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; 16b cut to {args.layers} layers "
          f"(stages: layers {splits[0].start}-{splits[0].stop - 1} | {splits[1].start}-{splits[1].stop - 1} + head), "
          f"fp32 master + bf16 autocast, micro-batch {args.micro} x {args.seq} tokens, {args.chunks} micro-batches "
          f"per step\n")
    print("| measurement | serial | overlapped (2 streams) | speed-up | gradients: max difference / max | peak memory |")
    print("|---|---|---|---|---|---|")
    serial, overlapped, diff = pair_bench(model, stages, batches, args.iters)
    print(f"| pair: F(mb 1, stage 2) + B(mb 0, stage 1) | {serial:.2f} ms | {overlapped:.2f} ms | "
          f"{serial / overlapped:.3f}x | {diff:.1e} | |", flush=True)
    tokens = args.chunks * args.micro * args.seq
    results = {}
    for overlap in (False, True):
        torch.cuda.reset_peak_memory_stats()
        results[overlap] = step_bench(model, batches, "dualpipev", store, overlap, args.iters)
    (s_ms, s_g, s_mem), (o_ms, o_g, o_mem) = results[False], results[True]
    print(f"| DualPipeV step (P = 1, {args.chunks} micro-batches) | {s_ms:.1f} ms ({tokens / s_ms:.1f}K tok/s) | "
          f"{o_ms:.1f} ms ({tokens / o_ms:.1f}K tok/s) | {s_ms / o_ms:.3f}x | {max_rel_diff(s_g, o_g):.1e} | "
          f"{s_mem:.1f} / {o_mem:.1f} GB |", flush=True)
    torch.cuda.reset_peak_memory_stats()
    r_ms, r_g, r_mem = step_bench(model, batches, "1f1b", store, False, args.iters)
    print(f"| 1F1B step (P = 1: F, B per micro-batch; reference) | {r_ms:.1f} ms ({tokens / r_ms:.1f}K tok/s) | | | "
          f"{max_rel_diff(r_g, s_g):.1e} vs DualPipeV serial | {r_mem:.1f} GB |")


if __name__ == "__main__":
    main()
