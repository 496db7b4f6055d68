"""Constrained decoding in the engine (the contract of dsv3.inference.constraint): bitmasks filled on the host before
each step, applied on the device to the whole batch (the prefill's first token included), the chosen token accepted
after the step's one read, the request finished ("stop") once the constraint is complete. Toy constraints: a fixed
set of allowed tokens, and a token sequence that must be spelled out."""

from __future__ import annotations


import pytest
import torch

import dsv3
from conftest import host_reads
from dsv3.inference import Engine, GenerationRequest, SamplingParams
from dsv3.inference.constraint import bitmask_from_allowed
from dsv3.inference.penalties import process_logits_reference
from dsv3.inference.sampler import SamplingTensors, sample

pytestmark = pytest.mark.usefixtures("one_thread")
V = 4096


def rand_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, V, (n,), generator=g).tolist()


class AllowedSet:
    """Only the tokens of a fixed set, forever."""

    def __init__(self, tokens: list[int]):
        self.allowed = torch.zeros(V, dtype=torch.bool)
        self.allowed[tokens] = True
        self.mask = bitmask_from_allowed(self.allowed)
        self.accepted: list[int] = []

    def fill_bitmask(self, row: torch.Tensor) -> None:
        row.copy_(self.mask)

    def accept(self, token: int) -> None:
        assert self.allowed[token], token
        self.accepted.append(token)

    def is_finished(self) -> bool:
        return False


class Spell:
    """Exactly this token sequence, then finished."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.done = tokens, 0

    def fill_bitmask(self, row: torch.Tensor) -> None:
        allowed = torch.zeros(V, dtype=torch.bool)
        allowed[self.tokens[self.done]] = True
        row.copy_(bitmask_from_allowed(allowed))

    def accept(self, token: int) -> None:
        assert token == self.tokens[self.done], (token, self.tokens[self.done])
        self.done += 1

    def is_finished(self) -> bool:
        return self.done == len(self.tokens)


def reference(model, prompt: list[int], params: SamplingParams, allowed: torch.Tensor) -> list[int]:
    """The model's full forward, the reference mask and processing, the one-row sampler."""
    out: list[int] = []
    t = SamplingTensors.from_params([params], [params.seed or 0])
    for i in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
        x = process_logits_reference(logits, params, prompt, out, allowed=allowed)
        out.append(int(sample(x[None], t, torch.tensor([len(prompt) + i]))[0]))
    return out


PROMPTS = [rand_tokens(n, 900 + n) for n in (5, 3, 8, 13)]
SET = rand_tokens(40, 950)
WORD = rand_tokens(4, 960)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "padded"])
def test_constraints_in_a_mixed_batch(model, monkeypatch, sampled, cuda_graph):
    kw = dict(max_new_tokens=7, ignore_eos=True, temperature=0.9 if sampled else 0)
    ps = [SamplingParams(seed=1, top_p=0.9, **kw), SamplingParams(seed=2, **kw), SamplingParams(seed=3, **kw),
          SamplingParams(seed=4, logprobs=2, frequency_penalty=1.0, **kw)]
    constraints = [AllowedSet(SET), Spell(WORD), None, AllowedSet(SET[:5])]
    engine = Engine(model, max_batch=4, max_seq_len=48, page_size=4, cuda_graph=cuda_graph, max_prefill_tokens=9)
    results = [engine.submit(GenerationRequest(p, sp, constraint=c)) for p, sp, c in zip(PROMPTS, ps, constraints)]
    steps = 0
    with host_reads(monkeypatch) as reads:
        while engine.scheduler.has_work:
            engine.step()
            steps += 1
    assert engine.host_reads == steps == len([f for f in reads if "inference" in f])
    allowed, spelled, plain, small = results
    assert allowed.tokens == constraints[0].accepted == reference(model, PROMPTS[0], ps[0], constraints[0].allowed)
    assert len(allowed.tokens) == 7 and allowed.finish_reason == "length"
    assert spelled.tokens == WORD and spelled.finish_reason == "stop"  # finished by its constraint
    alone = Engine(model, max_batch=1, max_seq_len=48, page_size=4).generate([PROMPTS[2]], ps[2])[0]
    assert plain.tokens == alone.tokens
    assert set(small.tokens) <= set(SET[:5]) and len(set(small.tokens)) > 1  # penalised within the set
    # log-probabilities of the raw model distribution: before the mask and the penalty
    with torch.no_grad():
        lp = model(torch.tensor([PROMPTS[3] + small.tokens])).logits[0].log_softmax(-1)
    want = [float(lp[len(PROMPTS[3]) - 1 + i, t]) for i, t in enumerate(small.tokens)]
    assert [x.logprob for x in small.logprobs] == pytest.approx(want, abs=1e-4)
    assert all(x.rank > 1 for x in small.logprobs)  # a random 5-token set never holds the model's favourite


def test_constraint_finishes_with_its_text():
    """With a tokenizer: the request finishes when its constraint is complete and its text is flushed."""

    class Letters:
        eos_id = 1

        def encode(self, text):
            return [ord(c) - 97 + 26 for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    engine = Engine(dsv3.build_model("tiny", seed=0), Letters(), max_batch=2, max_seq_len=32, page_size=4,
                    cuda_graph=True)
    word = Letters().encode("json")
    events = list(engine.stream([GenerationRequest("abc", SamplingParams(max_new_tokens=10, temperature=0.7,
                                                                         stop=["xyz"]), constraint=Spell(word))]))
    assert [e.token for e in events] == word and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == "json"


def test_speculative_refuses_constraints(model):
    engine = Engine(model, max_batch=2, max_seq_len=32, page_size=4, speculative=True)
    with pytest.raises(ValueError, match="constraint is not supported with speculative decoding"):
        engine.submit(GenerationRequest(PROMPTS[0], SamplingParams(), constraint=Spell(WORD)))
