"""Online serving benchmark of the OpenAI-compatible server, in the manner of ``vllm bench serve``: many streaming
clients send random token-id prompts of a fixed length and ask for a fixed number of tokens (EOS ignored), and
the table reports throughput and latency percentiles per run.

    # against a running server (dsv3 serve ...)
    python bench/serve.py --base-url http://127.0.0.1:8000 --max-concurrency 1,8,32,64
    # or start one on a checkpoint, or on a preset with random weights (one command on a GPU)
    python bench/serve.py --preset 16b --random-weights --max-concurrency 1,8,32,64 --speculative
    python bench/serve.py --checkpoint runs/tiny --input-len 128 --output-len 32
    # CPU smoke run, a few seconds
    python bench/serve.py --preset tiny --random-weights --input-len 32 --output-len 8 --num-prompts 8 \\
        --max-concurrency 1,4 --max-batch 4

Prompts are token ids, so their lengths are exact (``--shared-prefix N``: every prompt starts with the same N
tokens, and the prefix cache serves them after the first request). Each run (one per ``--max-concurrency``
value) first sends ``--warmup-prompts`` other prompts (compilation and CUDA-graph capture happen there; with
``--shared-prefix`` twice, so that prompts continuing cached pages have run too), then
``--num-prompts`` requests, all at once or as a Poisson process of ``--request-rate`` requests/s, at most
``--max-concurrency`` in flight. Per request: time to first token (TTFT), time per output token after the
first (TPOT = (latency - TTFT) / (tokens - 1)), and the gaps between streamed chunks (ITL). The prefix cache's
hit rate and the speculative acceptance come from the server's ``/metrics`` (before / after each run).

A server started here runs in a child process (the clients' event loop would otherwise share the GIL with the
server's), on the GPU when there is one (``--device``). Random-weight models get a synthetic tokenizer with
one word per id, so every id has text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's dsv3

from dsv3.config_flags import add_arguments, values  # noqa: E402
from dsv3.inference.config import EngineConfig  # noqa: E402
from dsv3.loading import DeviceOptions  # noqa: E402

ENGINE_FLAGS = ("max_batch", "max_seq_len", "page_size", "num_pages", "prefix_caching", "max_prefill_tokens",
                "speculative", "compile", "cuda_graph", "decode_experts", "graph_batch_sizes",
                "max_prefill_graph_tokens")


# ----------------------------------------------------------------------------------------------------
# the server, when this script starts one

def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with one word per id (``<t123>``; 0 and 1 are DeepSeek-V3's BOS and EOS), for
    models without a tokenizer of their own: every id decodes to text, so every token is streamed."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    from dsv3.data.tokenizer import BOS, EOS, Tokenizer

    vocab = {BOS: 0, EOS: 1, **{f"<t{i}>": i for i in range(2, vocab_size)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=BOS))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(hf)


def _serve_in_child(args: dict, engine: EngineConfig, port: int) -> None:
    """The child process: build or load the model, serve it on 127.0.0.1:port until terminated."""
    import torch
    import uvicorn

    import dsv3
    from dsv3.inference import Engine
    from dsv3.inference.chat import ChatTemplate
    from dsv3.loading import DeviceOptions, resolve_device, resolve_dtype
    from dsv3.runs import model_name
    from dsv3.server import create_app

    if args["checkpoint"]:
        model, tok = dsv3.load(args["checkpoint"], args["device"], args["dtype"])
        template, name = ChatTemplate.load(tok, args["checkpoint"]), model_name(args["checkpoint"])
    else:
        device = resolve_device(args["device"])
        model = dsv3.build_model(args["preset"], device, resolve_dtype(args["dtype"], device), seed=0)
        tok = synthetic_tokenizer(model.config.vocab_size)
        template, name = None, f"{args['preset']}-random"
    threads = DeviceOptions(args["device"], args["dtype"], args["threads"]).cpu_threads(model)
    if threads is not None:
        torch.set_num_threads(threads)
    eng = Engine(model, tok, engine)
    print(f"engine: {eng.describe()}", file=sys.stderr, flush=True)
    app = create_app(eng, name, chat_template=template, num_threads=threads)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_server(args: argparse.Namespace, timeout: float = 1800.0):
    """A child process serving the model; returns (process, base URL) once /health answers."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = EngineConfig(**values(args, EngineConfig, ENGINE_FLAGS))
    if engine.max_seq_len is None:
        engine.max_seq_len = args.input_len + args.output_len
    child_args = {k: getattr(args, k) for k in ("checkpoint", "preset", "device", "dtype", "threads")}
    proc = multiprocessing.get_context("spawn").Process(target=_serve_in_child, args=(child_args, engine, port),
                                                        daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise SystemExit(f"the server process exited with code {proc.exitcode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


# ----------------------------------------------------------------------------------------------------
# the clients

@dataclass
class RequestOutcome:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int,
                      temperature: float) -> RequestOutcome:
    """One streamed completion, timed from sending it to each chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out = RequestOutcome(ok=False)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return out
                now = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    out.prompt_tokens, out.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if any(c["text"] for c in chunk["choices"]):
                    if out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
        out.latency = time.perf_counter() - start
        out.ok = out.output_tokens > 0
        if not out.ok:
            out.error = "no tokens"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out.error = f"{type(e).__name__}: {e}"
    return out


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, rate: float,
                   concurrency: int | None, temperature: float, seed: int) -> tuple[list[RequestOutcome], float]:
    """Send every prompt (Poisson arrivals at ``rate``/s, or all at once), at most ``concurrency`` in flight;
    returns the outcomes and the seconds from the first send to the last answer."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(prompts))
    limits = httpx.Limits(max_connections=(concurrency or len(prompts)) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=60.0), limits=limits) as client:
        async def limited(prompt):
            async with limit:
                return await one_request(client, url, model, prompt, output_len, temperature)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


def make_prompts(rng: random.Random, n: int, length: int, prefix: list[int], vocab: int) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids: ``prefix`` then random ids (ids below 10 left out: special tokens)."""
    low = min(10, vocab - 1)
    return [prefix + [rng.randrange(low, vocab) for _ in range(length - len(prefix))] for _ in range(n)]


def scrape(url: str) -> dict[str, float]:
    """The server's counters that the table reads (summed over labels); empty without /metrics."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(url + "/metrics", timeout=30).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out
    except Exception:  # a server without /metrics (or no prometheus_client here): no such columns
        return {}


# ----------------------------------------------------------------------------------------------------
# the report

def summarize(outcomes: list[RequestOutcome], duration: float, before: dict, after: dict,
              concurrency: int | None, rate: float) -> dict:
    ok = [o for o in outcomes if o.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
        ordered = sorted(values)
        q = lambda p: ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]  # noqa: E731
        return {"mean": 1e3 * statistics.fmean(values), "p50": 1e3 * q(0.5), "p99": 1e3 * q(0.99)}

    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    drafts, accepted = delta("vllm:spec_decode_num_draft_tokens_total"), delta("vllm:spec_decode_num_accepted_tokens_total")
    queries, hits = delta("vllm:prefix_cache_queries_total"), delta("vllm:prefix_cache_hits_total")
    inputs, outputs = sum(o.prompt_tokens for o in ok), sum(o.output_tokens for o in ok)
    return {
        "max_concurrency": concurrency, "request_rate": rate, "successful": len(ok), "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5], "duration_s": duration,
        "input_tokens": inputs, "output_tokens": outputs, "cached_tokens": sum(o.cached_tokens for o in ok),
        "output_tokens_per_s": outputs / duration, "total_tokens_per_s": (inputs + outputs) / duration,
        "ttft_ms": stats([o.ttft for o in ok]),
        "tpot_ms": stats([(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]),
        "itl_ms": stats([g for o in ok for g in o.itl]),
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "spec_acceptance": accepted / drafts if drafts else None,
    }


def table(rows: list[dict]) -> str:
    head = ("| concurrency | rate (req/s) | ok | failed | duration (s) | output tok/s | total tok/s | "
            "TTFT mean / p50 / p99 (ms) | TPOT mean / p50 / p99 (ms) | ITL mean / p50 / p99 (ms) | "
            "prefix cache hits | MTP acceptance |")
    lines = [head, "|" + "---:|" * head.count(" | ") + "---:|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    ms = lambda s: f"{s['mean']:.1f} / {s['p50']:.1f} / {s['p99']:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['max_concurrency'] or 'inf'} | {r['request_rate']:g} | {r['successful']} | {r['failed']} | "
                     f"{r['duration_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['total_tokens_per_s']:.1f} | "
                     f"{ms(r['ttft_ms'])} | {ms(r['tpot_ms'])} | {ms(r['itl_ms'])} | "
                     f"{pct(r['prefix_cache_hit_rate'])} | {pct(r['spec_acceptance'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dsv3.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_argument_group("the server").add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--checkpoint", help="start a server on this checkpoint (run or Hugging Face directory)")
    target.add_argument("--preset", choices=sorted(PRESETS), help="start a server on this preset (--random-weights)")
    ap.add_argument("--random-weights", action="store_true", help="with --preset: random weights (the only option)")
    ap.add_argument("--model", help="the model id to ask for (default: the server's only model)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="prompt ids are drawn below this (default: the model's vocabulary; 1000 with --base-url)")
    load = ap.add_argument_group("a server started here")
    add_arguments(load, DeviceOptions, ("device", "dtype", "threads"))
    add_arguments(load, EngineConfig, ENGINE_FLAGS, {"max_batch": 64})
    w = ap.add_argument_group("the workload")
    w.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request (default 1024)")
    w.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default 128)")
    w.add_argument("--num-prompts", type=int, default=200, help="requests per run (default 200)")
    w.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with (default 0)")
    w.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    w.add_argument("--max-concurrency", default=None, metavar="N,N,...",
                   help="requests in flight at most; one run per value (default: no limit, one run)")
    w.add_argument("--warmup-prompts", type=int, default=None,
                   help="requests before each run, not measured (default: the run's concurrency, at most 64)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    w.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.preset and not args.random_weights:
        ap.error("--preset needs --random-weights (or use --checkpoint)")
    if not 0 <= args.shared_prefix < args.input_len:
        ap.error("--shared-prefix must lie in [0, --input-len)")
    args.concurrencies = ([int(c) for c in args.max_concurrency.split(",")] if args.max_concurrency else [None])
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    proc = None
    if args.base_url:
        url = args.base_url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        model = args.model or card["id"]
        if args.input_len + args.output_len > card.get("max_model_len", math.inf):
            raise SystemExit(f"--input-len + --output-len > the server's max_model_len {card['max_model_len']}")
        vocab = args.vocab_size
        if vocab is None and args.preset:
            from dsv3.config import preset

            vocab = preset(args.preset).vocab_size
        vocab = vocab or 1000
        rng = random.Random(args.seed)
        prefix = make_prompts(rng, 1, args.shared_prefix, [], vocab)[0] if args.shared_prefix else []
        rows = []
        for concurrency in args.concurrencies:
            warm = args.warmup_prompts if args.warmup_prompts is not None else min(concurrency or 64, 64)
            # with a shared prefix a second round: its prompts continue cached pages (another compiled path)
            for _ in range(2 if warm and prefix else 1 if warm else 0):
                asyncio.run(run_load(url, model, make_prompts(rng, warm, args.input_len, prefix, vocab),
                                     args.output_len, float("inf"), concurrency, args.temperature, args.seed))
            prompts = make_prompts(rng, args.num_prompts, args.input_len, prefix, vocab)
            before = scrape(url)
            outcomes, duration = asyncio.run(run_load(url, model, prompts, args.output_len, args.request_rate,
                                                      concurrency, args.temperature, args.seed))
            rows.append(summarize(outcomes, duration, before, scrape(url), concurrency, args.request_rate))
            print(f"max concurrency {concurrency or 'inf'}: {rows[-1]['successful']}/{len(outcomes)} ok in "
                  f"{duration:.2f} s", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.join(30)
    print(f"model {model}; {args.num_prompts} requests per run of {args.input_len} prompt tokens "
          f"({args.shared_prefix} shared) and {args.output_len} output tokens, EOS ignored, temperature "
          f"{args.temperature:g}")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "concurrencies"},
                                               "model": model, "runs": rows}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
