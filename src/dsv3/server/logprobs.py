"""The engine's log-probabilities (:class:`~dsv3.inference.TokenLogprobs`, computed on the device from the model's
raw distribution) in OpenAI's two response shapes: the legacy completions object (:func:`completion_logprobs`)
and the chat list (:func:`chat_logprobs`).

Token strings follow vLLM: each token decoded on its own, so a character split over several tokens shows as
U+FFFD in each. The chat format's ``bytes`` are the token's own bytes when the tokenizer is a byte-level BPE
(DeepSeek-V3's, and those ``dsv3`` trains), which is what OpenAI means them for: the bytes of consecutive tokens
concatenate to the text even where a character is split. Both are cached per token id (:class:`TokenTexts`), so
formatting a token costs dictionary look-ups, not decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import decoders

from ..inference import TokenLogprobs
from .protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

MIN_LOGPROB = -9999.0
"""What ``-inf`` (a token the model rules out) becomes: JSON has no infinity (OpenAI's and vLLM's value)."""


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in of each byte (GPT-2's scheme) -> the byte: printable Latin-1 bytes
    stand for themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in set(kept)]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


class TokenTexts:
    """Each token's string (decoded on its own) and bytes, computed once per token id.

    Used on the event loop only (no locking); the caches hold at most one entry per vocabulary id."""

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode
        hf = getattr(tokenizer, "hf", None)
        self._hf = hf if hf is not None and _is_byte_level(hf) else None
        self._special = set(hf.get_added_tokens_decoder()) if self._hf is not None else set()
        self._alphabet = _byte_alphabet() if self._hf is not None else {}
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token: int) -> str:
        s = self._texts.get(token)
        if s is None:
            s = self._texts[token] = self._decode([token])
        return s

    def bytes(self, token: int) -> list[int]:
        b = self._bytes.get(token)
        if b is None:
            b = self._bytes[token] = self._raw_bytes(token)
        return b

    def _raw_bytes(self, token: int) -> list[int]:
        """The byte-level symbols of the vocabulary entry mapped back to bytes; special tokens (stored as plain
        text) and other tokenizers: the UTF-8 of the decoded string."""
        if self._hf is not None and token not in self._special:
            symbols = self._hf.id_to_token(token)
            if symbols is not None and all(c in self._alphabet for c in symbols):
                return [self._alphabet[c] for c in symbols]
        return list(self.text(token).encode("utf-8", errors="replace"))


def _is_byte_level(hf) -> bool:
    return isinstance(getattr(hf, "decoder", None), decoders.ByteLevel)


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(texts: TokenTexts, tokens: Sequence[int], entries: Sequence[TokenLogprobs | None],
                        n: int, offset: int = 0) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy ``logprobs`` of ``tokens`` (``entries[i]`` those of ``tokens[i]``; ``None`` for a first
    prompt token) with ``n`` alternatives each, the text offsets counted from ``offset``. Returns the object and
    the offset after its last token (where a stream's next chunk continues).

    Each ``top_logprobs`` dict holds the chosen token, then the ``n`` most likely in order: up to n + 1 entries,
    the chosen one counted once; tokens with equal strings share a key, the later value kept (as vLLM)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in zip(tokens, entries, strict=True):
        s = texts.text(token)
        out.tokens.append(s)
        out.text_offset.append(offset)
        offset += len(s)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_clamp(entry.logprob))
        top = {s: _clamp(entry.logprob)}
        for t, lp in entry.top[:n]:
            top[texts.text(t)] = _clamp(lp)
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(texts: TokenTexts, entries: Sequence[TokenLogprobs]) -> list[ChatTokenLogprob]:
    """OpenAI's chat ``logprobs.content``: each token with its ``top_logprobs`` (the engine was asked for as many
    alternatives as the request's ``top_logprobs``)."""
    return [ChatTokenLogprob(token=texts.text(e.token), logprob=_clamp(e.logprob), bytes=texts.bytes(e.token),
                             top_logprobs=[TopLogprob(token=texts.text(t), logprob=_clamp(lp), bytes=texts.bytes(t))
                                           for t, lp in e.top])
            for e in entries]
