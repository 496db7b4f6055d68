"""Grammar constraints (dsv3.inference.grammar, .finishing): the bitmasks against xgrammar's own, and a random
model -- logits drawn from a seeded generator, sampled from the masked distribution -- that must always
produce valid JSON / tool calls within max_tokens."""

from __future__ import annotations

import json

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from dsv3.data import Tokenizer, train_tokenizer  # noqa: E402
from dsv3.inference.constraint import TokenConstraint, allowed_from_bitmask, bitmask_words, mask_logits  # noqa: E402
from dsv3.inference.grammar import GrammarFactory, check_schema  # noqa: E402
from dsv3.inference.tool_calls import (  # noqa: E402
    TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, ToolCall, format_tool_calls,
    parse_tool_calls,
)

MARKERS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP]
PADDING = 13
"""Model rows beyond the tokenizer's ids (as DeepSeek-V3's 129280 > its tokenizer's)."""

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
             "required": ["id", "email"]},
    "active": {"type": "boolean"}}, "required": ["user", "active"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "search", "strict": True, "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["q"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 600-token byte-level BPE trained on JSON and tool-call text (the markers are a few tokens each)."""
    root = tmp_path_factory.mktemp("grammar")
    corpus = root / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta Paris London weather search city unit name age tags user email".split()

    def word() -> str:
        return words[int(torch.randint(len(words), (1,), generator=g))]

    for i in range(8):
        lines = []
        for _ in range(40):
            obj = {word(): word(), word(): int(torch.randint(100, (1,), generator=g)), word(): [word(), True, None]}
            lines.append(json.dumps(obj, separators=(",", ":")))
            lines.append(" ".join(word() for _ in range(12)) + ".")
            lines.append(format_tool_calls([ToolCall("", word(), json.dumps({word(): word()}))]))
        (corpus / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer(corpus, root / "tok", vocab_size=600, show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def plain(tok_dir):
    """A dsv3-trained tokenizer: the tool-call markers are plain text."""
    tok = Tokenizer.load(tok_dir)
    return tok, GrammarFactory(tok, tok.vocab_size + PADDING)


@pytest.fixture(scope="module")
def official(tok_dir):
    """The same with the markers as special tokens, as in DeepSeek-V3's tokenizer."""
    tok = Tokenizer.load(tok_dir)
    tok.hf.add_special_tokens(MARKERS)
    return tok, GrammarFactory(tok, tok.vocab_size + PADDING)


def validate(value, schema: dict, defs: dict | None = None) -> None:
    """The JSON-schema features the tests use (an AssertionError names the first violation)."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kind = schema.get("type")
    if kind in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (value, schema)
        assert kind == "number" or isinstance(value, int), (value, schema)
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value), (value, schema)
    elif kind is not None:
        assert isinstance(value, types[kind]), (value, schema)
    if "enum" in schema:
        assert value in schema["enum"], (value, schema)
    if isinstance(value, str):
        assert len(value) <= schema.get("maxLength", len(value)), (value, schema)
    if isinstance(value, list):
        assert len(value) <= schema.get("maxItems", len(value)), (value, schema)
        for item in value:
            validate(item, schema.get("items", {}))
    if isinstance(value, dict):
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), (value, schema)
        for key, item in value.items():
            if key in props:
                validate(item, props[key])
            else:
                assert schema.get("additionalProperties", True) is not False, (key, schema)


def sample(constraint, vocab: int, seed: int, max_tokens: int, check_row=None) -> list[int]:
    """A random model under ``constraint``: tokens until it is finished, which must be within max_tokens."""
    g = torch.Generator().manual_seed(seed)
    row = torch.full((bitmask_words(vocab),), -1, dtype=torch.int32)
    tokens: list[int] = []
    while not constraint.is_finished():
        assert len(tokens) < max_tokens, f"seed {seed}: not finished within {max_tokens} tokens"
        constraint.fill_bitmask(row)
        if check_row is not None:
            check_row(row)
        logits = mask_logits(3 * torch.randn(1, vocab, generator=g), row[None])[0]
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        constraint.accept(token)
        tokens.append(token)
    return tokens


def never_specials(tok: Tokenizer, vocab: int, allowed_specials=()):
    """A row check: padding ids and added tokens (but EOS and ``allowed_specials``) never allowed."""
    forbidden = torch.zeros(vocab, dtype=torch.bool)
    forbidden[tok.vocab_size:] = True
    for i in tok.hf.get_added_tokens_decoder():
        forbidden[i] = i != tok.eos_id and i not in allowed_specials
    return lambda row: not (allowed_from_bitmask(row, vocab) & forbidden).any() or pytest.fail("special allowed")


# --- bitmasks ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, text", [
    (None, '{"name":"Ada \\"the\\" first","n":[1,-2.5e3,true,null],"o":{}}'),
    ({**PERSON, "properties": {**PERSON["properties"], "name": {"type": "string"}}},
     '{"name":"Ada","age":36,"tags":["bc","a"]}')])
def test_json_bitmask_equals_xgrammars(plain, schema, text):
    transformers = pytest.importorskip("transformers")
    tok, factory = plain
    vocab = factory.vocab_size
    # the reference: xgrammar's own tokenizer reading (through transformers) and JSON grammar
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf)
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab, stop_token_ids=[tok.eos_id])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        schema or {"type": "object"}, any_whitespace=False, separators=(",", ":"), strict_mode=False)
    reference = xgr.GrammarMatcher(compiled)
    added = torch.zeros(vocab, dtype=torch.bool)
    added[[i for i in tok.hf.get_added_tokens_decoder() if i != tok.eos_id]] = True
    constraint = factory.json_object() if schema is None else factory.json_schema(schema)
    assert isinstance(constraint, TokenConstraint)
    row, expected = torch.zeros(bitmask_words(vocab), dtype=torch.int32), xgr.allocate_token_bitmask(1, vocab)
    for token in tok.encode(text) + [tok.eos_id]:
        constraint.fill_bitmask(row)
        reference.fill_next_token_bitmask(expected)
        allowed = allowed_from_bitmask(row, vocab)
        # the same, except that added tokens (BOS, FIM ...) are never text for dsv3
        assert torch.equal(allowed, allowed_from_bitmask(expected[0], vocab) & ~added)
        assert not allowed[tok.vocab_size:].any() and allowed[token]
        logits = torch.randn(1, vocab)
        assert torch.equal(torch.isfinite(mask_logits(logits, row[None]))[0], allowed)
        assert constraint.is_finished() == (token == tok.eos_id)  # once only EOS may follow
        constraint.accept(token)
        reference.accept_token(token)
    assert constraint.is_finished() and reference.is_terminated()


def test_no_control_characters_in_strings(plain):
    """xgrammar (0.2.9) lets raw control characters into strings with a maxLength (invalid JSON); dsv3 does not."""
    tok, factory = plain
    vocab = factory.vocab_size
    control = [i for i in range(tok.vocab_size) if any(ord(ch) < 0x20 for ch in tok.decode([i]))]
    assert control
    info = xgr.TokenizerInfo([tok.hf.id_to_token(i) or "" for i in range(vocab)], xgr.VocabType.BYTE_LEVEL,
                             vocab_size=vocab, stop_token_ids=[tok.eos_id])
    reference = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(
        PERSON, any_whitespace=False, separators=(",", ":")))
    c = factory.json_schema(PERSON)
    for token in tok.encode('{"name":"A'):
        c.accept(token)
        assert reference.accept_token(token)
    row, expected = torch.zeros(bitmask_words(vocab), dtype=torch.int32), xgr.allocate_token_bitmask(1, vocab)
    c.fill_bitmask(row)
    reference.fill_next_token_bitmask(expected)
    assert allowed_from_bitmask(expected[0], vocab)[control].any()
    assert not allowed_from_bitmask(row, vocab)[control].any()


def test_spot_checks(plain):
    tok, factory = plain
    vocab = factory.vocab_size
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)

    def allowed_texts(constraint) -> set[str]:
        constraint.fill_bitmask(row)
        return {tok.decode([i]) for i in allowed_from_bitmask(row, vocab).nonzero().flatten().tolist()}

    c = factory.json_schema(PERSON)
    assert allowed_texts(c) == {t for t in allowed_texts(c) if '{"name":"'.startswith(t) or t.startswith('{"')}
    for token in tok.encode('{"name":"Ada","age":'):
        c.accept(token)
    texts = allowed_texts(c)
    assert {"1", "0"} <= texts and not {" ", "-", '"', "{"} & texts  # compact; minimum 0; an integer
    with pytest.raises(ValueError, match="not allowed"):
        c.accept(tok.encode(" ")[0])
    for token in tok.encode('36,"tags":["bc"]}'):
        c.accept(token)
    assert allowed_texts(c) == {tok.decode([tok.eos_id])} and c.is_finished()  # only EOS after the object
    c.accept(tok.eos_id)
    assert c.is_finished()


# --- a random model finishes within max_tokens ---------------------------------------------------------------

@pytest.mark.parametrize("kind, budget", [("json_object", 32), ("person", 64), ("nested", 64)])
def test_random_model_writes_valid_json_within_budget(plain, kind, budget):
    tok, factory = plain
    schema = {"json_object": {"type": "object"}, "person": PERSON, "nested": NESTED}[kind]
    check = never_specials(tok, factory.vocab_size)
    lengths = []
    for seed in range(50):
        c = factory.json_object(max_tokens=budget) if kind == "json_object" else \
            factory.json_schema(schema, max_tokens=budget)
        tokens = sample(c, factory.vocab_size, seed, budget, check if seed < 5 else None)
        validate(json.loads(tok.decode(tokens)), schema)
        lengths.append(len(tokens))
    assert max(lengths) > budget // 2  # the model did write freely before finishing


def test_without_budget_a_random_model_runs_on(plain):
    """What the finishing rule is for: the grammar alone lets a random model write one string on and on."""
    tok, factory = plain
    unfinished = 0
    for seed in range(10):
        try:
            sample(factory.json_object(), factory.vocab_size, seed, 32)
        except AssertionError:
            unfinished += 1
    assert unfinished >= 5


def test_tight_budget_follows_the_plan(plain):
    """With barely the tokens needed, the constraint is in its hard zone from the start: still valid."""
    tok, factory = plain
    for budget in (24, 30):
        for seed in range(10):
            c = factory.json_schema(PERSON, max_tokens=budget)
            validate(json.loads(tok.decode(sample(c, factory.vocab_size, seed, budget))), PERSON)


def check_calls(text: str, names: set[str], count: int | None = None) -> None:
    content, calls = parse_tool_calls(text)
    assert content == "" and calls and (count is None or len(calls) == count), text
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.name in names
        validate(json.loads(call.arguments), specs[call.name])
    assert text.endswith(TOOL_CALL_END + TOOL_CALLS_END)


@pytest.mark.parametrize("which, budget", [("official", 96), ("plain", 128)])
def test_random_model_writes_tool_calls(request, which, budget):
    tok, factory = request.getfixturevalue(which)
    markers = {tok.hf.token_to_id(m) for m in MARKERS} - {None}
    assert len(markers) == (5 if which == "official" else 0)
    check = never_specials(tok, factory.vocab_size, markers)
    for seed in range(30):
        c = factory.tool_call(TOOLS, "required", max_tokens=budget)
        tokens = sample(c, factory.vocab_size, seed, budget, check if seed < 5 else None)
        assert not markers or set(tokens) & markers  # the markers are the special tokens, not text
        check_calls(tok.decode(tokens), {"get_weather", "search"})
    for seed in range(10):
        c = factory.tool_call(TOOLS, {"type": "function", "function": {"name": "search"}}, max_tokens=budget)
        check_calls(tok.decode(sample(c, factory.vocab_size, seed, budget)), {"search"}, count=1)


def test_tool_call_masks(official):
    tok, factory = official
    vocab = factory.vocab_size
    ids = {m: tok.hf.token_to_id(m) for m in MARKERS}
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    c = factory.tool_call(TOOLS)

    def allowed() -> set[int]:
        c.fill_bitmask(row)
        return set(allowed_from_bitmask(row, vocab).nonzero().flatten().tolist())

    def feed(text: str) -> None:
        for token in tok.encode(text, allow_special=True):
            c.accept(token)

    assert allowed() == {ids[TOOL_CALLS_BEGIN]}
    feed(TOOL_CALLS_BEGIN)
    assert allowed() == {ids[TOOL_CALL_BEGIN]}
    feed(TOOL_CALL_BEGIN)
    assert all("function".startswith(tok.decode([t])) for t in allowed())
    feed("function")
    assert allowed() == {ids[TOOL_SEP]}
    feed(TOOL_SEP + 'search\n```json\n{"q":"x')
    inside = allowed()  # string content: any text, but no marker and no EOS
    assert len(inside) > 200 and not inside & (set(ids.values()) | {tok.eos_id})
    feed('"}\n```')
    assert allowed() == {ids[TOOL_CALL_END]}
    feed(TOOL_CALL_END)
    assert allowed() == {ids[TOOL_CALLS_END], tok.encode("\n")[0]}
    feed(TOOL_CALLS_END)
    assert allowed() == {tok.eos_id} and c.is_finished()


def test_auto_is_free_text_until_the_calls_open(official):
    """tool_choice auto: any token but the markers (the one that opens the calls excepted), EOS included, no bit
    past the vocabulary; prose with quotes does not disturb the JSON state after; then calls as "required"."""
    tok, factory = official
    vocab = factory.vocab_size
    ids = {m: tok.hf.token_to_id(m) for m in MARKERS}
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    c = factory.tool_call(TOOLS, "auto", max_tokens=96)

    def allowed() -> set[int]:
        c.fill_bitmask(row)
        return set(allowed_from_bitmask(row, vocab).nonzero().flatten().tolist())

    free = allowed()
    assert free == set(range(vocab)) - (set(ids.values()) - {ids[TOOL_CALLS_BEGIN]})
    assert tok.eos_id in free and not c.is_finished()
    for token in tok.encode('He said "hi', allow_special=True):  # an unclosed quote in the prose
        c.accept(token)
    assert allowed() == free
    c.accept(ids[TOOL_CALLS_BEGIN])
    assert allowed() == {ids[TOOL_CALL_BEGIN]}
    for seed in range(5):  # a random model finishes valid calls from there, within the budget
        c = factory.tool_call(TOOLS, "auto", max_tokens=96)
        for token in tok.encode("Let me check.", allow_special=True) + [ids[TOOL_CALLS_BEGIN]]:
            c.accept(token)
        tokens = sample(c, vocab, seed, 96 - c.generated)
        check_calls(TOOL_CALLS_BEGIN + tok.decode(tokens), {"get_weather", "search"})
    c = factory.tool_call(TOOLS, "auto")
    c.accept(tok.eos_id)  # a plain answer may end at once
    assert c.is_finished()


def test_auto_with_text_markers_is_free_until_the_opening_marker_is_written(plain):
    """A tokenizer with the markers as text (one trained by dsv3): free text (EOS included) until the model has
    written the opening marker's text, split over several tokens; from there valid calls within the budget."""
    tok, factory = plain
    vocab = factory.vocab_size
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    c = factory.tool_call(TOOLS, "auto", max_tokens=160)
    c.fill_bitmask(row)
    free = set(allowed_from_bitmask(row, vocab).nonzero().flatten().tolist())
    assert tok.eos_id in free and len(free) > 0.95 * tok.vocab_size and c.zone == "free"  # all but added tokens
    opening = tok.encode(TOOL_CALLS_BEGIN)
    assert len(opening) > 1  # the marker is text here, several tokens
    for seed in range(5):
        c = factory.tool_call(TOOLS, "auto", max_tokens=160)
        for token in tok.encode('Let me "check".') + opening:
            c.accept(token)
        tokens = sample(c, vocab, seed, 160 - c.generated)
        assert c.is_finished()
        check_calls(TOOL_CALLS_BEGIN + tok.decode(tokens), {"get_weather", "search"})
    c = factory.tool_call(TOOLS, "auto")
    c.accept(tok.eos_id)  # a plain answer may end at once
    assert c.is_finished()


def test_parallel_calls_and_exact_text(official):
    tok, factory = official
    text = format_tool_calls([ToolCall("", "search", '{"q":"a"}'),
                              ToolCall("", "get_weather", '{"city":"P","unit":"F"}')])
    ids = tok.encode(text, allow_special=True)
    for parallel, ok in ((True, True), (False, False)):
        c = factory.tool_call(TOOLS, "required", parallel=parallel)
        accepted = 0
        try:
            for token in ids:
                c.accept(token)
                accepted += 1
        except ValueError:
            pass
        assert (accepted == len(ids)) == ok
    assert c.is_finished() is False
    c = factory.tool_call(TOOLS)
    for token in ids:
        c.accept(token)
    assert c.is_finished()


# --- requests the constraint cannot honour, caching ----------------------------------------------------------

def test_unsupported_schemas_and_requests_are_refused(plain):
    _, factory = plain
    for schema, feature in [({"not": {"type": "string"}}, "'not'"), ({"if": {}, "then": {}}, "'if'"),
                            ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                            ({"type": "object", "properties": {"a": {"contains": {}}}}, "properties.a: .*'contains'"),
                            ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf"),
                            ({"$ref": "https://example.com/s.json"}, "local"), ("string", "must be an object")]:
        with pytest.raises(ValueError, match=feature):
            factory.json_schema(schema)
    check_schema({"oneOf": [{"type": "integer"}, {"type": "string"}], "allOf": [{"minimum": 1}]})
    with pytest.raises(ValueError, match="needs no constraint"):
        factory.tool_call(TOOLS, "none")
    with pytest.raises(ValueError, match="not among the tools"):
        factory.tool_call(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tools\\[get_weather\\]"):
        factory.tool_call([{"type": "function", "function": {"name": "get_weather", "parameters": {"not": {}}}}])
    assert factory.response_format({"type": "text"}) is None and factory.response_format(None) is None
    with pytest.raises(ValueError, match="response_format.type"):
        factory.response_format({"type": "xml"})


def test_response_format_strict_and_cache(tok_dir):
    tok = Tokenizer.load(tok_dir)
    factory = GrammarFactory(tok, cache_size=2)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    loose = factory.response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    strict = factory.response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                                "strict": True}})
    for c, extra_ok in ((loose, True), (strict, False)):
        for token in tok.encode('{"a":1'):
            c.accept(token)
        row = torch.zeros(bitmask_words(factory.vocab_size), dtype=torch.int32)
        c.fill_bitmask(row)
        assert bool(allowed_from_bitmask(row, factory.vocab_size)[tok.encode(",")[0]]) == extra_ok
    assert len(factory._cache) == 2
    first = factory._cache[next(iter(factory._cache))]
    factory.json_schema(schema)  # a hit: no new entry
    assert len(factory._cache) == 2 and factory._cache[next(iter(factory._cache))] is not first
    factory.json_object()  # a third grammar evicts the least recently used
    assert len(factory._cache) == 2 and ("json_object",) in factory._cache


def test_factory_checks_its_tokenizer(tok_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    tok = Tokenizer.load(tok_dir)
    with pytest.raises(ValueError, match="smaller"):
        GrammarFactory(tok, tok.vocab_size - 1)
    word_level = HFTokenizer(models.WordLevel({"<｜end▁of▁sentence｜>": 0, "a": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="byte-level"):
        GrammarFactory(Tokenizer(word_level))


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "padded-steps"])
def test_engine_writes_valid_json_with_a_random_model(plain, cuda_graph):
    """Through the engine (GenerationRequest.constraint): a random-weight model, sampling at temperature 1,
    in one batch with an unconstrained request, writes schema-valid JSON and stops within max_tokens."""
    import dsv3
    from dsv3.inference import Engine, GenerationRequest, SamplingParams

    tok, factory = plain
    model = dsv3.build_model(dsv3.preset("tiny").replace(vocab_size=factory.vocab_size), seed=0)
    engine = Engine(model, tok, max_batch=4, max_seq_len=160, page_size=8, cuda_graph=cuda_graph)
    budget = 64
    schemas = [PERSON, NESTED, {"type": "object"}, None]
    requests = []
    for i, schema in enumerate(schemas):
        # the unconstrained row ignores EOS: that it runs to the budget shows the others' masks left it alone
        params = SamplingParams(max_new_tokens=budget, temperature=1.0, seed=i, ignore_eos=schema is None)
        constraint = None if schema is None else factory.json_schema(schema, max_tokens=budget)
        requests.append(GenerationRequest("The answer as JSON:", params, constraint=constraint))
    results = engine.generate(requests)
    for schema, res in zip(schemas[:3], results):
        assert res.finish_reason == "stop" and len(res.tokens) <= budget, (res.finish_reason, len(res.tokens))
        validate(json.loads(res.text), schema)
    assert results[3].finish_reason == "length"  # the unconstrained row ran on, unaffected
    with pytest.raises(ValueError):
        json.loads(results[3].text)


def test_no_surrogates_in_strings(plain):
    """UTF-8-encoded surrogates (bytes ED A0..BF ..) are not UTF-8; xgrammar (0.2.9) lets them into strings with
    a maxLength, dsv3 does not (within a token, nor across two: after a token ending in ED); and a random
    model's strings decode as strict UTF-8 within the length."""
    import re

    tok, factory = plain
    vocab = factory.vocab_size
    texts = list(factory.info.decoded_vocab[:vocab])
    inside = [i for i, t in enumerate(texts) if re.search(rb"\xed[\xa0-\xbf]", t)]
    tails = [i for i, t in enumerate(texts) if t[:1] and 0xa0 <= t[0] <= 0xbf]
    ed = texts.index(b"\xed")
    assert tails  # the byte-level vocabulary has every single byte (this small one no merged surrogate)
    c = factory.json_schema(PERSON)
    for token in tok.encode('{"name":"A'):
        c.accept(token)
    row = torch.zeros(bitmask_words(vocab), dtype=torch.int32)
    c.fill_bitmask(row)
    allowed = allowed_from_bitmask(row, vocab)
    assert not allowed[inside].any() and allowed[ed]
    c.accept(ed)
    c.fill_bitmask(row)
    allowed = allowed_from_bitmask(row, vocab)
    assert not allowed[tails].any() and allowed[texts.index(b"\x80")]  # U+D000..D7FF may still follow
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 6}}, "required": ["s"]}
    for seed in range(40):
        tokens = sample(factory.json_schema(schema, max_tokens=32), vocab, seed, 32)
        value = json.loads(b"".join(texts[t] for t in tokens if t != tok.eos_id).decode("utf-8"))
        assert len(value["s"]) <= 6, value
