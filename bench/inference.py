"""Inference throughput on the benchmark shape of shared/benchmarks.md: the full "16b" preset, random weights,
bf16, 512-token prompts, 128 greedy new tokens (EOS ignored), against transformers' DeepseekV3ForCausalLM
holding the same weight tensors and against the HBM roofline, all measured in one run.

    python bench/inference.py [--batches 1,8,32] [--prompt 512] [--new 128] [--hf-new 128] [--skip-peer]

Decode tokens/s = batch x (new - 1) / time from the first generated token to the last (the prefill and the
first token excluded), the same for both: for dsv3 around the engine's steps (also with temperature 0.8 /
top-p 0.95 sampling, on the device inside the same CUDA graphs), for transformers
from a logits processor that stamps the time of every generated token inside ``model.generate``.
Prefill tokens/s = batch x prompt / time of one forward over the prompts (last-token logits only; dsv3
``ModelRunner.prefill_batch``, which also fills the latent cache; transformers ``model(ids, logits_to_keep=1)``).
Roofline: the bytes one decode step must read (activated weights: the experts that a batch touches,
expected under uniform routing, plus the latent cache) over the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import dsv3
from dsv3.inference import Engine, GenerationRequest, SamplingParams
from dsv3.info import model_stats


def timed(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of fn() (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps=10, warmup=2)
    src = dst = None  # free the 4 GiB before the models
    return 2 * n_bytes / t


def step_bytes(config: dsv3.ModelConfig, batch: int, context: int) -> float:
    """Bytes one decode step reads at least: activated matmul weights (bf16) with the routed experts that
    ``batch`` tokens touch (expected, uniform routing), plus the latent cache of ``batch`` sequences."""
    stats = model_stats(config)
    e, k = config.n_routed_experts, config.num_experts_per_tok
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    touched = e * (1 - (1 - k / e) ** batch)
    params = stats.activated_matmul_params + config.n_moe_layers * (touched - k) * per_expert
    cache = batch * context * config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    return 2 * params + cache


# --------------------------------------------------------------------------------------------------------
# dsv3

def dsv3_prefill(engine: Engine, prompts: list[list[int]]) -> float:
    def run():
        slots = [engine.cache.new_sequence() for _ in prompts]
        engine.runner.prefill_batch(slots, prompts)
        torch.cuda.synchronize()
        for slot in slots:
            engine.cache.free(slot)

    return timed(run)


SAMPLED = dict(temperature=0.8, top_p=0.95, seed=0)
"""The sampled rows' settings (a typical chat request)."""


def dsv3_decode(engine: Engine, prompts: list[list[int]], new: int, sampled: bool = False
                ) -> tuple[float, list[list[int]]]:
    """Seconds for steps 2 .. new of a greedy (or sampled) generation of ``new`` tokens per prompt, and the
    tokens."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, **(SAMPLED if sampled else {"temperature": 0}))
    results = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    engine.step()  # admits every prompt: prefill and first token
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.scheduler.has_work:
        engine.step()  # each step reads its greedy tokens back: the host clock is in step with the GPU
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [r.tokens for r in results]


# --------------------------------------------------------------------------------------------------------
# transformers, on the same tensors

def transformers_model(model: dsv3.DeepSeekV3):
    """transformers' DeepseekV3ForCausalLM built on the meta device, its parameters assigned our tensors
    (names: ``model.`` + ours, ``lm_head.weight`` as is; the stacked experts' layout is the same; our MTP
    module is left out): no second copy of the weights."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    hf_cfg = transformers.DeepseekV3Config(**model.config.to_hf_dict())
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    ours = {(k if k.startswith("lm_head.") else "model." + k): v
            for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    theirs = hf.state_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:8]
    bad = [k for k in ours if ours[k].shape != theirs[k].shape]
    assert not bad, bad[:8]
    hf.load_state_dict(ours, strict=True, assign=True)
    device = model.embed_tokens.weight.device
    with torch.device(device):  # its rotary frequencies are non-persistent buffers, still on meta
        hf.model.rotary_emb = DeepseekV3RotaryEmbedding(hf_cfg).to(device)
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation("grouped_mm")
    hf.generation_config.pad_token_id = model.config.eos_token_id
    hf.eval()
    shared = all(p.data_ptr() == q.data_ptr() for p, q in zip(
        (ours[k] for k in sorted(ours)), (hf.state_dict()[k] for k in sorted(ours))))
    return hf, shared


class StepClock:
    """A logits processor that stamps the (synchronised) time of every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def hf_generate(hf, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    from transformers import LogitsProcessorList

    clock = StepClock()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return clock.times[-1] - clock.times[0], out[:, ids.shape[1]:]


def hf_prefill(hf, ids: torch.Tensor) -> float:
    def run():
        with torch.inference_mode():
            hf(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)

    return timed(run)


# --------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hf-new", type=int, default=128, help="new tokens timed for transformers")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--no-eager", action="store_true", help="skip the dsv3 row without CUDA graphs")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = dsv3.preset("16b")
    stats = model_stats(config)
    bw = copy_bandwidth()
    try:
        import transformers

        peer_version = f", transformers {transformers.__version__}"
    except ImportError:
        peer_version = ""
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}{peer_version}, "
          f"date {datetime.date.today()}")
    print(f"16b: {stats.total_params / 1e9:.2f}B params, {stats.activated_matmul_params / 1e9:.2f}B activated "
          f"matmul params per token; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    t = time.perf_counter()
    model = dsv3.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    engine = Engine(model, max_batch=max(batches), max_seq_len=args.prompt + args.new, page_size=16)
    print(f"built in {time.perf_counter() - t:.0f} s; CUDA graphs: {engine.runner.graphs is not None}", flush=True)
    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(0, config.vocab_size, (max(batches), args.prompt), generator=g).tolist()
    rows = {}
    for b in batches:
        prompts = all_prompts[:b]
        r = rows[b] = {}
        r["prefill"] = b * args.prompt / dsv3_prefill(engine, prompts)
        dsv3_decode(engine, prompts, 4)  # warm-up: captures this batch's graph
        secs, _ = dsv3_decode(engine, prompts, args.new)
        r["decode"] = b * (args.new - 1) / secs
        dsv3_decode(engine, prompts, 4, sampled=True)  # warm-up of the sampling graph
        secs, _ = dsv3_decode(engine, prompts, args.new, sampled=True)
        r["sampled"] = b * (args.new - 1) / secs
        r["roofline"] = b * bw / step_bytes(config, b, args.prompt + args.new // 2)
        print(f"dsv3 batch {b}: decode {r['decode']:.1f} tok/s (sampled {r['sampled']:.1f}), "
              f"prefill {r['prefill']:.0f} tok/s "
              f"({len(engine.runner.graphs.steps) if engine.runner.graphs else 0} graphs)", flush=True)
    # Engine.generate end to end (admission, batched prefill, every step, detokenization-free results) for the
    # largest batch, against the raw prefill + decode time of the same batch measured above
    big = max(batches)
    for sampled in (False, True):
        params = SamplingParams(max_new_tokens=args.new, ignore_eos=True,
                                **(SAMPLED if sampled else {"temperature": 0}))
        t0 = time.perf_counter()
        engine.generate(all_prompts[:big], params)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        decode_rate = rows[big]["sampled" if sampled else "decode"]
        raw = big * args.prompt / rows[big]["prefill"] + big * args.new / decode_rate
        rows[big]["generate_sampled" if sampled else "generate"] = (secs, raw)
        print(f"Engine.generate of {big} requests ({'sampled' if sampled else 'greedy'}): {secs:.2f} s, raw prefill "
              f"+ decode {raw:.2f} s ({secs / raw - 1:+.0%})", flush=True)
    if not args.no_eager:
        eager = Engine(model, max_batch=1, max_seq_len=args.prompt + args.new, page_size=16, cuda_graph=False)
        secs, _ = dsv3_decode(eager, all_prompts[:1], 32)
        rows[1]["eager"] = 31 / secs
        print(f"dsv3 batch 1 without CUDA graphs: {rows[1]['eager']:.1f} tok/s", flush=True)
        del eager

    agree = ""
    if not args.skip_peer:
        hf, shared = transformers_model(model)
        print(f"transformers model on our tensors (shared storage: {shared})", flush=True)
        ids_all = torch.tensor(all_prompts, device="cuda")
        for b in batches:
            ids = ids_all[:b]
            rows[b]["hf_prefill"] = b * args.prompt / hf_prefill(hf, ids)
            secs, _ = hf_generate(hf, ids, args.hf_new)
            rows[b]["hf_decode"] = b * (args.hf_new - 1) / secs
            print(f"transformers batch {b}: decode {rows[b]['hf_decode']:.1f} tok/s, "
                  f"prefill {rows[b]['hf_prefill']:.0f} tok/s", flush=True)
        # greedy agreement on one prompt, and the first step's logits
        n_check = 16
        _, ours_tok = dsv3_decode(engine, all_prompts[:1], n_check)
        _, theirs_tok = hf_generate(hf, ids_all[:1], n_check)
        theirs_tok = theirs_tok[0].tolist()
        same = next((i for i, (a, c) in enumerate(zip(ours_tok[0], theirs_tok)) if a != c), n_check)
        slot = engine.cache.new_sequence()
        _, ours_logits = engine.runner.prefill(slot, all_prompts[0])
        engine.cache.free(slot)
        with torch.inference_mode():
            theirs_logits = hf(ids_all[:1], logits_to_keep=1).logits[0]
        diff = (ours_logits.float() - theirs_logits.float()).norm() / theirs_logits.float().norm()
        agree = (f"greedy tokens, one 512-token prompt: the first {same} of {n_check} agree "
                 f"(dsv3 {ours_tok[0][:8]}..., transformers {theirs_tok[:8]}...); first-step logits "
                 f"relative difference {diff:.2e}")
        print(agree, flush=True)

    print()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date {datetime.date.today()}; "
          f"16b, random weights, bf16, prompt {args.prompt}, {args.new} new tokens (transformers timed over "
          f"{args.hf_new}), greedy; copy bandwidth {bw / 1e12:.2f} TB/s")
    print()
    print("| batch | dsv3 decode tok/s | transformers decode tok/s | dsv3 / transformers | roofline tok/s | "
          "dsv3 % of roofline | dsv3 sampled decode tok/s | sampled / greedy | dsv3 prefill tok/s | "
          "transformers prefill tok/s | prefill ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b, r in rows.items():
        hd, hp = r.get("hf_decode"), r.get("hf_prefill")
        peer = [f"{hd:.1f}", f"{r['decode'] / hd:.1f}x"] if hd else ["-", "-"]
        peer_prefill = [f"{hp / 1e3:.1f}K", f"{r['prefill'] / hp:.2f}x"] if hp else ["-", "-"]
        cells = [str(b), f"{r['decode']:.1f}", *peer, f"{r['roofline']:.0f}", f"{r['decode'] / r['roofline']:.0%}",
                 f"{r['sampled']:.1f}", f"{r['sampled'] / r['decode']:.0%}", f"{r['prefill'] / 1e3:.1f}K",
                 *peer_prefill]
        print("| " + " | ".join(cells) + " |")
    if "eager" in rows.get(1, {}):
        print(f"\ndsv3 batch 1 without CUDA graphs (Engine(cuda_graph=False)): {rows[1]['eager']:.1f} tok/s")
    for key, what in (("generate", "greedy"), ("generate_sampled", "sampled")):
        if key in rows[big]:
            secs, raw = rows[big][key]
            print(f"Engine.generate, {big} requests, {what}: {secs:.2f} s against {raw:.2f} s of raw prefill + "
                  f"decode ({secs / raw - 1:+.0%})")
    if agree:
        print(agree)


if __name__ == "__main__":
    main()
