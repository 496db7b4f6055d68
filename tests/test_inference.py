"""Inference engine: paged latent cache, absorbed decode, sampling, MTP speculative decoding, scheduling.

Every reference is the model's own full forward (``model(tokens).logits``) in float32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import dsv3
from conftest import rand_tokens
from dsv3.model.transformer_block import Block
from dsv3.inference import (
    CacheFullError, Engine, GenerationRequest, PagedLatentCache, SamplingParams, speculative_accept, token_probs,
)

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


class CharTokenizer:
    """Stand-in tokenizer: token i is the letter chr(97 + i % 26)."""

    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 + 26 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


# ------------------------------------------------------------------------------------------------------
# cache

def test_cache_pages_slots_and_errors():
    cache = PagedLatentCache(2, 8, 4, max_seqs=3, max_seq_len=20, page_size=4, num_pages=5)
    assert cache.latent.shape == (2, 6, 4, 12)  # one scratch page beyond the pool
    a, b = cache.new_sequence(), cache.new_sequence()
    assert cache.extend(a, 5) == 0 and cache.pages[a] == [0, 1]
    assert cache.extend(b, 3) == 0 and cache.pages[b] == [2]
    assert cache.extend(a, 3) == 5 and cache.pages[a] == [0, 1]  # fits the partly filled page
    assert cache.extend(b, 2) == 3 and cache.pages[b] == [2, 3]
    with pytest.raises(CacheFullError, match="out of cache pages"):
        cache.extend(a, 8)  # needs 2 more pages, 1 free
    assert cache.lengths[a] == 8 and cache.num_free_pages == 1  # unchanged by the failure
    cache.truncate(b, 4)
    assert cache.pages[b] == [2] and cache.num_free_pages == 2
    assert cache.block_table[b, 1] == cache.null_page
    cache.free(a)
    cache.free(b)
    assert cache.num_free_pages == 5 and cache.num_free_slots == 3
    with pytest.raises(CacheFullError, match="max_seq_len"):
        cache.extend(cache.new_sequence(), 21)


# ------------------------------------------------------------------------------------------------------
# prefill and absorbed decode against the full forward

@pytest.mark.parametrize("variant", ["tiny", "yarn-noqlora"])
def test_absorbed_decode_matches_full_forward(model, variant):
    if variant != "tiny":  # YaRN softmax scale and the uncompressed query path
        cfg = dsv3.preset("tiny").replace(
            q_lora_rank=None, max_position_embeddings=4096,
            rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        )
        model = dsv3.build_model(cfg, seed=1)
    tokens = rand_tokens(14, 0)
    ref = full_logits(model, tokens)
    engine = Engine(model, max_batch=1, max_seq_len=32, page_size=4)
    slot = engine.cache.new_sequence()
    _, logits = engine.runner.prefill(slot, tokens[:1])
    got = [logits[0]]
    for t in tokens[1:]:
        _, logits = engine.runner.decode([slot], [t])
        got.append(logits[0, 0])
    torch.testing.assert_close(torch.stack(got), ref, atol=TOL, rtol=0)


def test_incremental_prefill_continuation_and_multi_token_decode(model):
    tokens = rand_tokens(17, 1)
    ref = full_logits(model, tokens)
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4)
    slot = engine.cache.new_sequence()
    _, a = engine.runner.prefill(slot, tokens[:5], all_logits=True)
    _, b = engine.runner.prefill(slot, tokens[5:11], all_logits=True)  # prefix continuation
    _, c = engine.runner.decode([slot], [tokens[11:13]])  # two tokens at once (as speculative verification does)
    rest = []
    for t in tokens[13:]:
        rest.append(engine.runner.decode([slot], [t])[1][0])
    got = torch.cat([a, b, c[0]] + rest)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert engine.cache.lengths[slot] == 17


def test_paged_batch_of_mixed_lengths_equals_each_alone(model):
    seqs = [rand_tokens(n, 10 + n) for n in (12, 7, 15)]
    engine = Engine(model, max_batch=3, max_seq_len=24, page_size=4)
    slots = [engine.cache.new_sequence() for _ in seqs]
    # interleave the prefills so that every sequence's pages are scattered through the pool
    prefix = [3, 1, 6]
    for slot, toks, n in zip(slots, seqs, prefix):
        engine.runner.prefill(slot, toks[:n])
    for slot, toks, n in zip(slots, seqs, prefix):
        engine.runner.prefill(slot, toks[n:n + 2])
    assert engine.cache.pages[slots[0]] == [0, 4]  # not contiguous
    # batched decode of all three, each at its own length
    pos = [n + 2 for n in prefix]
    for _ in range(3):
        _, logits = engine.runner.decode(slots, [toks[p] for toks, p in zip(seqs, pos)])
        for row, (toks, p) in enumerate(zip(seqs, pos)):
            torch.testing.assert_close(logits[row, 0], full_logits(model, toks[:p + 1])[-1], atol=TOL, rtol=0)
        pos = [p + 1 for p in pos]


# ------------------------------------------------------------------------------------------------------
# generation, sampling and stopping

def test_generate_greedy_matches_full_forward_argmax(model):
    prompt = rand_tokens(6, 2)
    engine = Engine(model, max_batch=2, max_seq_len=64, page_size=8)
    res = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert res.tokens == seq[6:]
    assert (res.finish_reason, res.prompt_tokens, res.completion_tokens) == ("length", 6, 6)
    assert engine.cache.num_free_pages == engine.cache.num_pages


def test_seeded_sampling_reproducible_and_independent_of_batch(model):
    engine = Engine(model, max_batch=4, max_seq_len=64, page_size=4)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    prompt = rand_tokens(5, 3)
    alone = engine.generate([prompt], p)[0].tokens
    others = [(rand_tokens(n, 20 + n), SamplingParams(max_new_tokens=n, temperature=0.7, seed=n, ignore_eos=True))
              for n in (3, 9, 14)]
    batch = engine.generate([others[0][0], prompt, others[1][0], others[2][0]],
                            [others[0][1], p, others[1][1], others[2][1]])
    assert batch[1].tokens == alone
    assert engine.generate([prompt], p)[0].tokens == alone
    other_seed = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=124, ignore_eos=True)
    assert engine.generate([prompt], other_seed)[0].tokens != alone


def test_top_k_and_top_p_restrict_support(model):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = token_probs(logits, SamplingParams(top_k=3))
    assert (probs > 0).nonzero().flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)  # 0.561, 0.206, 0.125, 0.076, ...: cumulative 0.561, 0.767, 0.892, 0.968
    assert (token_probs(logits, SamplingParams(top_p=0.5)) > 0).sum() == 1
    assert (token_probs(logits, SamplingParams(top_p=0.75)) > 0).sum() == 2
    assert (token_probs(logits, SamplingParams(top_p=0.8)) > 0).sum() == 3
    assert (token_probs(logits, SamplingParams(top_p=0.95)) > 0).sum() == 4
    torch.testing.assert_close(token_probs(logits, SamplingParams()), full)
    greedy = token_probs(logits, SamplingParams(temperature=0))
    assert greedy.tolist() == [1.0, 0, 0, 0, 0, 0]

    # in the engine: every sampled token lies in the top-k of the full forward's logits
    engine = Engine(model, max_batch=1, max_seq_len=32, page_size=4)
    prompt = rand_tokens(4, 4)
    params = SamplingParams(max_new_tokens=5, temperature=2.0, top_k=3, seed=0, ignore_eos=True)
    res = engine.generate([prompt], params)[0]
    ref = full_logits(model, prompt + res.tokens)
    for i, t in enumerate(res.tokens):
        assert t in ref[len(prompt) - 1 + i].topk(3).indices.tolist()


def test_stop_ids_strings_and_length(model):
    tok = CharTokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=2, max_seq_len=40, page_size=4)
    prompt = rand_tokens(5, 5)
    base = engine.generate([prompt], GREEDY)[0]
    assert base.finish_reason == "length" and len(base.tokens) == 12
    assert base.text == tok.decode(base.tokens)

    k = next(i for i in range(2, 12) if base.tokens[i] not in base.tokens[:i])
    stop_id = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[base.tokens[k]])
    res = engine.generate([prompt], stop_id)[0]
    assert res.finish_reason == "stop" and res.tokens == base.tokens[:k + 1]
    assert res.text == tok.decode(base.tokens[:k])  # the stop token is not in the text

    stop_text = tok.decode(base.tokens[3:5])
    first = base.text.find(stop_text)
    res = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True,
                                                   stop=["zzzzzz", stop_text]))[0]
    assert res.finish_reason == "stop" and res.text == base.text[:first]
    assert len(res.tokens) == first + 2

    # EOS (the tokenizer's) stops unless ignored
    eos_engine = Engine(model, tokenizer=tok, max_batch=1, max_seq_len=40, page_size=4)
    eos_engine.eos_id = base.tokens[k]
    res = eos_engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert res.finish_reason == "stop" and res.tokens == base.tokens[:k + 1]

    # max_seq_len caps the completion
    short = Engine(model, max_batch=1, max_seq_len=9, page_size=4)
    res = short.generate([prompt], GREEDY)[0]
    assert res.finish_reason == "length" and res.tokens == base.tokens[:4]


def test_streaming_yields_every_token_and_text(model):
    tok = CharTokenizer()
    engine = Engine(model, tokenizer=tok, max_batch=2, max_seq_len=40, page_size=4)
    prompts = ["hello", "abc"]
    params = [SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True, stop=["q"])]
    events = list(engine.stream(prompts, params))
    results = engine.generate(prompts, params)
    by_prompt = {}
    for e in events:
        by_prompt.setdefault(e.request_id, []).append(e)
    streamed = list(by_prompt.values())
    for evs, res in zip(streamed, results):
        assert [e.token for e in evs] == res.tokens
        assert "".join(e.text for e in evs) == res.text
        assert [e.finish_reason for e in evs[:-1]] == [None] * (len(evs) - 1)
        assert evs[-1].finish_reason == res.finish_reason
    # abandoning the iterator cancels what is still running
    stream = engine.stream(prompts, params)
    next(stream)
    stream.close()
    assert not engine.scheduler.has_work and engine.cache.num_free_pages == engine.cache.num_pages


# ------------------------------------------------------------------------------------------------------
# speculative decoding with the MTP module

PROMPTS = [rand_tokens(n, 30 + n) for n in (3, 9, 17)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(model, k):
    """k drafts a step (the MTP module chained on its own output for k > 1): plain greedy, token for token."""
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    plain = Engine(model, max_batch=3, max_seq_len=64, page_size=4).generate(PROMPTS, params)
    spec_engine = Engine(model, max_batch=3, max_seq_len=64, page_size=4, speculative=True,
                         num_speculative_tokens=k)
    assert spec_engine.cache.n_layers == model.config.num_hidden_layers + 1
    spec = spec_engine.generate(PROMPTS, params)
    for a, b in zip(plain, spec):
        assert b.tokens == a.tokens and b.finish_reason == "length"
        assert b.draft_tokens == k * (b.forward_passes - 1) and 0 <= b.acceptance_rate <= 1
        assert b.tokens_per_forward == len(b.tokens) / b.forward_passes
    assert spec_engine.cache.num_free_pages == spec_engine.cache.num_pages
    assert sum(spec_engine.speculator.accepted_at) == spec_engine.speculator.accepted
    # a sequence that reaches max_seq_len (the verify step writes k positions past the last token)
    short = Engine(model, max_batch=1, max_seq_len=12, page_size=4, speculative=True, num_speculative_tokens=k)
    res = short.generate([PROMPTS[1]], params)[0]
    assert res.finish_reason == "length" and res.tokens == plain[1].tokens[:3]


def oracle_drafts(speculator, truth: dict[tuple, list[int]], every: int = 2) -> None:
    """Replace the speculator's drafts, every ``every``-th time, by the right tokens of ``truth`` (the random
    tiny model's MTP module is never right), so that accepted drafts happen."""
    original, calls = speculator._set_drafts, {"n": 0}

    def oracle(seqs, drafts, q):
        original(seqs, drafts, q)
        for seq in seqs:
            calls["n"] += 1
            done = seq.mtp_len + 1 - len(seq.prompt)  # completion index of the first drafted token
            right = truth[tuple(seq.prompt)][done:done + len(seq.draft)]
            if calls["n"] % every == 1 and right:
                seq.draft = right + seq.draft[len(right):]

    speculator._set_drafts = oracle


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_accepts_correct_drafts(model, k):
    """With drafts replaced by an oracle (right on every other step), the output is still plain greedy,
    accepted drafts give up to k + 1 tokens per forward, mixed accept/reject rows share one MTP batch, and
    the acceptance counts by draft position add up."""
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain = Engine(model, max_batch=3, max_seq_len=64, page_size=4).generate(PROMPTS, params)
    truth = {tuple(p): r.tokens for p, r in zip(PROMPTS, plain)}
    engine = Engine(model, max_batch=3, max_seq_len=64, page_size=4, speculative=True, num_speculative_tokens=k)
    oracle_drafts(engine.speculator, truth)
    results = engine.generate(PROMPTS, params)
    for a, b in zip(plain, results):
        assert b.tokens == a.tokens
        assert b.accepted_tokens > 0
    assert sum(r.tokens_per_forward for r in results) / 3 > (1.2 if k == 1 else 1.6)
    assert 0.2 < sum(r.acceptance_rate for r in results) / 3 < 0.9
    spec = engine.speculator
    assert sum(spec.accepted_at) == spec.accepted and spec.accepted_at == sorted(spec.accepted_at, reverse=True)
    if k > 1:
        assert spec.accepted_at[k - 1] > 0  # all k accepted at times: the bonus token after them
    assert engine.cache.num_free_pages == engine.cache.num_pages


def test_speculative_k_drafts_chain_the_mtp_module(model):
    """The further drafts are the MTP module run again at the next position on its own output hidden state and
    the draft before (greedy: the argmax of each), checked against the module's plain forward over the same
    inputs."""
    engine = Engine(model, max_batch=1, max_seq_len=64, page_size=4, speculative=True, num_speculative_tokens=3)
    prompt = PROMPTS[1]
    res = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2, temperature=0,
                                                                 ignore_eos=True)))
    engine.step()  # prefill, first token, the first drafts
    seq = engine.scheduler.running[0]
    tokens = prompt + res.tokens  # positions 0 .. L, t_L the first sampled token
    mtp, emb = model.mtp[0], model.embed_tokens
    with torch.no_grad():
        h = model(torch.tensor([tokens[:-1]])).hidden  # the main model's final states at 0 .. L-1
        x = mtp.combine(h, emb(torch.tensor([tokens[1:]])))  # position i with t_{i+1}
        drafts = []
        for _ in range(3):  # the module's block over every position so far; the last one's output drafts
            cos, sin, _ = model.position_inputs(x.shape[1], x.device)
            y = Block.forward(mtp, x, cos, sin)
            drafts.append(int(model.lm_head(mtp.shared_head.norm(y[0, -1])).argmax()))
            x = torch.cat([x, mtp.combine(y[:, -1:], emb(torch.tensor([drafts[-1:]])))], dim=1)
    assert seq.draft == drafts


def test_speculative_sampling_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts = torch.zeros(4)
    n = 6000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        _, token = speculative_accept(p, q, draft, g)
        counts[token] += 1
    torch.testing.assert_close(counts / n, p, atol=0.025, rtol=0)
    # greedy (one-hot) drafts: accepted iff the draft is the target's argmax
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert speculative_accept(one_hot, None, 1, g) == (True, 1)
    assert speculative_accept(one_hot, None, 2, g) == (False, 1)


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_seeded_runs(model, k):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
    engine = Engine(model, max_batch=3, max_seq_len=64, page_size=4, speculative=True, num_speculative_tokens=k)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS[::-1], params)[::-1]
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert all(len(r.tokens) == 8 and r.finish_reason == "length" for r in a)


# ------------------------------------------------------------------------------------------------------
# continuous batching

def test_scheduler_runs_more_requests_than_max_batch(model):
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    prompts = [rand_tokens(n, 40 + n) for n in (2, 7, 3, 12, 5)]
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4, num_pages=9)
    sched = engine.scheduler
    results = [engine.submit(GenerationRequest(p, params)) for p in prompts]
    max_running = 0
    while sched.has_work:
        engine.step()
        max_running = max(max_running, len(sched.running))
        assert engine.cache.num_free_pages >= 0
    assert max_running == 2
    assert all(r.finish_reason == "length" and len(r.tokens) == 4 for r in results)
    alone = Engine(model, max_batch=1, max_seq_len=32, page_size=4)
    for p, r in zip(prompts, results):
        assert alone.generate([p], params)[0].tokens == r.tokens
    assert engine.cache.num_free_pages == engine.cache.num_pages


def test_scheduler_cancel_frees_pages(model):
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4)
    sched = engine.scheduler
    reqs = [GenerationRequest(rand_tokens(6, 50 + i), params) for i in range(3)]
    results = [engine.submit(r) for r in reqs]
    engine.step()
    engine.step()
    assert len(sched.running) == 2 and len(sched.waiting) == 1
    assert engine.cache.num_free_pages < engine.cache.num_pages
    engine.cancel(reqs[0].request_id)  # running
    engine.cancel(reqs[2].request_id)  # still waiting
    events = engine.step()
    assert {e.request_id for e in events if e.finish_reason == "cancelled"} == {reqs[0].request_id, reqs[2].request_id}
    assert results[0].finish_reason == results[2].finish_reason == "cancelled"
    assert len(sched.running) == 1 and not sched.waiting
    while sched.has_work:
        engine.step()
    assert results[1].finish_reason == "length" and len(results[1].tokens) == 20
    assert engine.cache.num_free_pages == engine.cache.num_pages
    assert engine.cache.num_free_slots == 2


def test_scheduler_rejects_requests_that_cannot_fit(model):
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4, num_pages=3)
    with pytest.raises(CacheFullError):
        engine.submit(GenerationRequest(rand_tokens(6, 0), SamplingParams(max_new_tokens=20)))
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(GenerationRequest(rand_tokens(40, 0), SamplingParams()))


# ------------------------------------------------------------------------------------------------------
# batched prefill and the fixed-shape (CUDA-graph) decode step

def test_batched_prefill_equals_one_at_a_time(model):
    prompts = [rand_tokens(n, 60 + n) for n in (9, 3, 14)]
    one = Engine(model, max_batch=3, max_seq_len=32, page_size=4)
    batch = Engine(model, max_batch=3, max_seq_len=32, page_size=4)
    slots = [batch.cache.new_sequence() for _ in prompts]
    got = batch.runner.prefill_batch(slots, prompts)
    for slot, p, (h, logits) in zip(slots, prompts, got):
        ref_h, ref_logits = one.runner.prefill(one.cache.new_sequence(), p)
        torch.testing.assert_close(h, ref_h, atol=TOL, rtol=0)
        torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0)
        assert batch.cache.lengths[slot] == len(p)
    # the padding wrote to the scratch page only: decoding continues exactly as after separate prefills
    nxt = [p[0] for p in prompts]
    torch.testing.assert_close(batch.runner.decode(slots, nxt)[1], one.runner.decode([0, 1, 2], nxt)[1], atol=TOL, rtol=0)


def test_padded_step_matches_plain_decode_and_writes_only_scratch(model):
    """Engine(cuda_graph=True) on the CPU runs the graph's padded fixed-shape step eagerly: 3 sequences
    padded to a batch of 4, keys padded to a power-of-two bucket of pages."""
    seqs = [rand_tokens(n, 70 + n) for n in (5, 11, 2)]
    engines = [Engine(model, max_batch=6, max_seq_len=40, page_size=4, cuda_graph=g) for g in (False, True)]
    plain, padded = engines
    assert plain.runner.graphs is None and padded.runner.graphs.batch_sizes == [1, 2, 4, 6]
    for eng in engines:
        for toks in seqs:
            eng.runner.prefill(eng.cache.new_sequence(), toks[:-1])
    slots, last = [0, 1, 2], [toks[-1] for toks in seqs]
    before = padded.cache.latent.clone()
    _, ref = plain.runner.decode(slots, last)
    h, logits, greedy = padded.runner.decode_step(slots, last)
    # batch 4, keys 16 (max length 12)
    assert logits.shape == ref.shape and (4, 1, 16, "greedy") in padded.runner.graphs.steps
    torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)
    assert greedy.tolist() == ref[:, -1].argmax(-1).tolist()
    cache = padded.cache
    changed = (padded.cache.latent != before).any(-1).any(0)  # (pages + 1, page_size)
    expected = torch.zeros_like(changed)
    for slot, toks in zip(slots, seqs):
        pos = len(toks) - 1
        expected[cache.pages[slot][pos // 4], pos % 4] = True
    assert changed[:-1].equal(expected[:-1])  # live pages: exactly the three new positions
    assert changed[cache.null_page].any()  # the padded row wrote to the scratch page


def test_padded_step_generation_equals_plain(model):
    params = SamplingParams(max_new_tokens=9, temperature=0, ignore_eos=True)
    prompts = [rand_tokens(n, 80 + n) for n in (2, 7, 3, 12, 5)]
    plain = Engine(model, max_batch=4, max_seq_len=40, page_size=4).generate(prompts, params)
    padded = Engine(model, max_batch=4, max_seq_len=40, page_size=4, cuda_graph=True)
    assert [r.tokens for r in padded.generate(prompts, params)] == [r.tokens for r in plain]
    spec = Engine(model, max_batch=4, max_seq_len=40, page_size=4, cuda_graph=True, speculative=True)
    assert [r.tokens for r in spec.generate(prompts, params)] == [r.tokens for r in plain]
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    a = Engine(model, max_batch=4, max_seq_len=40, page_size=4).generate(prompts[:3], sampled)
    b = Engine(model, max_batch=4, max_seq_len=40, page_size=4, cuda_graph=True).generate(prompts[:3], sampled)
    assert [r.tokens for r in a] == [r.tokens for r in b]


# ------------------------------------------------------------------------------------------------------
# on the GPU: captured CUDA graphs against the plain path

def _gpu_engines(model, **kw):
    return [Engine(model, max_batch=4, max_seq_len=64, page_size=8, cuda_graph=g, **kw) for g in (False, True)]


@pytest.mark.gpu
def test_cuda_graph_decode_matches_plain_float32():
    model = dsv3.build_model("tiny", seed=0).cuda()
    plain, graphed = _gpu_engines(model)
    prompts = [rand_tokens(n, 90 + n) for n in (4, 9, 6)]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    ref = plain.generate(prompts, params)
    got = graphed.generate(prompts, params)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert any(step.graph is not None for step in graphed.runner.graphs.steps.values())
    assert graphed.cache.num_free_pages == graphed.cache.num_pages
    spec = Engine(model, max_batch=4, max_seq_len=64, page_size=8, speculative=True, cuda_graph=True)
    assert [r.tokens for r in spec.generate(prompts, params)] == [r.tokens for r in ref]


@pytest.mark.gpu
def test_cuda_graph_decode_bf16_logits_close_and_used_by_default():
    model = dsv3.build_model("tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    plain, graphed = _gpu_engines(model)
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert (Engine(model, max_batch=2, max_seq_len=32).runner.graphs is not None) == hopper  # automatic on Hopper
    assert graphed.runner.decode_experts == ("few_rows" if hopper else "module")
    prompts = [rand_tokens(n, 100 + n) for n in (5, 8)]
    prefilled = [[eng.runner.prefill(eng.cache.new_sequence(), p) for p in prompts] for eng in (plain, graphed)]
    assert graphed.runner.prefill_graphs.steps[(1, 16)].graph is not None  # both prompts padded to 16 tokens
    for (h_ref, l_ref), (h, logits) in zip(*prefilled):
        assert h.shape == h_ref.shape
        torch.testing.assert_close(logits.float(), l_ref.float(), atol=0.05, rtol=0.02)
    _, ref = plain.runner.decode([0, 1], [3, 4])
    _, got = graphed.runner.decode([0, 1], [3, 4])
    assert graphed.runner.graphs.steps[(2, 1, 16, "greedy")].graph is not None
    torch.testing.assert_close(got.float(), ref.float(), atol=0.05, rtol=0.02)


def test_sort_by_expert_equals_stable_argsort():
    from dsv3.inference.moe import sort_by_expert

    g = torch.Generator().manual_seed(0)
    for n, e in [(1, 4), (6, 64), (192, 64), (300, 5), (5000, 64)]:  # counting sort, and argsort above 2048
        ids = torch.randint(0, e, (n,), generator=g)
        order, place, counts = sort_by_expert(ids, e)
        assert order.equal(ids.argsort(stable=True))
        assert order[place].equal(torch.arange(n))
        assert counts.equal(torch.bincount(ids, minlength=e))


@pytest.mark.slow
def test_compiled_decode_matches_plain(model):
    """torch.compile of the decode block (the default with CUDA graphs on a GPU), here on the CPU: same
    greedy tokens, logits within float32 rounding, and the cache written in place (no copies)."""
    prompts = [rand_tokens(n, 110 + n) for n in (6, 3, 9)]
    plain = Engine(model, max_batch=4, max_seq_len=40, page_size=4)
    compiled = Engine(model, max_batch=4, max_seq_len=40, page_size=4, cuda_graph=True, compile=True)
    for eng in (plain, compiled):
        for p in prompts:
            eng.runner.prefill(eng.cache.new_sequence(), p)
    for tokens in ([3, 4, 5], [6, 7, 8]):
        _, ref = plain.runner.decode([0, 1, 2], tokens)
        _, got = compiled.runner.decode([0, 1, 2], tokens)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    live = slice(0, compiled.cache.null_page)  # the padded row (batch 3 -> 4) wrote to the scratch page
    torch.testing.assert_close(compiled.cache.latent[:, live], plain.cache.latent[:, live], atol=TOL, rtol=0)


@pytest.mark.gpu
def test_few_rows_triton_kernel_matches_float64_reference():
    """The decode experts' Triton kernel: empty experts, experts with more rows than one row tile, and
    sizes that are not multiples of its blocks."""
    from dsv3.kernels.few_rows import grouped_mm_few_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    for counts, n, k in [([1, 0, 0, 2, 3, 0], 2816, 2048), ([0, 40, 1, 0, 17], 100, 200), ([5], 64, 128)]:
        counts_t = torch.tensor(counts, device="cuda")
        x = torch.randn(sum(counts), k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(len(counts), n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
        y = grouped_mm_few_rows(x, w, counts_t.cumsum(0).to(torch.int32))
        expert = torch.repeat_interleave(torch.arange(len(counts), device="cuda"), counts_t)
        ref = torch.einsum("mk,mnk->mn", x.double(), w[expert].double())
        assert torch.isfinite(y).all()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_decode_experts_kernels_match_float64_reference():
    """Routed + shared experts of a few tokens without a sort: one token (the batch-1 step), several
    tokens sharing experts, the most tokens it takes, no shared experts, sizes not multiples of its blocks."""
    from dsv3.inference.triton_moe import moe_decode_experts

    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g)

    def mlp(x, w13, w2):
        gate, up = (x @ w13.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2.T

    for t, e, k, d, inter, pieces in [(1, 64, 6, 2048, 1408, 2), (5, 6, 3, 200, 72, 1), (16, 8, 2, 128, 64, 0)]:
        x = torch.randn(t, d, **kw).bfloat16()
        ids = torch.stack([torch.randperm(e, **kw)[:k] for _ in range(t)])
        w13 = (torch.randn(e, 2 * inter, d, **kw) / d ** 0.5).bfloat16()
        w2 = (torch.randn(e, d, inter, **kw) / inter ** 0.5).bfloat16()
        ws13 = (torch.randn(2 * inter * pieces, d, **kw) / d ** 0.5).bfloat16() if pieces else None
        ws2 = (torch.randn(d, inter * pieces, **kw) / inter ** 0.5).bfloat16() if pieces else None
        y = moe_decode_experts(x, ids, w13, w2, ws13, ws2, []).double()
        assert y.shape == (t * k + t * pieces, d)
        ref = torch.stack([mlp(x[i].double(), w13[j].double(), w2[j].double()) for i, j in
                           zip(torch.arange(t).repeat_interleave(k).tolist(), ids.flatten().tolist())])
        assert ((y[:t * k] - ref).norm() / ref.norm()).item() < 1e-2
        if pieces:
            ref = mlp(x.double(), ws13.double(), ws2.double())
            assert ((y[t * k:].view(pieces, t, d).sum(0) - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_absorbed_attention_kernels_match_reference():
    """The Triton kernels of dsv3.inference.triton_mla against the model's and einsum's math: the latent
    write (RMSNorm and RoPE of kv_a_proj_with_mqa's output), the per-head products in both weight layouts,
    and the paged latent attention (query RoPE inside; pages out of order, tokens at different positions, a
    split past a token's last key, two tokens per sequence, the 16b preset's sizes and small ones)."""
    from dsv3.inference.cache import write_latent as write_reference
    from dsv3.inference.triton_mla import head_matmul, latent_attention, write_latent
    from dsv3.model.norm import RMSNorm
    from dsv3.model.rope import apply_rope

    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", generator=g)
    for d_c, d_r in [(512, 64), (64, 16)]:
        cache = torch.randn(9, 16, d_c + d_r, **kw).bfloat16()
        index, kv_a = torch.tensor([[5, 130]], device="cuda"), torch.randn(1, 2, d_c + d_r, **kw).bfloat16()
        cos, sin = torch.randn(1, 2, d_r // 2, **kw), torch.randn(1, 2, d_r // 2, **kw)
        norm = RMSNorm(d_c).cuda().bfloat16()
        norm.weight.data.uniform_(0.5, 1.5, generator=g)
        ref = cache.clone()
        kv, k_pe = kv_a.split([d_c, d_r], dim=-1)
        write_reference(ref, index, norm(kv), apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2))
        write_latent(cache, index, kv_a, norm.weight, norm.eps, cos, sin)
        torch.testing.assert_close(cache.float(), ref.float(), atol=0.05, rtol=0.02)
    for t, h, k, n in [(1, 16, 128, 512), (1, 16, 512, 128), (40, 3, 72, 40)]:
        x = torch.randn(t, h, k, **kw).bfloat16()
        w = torch.randn(h, n, k, **kw).bfloat16()
        ref = torch.einsum("thk,hnk->thn", x.double(), w.double())
        for w_kn in (w.transpose(1, 2), w.transpose(1, 2).contiguous()):  # W^UV's and W^UK's layouts
            got = head_matmul(x, w_kn).double()
            assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    for b, s, h, d_c, d_r, page, n_pages in [(1, 1, 16, 512, 64, 16, 36), (3, 2, 4, 64, 16, 8, 5),
                                             (1, 1, 16, 512, 64, 16, 160), (2, 1, 16, 512, 64, 16, 1024)]:
        # the last two: more splits than the combine kernel takes at once (16K keys: 256 splits at batch 1)
        latent = torch.randn(3 * n_pages + 1, page, d_c + d_r, **kw).bfloat16()
        pages = torch.stack([torch.randperm(3 * n_pages, **kw)[:n_pages] for _ in range(b)])
        last = torch.randint(s, n_pages * page, (b, 1), **kw)
        positions = last - s + 1 + torch.arange(s, device="cuda")
        q_lat, q_pe = torch.randn(b, s, h, d_c, **kw).bfloat16(), torch.randn(b, s, h, d_r, **kw).bfloat16()
        cos, sin = torch.randn(b, s, d_r // 2, **kw), torch.randn(b, s, d_r // 2, **kw)
        got = latent_attention(q_lat, q_pe, latent, pages, positions, cos, sin, 0.1).double()
        lat = latent[pages].flatten(1, 2).double()
        q = torch.cat([q_lat, apply_rope(q_pe, cos, sin)], -1).double()
        scores = torch.einsum("bshc,btc->bsht", q, lat) * 0.1
        hidden = torch.arange(lat.shape[1], device="cuda") > positions[:, :, None, None]
        ref = torch.einsum("bsht,btc->bshc", scores.masked_fill(hidden, float("-inf")).softmax(-1), lat[..., :d_c])
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("q_lora_rank", [96, None])
def test_fused_projections_keep_the_model_its_state_dict_and_the_numbers(q_lora_rank):
    from dsv3.inference.fusion import fuse_projections, mla_query_latent, swiglu
    from dsv3.model.attention import MLA
    from dsv3.model.ffn import MLP

    model = dsv3.build_model(dsv3.preset("tiny").replace(q_lora_rank=q_lora_rank), seed=1)
    tokens = torch.tensor([rand_tokens(12, 3)])
    with torch.no_grad():
        before = model(tokens).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_groups = sum(isinstance(m, (MLA, MLP)) for m in model.modules())
    assert fuse_projections(model) == n_groups and fuse_projections(model) == 0
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k].float(), v.float()) for k, v in state.items())
    attn = model.layers[0].self_attn
    first = attn.q_proj if q_lora_rank is None else attn.q_a_proj
    # the Linear weights are rows of the stack: no second copy of the weights
    assert first.weight.untyped_storage().data_ptr() == attn.fused_in_proj.untyped_storage().data_ptr()
    assert attn.kv_a_proj_with_mqa.weight.data_ptr() == attn.fused_in_proj[first.out_features:].data_ptr()
    x = torch.randn(2, 5, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(5))
    (q_nope, q_pe), (kv, k_pe) = mla_query_latent(attn, x, cos, sin)
    for got, want in zip((q_nope, q_pe, kv, k_pe), (*attn.query(x, cos, sin), *attn.latent(x, cos, sin))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mlp = model.layers[0].mlp
    torch.testing.assert_close(swiglu(mlp, x), mlp(x), rtol=1e-5, atol=1e-6)
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if type(m).__name__ == "Gate")


def _decode_gate():
    from dsv3.inference.moe import ROUTE_FEW_MAX
    from dsv3.model.moe import Gate

    gate = Gate(dsv3.preset("tiny").replace(n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1))
    torch.nn.init.normal_(gate.weight, std=0.05)
    gate.e_score_correction_bias.normal_(std=0.01)
    return gate, torch.randn(ROUTE_FEW_MAX, gate.weight.shape[1])


def test_decode_routing_matches_the_gate():
    from dsv3.inference.moe import route

    gate, x = _decode_gate()
    w_ref, i_ref, _ = gate(x)
    w, i = route(gate, x)
    order, order_ref = i.argsort(dim=1), i_ref.argsort(dim=1)
    assert torch.equal(i.gather(1, order), i_ref.gather(1, order_ref))  # the same experts for every token
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)
    s = (x @ gate.weight.t()).sigmoid() + gate.e_score_correction_bias  # chosen in rank order
    assert (s.gather(1, i)[:, :-1] >= s.gather(1, i)[:, 1:]).all()


@pytest.mark.gpu
def test_route_topk_kernel_matches_decode_routing():
    """The Triton top-k kernel (route(..., kernel=True)) chooses the same experts in the same (rank) order
    with the same gate values as the fusible routing, itself checked against the model's Gate above."""
    from dsv3.inference.moe import route

    gate, x = _decode_gate()
    w, i = route(gate, x)
    w_k, i_k = route(gate.cuda(), x.cuda(), kernel=True)
    assert torch.equal(i_k.cpu(), i)
    torch.testing.assert_close(w_k.cpu(), w, rtol=1e-5, atol=1e-6)
