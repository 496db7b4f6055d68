"""``response_format`` through the server, with the official ``openai`` client: a tiny random model sampling at
temperature 1 still answers JSON that parses and validates against the schema, finished ("stop") within
max_tokens, on chat and completions, streamed or not; unsupported schemas and a speculative engine are 400s
naming ``response_format``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("xgrammar")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")
from serving import MODEL, error_of, make_engine, running, wait_idle  # noqa: E402
from test_grammar import validate  # noqa: E402

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
MAX_TOKENS = 48


def check_json(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    assert isinstance(value, dict), text
    if schema is not None:
        validate(value, schema)


@pytest.mark.parametrize("fmt, schema", [({"type": "json_object"}, None), (SCHEMA_FORMAT, PERSON)],
                         ids=["json_object", "json_schema"])
def test_chat_answers_valid_json_within_max_tokens(client, fmt, schema):
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0,
                                             seed=seed, response_format=fmt)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", (seed, choice)
        assert out.usage.completion_tokens <= MAX_TOKENS
        check_json(choice.message.content, schema)

    # n choices, each with its own constraint; streamed, the same text as the whole response of the same seed
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0,
                                         seed=7, n=3, response_format=fmt)
    assert [c.finish_reason for c in out.choices] == ["stop"] * 3
    for c in out.choices:
        check_json(c.message.content, schema)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0,
                                            seed=7, n=3, response_format=fmt, stream=True)
    texts, reasons = [""] * 3, [None] * 3
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.message.content for c in out.choices] and reasons == ["stop"] * 3


def test_completions_take_response_format(client):
    for seed in range(3):
        out = client.completions.create(model=MODEL, prompt=["The fox", "Hello"], max_tokens=MAX_TOKENS,
                                        temperature=1.0, seed=seed, extra_body={"response_format": SCHEMA_FORMAT})
        assert len(out.choices) == 2
        for c in out.choices:
            assert c.finish_reason == "stop"
            check_json(c.text, PERSON)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The fox", max_tokens=MAX_TOKENS, temperature=1.0, seed=3, stream=True,
        extra_body={"response_format": {"type": "json_object"}}) if c.choices)
    check_json(text, None)
    # "text" constrains nothing
    out = client.completions.create(model=MODEL, prompt="The fox", max_tokens=5, temperature=0,
                                    extra_body={"response_format": {"type": "text"}, "ignore_eos": True})
    assert out.usage.completion_tokens == 5


def test_invalid_response_formats_are_400s(server):
    url, engine = server
    bad = [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
           "json"]
    for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "fox"})]:
        for fmt in bad:
            r = httpx.post(url + path, json={**body, "max_tokens": 8, "response_format": fmt}, timeout=30)
            err = error_of(r)
            assert r.status_code == 400 and err["param"] == "response_format", (path, fmt, err)
    wait_idle(engine)


def test_speculative_engine_refuses_response_format(loaded):
    from dsv3.server import create_app

    engine = make_engine(loaded, speculative=True)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "fox"})]:
            r = httpx.post(url + path, timeout=30,
                           json={**body, "max_tokens": 8, "response_format": {"type": "json_object"}})
            err = error_of(r)
            assert err["code"] == "unsupported_parameter" and err["param"] == "response_format", err
            r = httpx.post(url + path, timeout=30, json={**body, "max_tokens": 4, "response_format": {"type": "text"}})
            assert r.status_code == 200, r.text
        wait_idle(engine)
