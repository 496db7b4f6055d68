"""Log-probabilities through the server, with the official ``openai`` client: /v1/completions' legacy ``logprobs``
(generated tokens, and prompt tokens with ``echo``), ``echo`` with ``max_tokens`` 0 as evaluation harnesses score
texts, and /v1/chat/completions' ``logprobs`` / ``top_logprobs``; streamed and not. Values are checked against
the log-softmax of the served model's own full forward over prompt + completion (float32)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")
from serving import GREEDY, MODEL, full_logits, greedy_ids, wait_idle  # noqa: E402

from dsv3.inference.chat import ChatTemplate  # noqa: E402
from dsv3.server.logprobs import TokenTexts  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def check_completion_logprobs(loaded, prompt: list[int], completion: list[int], got, n: int, echo: bool) -> None:
    """``got`` (a choice's ``logprobs``) against the forward over prompt + completion: each token's string and
    offset, its log-probability (None for the first prompt token) and its top dict, the chosen token and the n
    most likely (tokens with equal strings share a key, valued as one of them)."""
    _, tok = loaded
    lp = full_logits(loaded, prompt + completion).log_softmax(-1)
    tokens, start = (prompt + completion, 0) if echo else (completion, len(prompt))
    strings = [tok.decode([t]) for t in tokens]
    assert got.tokens == strings
    assert got.text_offset == [sum(map(len, strings[:k])) for k in range(len(strings))]
    assert len(got.token_logprobs) == len(got.top_logprobs) == len(tokens)
    for k, t in enumerate(tokens):
        if start + k == 0:
            assert got.token_logprobs[k] is None and got.top_logprobs[k] is None
            continue
        row = lp[start + k - 1]
        assert got.token_logprobs[k] == pytest.approx(float(row[t]), abs=TOL)
        candidates = [t] + row.topk(n).indices.tolist()
        top = got.top_logprobs[k]
        assert set(top) == {tok.decode([u]) for u in candidates} and len(top) <= n + 1
        for key, value in top.items():
            assert any(tok.decode([u]) == key and abs(float(row[u]) - value) <= TOL for u in candidates), key


def streamed_completions(stream) -> dict[int, dict]:
    """Per choice: its text and the concatenation of its chunks' logprobs."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            acc = out.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [],
                                           "text_offset": [], "finish_reason": None})
            acc["text"] += c.text
            acc["finish_reason"] = c.finish_reason or acc["finish_reason"]
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    acc[key] += getattr(c.logprobs, key)
    return out


def same_logprobs(streamed: dict, got) -> None:
    assert streamed["tokens"] == got.tokens and streamed["text_offset"] == got.text_offset
    assert [v is None for v in streamed["token_logprobs"]] == [v is None for v in got.token_logprobs]
    assert [v for v in streamed["token_logprobs"] if v is not None] == pytest.approx(
        [v for v in got.token_logprobs if v is not None], abs=TOL)
    for a, b in zip(streamed["top_logprobs"], got.top_logprobs, strict=True):
        assert (a is None and b is None) or (a.keys() == b.keys() and list(a.values()) == pytest.approx(
            list(b.values()), abs=TOL))


def test_completion_logprobs_equal_the_forward(client, loaded):
    _, tok = loaded
    prompt = tok.encode("The quick brown fox")
    expected = greedy_ids(loaded, prompt, 6)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=5, **GREEDY)
    choice = out.choices[0]
    assert choice.text == tok.decode(expected)
    check_completion_logprobs(loaded, prompt, expected, choice.logprobs, 5, echo=False)
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == len(prompt)

    zero = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logprobs=0, **GREEDY)
    assert [len(d) for d in zero.choices[0].logprobs.top_logprobs] == [1, 1]  # the chosen token alone
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_echo_prepends_the_prompt_and_its_logprobs_streamed_or_not(client, loaded):
    _, tok = loaded
    prompts = ["Hello, how are", "def add(a, b):"]
    ids = [tok.encode(p) for p in prompts]
    kw = dict(model=MODEL, prompt=prompts, max_tokens=5, logprobs=3, echo=True, **GREEDY)
    out = client.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1]
    for c, prompt, text in zip(out.choices, ids, prompts):
        expected = greedy_ids(loaded, prompt, 5)
        assert c.text == text + tok.decode(expected) and c.finish_reason == "length"
        check_completion_logprobs(loaded, prompt, expected, c.logprobs, 3, echo=True)
    assert out.usage.prompt_tokens == len(ids[0]) + len(ids[1]) and out.usage.completion_tokens == 10

    streamed = streamed_completions(client.completions.create(**kw, stream=True))
    for i, c in enumerate(out.choices):
        assert streamed[i]["text"] == c.text and streamed[i]["finish_reason"] == "length"
        same_logprobs(streamed[i], c.logprobs)

    no_logprobs = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=3, echo=True, **GREEDY)
    assert no_logprobs.choices[0].text.startswith(prompts[0]) and no_logprobs.choices[0].logprobs is None


def test_scoring_token_ids_with_echo_and_max_tokens_0(server, client, loaded):
    """What evaluation harnesses (lm-evaluation-harness' local-completions) send to score a continuation: the
    token ids of context + continuation, echo, logprobs, max_tokens 0; the log-likelihood is the sum of the
    continuation's logprobs, greedy when each is the top token."""
    _, tok = loaded
    pairs = [("The quick brown fox", " jumps over"), ("Hello, how are you", " today?")]
    prompts = [tok.encode(context) + tok.encode(continuation) for context, continuation in pairs]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 0
    for (context, _), prompt, c in zip(pairs, prompts, out.choices):
        assert c.text == tok.decode(prompt) and c.finish_reason == "length"
        check_completion_logprobs(loaded, prompt, [], c.logprobs, 1, echo=True)
        lp = full_logits(loaded, prompt).log_softmax(-1)
        start = len(tok.encode(context))
        loglik = sum(c.logprobs.token_logprobs[start:])
        assert loglik == pytest.approx(sum(float(lp[j - 1, prompt[j]]) for j in range(start, len(prompt))), abs=1e-3)

    streamed = streamed_completions(client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0, stream=True))
    for i, c in enumerate(out.choices):
        assert streamed[i]["text"] == c.text and streamed[i]["finish_reason"] == "length"
        same_logprobs(streamed[i], c.logprobs)

    text = client.completions.create(model=MODEL, prompt="fox", max_tokens=0, echo=True)  # no logprobs
    assert text.choices[0].text == "fox" and text.choices[0].logprobs is None
    wait_idle(server[1])


def test_chat_logprobs_and_top_logprobs(client, loaded):
    _, tok = loaded
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    prompt = ChatTemplate(tok).encode(messages)
    expected = greedy_ids(loaded, prompt, 6)
    lp = full_logits(loaded, prompt + expected).log_softmax(-1)
    kw = dict(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=4, **GREEDY)
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert choice.message.content == tok.decode(expected) and len(content) == 6
    for k, (t, entry) in enumerate(zip(expected, content)):
        row = lp[len(prompt) - 1 + k]
        assert entry.token == tok.decode([t]) and entry.logprob == pytest.approx(float(row[t]), abs=TOL)
        top = row.topk(4)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=TOL)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([u]) for u in top.indices.tolist()]
    # OpenAI's bytes: a token's own bytes, which concatenate to the text even where a character is split
    joined = bytes(b for entry in content for b in entry.bytes)
    assert joined.decode("utf-8", errors="replace") == choice.message.content

    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs is not None else []
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=TOL)

    bare = client.chat.completions.create(**{**kw, "top_logprobs": None})
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * 6
    none = client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert none.choices[0].logprobs is None


def test_token_strings_and_bytes(loaded):
    """Each token decoded on its own (a split character: U+FFFD), its bytes the vocabulary entry's own bytes
    (special tokens: their text's UTF-8)."""
    _, tok = loaded
    texts = TokenTexts(tok)
    text = "naïve 日本 fox"
    ids = tok.encode(text)
    assert b"".join(bytes(texts.bytes(t)) for t in ids) == text.encode()
    assert any(texts.text(t) == "\ufffd" for t in ids)  # the 300-token BPE splits the CJK characters
    assert [texts.text(t) for t in ids] == [tok.decode([t]) for t in ids]
    assert texts.bytes(tok.eos_id) == list(tok.decode([tok.eos_id]).encode())
