"""The chat template (dsv3.inference.chat) with tools: assistant tool calls, tool results and tool definitions,
in the fallback format and through a Jinja template. (Plain conversations: tests/test_serve.py.)"""

import json

import pytest

from dsv3.data import Tokenizer, train_tokenizer
from dsv3.inference.chat import ChatTemplate, check_messages
from dsv3.inference.tool_calls import (
    TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_SEP, parse_tool_calls, tools_prompt,
)

pytest.importorskip("jinja2")

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
MARKERS = [USER, ASSISTANT, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
           TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain <｜tool▁outputs▁end｜>"},
    {"role": "assistant", "content": "Paris: sunny; Oslo: rain."},
    {"role": "user", "content": "Thanks. London?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": CALLS[:1]},
    {"role": "tool", "tool_call_id": "call_1", "content": "fog"},
]
CALL_PARIS = f'{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{TOOL_CALL_END}'
CALL_OSLO = f'{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city":"Oslo"}}\n```{TOOL_CALL_END}'
EXPECTED = (
    f"{BOS}Be brief.\n\n{tools_prompt(TOOLS)}{USER}Weather in Paris and Oslo?"
    f"{ASSISTANT}{TOOL_CALLS_BEGIN}{CALL_PARIS}\n{CALL_OSLO}{TOOL_CALLS_END}{EOS}"
    f"{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}sunny{TOOL_OUTPUT_END}\n"
    f"{TOOL_OUTPUT_BEGIN}rain {TOOL_OUTPUTS_END}{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}"
    f"Paris: sunny; Oslo: rain.{EOS}{USER}Thanks. London?"
    f"{ASSISTANT}Checking.{TOOL_CALLS_BEGIN}{CALL_PARIS}{TOOL_CALLS_END}{EOS}"
    f"{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}fog{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}")

# a template in the official layout that handles tool calls and results (and does not use ``tools``)
JINJA = (
    "{{ bos_token }}{% for m in messages if m['role'] == 'system' %}{{ m['content'] }}"
    "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% set ns = namespace(outputs=false) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% if ns.outputs %}<｜tool▁outputs▁end｜>{% endif %}"
    "{% set ns.outputs = false %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% if ns.outputs %}<｜tool▁outputs▁end｜>{% else %}<｜Assistant｜>{% endif %}{% set ns.outputs = false %}"
    "{% if m['content'] is not none %}{{ m['content'] }}{% endif %}"
    "{% if 'tool_calls' in m %}<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}<｜tool▁call▁begin｜>{{ c['type'] }}<｜tool▁sep｜>"
    "{{ c['function']['name'] + '\\n```json\\n' + c['function']['arguments'] + '\\n```' }}<｜tool▁call▁end｜>"
    "{% endfor %}<｜tool▁calls▁end｜>{% endif %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}{% if ns.outputs %}{{ '\\n' }}{% else %}<｜tool▁outputs▁begin｜>{% endif %}"
    "{% set ns.outputs = true %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% endif %}{% endfor %}"
    "{% if ns.outputs %}<｜tool▁outputs▁end｜>{% elif add_generation_prompt %}<｜Assistant｜>{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("Weather in Paris and Oslo? It is sunny. get_weather city json\n" * 20)
    train_tokenizer(root / "corpus", root / "tok", vocab_size=300, show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def plain(tok_dir):
    """Trained by dsv3: BOS / EOS are the only special tokens."""
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def official(tok_dir):
    """With DeepSeek-V3's markers as special tokens."""
    tok = Tokenizer.load(tok_dir)
    tok.hf.add_special_tokens(MARKERS)
    return tok


def test_fallback_renders_tool_calls_and_results(plain):
    template = ChatTemplate(plain)
    assert template.render(CONVERSATION, tools=TOOLS) == EXPECTED
    # after tool results the model answers directly: no <｜Assistant｜> to add
    assert template.render(CONVERSATION, add_generation_prompt=False, tools=TOOLS) == EXPECTED
    assert template.render(CONVERSATION[:2], tools=TOOLS).endswith("Weather in Paris and Oslo?" + ASSISTANT)
    # without tools, no tool description; system messages are joined with a blank line
    two_systems = [{"role": "system", "content": "A."}, {"role": "user", "content": "x"},
                   {"role": "system", "content": "B."}]
    assert template.render(two_systems) == f"{BOS}A.\n\nB.{USER}x{ASSISTANT}"
    # what the model wrote parses back into the calls it was given
    turn = EXPECTED.split(ASSISTANT)[1].split(EOS)[0]
    content, calls = parse_tool_calls(turn)
    assert content == "" and [c.name for c in calls] == ["get_weather"] * 2
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]


def test_fallback_encoding_keeps_contents_as_text(plain, official):
    for tok, markers_are_tokens in ((plain, False), (official, True)):
        ids = ChatTemplate(tok).encode(CONVERSATION, tools=TOOLS)
        assert tok.decode(ids) == EXPECTED
        outputs_end = tok.hf.token_to_id(TOOL_OUTPUTS_END)
        if markers_are_tokens:  # three runs of results closed; the one in a result's content stays text
            assert ids.count(outputs_end) == 2 and ids.count(tok.hf.token_to_id(TOOL_CALL_BEGIN)) == 3
        else:
            assert outputs_end is None and ids.count(tok.eos_id) == 3


def test_jinja_template_gets_tool_messages(official, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA}))
    jinja = ChatTemplate.load(official, tmp_path)
    assert jinja.render(CONVERSATION, tools=TOOLS) == EXPECTED  # tools described in a system message
    # the same ids where no content holds marker strings (a Jinja template's text is encoded with them as tokens,
    # the fallback keeps contents, the tool description included, as text)
    clean = [{**m, "content": "rain"} if m["role"] == "tool" else m for m in CONVERSATION]
    assert jinja.encode(clean) == ChatTemplate(official).encode(clean)
    assert jinja.render(CONVERSATION[:2]) == ChatTemplate(official).render(CONVERSATION[:2])
    # a template that renders ``tools`` itself gets them, and no description is added
    own = ChatTemplate(official, "{{ tools | length }} tools{% for m in messages %}|{{ m['role'] }}{% endfor %}")
    assert own.render(CONVERSATION[:2], tools=TOOLS) == "1 tools|system|user"


def test_continue_final_message_leaves_the_assistant_turn_open(official, tmp_path):
    """The last (assistant) message without its end of turn, in the fallback format and with a Jinja template
    (whose text after the content is cut); the same ids either way; bad uses are ValueErrors."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA}))
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "It is"}]
    for template in (ChatTemplate(official), ChatTemplate.load(official, tmp_path)):
        for content in ("It is", "<", "e", "end"):  # also contents that the end-of-turn marker contains
            turn = [messages[0], {"role": "assistant", "content": content}]
            closed = template.render(turn, add_generation_prompt=False)
            open_ = template.render(turn, add_generation_prompt=False, continue_final_message=True)
            assert closed == open_ + EOS and open_.endswith(ASSISTANT + content), content
        assert template.encode(messages, add_generation_prompt=False, continue_final_message=True) == \
            ChatTemplate(official).encode(messages, add_generation_prompt=False, continue_final_message=True)
        for bad, match in ((messages[:1], "assistant's"), ([*messages[:1], {"role": "assistant", "content": ""}],
                                                          "text content")):
            with pytest.raises(ValueError, match=match):
                template.render(bad, add_generation_prompt=False, continue_final_message=True)
        with pytest.raises(ValueError, match="cannot both"):
            template.encode(messages, continue_final_message=True)


def test_message_checks():
    checked = check_messages(CONVERSATION)
    assert checked[2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}
    assert checked[3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert "tool_calls" not in checked[5] and checked[7]["content"] == "Checking."
    for bad, match in [({"role": "robot", "content": "x"}, "role"),
                       ({"role": "assistant", "content": None, "tool_calls": "x"}, "list"),
                       ({"role": "assistant", "tool_calls": [{"function": {}}]}, "name"),
                       ({"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}, "type")]:
        with pytest.raises(ValueError, match=match):
            check_messages([bad])
