"""The sampling controls through the server, with the official ``openai`` client: penalties, ``logit_bias``,
``min_p``, ``min_tokens`` and ``stop_token_ids`` change greedy completions exactly as their definitions say
(checked against greedy decoding of the served model's own full forward with the processed logits); invalid
values are OpenAI-shaped 400s naming the field; a speculative engine refuses what it cannot apply."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")
from serving import GREEDY, MODEL, error_of, full_logits, greedy_ids, make_engine, running, wait_idle  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
STEPS = 12


@pytest.fixture(scope="module")
def prompt(loaded) -> list[int]:
    """A prompt whose plain greedy completion repeats tokens (the tiny random model loops)."""
    _, tok = loaded
    ids = tok.encode("Hello, how")
    plain = greedy_ids(loaded, ids, STEPS)
    assert len(set(plain)) < len(plain)
    return ids


def complete(client, prompt: list[int], **kw):
    """A greedy completion of STEPS tokens (EOS ignored) with its tokens' raw log-probabilities."""
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=STEPS, logprobs=0,
                                     **{**GREEDY, **kw}).choices[0]


def assert_generates(loaded, prompt: list[int], choice, expected: list[int]) -> None:
    """The choice is ``expected``: the same text, and each token's raw log-probability (the distribution before
    the controls: what the model thinks of the token) that of the expected token."""
    _, tok = loaded
    assert choice.text == tok.decode(expected)
    lp = full_logits(loaded, prompt + expected).log_softmax(-1)
    raw = [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(expected)]
    assert choice.logprobs.token_logprobs == pytest.approx(raw, abs=TOL)


def counts(out: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).float() if out else torch.zeros(vocab)


def test_penalties_follow_their_definitions(client, loaded, prompt):
    plain = greedy_ids(loaded, prompt, STEPS)
    assert_generates(loaded, prompt, complete(client, prompt), plain)

    # OpenAI's: the logit of a token minus frequency x its count in the completion, minus presence once seen
    for kw, process in [
        ({"frequency_penalty": 2.0}, lambda x, out: x - 2.0 * counts(out, x.numel())),
        ({"presence_penalty": 1.5}, lambda x, out: x - 1.5 * (counts(out, x.numel()) > 0).float()),
        ({"frequency_penalty": 0.4, "presence_penalty": -0.3},
         lambda x, out: x - 0.4 * counts(out, x.numel()) + 0.3 * (counts(out, x.numel()) > 0).float()),
    ]:
        expected = greedy_ids(loaded, prompt, STEPS, process)
        assert expected != plain
        assert_generates(loaded, prompt, complete(client, prompt, **kw), expected)
    no_repeats = greedy_ids(loaded, prompt, STEPS, lambda x, out: x - 2.0 * counts(out, x.numel()))
    assert len(set(no_repeats)) == STEPS  # what greedy repeated, a large frequency penalty prevents

    # vLLM's repetition_penalty: logits of tokens in the prompt or the completion divided by it (x it if negative)
    def repetition(x, out, p=1.3):
        seen = counts(prompt + out, x.numel()) > 0
        return torch.where(seen, torch.where(x > 0, x / p, x * p), x)

    expected = greedy_ids(loaded, prompt, STEPS, repetition)
    assert expected != plain
    assert_generates(loaded, prompt, complete(client, prompt, extra_body={"ignore_eos": True,
                                                                          "repetition_penalty": 1.3}), expected)


def test_logit_bias_moves_the_greedy_token(client, loaded, prompt):
    first = full_logits(loaded, prompt)[-1]
    best, second = first.topk(2).indices.tolist()
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=0,
                                       logit_bias={str(best): -100}, **GREEDY).choices[0]
    assert_generates(loaded, prompt, choice, [second])  # its reported logprob is still the raw one

    forced = int(first.argmin())  # the least likely token, forced at every step
    bias = {str(forced): 100, str(best): -50}
    assert_generates(loaded, prompt, complete(client, prompt, logit_bias=bias), [forced] * STEPS)
    bias_vector = torch.zeros_like(first)
    bias_vector[forced], bias_vector[best] = 5.0, -5.0
    expected = greedy_ids(loaded, prompt, STEPS, lambda x, out: x + bias_vector)
    assert_generates(loaded, prompt, complete(client, prompt, logit_bias={str(forced): 5, str(best): -5}), expected)


def test_min_p_one_keeps_only_the_most_likely_token(client, loaded, prompt):
    """min_p = 1 drops every token less likely than the most likely one: sampling at temperature 1 is greedy."""
    choice = client.completions.create(model=MODEL, prompt=prompt, max_tokens=STEPS, logprobs=0, temperature=1.0,
                                       seed=3, extra_body={"min_p": 1.0, "ignore_eos": True}).choices[0]
    assert_generates(loaded, prompt, choice, greedy_ids(loaded, prompt, STEPS))


def test_stop_token_ids_and_min_tokens(client, loaded, prompt):
    """A token forced by logit_bias and made a stop token ends the completion at once; min_tokens masks it
    until that many tokens were generated, then it comes and stops."""
    forced = int(full_logits(loaded, prompt)[-1].argmin())
    kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logit_bias={str(forced): 100})
    out = client.completions.create(**kw, extra_body={"stop_token_ids": [forced]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1 and out.choices[0].text == ""
    out = client.completions.create(**kw, extra_body={"stop_token_ids": [forced], "min_tokens": 4})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 5
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                         temperature=0, logit_bias={str(forced): 100},
                                         extra_body={"stop_token_ids": [forced], "min_tokens": 2})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 3


def test_invalid_values_are_400s_naming_the_field(server, loaded):
    url, engine = server
    vocab = loaded[0].config.vocab_size
    comp = {"model": MODEL, "prompt": "fox", "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    shared = [("presence_penalty", 2.5), ("presence_penalty", "x"), ("frequency_penalty", -3),
              ("repetition_penalty", 0), ("repetition_penalty", -1), ("logit_bias", {"abc": 1}),
              ("logit_bias", {"-3": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {str(vocab): 1}),
              ("logit_bias", [1, 2]), ("min_p", 1.5), ("min_p", -0.1), ("min_tokens", -1), ("min_tokens", 5),
              ("stop_token_ids", [-1]), ("stop_token_ids", [vocab]), ("stop_token_ids", 3)]
    cases = [("/v1/completions", comp, f, v) for f, v in shared + [
        ("logprobs", 21), ("logprobs", -1), ("max_tokens", 0), ("echo", "x")]]
    cases += [("/v1/chat/completions", chat, f, v) for f, v in shared + [
        ("top_logprobs", 21), ("top_logprobs", 2), ("logprobs", "perhaps"), ("max_tokens", 0)]]
    for path, body, field, value in cases:
        r = httpx.post(url + path, json={**body, field: value}, timeout=30)
        assert r.status_code == 400, (path, field, value, r.text)
        err = error_of(r)
        assert err["param"] == field and err["type"] == "invalid_request_error", (path, field, value, err)
    # max_tokens 0 with echo is fine; min_tokens up to max_tokens too; unknown fields are still ignored
    ok = [("/v1/completions", {**comp, "max_tokens": 0, "echo": True}),
          ("/v1/completions", {**comp, "min_tokens": 4, "ignore_eos": True, "logit_bias": {"7": -100.0}}),
          ("/v1/chat/completions", {**chat, "min_tokens": 4, "top_logprobs": 0, "logprobs": True,
                                    "guided_choice": ["a"], "some_future_field": 1})]
    for path, body in ok:
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 200, (path, r.text)
    wait_idle(engine)


def test_speculative_engine_refuses_what_it_cannot_apply(loaded, prompt):
    """Penalties, logit_bias, min_p and min_tokens are not applied by speculative decoding: a 400
    ``unsupported_parameter`` naming the field (the engine's typed refusal); logprobs are supported."""
    from dsv3.server import create_app

    engine = make_engine(loaded, speculative=True)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for field, value in [("presence_penalty", 0.5), ("frequency_penalty", -0.5), ("logit_bias", {"5": 3}),
                             ("repetition_penalty", 1.2), ("min_p", 0.1), ("min_tokens", 2)]:
            r = httpx.post(url + "/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": prompt, "max_tokens": 4, field: value})
            assert r.status_code == 400, (field, r.text)
            err = error_of(r)
            assert err["code"] == "unsupported_parameter" and err["param"] == field, err
        assert_generates(loaded, prompt, complete(client, prompt), greedy_ids(loaded, prompt, STEPS))
        wait_idle(engine)
