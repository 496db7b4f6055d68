"""Penalties, logit biases, min_tokens and min-p: the batched device path (dsv3.inference.penalties and
sampler.sample_processed) against the plain per-row references, their definitions, and the engine's tokens against
a reference generation loop over the model's own full forward."""

from __future__ import annotations

import pytest
import torch

from conftest import rand_tokens
from dsv3.inference import Engine, GenerationRequest, SamplingParams
from dsv3.inference.constraint import bitmask_from_allowed
from dsv3.inference.logprobs import logprob_pack, pack_width, read_step, unpack
from dsv3.inference.penalties import ProcessingState, ProcessingTensors, process_logits, process_logits_reference
from dsv3.inference.sampler import SamplingTensors, probs, sample, sample_processed
from dsv3.inference.sampling import token_probs

V = 64
STOP = [3, 7]
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, presence_penalty=1.5, frequency_penalty=0.7, min_tokens=3),
    SamplingParams(temperature=0, repetition_penalty=1.8, logit_bias={5: 4.0, 9: -100.0}),
    SamplingParams(temperature=1.2, top_k=10, top_p=0.9, min_p=0.2, frequency_penalty=-1.0),
    SamplingParams(temperature=1.0, min_tokens=4, repetition_penalty=0.7, logit_bias={3: 50.0}),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.1, min_p=0.5, presence_penalty=-2.0, logit_bias={0: 1.0}),
]


def history(i: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(100 + i)
    prompt = torch.randint(0, V, (5 + i,), generator=g).tolist()
    completion = torch.randint(0, 16, (2 * i,), generator=g).tolist()  # small ids: repeats
    return prompt, completion


def batch(constrained: bool):
    """Logits, state and per-row tensors for PARAMS (slot = 2 * row: not the row), with histories whose last
    completion tokens are counted through ``record`` (as the step does) and the rest through ``reset``."""
    b = len(PARAMS)
    logits = 3 * torch.randn(b, V, generator=torch.Generator().manual_seed(0))
    state = ProcessingState(2 * b, V, "cpu")
    state.counts.fill_(7)  # stale counts of an earlier request: rows without penalties never read them
    state.bias.fill_(3.0)
    slots = torch.arange(b) * 2
    allowed = torch.rand(b, V, generator=torch.Generator().manual_seed(1)) < (0.5 if constrained else 2.0)
    masks = bitmask_from_allowed(allowed)
    constraints = [None] * b
    if constrained:
        class Fixed:
            def __init__(self, row):
                self.row = row

            def fill_bitmask(self, out):
                out.copy_(masks[self.row])
        constraints = [Fixed(i) if i % 2 == 0 else None for i in range(b)]
    hist = [history(i) for i in range(b)]
    for i, (p, (prompt, completion)) in enumerate(zip(PARAMS, hist)):
        state.reset(int(slots[i]), p, prompt, completion[:-1], STOP)
    last = torch.tensor([c[-1] if c else 0 for _, c in hist])
    state.record(slots, last, torch.tensor([1 if c else 0 for _, c in hist]))
    proc = ProcessingTensors.from_rows(PARAMS, [len(c) for _, c in hist], constraints, V)
    ref = torch.stack([
        process_logits_reference(logits[i], p, prompt, completion, STOP,
                                 allowed[i] if constraints[i] is not None else None)
        for i, (p, (prompt, completion)) in enumerate(zip(PARAMS, hist))])
    return logits, state, slots, proc, ref


@pytest.mark.parametrize("constrained", [False, True])
def test_batched_processing_equals_the_reference(constrained):
    logits, state, slots, proc, ref = batch(constrained)
    got = process_logits(logits, proc, state, slots)
    assert torch.equal(got.isinf(), ref.isinf())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(got[5], logits[5]) and (constrained or torch.equal(got[0], logits[0]))  # plain: untouched
    # sampling: each row's distribution (min-p included) is token_probs of its reference-processed logits, and the
    # batched draw is the one-row draw of the same seed and position
    t = SamplingTensors.from_params(PARAMS, list(range(len(PARAMS))))
    p = probs(got, t, min_p=proc.min_p)
    for i, params in enumerate(PARAMS):
        torch.testing.assert_close(p[i], token_probs(ref[i], params), rtol=0, atol=1e-6)
    offset = torch.arange(len(PARAMS)) + 10
    counts = state.counts.clone()
    packs = sample_processed(logits, t, offset, proc, state, slots)
    tokens = packs[:, 0].long()
    for i, params in enumerate(PARAMS):
        one = SamplingTensors.from_params([params], [i])
        assert int(tokens[i]) == int(sample(ref[i:i + 1], one, offset[i:i + 1], min_p=proc.min_p[i:i + 1])[0])
        assert p[i, tokens[i]] > 0  # never outside the row's support (masks, min-p, top-k / top-p)
    # the new tokens are counted in their slots
    counts[slots, tokens] += 1
    assert torch.equal(state.counts, counts)


def test_penalties_change_the_logits_as_defined():
    prompt, completion = [1, 2, 2], [4, 4, 4, 5, 2]
    x = torch.tensor([1.0, 2.0, -2.0, 0.5, 3.0, -1.0, 0.0, 4.0])
    ref = process_logits_reference
    # frequency and presence (OpenAI): on completion tokens only
    out = ref(x, SamplingParams(frequency_penalty=2.0, presence_penalty=0.5), prompt, completion)
    expect = x.clone()
    expect[4] -= 3 * 2.0 + 0.5
    expect[5] -= 2.0 + 0.5
    expect[2] -= 2.0 + 0.5
    assert torch.equal(out, expect)
    # repetition (vLLM / CTRL): prompt and completion tokens; positive divided, negative multiplied
    out = ref(x, SamplingParams(repetition_penalty=2.0), prompt, completion)
    expect = x.clone()
    expect[[1, 4]] /= 2
    expect[[2, 5]] *= 2
    assert torch.equal(out, expect)
    # bias, then min_tokens masks the stop tokens while fewer were generated
    out = ref(x, SamplingParams(logit_bias={0: 10.0, 7: -100.0}, min_tokens=6), prompt, completion, stop_ids=[3])
    assert out[0] == 11 and out[7] == -96 and out[3] == float("-inf")
    assert ref(x, SamplingParams(min_tokens=5), prompt, completion, stop_ids=[3])[3] == 0.5
    # the batched path, one row: a token repeated 3 times drops by 3 x the frequency penalty
    state = ProcessingState(1, 8, "cpu")
    params = SamplingParams(frequency_penalty=2.0)
    state.reset(0, params, prompt, completion, [])
    proc = ProcessingTensors.from_rows([params], [len(completion)], [None], 8)
    got = process_logits(x[None], proc, state, torch.tensor([0]))[0]
    assert got[4] == x[4] - 6 and got[5] == x[5] - 2 and got[0] == x[0]


def test_sample_processed_leaves_plain_rows_alone():
    """Rows without options in a processed batch get exactly the tokens of the plain sampler (greedy, sampled,
    top-k / top-p), whatever their slots held before."""
    plain = [SamplingParams(temperature=0), SamplingParams(temperature=0.7), SamplingParams(top_k=5, top_p=0.8),
             SamplingParams(temperature=1.3, top_p=0.5)]
    n = 200
    logits = 2 * torch.randn(n, V, generator=torch.Generator().manual_seed(3))
    params = [plain[i % 4] for i in range(n)]
    t = SamplingTensors.from_params(params, list(range(n)))
    state = ProcessingState(n, V, "cpu")
    state.counts.random_(0, 3)
    state.in_prompt.fill_(True)
    state.stop.fill_(True)
    state.bias.normal_()
    proc = ProcessingTensors.from_rows(params, [0] * n, [None] * n, V)
    offset = torch.arange(n)
    packs = sample_processed(logits, t, offset, proc, state, torch.arange(n))
    assert torch.equal(packs[:, 0].long(), sample(logits, t, offset))


def test_logprob_packs_and_the_one_read():
    logits = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(4)).bfloat16()
    tokens = torch.tensor([[0, 5], [63, 7], [12, 12]])
    packs = logprob_pack(logits, tokens)
    assert packs.shape == (3, 2, pack_width(V)) and packs.dtype == torch.float32
    lp = logits.float().log_softmax(-1)
    for i in range(3):
        for j in range(2):
            row = unpack(packs[i, j].tolist(), 4)
            assert row.token == tokens[i, j]
            assert row.logprob == pytest.approx(float(lp[i, j, tokens[i, j]]), abs=1e-6)
            assert row.rank == 1 + int((lp[i, j] > lp[i, j, tokens[i, j]]).sum())
            top = lp[i, j].topk(4)
            assert [t for t, _ in row.top] == top.indices.tolist()
            assert [v for _, v in row.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert unpack(packs[0, 0].tolist(), 0).top == []
    # a step's pieces: plain tokens stay int64 unless some piece is a pack
    ints = torch.tensor([4, 4095])
    assert read_step([ints, ints[:1]], 43) == [[4, 4095], [4]]
    rows = read_step([ints, packs[:, 0]], pack_width(V))
    assert rows[0] == [4, 4095] and [int(r[0]) for r in rows[1]] == [0, 63, 12]


def test_full_path_captures_without_graph_breaks():
    logits, state, slots, proc, _ = batch(True)
    t = SamplingTensors.from_params(PARAMS, list(range(len(PARAMS))))
    offset = torch.arange(len(PARAMS))
    weight = torch.ones(len(PARAMS), dtype=torch.long)
    counts = state.counts.clone()
    want = sample_processed(logits, t, offset, proc, state, slots, weight)
    state.counts.copy_(counts)
    torch._dynamo.reset()
    compiled = torch.compile(sample_processed, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits, t, offset, proc, state, slots, weight), want)


@pytest.mark.parametrize("bad, name", [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
    (dict(logit_bias={1: 101}), "logit_bias"), (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(min_tokens=9, max_new_tokens=8), "min_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(logprobs=True), "logprobs"),
])
def test_params_are_validated(bad, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


# ------------------------------------------------------------------------------------------------------
# the engine against a reference generation loop

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(model, prompt: list[int], params: SamplingParams, seed: int, stop_ids=()) -> list[int]:
    """One token at a time: the model's full forward, the reference processing, the one-row sampler."""
    out: list[int] = []
    t = SamplingTensors.from_params([params], [seed])
    for i in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
        x = process_logits_reference(logits, params, prompt, out, stop_ids)
        out.append(int(sample(x[None], t, torch.tensor([len(prompt) + i]), min_p=torch.tensor([params.min_p]))[0]))
        if out[-1] in stop_ids:
            break
    return out


ENGINE_PARAMS = [
    SamplingParams(max_new_tokens=8, temperature=0, frequency_penalty=2.0, presence_penalty=0.5, ignore_eos=True),
    SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.5, ignore_eos=True),
    SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, presence_penalty=-1.0, min_p=0.05, seed=3,
                   logit_bias={17: 6.0}, ignore_eos=True),
    SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),  # plain, in a processed batch
]
PROMPTS = [rand_tokens(n, 500 + n) for n in (4, 9, 6, 12)]


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "padded"])
def test_engine_penalties_equal_the_reference_loop(model, cuda_graph):
    engine = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=cuda_graph, max_prefill_tokens=8)
    got = engine.generate(PROMPTS, ENGINE_PARAMS)
    for prompt, params, res in zip(PROMPTS, ENGINE_PARAMS, got):
        assert res.tokens == reference(model, prompt, params, params.seed or 0)  # greedy rows: no seed
    plain = Engine(model, max_batch=4, max_seq_len=48, page_size=4).generate(
        PROMPTS, [SamplingParams(**{**vars(p), "presence_penalty": 0, "frequency_penalty": 0,
                                    "repetition_penalty": 1, "min_p": 0, "logit_bias": {}}) for p in ENGINE_PARAMS])
    assert got[3].tokens == plain[3].tokens  # the plain row keeps its tokens
    assert got[0].tokens != plain[0].tokens and got[1].tokens != plain[1].tokens  # the penalties did something
    assert len(set(got[0].tokens)) == 8  # a frequency penalty of 2 on a random model: no repeats


def test_engine_penalties_survive_preemption(model):
    """Recomputed after a preemption, a sequence's counts are rebuilt from its completion: same tokens."""
    params = [SamplingParams(**{**vars(p), "max_new_tokens": 10}) for p in ENGINE_PARAMS]
    ref = Engine(model, max_batch=4, max_seq_len=48, page_size=4).generate(PROMPTS, params)
    small = Engine(model, max_batch=4, max_seq_len=48, page_size=4, num_pages=12)
    got = small.generate(PROMPTS, params)
    assert small.scheduler.preemptions > 0
    assert [r.tokens for r in got] == [r.tokens for r in ref]


def test_min_tokens_masks_eos_and_stop_token_ids(model):
    engine = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=True)
    eos = engine.eos_id
    forced = {eos: 100.0}
    got = engine.generate(PROMPTS[:4], [
        SamplingParams(max_new_tokens=8, temperature=0, logit_bias=forced),
        SamplingParams(max_new_tokens=8, temperature=0, logit_bias=forced, min_tokens=3),
        SamplingParams(max_new_tokens=8, temperature=0.8, seed=1, logit_bias={42: 100.0}, stop_token_ids=[42],
                       min_tokens=5, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=0, logit_bias=forced, min_tokens=8, ignore_eos=True),
    ])
    assert got[0].tokens == [eos] and got[0].finish_reason == "stop"
    assert len(got[1].tokens) == 4 and eos not in got[1].tokens[:3] and got[1].tokens[3] == eos
    assert got[1].finish_reason == "stop"
    assert len(got[2].tokens) == 6 and 42 not in got[2].tokens[:5] and got[2].tokens[5] == 42
    assert got[3].tokens == [eos] * 8 and got[3].finish_reason == "length"  # ignore_eos: EOS is no stop token


def test_logit_bias_token_ids_are_checked_and_speculative_refuses_penalties(model):
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(GenerationRequest(PROMPTS[0], SamplingParams(logit_bias={4096: 1.0})))
    spec = Engine(model, max_batch=2, max_seq_len=32, page_size=4, speculative=True)
    for options, name in ((dict(frequency_penalty=1.0), "frequency_penalty"), (dict(min_p=0.1), "min_p"),
                          (dict(logit_bias={3: 1.0}, min_tokens=2), "logit_bias, min_tokens are")):
        with pytest.raises(ValueError, match=f"{name}.*not supported with speculative decoding"):
            spec.submit(GenerationRequest(PROMPTS[0], SamplingParams(**options)))
