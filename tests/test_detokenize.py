"""Tests of incremental detokenization (:mod:`dsv3.inference.detokenize`): streamed text == full decode, stop
ids and strings, the same events as re-decoding the whole completion per token, a bounded decode cost."""

import random
from collections.abc import Sequence

import pytest
from tokenizers.decoders import DecodeStream

from dsv3.data.tokenizer import Tokenizer, train_tokenizer
from dsv3.inference import detokenize
from dsv3.inference.detokenize import IncrementalDetokenizer

FFFD = "\ufffd"
WORDS = ["def", "return", "self", "naïve", "café", "données", "Ελληνικά", "русский", "日本語", "中文字符", "漢字",
         "😀", "🎉", "👍🏽", "x", "=", "(", ")", ":", "\n"]
RARE = ["ß", "龍", "🦀", "é", "ü"]  # rare in the corpus: split into byte tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE trained the project's way on mixed-script text: many characters span several tokens."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        doc = " ".join(rng.choice(WORDS) for _ in range(80)) + "\n"
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return train_tokenizer(root, tmp_path_factory.mktemp("tok"), vocab_size=400, show_progress=False)


class DecodeOnly:
    """A tokenizer with nothing but ``decode`` (the windowed path); counts the tokens it decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens = 0

    def decode(self, ids) -> str:
        ids = list(ids)
        self.tokens += len(ids)
        return self.tokenizer.decode(ids)


class CountingTokenizer(Tokenizer):
    """The project's tokenizer (the DecodeStream path), counting the tokens decoded from Python."""

    tokens = 0

    def decode(self, ids) -> str:
        ids = list(ids)
        self.tokens += len(ids)
        return super().decode(ids)


@pytest.fixture(params=["stream", "window"])
def tok(request, tokenizer):
    """The tokenizer as given to the detokenizer: the project's (DecodeStream) or a decode-only object."""
    t = tokenizer if request.param == "stream" else DecodeOnly(tokenizer)
    assert (IncrementalDetokenizer(t)._stream is not None) == (request.param == "stream")
    return t


def mixed_text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS + RARE) + rng.choice(["", " ", "  "]) for _ in range(n_words))


def random_ids(tokenizer: Tokenizer, rng: random.Random) -> list[int]:
    """Random ids (stray bytes, split characters, special tokens) or a random slice of an encoding."""
    if rng.random() < 0.5:
        return [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
    ids = tokenizer.encode(mixed_text(rng, 20))
    a = rng.randrange(len(ids))
    return ids[a:a + rng.randint(1, 40)]


def run(tok, ids: Sequence[int], stop=(), stop_ids=(), max_new: int | None = None):
    """Push ``ids`` one at a time like the engine: ([(delta, finish reason)], final text)."""
    detok = IncrementalDetokenizer(tok, stop, stop_ids)
    events = []
    for n, t in enumerate(ids, 1):
        last = max_new is not None and n >= max_new
        delta, reason = detok.push(t, last=last)
        events.append((delta, reason or ("length" if last else None)))
        if events[-1][1]:
            break
    return events, detok.text


# --- reference: the engine's former emit, which decoded the whole completion for every token -----------------
def _streamable(text: str, stops: Sequence[str]) -> int:
    end = len(text.rstrip(FFFD))
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                hold = max(hold, k)
                break
    return end - hold


def reference(tokenizer, ids, stop=(), stop_ids=(), max_new: int | None = None):
    tokens, sent, events, text = [], 0, [], ""
    for token in ids:
        tokens.append(token)
        reason = "stop" if token in stop_ids else None
        text = tokenizer.decode(tokens[:-1] if reason == "stop" else tokens)
        cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if cut:
            text, reason = text[:min(cut)], "stop"
        if reason is None and max_new is not None and len(tokens) >= max_new:
            reason = "length"
        delta = ""
        safe = len(text) if reason is not None else _streamable(text, stop)
        if safe > sent:
            delta = text[sent:safe]
            sent = safe
        events.append((delta, reason))
        if reason:
            break
    return events, text


# --- tests -----------------------------------------------------------------------------------------------------
def test_tokenizer_splits_characters(tokenizer):
    """The test data exercise characters split across tokens (whose tokens alone decode to U+FFFD)."""
    ids = tokenizer.encode(" ".join(WORDS + RARE))
    assert tokenizer.decode(ids) == " ".join(WORDS + RARE)
    assert sum(FFFD in tokenizer.decode([t]) for t in ids) >= 10


def test_decode_stream_agrees_with_decode(tokenizer):
    """What the detokenizer relies on: DecodeStream's chunks are the full decode, less a tail ending in U+FFFD
    that it holds back (a partial character, or invalid bytes not yet followed by a valid character)."""
    rng = random.Random(1)
    for _ in range(300):
        ids = random_ids(tokenizer, rng)
        stream = DecodeStream(skip_special_tokens=False)
        out = "".join(c for c in (stream.step(tokenizer.hf, t) for t in ids) if c is not None)
        full = tokenizer.decode(ids)
        assert full.startswith(out)
        assert full == out or full.endswith(FFFD)


def test_stream_equals_full_decode(tok, tokenizer):
    rng = random.Random(2)
    held_partial = 0
    for _ in range(300):
        ids = random_ids(tokenizer, rng)
        full = tokenizer.decode(ids)
        detok = IncrementalDetokenizer(tok)
        streamed = ""
        for n, t in enumerate(ids, 1):
            delta, reason = detok.push(t, last=n == len(ids))
            assert reason is None
            streamed += delta
            so_far = tokenizer.decode(ids[:n])
            assert detok.text == so_far
            if n < len(ids):  # all but trailing U+FFFD (an incomplete character) is streamed at once
                assert streamed == so_far.rstrip(FFFD)
                held_partial += so_far.endswith(FFFD) and not full.startswith(so_far)
            assert full.startswith(streamed)  # so never a U+FFFD that the full decode does not have
            if FFFD not in full:
                assert FFFD not in delta
        assert streamed == detok.text == full
    assert held_partial > 50  # characters completed by a later token were held back


def test_long_completion_equals_full_decode(tok, tokenizer):
    ids = tokenizer.encode(mixed_text(random.Random(3), 600))
    events, text = run(tok, ids, max_new=len(ids))
    assert "".join(d for d, _ in events) == text == tokenizer.decode(ids)
    assert events[-1][1] == "length"


def test_stop_ids(tok, tokenizer):
    eos = tokenizer.eos_id
    ids = tokenizer.encode("naïve 龍 日本語 café")
    events, text = run(tok, ids + [eos] + ids, stop_ids={eos})
    assert len(events) == len(ids) + 1 and events[-1][1] == "stop"
    assert "".join(d for d, _ in events) == text == "naïve 龍 日本語 café"
    assert run(tok, [eos, *ids], stop_ids={eos}) == ([("", "stop")], "")
    # a stop token after part of a character: the text is what decoding the tokens before it gives
    partial = next(ids[:i] for i in range(len(ids), 0, -1) if tokenizer.decode(ids[:i]).endswith(FFFD))
    events, text = run(tok, partial + [eos], stop_ids={eos})
    assert "".join(d for d, _ in events) == text == tokenizer.decode(partial)


def check_stop(tok, tokenizer, ids, stop, expected):
    """The text is cut to ``expected``; nothing past it is ever streamed, and it ends with "stop"."""
    events, text = run(tok, ids, stop)
    assert text == expected and events[-1][1] == "stop" and len(events) < len(ids) + 1
    streamed = ""
    for delta, _ in events:
        streamed += delta
        assert expected.startswith(streamed)  # held back until recognised: never a piece of the stop string
    assert streamed == expected


def test_stop_strings(tok, tokenizer):
    text = "def naïve 日本語 return café données"
    ids = tokenizer.encode(text)
    check_stop(tok, tokenizer, ids, ["日本語 return"], "def naïve ")  # spans several tokens
    check_stop(tok, tokenizer, ids, ["données", "ret"], "def naïve 日本語 ")  # the earliest, not the first listed
    check_stop(tok, tokenizer, ids, ["本"], "def naïve 日")  # part of a multi-byte token sequence
    # one starting inside a token
    pieces = [tokenizer.decode([t]) for t in ids]
    i = next(i for i, p in enumerate(pieces) if i > 0 and len(p) >= 3 and FFFD not in p)
    start = len(tokenizer.decode(ids[:i])) + 1
    stop = text[start:start + 4]
    check_stop(tok, tokenizer, ids, [stop], text[:text.find(stop)])
    check_stop(tok, tokenizer, ids + [tokenizer.eos_id], ["zzz", "café"], "def naïve 日本語 return ")


def test_hold_back_and_flush(tok, tokenizer):
    ids = tokenizer.encode("naïve café")
    detok = IncrementalDetokenizer(tok, ["café!", "ïvz"])
    streamed = "".join(detok.push(t)[0] for t in ids)
    assert streamed == "naïve " and detok.text == "naïve café"  # "café" may begin "café!"
    detok = IncrementalDetokenizer(tok, ["café!"])
    deltas = [detok.push(t, last=n == len(ids))[0] for n, t in enumerate(ids, 1)]
    assert "".join(deltas) == detok.text == "naïve café" and deltas[-1].endswith("café")
    with pytest.raises(RuntimeError):
        detok.push(ids[0])


def test_a_run_of_invalid_bytes_is_streamed_before_the_end(tok, tokenizer):
    """A model that writes stray UTF-8 continuation bytes (a small random model does) gets them streamed as
    U+FFFD once they cannot be part of a character any more, not all held back until the completion ends."""
    stray = next(t for t in range(tokenizer.vocab_size) if tokenizer.decode([t] * 3) == FFFD * 3
                 and tokenizer.decode([t] + tokenizer.encode("a")) == FFFD + "a")
    ids = [stray] * 40
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(t, last=n == len(ids))[0] for n, t in enumerate(ids, 1)]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids) == FFFD * 40
    # streamed along the way, a few tokens at a time (what may still be a character's start is held back)
    assert len("".join(deltas[:-1])) >= 30 and sum(1 for d in deltas[:-1] if d) >= 5


def test_same_events_as_full_redecoding(tok, tokenizer):
    """Deltas, finish reasons and text of every step agree with decoding the whole completion each time."""
    rng = random.Random(4)
    stopped = 0
    for _ in range(500):
        ids = random_ids(tokenizer, rng)
        full = tokenizer.decode(ids)
        stop = []
        for _ in range(rng.randint(0, 3)):
            a = rng.randrange(len(full) + 1)
            stop.append(full[a:a + rng.randint(1, 6)])  # may be empty, may hold U+FFFD or a special token
        if rng.random() < 0.3:
            stop.append(rng.choice(WORDS))
        stop_ids = {rng.choice(ids)} if rng.random() < 0.3 else set()
        max_new = rng.choice([None, rng.randint(1, len(ids))])
        expected = reference(tokenizer, ids, stop, stop_ids, max_new)
        assert run(tok, ids, stop, stop_ids, max_new) == expected, (ids, stop, stop_ids, max_new)
        stopped += expected[0][-1][1] == "stop"
    assert stopped > 150


def test_decode_cost_does_not_grow(tokenizer):
    """Tokens decoded per push: the same for a 50- and a 2,000-token completion, under a constant. Both start with
    a run of invalid bytes (U+FFFD that never completes), the worst case for the pending window."""
    rng = random.Random(5)
    stray = next(t for t in range(tokenizer.vocab_size) if tokenizer.decode([t] * 3) == FFFD * 3)
    ids = (tokenizer.encode(mixed_text(rng, 10))[:10] + [stray] * 30 + tokenizer.encode(mixed_text(rng, 2000)))[:2000]
    assert len(ids) == 2000
    for counter in (DecodeOnly(tokenizer), CountingTokenizer(tokenizer.hf)):
        worst = {}
        for n in (50, 2000):
            detok = IncrementalDetokenizer(counter, ["日本語?", "café!"], {tokenizer.eos_id})
            worst[n] = pending = 0
            for i, t in enumerate(ids[:n]):
                counter.tokens = 0
                detok.push(t, last=i == n - 1)
                worst[n] = max(worst[n], counter.tokens)
                pending = max(pending, len(detok._pending))  # also bounds what DecodeStream decodes (in Rust)
                assert len(detok._buf) <= 45  # held text (the run of U+FFFD) and the stop-string context only
            assert pending <= detokenize.MAX_PENDING
            assert detok.text == tokenizer.decode(ids[:n])
        assert worst[50] == worst[2000] <= 32, worst
