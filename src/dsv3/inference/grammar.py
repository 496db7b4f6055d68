"""Grammar constraints backed by xgrammar: any JSON object, a JSON schema, DeepSeek-V3 tool calls.

One :class:`GrammarFactory` per (tokenizer, model vocabulary) compiles grammars (an LRU cache keyed by the
request's schema or tools) and makes a fresh :class:`GrammarConstraint` per request, which implements
:class:`~dsv3.inference.constraint.TokenConstraint`::

    factory = GrammarFactory(tokenizer, model.config.vocab_size)       # once, at server start
    constraint = factory.json_schema(schema, max_tokens=params.max_new_tokens)   # per request
    constraint = factory.response_format(body["response_format"], max_tokens=...)  # or None for "text"
    constraint = factory.tool_call(body["tools"], body["tool_choice"], max_tokens=...)  # "required" / named

Ids the model has beyond the tokenizer's (padding rows of the embedding) are never allowed, nor are the
tokenizer's added tokens (BOS, FIM, tool markers ...) as text: xgrammar sees them as special. JSON is compact
(no whitespace, ``,`` and ``:`` separators) so that a model cannot run on with spaces. Once the text is
complete only EOS may follow, and :meth:`GrammarConstraint.is_finished` is already True then.

Told the request's ``max_tokens``, a constraint also makes sure the text completes within it, even for a weak
(random) model: :mod:`dsv3.inference.finishing`.

Tool calls follow :mod:`dsv3.inference.tool_calls`' format. With a tokenizer that has the markers as special
tokens (DeepSeek-V3's), the markers are placed by :class:`_ToolCallDriver` and xgrammar matches the text
between them; with one that has not (trained by dsv3), the whole output is one xgrammar structural tag.
Written against xgrammar 0.2.9 (structural tags with ``format``, ``GrammarMatcher.fork`` and
``override_stop_tokens``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch

from .finishing import GrammarConstraint, TokenTable, set_bit
from .tool_calls import (
    ARGS_BEGIN, ARGS_END, CALL_SEPARATOR, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
    TOOL_SEP, function_specs,
)

try:
    import xgrammar as xgr
except ImportError:  # pragma: no cover - xgrammar is in the serve extra
    xgr = None

# JSON-schema keywords xgrammar accepts but does not enforce (or enforces wrongly): refused, not ignored
_UNSUPPORTED = {
    "not": "'not'", "if": "'if'/'then'/'else'", "then": "'if'/'then'/'else'", "else": "'if'/'then'/'else'",
    "dependentRequired": "'dependentRequired'", "dependentSchemas": "'dependentSchemas'",
    "dependencies": "'dependencies'", "contains": "'contains'", "unevaluatedProperties": "'unevaluatedProperties'",
    "unevaluatedItems": "'unevaluatedItems'", "$dynamicRef": "'$dynamicRef'", "$recursiveRef": "'$recursiveRef'",
}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def check_schema(schema: object, where: str = "schema") -> None:
    """Raise ``ValueError`` naming the first JSON-schema feature the constraint would not enforce: ``not``,
    ``if``/``then``/``else``, ``dependent*``, ``contains``, ``unevaluated*``, ``uniqueItems: true``, ``allOf``
    with more than one subschema, ``$ref`` outside the document. ``oneOf`` is enforced as ``anyOf`` (the same
    when its branches exclude each other, as they normally do); ``format`` values xgrammar does not know are
    annotations (JSON Schema's default), not constraints."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where} must be a JSON schema object")
    for key, feature in _UNSUPPORTED.items():
        if key in schema:
            raise ValueError(f"{where}: JSON schema feature {feature} is not supported by constrained decoding")
    if schema.get("uniqueItems") is True:
        raise ValueError(f"{where}: JSON schema feature 'uniqueItems' is not supported by constrained decoding")
    if len(schema.get("allOf", ())) > 1:
        raise ValueError(f"{where}: JSON schema feature 'allOf' with several subschemas is not supported by "
                         "constrained decoding (merge them into one schema)")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise ValueError(f"{where}: only local '$ref's ('#/...') are supported, got {ref!r}")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), (Mapping, bool)):
            check_schema(schema[key], f"{where}.{key}")
    for key in _SUBSCHEMA_LISTS + ("items",):
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{where}.{key}[{i}]")


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _literal(text: str) -> str:
    """An EBNF string literal (xgrammar reads JSON-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarFactory:
    """Compiles grammars for one tokenizer and model vocabulary, and makes per-request constraints.

    ``tokenizer``: a :class:`dsv3.data.Tokenizer` (byte-level BPE: DeepSeek-V3's or one trained by dsv3);
    ``vocab_size``: the model's (logit rows; at least the tokenizer's). ``cache_size`` compiled grammars are
    kept (least recently used dropped). Building one reads the whole vocabulary (about a second for 129K
    tokens); compiling a new schema takes a few tens of milliseconds to a few hundred. Make constraints from
    one thread (the server's); each constraint is then used by one thread (the engine's), and what constraints
    share (compiled grammars, the token table) is read-only.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None, *, cache_size: int = 64, max_threads: int = 2):
        if xgr is None:
            raise ImportError("grammar constraints need xgrammar: pip install 'dsv3[serve]'")
        hf = tokenizer.hf
        n = hf.get_vocab_size(with_added_tokens=True)
        self.vocab_size = n if vocab_size is None else int(vocab_size)
        if self.vocab_size < n:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {n} ids")
        decoder = json.loads(hf.decoder.__getstate__()) if hf.decoder is not None else {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        if "ByteLevel" not in kinds:
            raise ValueError(f"grammar constraints need a byte-level BPE tokenizer; this one decodes with {kinds}")
        self.eos_id: int = tokenizer.eos_id
        self.added_ids = frozenset(hf.get_added_tokens_decoder())
        encoded = [""] * self.vocab_size  # "" = special: never allowed as text
        for token, i in hf.get_vocab(with_added_tokens=True).items():
            if i not in self.added_ids:
                encoded[i] = token
        self.info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=self.vocab_size,
                                      stop_token_ids=[self.eos_id])
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_size = cache_size
        markers = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)
        ids = [hf.token_to_id(m) for m in markers]
        if all(i is not None for i in ids):
            self.marker_ids: dict[str, int] | None = dict(zip(markers, ids))
        elif any(i is not None for i in ids):
            raise ValueError("the tokenizer has some of DeepSeek-V3's tool-call markers as tokens but not all")
        else:
            self.marker_ids = None  # the markers are plain text
        newline = tokenizer.encode(CALL_SEPARATOR)
        self.newline_id = newline[0] if len(newline) == 1 else None
        texts = list(self.info.decoded_vocab[:self.vocab_size])  # b"" for added tokens and padding
        self._table = TokenTable(texts, self.added_ids, self.eos_id)

    # --- constraints -------------------------------------------------------------------------------------

    def json_object(self, *, max_tokens: int | None = None) -> GrammarConstraint:
        """Any JSON object (OpenAI ``response_format: {"type": "json_object"}``)."""
        compiled = self._compiled(("json_object",),
                                  lambda: self._compiler.compile_grammar(self._json({"type": "object"}, False)))
        return self._constraint(_MatcherDriver(compiled), max_tokens)

    def json_schema(self, schema: Mapping, *, strict: bool = False,
                    max_tokens: int | None = None) -> GrammarConstraint:
        """Text valid against ``schema``. ``strict`` (OpenAI's flag) also forbids properties and array items
        the schema does not name where it leaves them open (as OpenAI's strict mode requires them closed);
        without it, the schema's own ``additionalProperties`` rules."""
        if not isinstance(schema, Mapping):
            raise ValueError("the JSON schema must be an object")
        check_schema(schema)
        compiled = self._compiled(("schema", _canonical(schema), strict),
                                  lambda: self._compiler.compile_grammar(self._json(schema, strict)))
        return self._constraint(_MatcherDriver(compiled), max_tokens)

    def response_format(self, response_format: Mapping | None, *,
                        max_tokens: int | None = None) -> GrammarConstraint | None:
        """The constraint of an OpenAI ``response_format`` (``None`` for ``{"type": "text"}`` or no format)."""
        if response_format is None:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_object(max_tokens=max_tokens)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
                raise ValueError("response_format.json_schema must be {'name': ..., 'schema': {...}}")
            return self.json_schema(spec.get("schema", {}), strict=bool(spec.get("strict", False)),
                                    max_tokens=max_tokens)
        raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")

    def tool_call(self, tools: Sequence[Mapping], choice: str | Mapping = "required", *, parallel: bool = True,
                  max_tokens: int | None = None) -> GrammarConstraint:
        """The model's whole output is DeepSeek-V3 tool calls, each function's arguments valid against its
        ``parameters`` schema (``strict`` per function as in :meth:`json_schema`), then EOS.

        ``choice``: ``"required"`` (one call, or several separated by a newline when ``parallel``, of any of
        ``tools``) or a named function (``{"type": "function", "function": {"name": ...}}`` or the name):
        exactly one call of it. ``"auto"``: free text (no tool-call marker but the one that opens the calls),
        and once the model opens the calls, "required" from there (where the markers are text, once it has
        written the opening marker's text). ``"none"`` is refused."""
        specs = function_specs(tools)
        auto = choice == "auto"
        if auto:
            choice = "required"
        if isinstance(choice, Mapping):
            function = choice.get("function") if choice.get("type", "function") == "function" else None
            name = function.get("name") if isinstance(function, Mapping) else None
            if not isinstance(name, str):
                raise ValueError("tool_choice must be 'required' or {'type': 'function', 'function': {'name': ...}}")
            choice = name
        if choice != "required":
            if choice == "none":
                raise ValueError("tool_choice 'none' needs no constraint")
            specs = [s for s in specs if s["name"] == choice]
            if not specs:
                raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
            parallel = False
        for spec in specs:
            check_schema(spec["parameters"], f"tools[{spec['name']}].parameters")
        key = _canonical([[s["name"], s["parameters"], bool(s.get("strict", False))] for s in specs])
        if self.marker_ids is None:  # markers are text: one grammar for the whole output
            compiled = self._compiled(("tools_text", key, parallel, auto),
                                      lambda: self._tool_text_grammar(specs, parallel, auto))
            driver = _TriggeredDriver(compiled, TOOL_CALLS_BEGIN.encode(), self._table.texts) if auto \
                else _MatcherDriver(compiled)
            return self._constraint(driver, max_tokens, repeats=parallel)
        if self.newline_id is None:
            raise ValueError("the tokenizer does not encode a newline as one token")
        function = self._compiled(("literal", "function"),
                                  lambda: self._compiler.compile_grammar(xgr.Grammar.from_ebnf('root ::= "function"')))
        body = self._compiled(("tools_body", key), lambda: self._compiler.compile_grammar(self._bodies(specs)))
        driver = _ToolCallDriver(self.marker_ids, function, body, self.newline_id, parallel, self.eos_id,
                                 free=self.vocab_size if auto else None)
        return self._constraint(driver, max_tokens, repeats=parallel)

    # --- grammars ----------------------------------------------------------------------------------------

    def _json(self, schema: Mapping, strict: bool):
        try:
            return xgr.Grammar.from_json_schema(dict(schema), any_whitespace=False, separators=(",", ":"),
                                                strict_mode=strict)
        except Exception as e:  # xgrammar raises RuntimeError / its own errors for schemas it cannot convert
            raise ValueError(f"JSON schema not supported by constrained decoding: {e}") from e

    def _bodies(self, specs: list[dict]):
        """``NAME\\n```json\\nARGS\\n``` `` of any of the functions (the text between ``<｜tool▁sep｜>`` and
        ``<｜tool▁call▁end｜>``)."""
        bodies = [xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {_literal(s['name'] + ARGS_BEGIN)}"),
                                     self._json(s["parameters"], bool(s.get("strict", False))),
                                     xgr.Grammar.from_ebnf(f"root ::= {_literal(ARGS_END)}")) for s in specs]
        return bodies[0] if len(bodies) == 1 else xgr.Grammar.union(*bodies)

    def _tool_text_grammar(self, specs: list[dict], parallel: bool, auto: bool = False):
        """The whole tool-call block as text (a tokenizer without the marker tokens); ``auto``: free text until
        the model writes the opening marker, then the block, then the end (xgrammar's triggered tags)."""
        def call(s: dict) -> dict:
            return {"type": "sequence", "elements": [
                {"type": "const_string", "value": f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{s['name']}{ARGS_BEGIN}"},
                {"type": "grammar", "grammar": str(self._json(s["parameters"], bool(s.get("strict", False))))},
                {"type": "const_string", "value": ARGS_END + TOOL_CALL_END}]}
        calls = {"type": "or", "elements": [call(s) for s in specs]}
        inner = [calls]
        if parallel:
            inner.append({"type": "star", "content": {"type": "sequence", "elements": [
                {"type": "const_string", "value": CALL_SEPARATOR}, calls]}})
        if auto:
            block = {"type": "tag", "begin": TOOL_CALLS_BEGIN, "content": {"type": "sequence", "elements": inner},
                     "end": TOOL_CALLS_END}
            fmt = {"type": "triggered_tags", "triggers": [TOOL_CALLS_BEGIN], "tags": [block],
                   "stop_after_first": True}
        else:
            fmt = {"type": "sequence", "elements": [{"type": "const_string", "value": TOOL_CALLS_BEGIN}, *inner,
                                                    {"type": "const_string", "value": TOOL_CALLS_END}]}
        tag = {"type": "structural_tag", "format": fmt}
        return self._compiler.compile_structural_tag(json.dumps(tag, ensure_ascii=False))

    def _compiled(self, key: tuple, build: Callable[[], object]):
        """The compiled grammar of ``key`` from the LRU cache, or built and cached."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            compiled = build()
        except ValueError:
            raise
        except Exception as e:  # xgrammar's compile errors (RuntimeError and its own classes)
            raise ValueError(f"grammar not supported by constrained decoding: {e}") from e
        self._cache[key] = compiled
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _constraint(self, driver, max_tokens: int | None, repeats: bool = False) -> GrammarConstraint:
        return GrammarConstraint(driver, self.vocab_size, self.eos_id, max_tokens, self._table, repeats)


# --- drivers: the grammar state, behind one interface (fill / accept / fork / terminated) ----------------

class _MatcherDriver:
    """One xgrammar matcher over the whole output."""

    def __init__(self, compiled, matcher=None):
        self._compiled = compiled
        self.matcher = matcher if matcher is not None else xgr.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(bitmask)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    def fork(self) -> _MatcherDriver:
        return _MatcherDriver(self._compiled, self.matcher.fork())

    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def structured(self) -> bool:
        """Whether the output so far is inside the constrained structure (always, for a whole-output grammar)."""
        return True


class _TriggeredDriver(_MatcherDriver):
    """One matcher over free text then a structure that opens with ``trigger`` (tool_choice auto where the
    markers are text): ``structured()`` from the moment the accepted bytes contain the trigger."""

    def __init__(self, compiled, trigger: bytes, texts: list[bytes], matcher=None, tail: bytes = b"",
                 opened: bool = False):
        super().__init__(compiled, matcher)
        self.trigger, self.texts, self.tail, self.opened = trigger, texts, tail, opened

    def accept(self, token: int) -> bool:
        ok = self.matcher.accept_token(token)
        if ok and not self.opened:
            self.tail += self.texts[token]
            self.opened = self.trigger in self.tail
            self.tail = self.tail[-(len(self.trigger) - 1):]  # enough to see a trigger split over tokens
        return ok

    def fork(self) -> _TriggeredDriver:
        return _TriggeredDriver(self._compiled, self.trigger, self.texts, self.matcher.fork(), self.tail, self.opened)

    def structured(self) -> bool:
        return self.opened


class _ToolCallDriver:
    """DeepSeek-V3 tool calls where the markers are special tokens: the markers are placed here, and xgrammar
    matches the text between them (``function``; name and arguments), each matcher ending on the marker that
    follows as its stop token. xgrammar never allows a special token as text, so markers cannot leak into
    argument strings."""

    def __init__(self, ids: dict[str, int], function, body, newline: int, parallel: bool, eos: int,
                 free: int | None = None):
        self.ids, self.function, self.body, self.newline, self.parallel, self.eos = \
            ids, function, body, newline, parallel, eos
        self.markers = frozenset(ids.values())
        self.vocab_size = free
        # free (tool_choice auto: any text until the calls open), calls_begin, call_begin, type, body, after,
        # end, terminated
        self.stage = "calls_begin" if free is None else "free"
        self.matcher = None

    def structured(self) -> bool:
        return self.stage != "free"

    def fill(self, bitmask: torch.Tensor) -> None:
        if self.stage in ("type", "body"):
            self.matcher.fill_next_token_bitmask(bitmask)
            # EOS has no text (as every added token) but, not being these matchers' stop token, would be
            # taken for an empty string by xgrammar
            set_bit(bitmask.numpy()[0], self.eos, clear=True)
        elif self.stage == "free":  # any token of the vocabulary but the markers, which only open the calls
            words = bitmask.numpy()[0]
            words[:] = -1
            tail = self.vocab_size & 31
            if tail:
                words[-1] = (1 << tail) - 1
            words[self.vocab_size + 31 >> 5:] = 0
            for t in self.markers - {self.ids[TOOL_CALLS_BEGIN]}:
                set_bit(words, t, clear=True)
        else:
            words = bitmask.numpy()[0]
            words[:] = 0
            for t in self._allowed():
                set_bit(words, t)

    def _allowed(self) -> list[int]:
        ids = self.ids
        if self.stage == "calls_begin":
            return [ids[TOOL_CALLS_BEGIN]]
        if self.stage == "call_begin":
            return [ids[TOOL_CALL_BEGIN]]
        if self.stage == "after":
            return [ids[TOOL_CALLS_END]] + ([self.newline] if self.parallel else [])
        return [self.eos] if self.stage == "end" else []

    def accept(self, token: int) -> bool:
        ids = self.ids
        if self.stage in ("type", "body"):
            stop = ids[TOOL_SEP] if self.stage == "type" else ids[TOOL_CALL_END]
            if token == self.eos or (token in self.markers and token != stop):
                return False  # (without asking xgrammar, which logs a warning for special tokens)
            if not self.matcher.accept_token(token):
                return False
            if token == ids[TOOL_SEP] and self.stage == "type":
                self.stage = "body"
                self.matcher = xgr.GrammarMatcher(self.body, override_stop_tokens=[ids[TOOL_CALL_END]])
            elif token == ids[TOOL_CALL_END] and self.stage == "body":
                self.stage, self.matcher = "after", None
            return True
        if self.stage == "free":
            if token in self.markers and token != ids[TOOL_CALLS_BEGIN]:
                return False
            if token == ids[TOOL_CALLS_BEGIN]:
                self.stage = "call_begin"
            elif token == self.eos:
                self.stage = "terminated"
            return True
        if token not in self._allowed():
            return False
        if token == ids[TOOL_CALL_BEGIN]:
            self.stage = "type"
            self.matcher = xgr.GrammarMatcher(self.function, override_stop_tokens=[ids[TOOL_SEP]])
        else:
            self.stage = {ids[TOOL_CALLS_BEGIN]: "call_begin", self.newline: "call_begin",
                          ids[TOOL_CALLS_END]: "end", self.eos: "terminated"}[token]
        return True

    def fork(self) -> _ToolCallDriver:
        other = _ToolCallDriver(self.ids, self.function, self.body, self.newline, self.parallel, self.eos,
                                self.vocab_size)
        other.stage, other.matcher = self.stage, self.matcher.fork() if self.matcher is not None else None
        return other

    def terminated(self) -> bool:
        return self.stage == "terminated"
