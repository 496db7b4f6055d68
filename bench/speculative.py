"""MTP speculative decoding against plain decoding at batch 1, both through the engine's CUDA graphs, measured in
one run (report §2.2; :mod:`dsv3.inference.speculative`).

    PYTHONPATH=src python bench/speculative.py [--layers 12] [--steps 1500] [--new 256] [--drafts 1,2,3]
                                               [--skip-train] [--skip-16b] [--breakdown]

1. **trained**: a ``tiny``-width model with ``--layers`` layers and one MTP module is trained here on the built-in
   corpus (the Python standard library) for ``--steps`` steps; then one greedy completion of ``--new`` tokens of
   a prompt from the corpus, plain and speculative with each number of drafts a step (``--drafts``): tokens/s,
   the drafts' acceptance (by position) and whether the outputs agree token for token (bf16);
2. **16b**: the benchmark shape of shared/benchmarks.md (random weights, so drafts are rarely right): the
   time of a plain decode step and of a speculative step with k drafts (verify [last token, k drafts] +
   accept + the MTP module's steps and next drafts, one graph) at batch 1, and the speed-up they imply at the
   report's 85% acceptance (each draft accepted with 0.85 if the ones before were: 1 + 0.85 + ... + 0.85^k
   tokens a step) x plain step / speculative step.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import tempfile
import time

import torch

import dsv3
from dsv3.inference import Engine, GenerationRequest, SamplingParams


def timed_generate(engine: Engine, prompt, new: int) -> tuple[float, list[int]]:
    """Seconds for tokens 2 .. new of one greedy completion (the prefill and first token excluded)."""
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    res = engine.submit(GenerationRequest(prompt, params))
    engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.scheduler.has_work:
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, res.tokens


def trained(args) -> None:
    from dsv3.runs import load_run_or_checkpoint
    from dsv3.train import TrainConfig, train

    out = tempfile.mkdtemp(prefix="spec-bench-")
    t0 = time.perf_counter()
    cfg = TrainConfig(preset="tiny", model={"num_hidden_layers": args.layers, "max_position_embeddings": 2048},
                      steps=args.steps, out=out, device="cuda", eval_every=10 ** 6, save_every=args.steps)
    train(cfg, log=lambda *a, **k: None)
    print(f"trained tiny x {args.layers} layers for {args.steps} steps in {time.perf_counter() - t0:.0f} s",
          flush=True)
    model, tokenizer = load_run_or_checkpoint(out, "cuda")
    prompt = "def main(argv=None):\n    parser = argparse.ArgumentParser("
    rows = {}
    for k in [0] + args.drafts:  # 0: plain decoding
        engine = Engine(model, tokenizer, max_batch=1, max_seq_len=args.new + 64, dtype="bfloat16",
                        speculative=k > 0, num_speculative_tokens=max(k, 1))
        timed_generate(engine, prompt, args.new)  # compile and capture
        if k:
            engine.speculator.drafted = engine.speculator.accepted = 0
            engine.speculator.accepted_at = [0] * k
        secs, tokens = timed_generate(engine, prompt, args.new)
        rows[k] = ((args.new - 1) / secs, tokens, engine.speculator)
        del engine
    plain = rows[0]
    print(f"\ntrained tiny x {args.layers} layers, batch 1, greedy, {args.new} tokens, bf16:")
    print("| decoding | tokens/s | speed-up | drafts accepted | by position | tokens agreeing with plain |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| plain | {plain[0]:.0f} | | | | |")
    for k in args.drafts:
        speed, tokens, sp = rows[k]
        steps = max(sp.drafted // k, 1)
        same = next((i for i, (a, b) in enumerate(zip(plain[1], tokens)) if a != b), len(plain[1]))
        print(f"| speculative ({k} MTP draft{'s' * (k > 1)}) | {speed:.0f} | {speed / plain[0]:.2f}x | "
              f"{sp.accepted / max(sp.drafted, 1):.0%} ({sp.accepted}/{sp.drafted}) | "
              f"{' / '.join(f'{a / steps:.0%}' for a in sp.accepted_at)} | first {same} of {len(plain[1])} |")


def step_costs(args) -> None:
    config = dsv3.preset("16b")
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
    times = {}
    for k in [0] + args.drafts:  # 0: plain decoding
        engine = Engine(model, max_batch=1, max_seq_len=args.prompt + 80, page_size=16, speculative=k > 0,
                        num_speculative_tokens=max(k, 1))
        timed_generate(engine, prompt, 16)  # compile and capture
        drafted = engine.speculator.drafted if k else 0
        secs, _ = timed_generate(engine, prompt, 64)
        steps = (engine.speculator.drafted - drafted) // k if k else 63
        times[k] = secs / steps * 1e3
        del engine
    print(f"\n16b, random weights, bf16, batch 1, {args.prompt}-token prompt:")
    print("| step | ms | x plain step | tokens a step at 85% acceptance | implied speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain decode step | {times[0]:.2f} | 1.00 | 1 | |")
    for k in args.drafts:
        ratio, expected = times[k] / times[0], sum(0.85 ** i for i in range(k + 1))
        print(f"| speculative step, {k} draft{'s' * (k > 1)} (verify {k + 1} tokens + accept + MTP steps) | "
              f"{times[k]:.2f} | {ratio:.2f} | {expected:.2f} | {expected / ratio:.2f}x |")


def breakdown(args) -> None:
    """Where a step's time goes at a small width (random weights: the cost of a step does not depend on them):
    wall time per step against the GPU's kernel time per step, plain and speculative."""
    from torch.profiler import ProfilerActivity, profile

    config = dsv3.preset("tiny")
    config.num_hidden_layers = args.layers
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    prompt = list(range(5, 69))
    print(f"\ntiny x {args.layers} layers, random weights, bf16, batch 1, per step:")
    print("| step | wall ms | kernel ms | kernels | host-bound ms (wall - kernel) |")
    print("|---|---:|---:|---:|---:|")
    tops: dict[str, dict[str, float]] = {}
    for name, spec in (("plain", False), ("speculative", True)):
        engine = Engine(model, max_batch=1, max_seq_len=512, page_size=16, speculative=spec)
        timed_generate(engine, prompt, 32)  # compile and capture
        params = SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True)
        engine.submit(GenerationRequest(prompt, params))
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 50 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 20 / 1e3
        print(f"| {name} | {wall:.3f} | {kernel_ms:.3f} | {len(kernels) / 20:.0f} | {wall - kernel_ms:.3f} |")
        counts = collections.Counter(e.name[:60] for e in kernels)
        tops[name] = {k: v / 20 for k, v in counts.items()}
        del engine
    extra = sorted(tops["speculative"], key=lambda k: tops["plain"].get(k, 0) - tops["speculative"][k])[:12]
    print("\n| kernel | per plain step | per speculative step |\n|---|---:|---:|")
    for k in extra:
        print(f"| {k} | {tops['plain'].get(k, 0):.0f} | {tops['speculative'][k]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--drafts", default="1,2,3", help="MTP drafts a speculative step, each measured")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-16b", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="only the wall / kernel time per step at --layers")
    args = ap.parse_args()
    args.drafts = [int(k) for k in args.drafts.split(",")]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {datetime.date.today()}",
          flush=True)
    if args.breakdown:
        return breakdown(args)
    if not args.skip_train:
        trained(args)
    if not args.skip_16b:
        step_costs(args)


if __name__ == "__main__":
    main()
