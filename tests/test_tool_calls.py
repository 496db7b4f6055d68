"""DeepSeek-V3's tool-call text (dsv3.inference.tool_calls): formatting, parsing, and streamed parsing that
agrees with the whole parse however the text is split."""

import json

import pytest

from dsv3.inference.tool_calls import (
    TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, ToolCall, ToolCallStreamParser,
    format_tool_call, format_tool_calls, function_specs, parse_tool_calls, tools_prompt,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search"}}


def ids(index: int) -> str:
    return f"call_{index}"


def test_format_is_deepseek_v3s():
    text = format_tool_calls([ToolCall("a", "get_weather", '{"city":"Paris"}'),
                              {"id": "b", "type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}])
    assert text == (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city":"Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n'
        '```json\n{"q":"x"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


def test_parse_content_and_calls():
    text = "Let me look.\n" + format_tool_calls([ToolCall("", "get_weather", '{"city": "Paris"}'),
                                                  ToolCall("", "search", '{"q":"a\\nb"}')])
    content, calls = parse_tool_calls(text, make_id=ids)
    assert content == "Let me look.\n"
    assert [c.to_openai() for c in calls] == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q":"a\\nb"}'}}]
    # no tool calls: all content; default ids are fresh OpenAI-style ids
    assert parse_tool_calls("just text <｜tool") == ("just text <｜tool", [])
    _, (call,) = parse_tool_calls(format_tool_calls([ToolCall("", "f", "{}")]))
    assert call.id.startswith("call_") and len(call.id) == 29


CASES = [
    "plain answer, no tools",
    "almost a marker <｜tool▁calls▁beg but not quite",
    "Sure." + format_tool_calls([ToolCall("", "get_weather", '{"city":"Paris"}')]),
    format_tool_calls([ToolCall("", "a", '{"x":[1,2]}'), ToolCall("", "b", '{"y":"\\n```"}')]) + "ignored",
    # cut off inside the arguments, inside the terminator, before the arguments
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "f\n```json\n{\"a\":1",
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "f\n```json\n{\"a\":1}\n``",
    TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "f\n``",
    # junk between calls is dropped
    TOOL_CALLS_BEGIN + "junk" + format_tool_call("g", "{}") + "\n\n" + TOOL_CALL_BEGIN + "x" + TOOL_SEP
    + "h\n```json\n[]\n```" + TOOL_CALL_END + TOOL_CALLS_END,
]


def collect(deltas: list[dict]) -> tuple[str, list[dict]]:
    """Content and OpenAI tool calls assembled from stream deltas, as a client does."""
    content, calls = "", []
    for d in deltas:
        assert set(d) in ({"content"}, {"tool_calls"})
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:  # the first delta of a call
                assert tc["index"] == len(calls) and tc["type"] == "function"
                calls.append({"id": tc["id"], "type": "function", "function": dict(tc["function"])})
            else:
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("text", CASES)
def test_stream_equals_whole_parse_at_every_split(text):
    content, calls = parse_tool_calls(text, make_id=ids)
    expected = (content, [c.to_openai() for c in calls])
    for at in range(len(text) + 1):
        parser = ToolCallStreamParser(make_id=ids)
        deltas = parser.feed(text[:at]) + parser.feed(text[at:]) + parser.finish()
        assert collect(deltas) == expected, at
    parser = ToolCallStreamParser(make_id=ids)  # one character at a time
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert collect(deltas) == expected
    assert (parser.content, parser.calls) == (content, calls)


def test_stream_holds_back_possible_markers_only():
    parser = ToolCallStreamParser(make_id=ids)
    assert parser.feed("Hello <｜tool▁ca") == [{"content": "Hello "}]
    assert parser.feed("lls▁begin｜>" + TOOL_CALL_BEGIN + "function" + TOOL_SEP + "get_weather\n```js") == []
    assert parser.feed("on\n") == [{"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": ""}}]}]
    assert parser.feed('{"city":"Par') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Par'}}]}]
    assert parser.feed('is"}\n`') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}]
    assert parser.feed("``" + TOOL_CALL_END + TOOL_CALLS_END) == []
    assert parser.finish() == []
    assert parser.calls == [ToolCall("call_0", "get_weather", '{"city":"Paris"}')]
    with pytest.raises(RuntimeError):
        parser.feed("more")
    # a held-back possible marker that never completes is content after all
    parser = ToolCallStreamParser()
    assert parser.feed("a <｜tool") == [{"content": "a "}]
    assert parser.finish() == [{"content": "<｜tool"}]


def test_function_specs_and_prompt():
    specs = function_specs([WEATHER, SEARCH])
    assert [s["name"] for s in specs] == ["get_weather", "search"]
    assert specs[1]["parameters"] == {"type": "object", "properties": {}}
    for bad, match in [([], "non-empty"), ([{"type": "retrieval"}], "function"),
                       ([{"function": {"name": "has space"}}], "name"), ([WEATHER, WEATHER], "twice"),
                       ([{"function": {"name": "f", "parameters": "x"}}], "parameters")]:
        with pytest.raises(ValueError, match=match):
            function_specs(bad)
    prompt = tools_prompt([WEATHER, SEARCH])
    assert "### get_weather\nWeather of a city\nParameters (JSON schema): " + json.dumps(
        WEATHER["function"]["parameters"]) in prompt
    assert "### search" in prompt and TOOL_CALLS_BEGIN in prompt and TOOL_CALLS_END in prompt
    assert format_tool_call("NAME", "ARGUMENTS") in prompt
