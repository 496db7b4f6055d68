"""Time to first token with and without the prefix cache: a shared system prompt and many different questions,
the benchmark shape of shared/benchmarks.md (the "16b" preset, random weights, bf16), measured in one run.

    PYTHONPATH=src python bench/prefix_cache.py [--system 2048] [--question 128] [--requests 32] [--reps 3]

Each round submits ``--requests`` prompts (the system prompt followed by a new random question each) at once;
time to first token = the engine steps until every request has its first token (prefills of at most
``max_prefill_tokens`` = 8192 prompt tokens per step, so without the cache several steps). Before the rounds one request with the system prompt has run on both engines, so the engine
with the cache holds the system prompt's pages (all but its last page, whose key includes the question's first
token). The questions are new every round, so only the system prompt can come from the cache.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import dsv3
from dsv3.inference import Engine, GenerationRequest, SamplingParams


def first_token_seconds(engine: Engine, prompts: list[list[int]]) -> tuple[float, list[int], list[int]]:
    """Seconds until every prompt has its first token; the tokens and the cached prompt tokens."""
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    results = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while not all(r.tokens for r in results):  # each step reads its tokens back: the clock keeps up with the GPU
        engine.step()
    secs = time.perf_counter() - t0
    while engine.scheduler.has_work:
        engine.step()
    return secs, [r.tokens[0] for r in results], [r.cached_tokens for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--system", type=int, default=2048)
    ap.add_argument("--question", type=int, default=128)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    config = dsv3.preset("16b")
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    system = tokens(args.system)
    n = args.system + args.question
    kw = dict(max_batch=args.requests, max_seq_len=n + 16, page_size=16)
    engines = {"off": Engine(model, prefix_caching=False, **kw), "on": Engine(model, **kw)}
    times: dict[str, list[float]] = {k: [] for k in engines}
    agree = total = 0
    for name, engine in engines.items():  # compile and capture every shape once, then the system prompt
        first_token_seconds(engine, [tokens(n) for _ in range(args.requests)])
        first_token_seconds(engine, [system + tokens(args.question)])
    for rep in range(args.reps + 1):  # round 0 warms the cached engine's continuation shapes
        prompts = [system + tokens(args.question) for _ in range(args.requests)]
        out = {name: first_token_seconds(engine, prompts) for name, engine in engines.items()}
        if rep:
            for name in engines:
                times[name].append(out[name][0])
            agree += sum(a == b for a, b in zip(out["off"][1], out["on"][1]))
            total += args.requests
        cached = out["on"][2]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {datetime.date.today()}; 16b, "
          f"random weights, bf16; {args.requests} requests of a {args.system}-token system prompt + a "
          f"{args.question}-token question; median of {args.reps}")
    print()
    print("| prefix cache | time to first token (s) | prompt tokens computed per request | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| off | {off:.3f} | {n} | |")
    print(f"| on | {on:.3f} | {n - cached[0]} | {off / on:.1f}x |")
    print(f"\nfirst tokens equal with and without the cache: {agree} of {total} (bf16: the cached run attends "
          f"over the same latents through the continuation path)")


if __name__ == "__main__":
    main()
