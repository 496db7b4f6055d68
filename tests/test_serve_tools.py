"""Tools through the server, with the official ``openai`` client, on a tiny random model whose tokenizer has
DeepSeek-V3's tool-call markers as special tokens: a forced call (``required`` or a named function) comes back
as OpenAI ``tool_calls`` whose arguments validate against the function's schema, streamed the same as whole;
the calls and their results go back into the conversation (rendered with the markers); ``auto`` leaves text free
and makes calls valid once the model opens them, and its parsing is checked on a fixed text; invalid tools are
400s naming the field."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("xgrammar")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytest.register_assert_rewrite("serving")
from serving import MODEL, TOOL_MAX_SEQ_LEN, error_of, make_engine, running, wait_idle  # noqa: E402
from test_grammar import validate  # noqa: E402

from dsv3.inference.tool_calls import (  # noqa: E402
    TOOL_CALL_BEGIN, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, ToolCall, format_tool_calls,
)

pytest_plugins = ["serving"]
pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 16},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["q"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH, "strict": True}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_TOKENS = 96
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_server(tool_loaded):
    from dsv3.server import create_app

    engine = make_engine(tool_loaded, max_seq_len=TOOL_MAX_SEQ_LEN)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        yield url, engine


@pytest.fixture(scope="module")
def tool_client(tool_server):
    url, _ = tool_server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, **kw):
    return client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "tools": TOOLS,
                                             "max_tokens": MAX_TOKENS, "temperature": 1.0, **kw})


def check_calls(message) -> list[tuple[str, str]]:
    """The message's calls as (name, arguments), each valid against its function's schema."""
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        out.append((call.function.name, call.function.arguments))
    return out


def streamed(client, **kw) -> tuple[str | None, list[tuple[str, str]], str]:
    """A streamed answer assembled from its deltas: content, calls (name, arguments), the last finish_reason."""
    content, calls, ids, reason = None, {}, {}, None
    for chunk in ask(client, stream=True, **kw):
        for c in chunk.choices:
            if c.delta.content:
                content = (content or "") + c.delta.content
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.type == "function" and d.index not in ids
                    ids[d.index] = d.id
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            reason = c.finish_reason or reason
    return content, [tuple(calls[i]) for i in sorted(calls)], reason


def test_named_tool_choice_returns_a_valid_call(tool_client):
    for seed in range(3):
        out = ask(tool_client, tool_choice=NAMED, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice  # OpenAI: a forced named function ends with "stop"
        assert choice.message.content is None
        calls = check_calls(choice.message)
        assert len(calls) == 1 and calls[0][0] == "get_weather"
        assert out.usage.completion_tokens <= MAX_TOKENS
        # streamed with the same seed: the same call, piece by piece
        assert streamed(tool_client, tool_choice=NAMED, seed=seed) == (None, calls, "stop")


def test_required_calls_any_of_the_tools(tool_client):
    names = set()
    for seed in range(4):
        choice = ask(tool_client, tool_choice="required", seed=seed).choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = check_calls(choice.message)
        names |= {name for name, _ in calls}
        assert streamed(tool_client, tool_choice="required", seed=seed) == (None, calls, "tool_calls")
        one = ask(tool_client, tool_choice="required", parallel_tool_calls=False, seed=seed).choices[0]
        assert len(check_calls(one.message)) == 1
    assert names <= set(SCHEMAS)


def test_tool_calls_and_results_go_back_into_the_conversation(tool_client, tool_server, tool_loaded):
    url, engine = tool_server
    _, tok = tool_loaded
    first = ask(tool_client, tool_choice=NAMED, seed=1).choices[0].message
    call = first.tool_calls[0]
    messages = MESSAGES + [first.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    out = tool_client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8,
                                              temperature=1.0, seed=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    # the template rendered the call and the result with the markers (special tokens of this tokenizer)
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "messages": messages, "tools": TOOLS}, timeout=30)
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    for marker in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN):
        assert tok.hf.token_to_id(marker) in tokens, marker
    assert call.function.arguments in tok.decode(tokens)
    wait_idle(engine)


def test_auto_and_none_leave_text_free(tool_client):
    """auto (the default with tools) and none let the model write text as it likes (to "length" here); none
    leaves the tools out of the prompt."""
    prompt = {}
    for choice in ("auto", "none", None):
        out = ask(tool_client, tool_choice=choice, seed=0, max_tokens=6, extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
        prompt[choice] = out.usage.prompt_tokens
    assert prompt[None] == prompt["auto"] > prompt["none"]


def test_auto_calls_are_valid_once_the_model_opens_them(tool_client, tool_loaded):
    """With auto the model may write text or open tool calls; once it opens them (pushed here by a logit bias
    on the opening marker, which a random model would rarely pick) the calls are valid against their schemas
    and end within max_tokens, whole and streamed alike."""
    _, tok = tool_loaded
    begin = tok.hf.token_to_id(TOOL_CALLS_BEGIN)
    for seed in range(3):
        out = ask(tool_client, tool_choice="auto", seed=seed, logit_bias={str(begin): 100})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = check_calls(choice.message)
        assert out.usage.completion_tokens <= MAX_TOKENS
        assert streamed(tool_client, tool_choice="auto", seed=seed, logit_bias={str(begin): 100})[1:] == \
            (calls, "tool_calls")


def test_auto_parses_tool_calls_into_the_message():
    """The response builder on a fixed completion with content and two calls, whole and streamed in pieces."""
    from dsv3.server.tools import ToolStream, chat_message, finish_reason

    calls = [ToolCall("", "get_weather", '{"city":"Paris","unit":"C"}'), ToolCall("", "search", '{"q":"x"}')]
    text = "Let me check." + format_tool_calls(calls)
    message, has_calls = chat_message(text, parse=True)
    assert has_calls and finish_reason("stop", has_calls) == "tool_calls"
    assert message.content == "Let me check."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        (c.name, c.arguments) for c in calls]
    assert len({c.id for c in message.tool_calls}) == 2
    plain, has_calls = chat_message("Just text.", parse=True)
    assert plain.content == "Just text." and plain.tool_calls is None and not has_calls
    assert finish_reason("length", True) == "length"
    assert finish_reason("stop", True, named=True) == "stop"
    assert chat_message(text, parse=False)[0].content == text  # tool_choice "none": not parsed

    stream = ToolStream()
    deltas = []
    for k in range(0, len(text), 5):
        deltas += stream.feed(text[k:k + 5], final=k + 5 >= len(text))
    content = "".join(d.content or "" for d in deltas)
    args: dict[int, list] = {}
    for d in deltas:
        for c in d.tool_calls or []:
            if c.id is not None:
                args[c.index] = [c.function.name, ""]
            args[c.index][1] += c.function.arguments or ""
    assert content == "Let me check." and stream.has_calls
    assert [tuple(v) for _, v in sorted(args.items())] == [(c.name, c.arguments) for c in calls]


def test_invalid_tools_are_400s_naming_the_field(tool_server):
    url, engine = tool_server
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": bad_schema, "tool_choice": "required"}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "function", "content": "y"}]}, "messages"),
    ]
    for extra, param in cases:
        r = httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=30)
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == param, (extra, err)
    # an unsupported schema feature is fine where nothing is constrained
    r = httpx.post(url + "/v1/chat/completions", json={**body, "tools": bad_schema}, timeout=30)
    assert r.status_code == 200, r.text
    wait_idle(engine)


def test_speculative_engine_refuses_forced_tool_calls(tool_loaded):
    from dsv3.server import create_app

    engine = make_engine(tool_loaded, max_seq_len=TOOL_MAX_SEQ_LEN, speculative=True)
    with running(create_app(engine, MODEL, num_threads=1)) as url:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "tools": TOOLS}
        for choice in ("required", NAMED):
            r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": choice}, timeout=60)
            err = error_of(r)
            assert err["code"] == "unsupported_parameter" and err["param"] == "tool_choice", err
        r = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "auto"}, timeout=60)
        assert r.status_code == 200, r.text
        wait_idle(engine)
