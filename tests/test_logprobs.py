"""Log-probabilities of generated and prompt tokens: the engine's against the log-softmax of the model's own full
forward over prompt + completion (float32, CPU), on every path (eager and padded steps, chunked prefill, the
prefix cache, speculative decoding), with one host read per step."""

from __future__ import annotations


import pytest
import torch

from conftest import host_reads, rand_tokens
from dsv3.inference import Engine, GenerationRequest, SamplingParams

TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [rand_tokens(n, 700 + n) for n in (3, 11, 6, 17)]


def full_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def check(model, prompt, res, n: int | None, n_prompt: int | None) -> None:
    """res.logprobs and res.prompt_logprobs against the full forward over prompt + completion."""
    lp = full_logprobs(model, prompt + res.tokens)
    if n is None:
        assert res.logprobs is None
    else:
        assert len(res.logprobs) == len(res.tokens)
        for i, (token, got) in enumerate(zip(res.tokens, res.logprobs)):
            row = lp[len(prompt) - 1 + i]
            assert got.token == token
            assert got.logprob == pytest.approx(float(row[token]), abs=TOL)
            assert abs(got.rank - (1 + int((row > row[token]).sum()))) <= 1  # ties within the tolerance aside
            top = row.topk(n)
            assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=TOL)
            assert len(got.top) == n and all(float(row[t]) == pytest.approx(v, abs=TOL) for t, v in got.top)
    if n_prompt is None:
        assert res.prompt_logprobs is None
    else:
        assert len(res.prompt_logprobs) == len(prompt) and res.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            got, row = res.prompt_logprobs[j], lp[j - 1]
            assert got.token == prompt[j] and got.logprob == pytest.approx(float(row[prompt[j]]), abs=TOL)
            assert [v for _, v in got.top] == pytest.approx(row.topk(n_prompt).values.tolist(), abs=TOL)


def params(i: int, sampled: bool, **kw) -> SamplingParams:
    base = dict(max_new_tokens=6, ignore_eos=True, logprobs=[0, 3, 20, None][i], prompt_logprobs=[2, None, 5, 0][i])
    if sampled:
        base.update(temperature=0.9, top_p=0.9 if i % 2 else 1.0, top_k=50 * (i % 3), seed=i)
    else:
        base.update(temperature=0)
    return SamplingParams(**{**base, **kw})


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "padded"])
def test_logprobs_equal_the_full_forward(model, monkeypatch, sampled, cuda_graph):
    """Generated and prompt tokens, every row with its own N (row 3 asks for none: it keeps its tokens), with
    chunked prefill (5 tokens per step), one host read per step."""
    ps = [params(i, sampled) for i in range(4)]
    engine = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=cuda_graph, max_prefill_tokens=5)
    results = [engine.submit(GenerationRequest(p, sp)) for p, sp in zip(PROMPTS, ps)]
    steps = 0
    with host_reads(monkeypatch) as reads:
        while engine.scheduler.has_work:
            engine.step()
            steps += 1
    assert engine.host_reads == steps == len([f for f in reads if "inference" in f])
    for prompt, sp, res in zip(PROMPTS, ps, results):
        check(model, prompt, res, sp.logprobs, sp.prompt_logprobs)
    plain = Engine(model, max_batch=4, max_seq_len=48, page_size=4).generate(
        PROMPTS, [SamplingParams(**{**vars(sp), "logprobs": None, "prompt_logprobs": None}) for sp in ps])
    assert [r.tokens for r in results] == [r.tokens for r in plain]


def test_streamed_events_carry_logprobs(model):
    engine = Engine(model, max_batch=2, max_seq_len=48, page_size=4, cuda_graph=True)
    events = list(engine.stream(PROMPTS[:2], [params(1, True), params(3, False)]))
    ids = {e.request_id for e in events}
    assert len(ids) == 2 and len(events) == 12
    with_lp = [e for e in events if e.logprobs is not None]
    assert len(with_lp) == 6 and all(e.logprobs.token == e.token and len(e.logprobs.top) == 3 for e in with_lp)


def test_prompt_logprobs_skip_the_prefix_cache(model):
    """A request asking for prompt logprobs computes its whole prompt (every position's logits) even when its
    prefix is cached; the others still attach the cached pages."""
    system = rand_tokens(13, 800)
    questions = [system + rand_tokens(n, 810 + n) for n in (2, 5, 3)]
    engine = Engine(model, max_batch=2, max_seq_len=48, page_size=4)
    first = engine.generate([questions[0]], params(1, False))[0]
    with_lp = engine.generate([questions[1]], params(0, False))[0]
    without = engine.generate([questions[2]], params(1, False))[0]
    assert (first.cached_tokens, with_lp.cached_tokens, without.cached_tokens) == (0, 0, 12)
    check(model, questions[1], with_lp, 0, 2)


def oracle_engine(model, truth: dict[tuple, list[int]], **kw) -> Engine:
    """A speculative engine whose drafts are replaced, every other time, by the tokens of ``truth`` (the random tiny
    model's MTP module is never right): accepted drafts happen."""
    engine = Engine(model, speculative=True, **kw)
    spec, calls = engine.speculator, {}
    original = spec._set_drafts

    def oracle(seqs, drafts, q):
        original(seqs, drafts, q)
        for seq in seqs:
            n = calls[seq.prompt[0]] = calls.get(seq.prompt[0], 0) + 1
            done = seq.mtp_len + 1 - len(seq.prompt)  # completion index of the first drafted token
            right = truth[tuple(seq.prompt)][done:done + len(seq.draft)]
            if n % 2 and right:
                seq.draft = right + seq.draft[len(right):]

    spec._set_drafts = oracle
    return engine


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_speculative_logprobs_equal_the_full_forward(model, monkeypatch, sampled, k):
    """The verify forward's logits give the logprobs of accepted drafts and corrections alike; the tokens are those
    of the same speculative run without logprobs; one read per decode step."""
    ps = [params(i, sampled, max_new_tokens=10, top_k=0) for i in range(4)]  # top-k would reject the oracle
    no_lp = [SamplingParams(**{**vars(sp), "logprobs": None, "prompt_logprobs": None}) for sp in ps]
    kw = dict(max_batch=4, max_seq_len=48, page_size=4, cuda_graph=True)
    truth = {tuple(p): r.tokens for p, r in zip(PROMPTS, Engine(model, **kw).generate(PROMPTS, no_lp))}
    kw["num_speculative_tokens"] = k
    engine = oracle_engine(model, truth, **kw)
    results = [engine.submit(GenerationRequest(p, sp)) for p, sp in zip(PROMPTS, ps)]
    engine.step()  # admission
    with host_reads(monkeypatch) as reads:
        for _ in range(3):
            engine.step()
    assert len([f for f in reads if "inference" in f]) == 3
    while engine.scheduler.has_work:
        engine.step()
    assert all(r.accepted_tokens > 0 for r in results)
    for prompt, sp, res in zip(PROMPTS, ps, results):
        check(model, prompt, res, sp.logprobs, sp.prompt_logprobs)
    again = oracle_engine(model, truth, **kw).generate(PROMPTS, no_lp)
    assert [r.tokens for r in results] == [r.tokens for r in again]
    if not sampled:
        assert [r.tokens for r in results] == list(truth.values())  # greedy: plain greedy decoding
