"""The engine's structure and hot path: one batched prefill per step, one host read per step, sampling on the
device, pages taken as sequences grow with preemption and recompute, weights replaced in place, one-way
layers. References: the model's own full forward and the engine's own plain paths (float32, CPU)."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

import dsv3
from conftest import host_reads, rand_tokens
from dsv3.inference import Engine, EngineConfig, GenerationRequest, ModelRunner, SamplingParams

PACKAGE = pathlib.Path(dsv3.__file__).parent / "inference"


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [rand_tokens(n, 200 + n) for n in (3, 11, 6, 17)]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
SAMPLED = [SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9 if i % 2 else 1.0, top_k=50 * (i % 3),
                          seed=i, ignore_eos=True) for i in range(len(PROMPTS))]


def _count(monkeypatch, obj, name):
    calls = []
    original = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: (calls.append(a), original(*a, **k))[1])
    return calls


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "padded"])
def test_one_prefill_forward_and_one_host_read_per_step(model, monkeypatch, params, cuda_graph):
    engine = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=cuda_graph)
    prefills = _count(monkeypatch, engine.runner, "prefill_padded")
    steps = 0
    results = [engine.submit(GenerationRequest(p, params if isinstance(params, SamplingParams) else params[i]))
               for i, p in enumerate(PROMPTS)]
    with host_reads(monkeypatch) as reads:
        while engine.scheduler.has_work:
            engine.step()
            steps += 1
    assert len(prefills) == 1  # the four prompts admitted together: one forward
    # one read of the new tokens per step; none elsewhere in the engine (on the CPU the model's own expert
    # loop, dsv3/model/moe.py, reads its counts: the reference path, not the GPU's grouped GEMMs)
    assert engine.host_reads == steps
    assert len([f for f in reads if "inference" in f]) == steps
    assert all(r.finish_reason == "length" and len(r.tokens) == 8 for r in results)


def test_sampled_tokens_do_not_depend_on_the_batch_or_the_path(model):
    alone = [Engine(model, max_batch=1, max_seq_len=48, page_size=4).generate([p], sp)[0].tokens
             for p, sp in zip(PROMPTS, SAMPLED)]
    for cuda_graph in (False, True):
        batch = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=cuda_graph)
        assert [r.tokens for r in batch.generate(PROMPTS, SAMPLED)] == alone
    unseeded = SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)
    engine = Engine(model, max_batch=2, max_seq_len=48, page_size=4)
    a, b = engine.generate([PROMPTS[0], PROMPTS[0]], unseeded)
    assert a.tokens != b.tokens  # each request draws its own seed


def test_preemption_and_recompute_give_the_same_tokens(model):
    """A cache too small for four growing sequences: the latest admitted are preempted, recomputed later,
    and every request still gets the tokens of an unconstrained run (greedy and seeded sampling)."""
    for params in (GREEDY, SAMPLED):
        ref = Engine(model, max_batch=4, max_seq_len=48, page_size=4).generate(PROMPTS, params)
        small = Engine(model, max_batch=4, max_seq_len=48, page_size=4, num_pages=12)
        got = small.generate(PROMPTS, params)
        assert small.scheduler.preemptions > 0
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        assert small.cache.num_free_pages == small.cache.num_pages and small.cache.num_free_slots == 4
    plain = [r.tokens for r in Engine(model, max_batch=4, max_seq_len=48, page_size=4).generate(PROMPTS, GREEDY)]
    for k in (1, 3):  # speculative: k + 1 verified positions and k - 1 further drafts a step
        spec = Engine(model, max_batch=4, max_seq_len=48, page_size=4, num_pages=10, speculative=True,
                      num_speculative_tokens=k)
        got = spec.generate(PROMPTS, GREEDY)
        assert spec.scheduler.preemptions > 0, k
        assert [r.tokens for r in got] == plain
        assert spec.cache.num_free_pages == spec.cache.num_pages


def test_pages_are_taken_as_sequences_grow(model):
    engine = Engine(model, max_batch=2, max_seq_len=64, page_size=4)
    engine.submit(GenerationRequest(PROMPTS[0], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)))
    engine.step()  # admitted: 3 prompt tokens, 1 page, not the 13 pages of prompt + max_new_tokens
    assert engine.cache.num_pages - engine.cache.num_free_pages == 1


def test_load_weights_gives_what_a_fresh_engine_gives(model):
    other = dsv3.build_model("tiny", seed=1)
    fresh = Engine(other, max_batch=2, max_seq_len=48, page_size=4).generate(PROMPTS[:2], GREEDY)
    engine = Engine(dsv3.build_model("tiny", seed=0), max_batch=2, max_seq_len=48, page_size=4, cuda_graph=True)
    before = engine.generate(PROMPTS[:2], GREEDY)
    engine.load_weights(dsv3.build_model("tiny", seed=1).state_dict())
    after = engine.generate(PROMPTS[:2], GREEDY)
    assert [r.tokens for r in after] == [r.tokens for r in fresh] != [r.tokens for r in before]
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights({"lm_head.weight": torch.zeros(3, 3)}, strict=False)
    with pytest.raises(KeyError, match="unknown"):
        engine.load_weights({"nope": torch.zeros(1)}, strict=False)


def test_config_is_one_dataclass_for_python_cli_and_server(model):
    cfg = EngineConfig(max_batch=2, max_seq_len=32, page_size=4)
    engine = Engine(model, config=cfg)
    assert engine.options is cfg and engine.max_seq_len == 32 and "decode experts" in engine.describe()
    with pytest.raises(TypeError):
        Engine(model, config=cfg, max_batch=3)
    for bad in ({"max_batch": 0}, {"dtype": "fp7"}, {"decode_experts": "fast"}):
        with pytest.raises(ValueError):
            EngineConfig(**bad)
    import argparse

    from dsv3.config_flags import add_arguments, values

    p = argparse.ArgumentParser()
    names = ("max_batch", "speculative", "compile", "graph_batch_sizes")
    add_arguments(p, EngineConfig, names)
    got = values(p.parse_args(["--max-batch", "3", "--no-compile", "--graph-batch-sizes", "1,2"]), EngineConfig, names)
    assert got == {"max_batch": 3, "speculative": False, "compile": False, "graph_batch_sizes": (1, 2)}
    assert "Sequences decoded together" in p.format_help()


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.add(node.module or "")
    return names


def test_layers_import_one_way_and_hold_no_engine():
    """runner, scheduler, sampler, speculative, graphs and kernels never import the engine (nor each other
    in a cycle), and nothing below the engine keeps a reference to it."""
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    for module, deps in graph.items():
        if module not in ("engine", "__init__"):
            assert "engine" not in deps, module

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, seen + (d,))) for d in graph.get(a, ()))

    assert not [m for m in graph if reaches(m, m)]
    engine = Engine(dsv3.build_model("tiny", seed=0), max_batch=2, max_seq_len=32, speculative=True, cuda_graph=True)
    for part in (engine.runner, engine.scheduler, engine.speculator, engine.runner.graphs, engine.cache):
        assert all(v is not engine for v in vars(part).values()), type(part).__name__
    assert isinstance(engine.speculator.runner, ModelRunner)


class _NoLowIds:
    """A toy constraint (host side): every token but the first 32."""

    def fill_bitmask(self, row):
        row.fill_(-1)
        row[0] = 0

    def accept(self, token):
        assert token >= 32

    def is_finished(self):
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["greedy", "sampled", "full"])
def test_gpu_decode_steps_sync_once(mode):
    """On the GPU, after the graphs are captured, a decode step synchronises with the host exactly once (the
    read of its new tokens), greedy, sampled or through the full path (penalties, bias, min-p, a constraint,
    logprobs)."""
    import warnings

    model = dsv3.build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    engine = Engine(model, max_batch=4, max_seq_len=64, page_size=8, cuda_graph=True)
    params = GREEDY if mode == "greedy" else SAMPLED
    full = dict(logprobs=3, frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.02, logit_bias={7: 2.0},
                min_tokens=2) if mode == "full" else {}
    for i, (p, sp) in enumerate(zip(PROMPTS, [params] * 4 if mode == "greedy" else params)):
        engine.submit(GenerationRequest(p, SamplingParams(**{**vars(sp), "max_new_tokens": 20, **full}),
                                        constraint=_NoLowIds() if full and i % 2 else None))
    for _ in range(3):  # admission, graph capture, compilation
        engine.step()
    syncs = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                engine.step()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) == 5, [str(w.message) for w in syncs]


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_the_models_absorbed_attention_equals_its_expanded_form(q_lora_rank):
    """MLA.absorbed over [c^KV; k^R] of every position (causal) gives MLA.forward's output (report §2.1.1)."""
    from dsv3.model.attention import MLA

    config = dsv3.preset("tiny")
    config.q_lora_rank = q_lora_rank
    torch.manual_seed(0)
    attn = MLA(config).double()
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.float64)
    model = dsv3.build_model("tiny", seed=0)
    cos, sin = (t.double() for t in model.rotary(torch.arange(7)))
    q_nope, q_pe = attn.query(x, cos, sin)
    kv, k_pe = attn.latent(x, cos, sin)
    visible = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 7, 7)
    got = attn.absorbed(q_nope, q_pe, torch.cat([kv, k_pe], dim=-1), visible)
    torch.testing.assert_close(got, attn(x, cos, sin), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------------
# prefix caching

SYSTEM = rand_tokens(13, 300)
QUESTIONS = [SYSTEM + rand_tokens(n, 310 + n) for n in (2, 5, 9)]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_prefix_cache_hits_give_the_tokens_of_misses(model, monkeypatch, speculative):
    kw = dict(max_batch=2, max_seq_len=48, page_size=4, speculative=speculative)
    for params in (GREEDY, SAMPLED[1]):
        off = Engine(model, prefix_caching=False, **kw)
        ref = [off.generate([q], params)[0] for q in QUESTIONS]
        on = Engine(model, **kw)
        computed = []
        run_prefill = on.runner.run_prefill
        monkeypatch.setattr(on.runner, "run_prefill",
                            lambda x, blocks, *a, **k: (computed.append(x.shape[1]), run_prefill(x, blocks, *a, **k))[1])
        got = [on.generate([q], params)[0] for q in QUESTIONS]
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        # the first request computes its prompt; the others find the system prompt's 3 full pages (12 tokens;
        # the 13th token of the system prompt is in each page key) and compute only the rest
        assert [r.cached_tokens for r in got] == [0, 12, 12] and all(r.cached_tokens == 0 for r in ref)
        main = computed[::2] if speculative else computed  # (the MTP block's prefill follows each main one)
        assert main == [len(QUESTIONS[0])] + [len(q) - 12 for q in QUESTIONS[1:]]
        assert on.cache.num_free_pages == on.cache.num_pages and on.cache.num_cached_pages > 0
        monkeypatch.undo()


def test_prefix_pages_are_shared_counted_and_evicted(model):
    engine = Engine(model, max_batch=2, max_seq_len=40, page_size=4, num_pages=12)
    cache = engine.cache
    long = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    a = engine.submit(GenerationRequest(QUESTIONS[0], long))
    engine.step()  # a admitted and its pages registered
    b = engine.submit(GenerationRequest(QUESTIONS[1], long))
    engine.step()  # b attaches a's three system-prompt pages while a still holds them
    assert b.cached_tokens == 12 and cache.pages[0][:3] == cache.pages[1][:3]
    while engine.scheduler.has_work:
        engine.step()
    assert a.tokens and b.tokens and cache.num_free_pages == cache.num_pages
    assert len(cache.match_prefix(QUESTIONS[2])) == 3  # idle, still cached
    # unrelated prompts take every page: the idle cached pages are evicted (least recently used first)
    engine.generate([rand_tokens(30, 400 + i) for i in range(3)], SamplingParams(max_new_tokens=6, temperature=0))
    assert cache.match_prefix(QUESTIONS[2]) == [] and cache.num_free_pages == cache.num_pages
    # new weights: the cached latents are stale, every prefix is forgotten
    engine.generate([QUESTIONS[0]], long)
    assert cache.num_cached_pages > 0
    engine.load_weights(model.state_dict())
    assert cache.num_cached_pages == 0 and cache.match_prefix(QUESTIONS[1]) == []


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED[1]], ids=["greedy", "sampled"])
def test_speculative_steps_read_the_host_once(model, monkeypatch, params, k):
    """Verify, acceptance and the next drafts of the whole batch, then one read (the padded CPU path)."""
    engine = Engine(model, max_batch=4, max_seq_len=64, page_size=4, cuda_graph=True, speculative=True,
                    num_speculative_tokens=k)
    long = SamplingParams(**{**vars(params), "max_new_tokens": 16})
    results = [engine.submit(GenerationRequest(p, long)) for p in PROMPTS]
    engine.step()  # admission: prefill, first tokens, the first drafts
    with host_reads(monkeypatch) as reads:
        for _ in range(3):
            engine.step()
    assert len([f for f in reads if "inference" in f]) == 3
    while engine.scheduler.has_work:
        engine.step()
    assert all(len(r.tokens) == 16 for r in results) and engine.speculator.drafted > 0


# ------------------------------------------------------------------------------------------------------
# chunked prefill

@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_chunked_prefill_gives_the_same_tokens_and_keeps_decoding(model, monkeypatch, speculative):
    """A prefill budget of 5 tokens per step: long prompts are prefilled over several steps (no forward sees
    more than 5 prompt tokens), the running sequences decode meanwhile, and every output is that of an
    unchunked run (greedy and seeded sampling; with the prefix cache too)."""
    kw = dict(max_batch=4, max_seq_len=48, page_size=4, speculative=speculative)
    for params in (GREEDY, SAMPLED):
        ref = Engine(model, **kw).generate(PROMPTS, params)
        engine = Engine(model, max_prefill_tokens=5, **kw)
        sizes = []
        prefill_batch = engine.runner.prefill_batch
        monkeypatch.setattr(engine.runner, "prefill_batch",
                            lambda slots, prompts: (sizes.append(sum(map(len, prompts))),
                                                    prefill_batch(slots, prompts))[1])
        got = engine.generate(PROMPTS, params)
        monkeypatch.undo()
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        assert max(sizes) <= 5 and sum(sizes) == sum(map(len, PROMPTS))
    # the first (3-token) request decodes while the 17-token prompt is still being prefilled
    engine = Engine(model, max_prefill_tokens=5, **kw)
    first = engine.submit(GenerationRequest(PROMPTS[0], GREEDY))
    last = engine.submit(GenerationRequest(PROMPTS[3], GREEDY))
    engine.step()
    engine.step()
    engine.step()
    assert len(first.tokens) >= 2 and not last.tokens
    while engine.scheduler.has_work:
        engine.step()
    assert last.tokens == Engine(model, **kw).generate([PROMPTS[3]], GREEDY)[0].tokens
