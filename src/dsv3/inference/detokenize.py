"""Incremental detokenization for streaming: text deltas and stop strings at a cost per token that does not
grow with the completion.

Decoding the whole completion again for every new token is quadratic in its length.
:class:`IncrementalDetokenizer` decodes only the new token with a few tokens of left context, searches for
stop strings only in the new text and the few characters before it, and keeps only the text it may still
hold back. It gives exactly what full re-decoding gives:

* the completion text is the decoding of the completion tokens, a final stop token (e.g. EOS) excluded;
* once that text contains a stop string it is cut before the earliest occurrence and the request
  finishes ("stop");
* while unfinished, an incomplete UTF-8 character (decoded as U+FFFD) and any tail that may be the start
  of a stop string are held back; when finished, everything up to the cut is flushed;
* the streamed deltas add up to the final text.

This relies on the decoder being prefix-consistent: the text of some tokens, trailing U+FFFD stripped, is a
prefix of the text of any continuation. Byte-level BPE (DeepSeek-V3's, and those trained by
:mod:`dsv3.data.tokenizer`) is. A :class:`~dsv3.data.tokenizer.Tokenizer` is decoded with the Rust
``tokenizers.decoders.DecodeStream``; any other object with ``decode(ids) -> str`` by re-decoding a window.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..data.tokenizer import Tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

REPLACEMENT = "\ufffd"
"""What decoders show for bytes that are not (yet) a complete UTF-8 character."""
CONTEXT_TOKENS = 4
"""Tokens of final text decoded before the new ones: some decoders treat a sequence's first token apart
(SentencePiece drops its leading space), so a token is never decoded alone."""
CHAR_TOKENS = 4
"""A UTF-8 character has at most 4 bytes, so at most the last 4 tokens can hold an incomplete one."""
MAX_PENDING = 8
"""Tokens whose text may still change kept at most. Longer runs still ending in U+FFFD are invalid bytes:
all but the last :data:`CHAR_TOKENS` of them are then final."""


class IncrementalDetokenizer:
    """The text of one request's completion, one token at a time.

    ``stop``: stop strings (empty ones are ignored); ``stop_ids``: tokens that end the completion
    without being part of its text. Working state: a few tokens, the held-back text (a possible stop-string
    start, or trailing U+FFFD) and the ``max(len(stop)) - 1`` characters streamed last. In the engine::

        detok = IncrementalDetokenizer(tokenizer, params.stop, stop_ids)  # per request
        delta, reason = detok.push(token, last=n_tokens >= max_new_tokens)  # reason None + last: "length"
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids: Collection[int] = ()):
        self._decode = tokenizer.decode
        use_stream = isinstance(tokenizer, Tokenizer) and DecodeStream is not None
        self._hf = tokenizer.hf if use_stream else None
        self._stream = DecodeStream(skip_special_tokens=False) if use_stream else None  # == Tokenizer.decode
        self._stops = [s for s in stop if s]
        self._keep = max(map(len, self._stops), default=1) - 1
        """Characters before new text where a stop string ending in it may begin."""
        self._stop_ids = frozenset(stop_ids)
        # tokens -> text
        self._context: list[int] = []  # the last few tokens whose text is final
        self._context_text: str | None = None  # their decoding, once needed
        self._pending: list[int] = []  # the tokens after them, whose text may still change
        # text; positions are absolute character offsets in the completion text
        self._chunks: list[str] = []  # the streamed deltas
        self._streamed = ""  # their concatenation, as far as :attr:`text` has joined them
        self._buf = ""  # final text from offset _base on: the last `_keep` streamed characters and what is held
        self._base = 0
        self._tail = ""  # the text of the pending tokens, as decoding shows it now (U+FFFD for a partial character)
        self._sent = 0  # characters streamed; may run into _tail (text before its U+FFFD)
        self._done = False

    @property
    def text(self) -> str:
        """The completion text so far: everything streamed and what is held back (cut at a stop string once
        found). Building the string copies it: linear in its length, so read it when the request finishes
        rather than after every token."""
        if self._chunks:
            self._streamed += "".join(self._chunks)
            self._chunks.clear()
        return self._streamed + (self._buf + self._tail)[self._sent - self._base:]

    def push(self, token: int, last: bool = False) -> tuple[str, str | None]:
        """Add the next token: returns (text to stream now, ``"stop"`` when a stop token or string ended the
        completion, else ``None``). ``last``: no more tokens will come (e.g. length limit); flush all."""
        if self._done:
            raise RuntimeError("push after the completion finished")
        reason = None
        if token in self._stop_ids:
            reason = "stop"  # its text is not part of the completion; the text before it was searched already
        else:
            end = len(self._buf)  # final text before this token: no stop string lies wholly inside it
            final, self._tail = self._decode_token(token)
            self._buf += final
            text = self._buf + self._tail
            start = max(0, end - self._keep)
            hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
            if hits:
                self._buf, self._tail, reason = text[:min(hits)], "", "stop"
        self._done = reason is not None or last
        text = self._buf + self._tail
        sent = self._sent - self._base
        safe = len(text) if self._done else self._streamable(text)
        delta = text[sent:safe] if safe > sent else ""
        if delta:
            self._sent += len(delta)
            self._chunks.append(delta)
        # Keep `_keep` characters before the first one that is unsent or not final (stop strings may begin there).
        drop = min(self._sent - self._base, len(self._buf)) - self._keep
        if drop > 0:
            self._buf, self._base = self._buf[drop:], self._base + drop
        return delta, reason

    def _streamable(self, text: str) -> int:
        """How much of ``text`` can be sent: hold back the pending tokens' trailing U+FFFD (an incomplete
        character; a final U+FFFD stands for invalid bytes and goes out) and any tail that may be the start of a
        stop string."""
        end = len(text) - (len(self._tail) - len(self._tail.rstrip(REPLACEMENT)))
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:k], 0, end):
                    hold = k
                    break
        return end - hold

    # ----------------------------------------------------------------------------------------------
    # tokens -> text
    def _decode_token(self, token: int) -> tuple[str, str]:
        """Add a token: (text that has become final, text of the tokens still pending)."""
        self._pending.append(token)
        final = None
        if self._stream is not None:
            try:
                final = self._stream.step(self._hf, token)  # None until the text no longer ends in U+FFFD
            except Exception:  # its prefix check failed (a decoder that is not prefix-consistent)
                self._stream = None
        if final is None:
            tail = self._after_context(self._pending)
            if self._stream is None and tail and not tail.endswith(REPLACEMENT):
                final = tail
        if final is not None:
            self._advance(len(self._pending))
            return final, ""
        if len(self._pending) > MAX_PENDING:
            head = self._pending[:-CHAR_TOKENS]
            head_text = self._after_context(head)
            if tail.startswith(head_text):  # its U+FFFD are invalid bytes, not a character still to complete
                self._stream = None  # its own buffer would keep growing: decode windows from here on
                self._advance(len(head))
                return head_text, tail[len(head_text):]
        return "", tail

    def _after_context(self, ids: list[int]) -> str:
        """The text that ``ids`` add after the context tokens (two decodes of a few tokens each)."""
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        return self._decode(self._context + ids)[len(self._context_text):]

    def _advance(self, n: int) -> None:
        """The first ``n`` pending tokens' text is final: they become context."""
        self._context = (self._context + self._pending[:n])[-CONTEXT_TOKENS:]
        self._context_text = None
        del self._pending[:n]
