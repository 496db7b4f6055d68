"""Byte-level BPE tokenizer: train one on a corpus, or load any Hugging Face one.

Files on disk are the standard Hugging Face ``tokenizer.json`` (readable by
``tokenizers`` and ``transformers``) plus a minimal ``tokenizer_config.json``
naming the BOS/EOS/pad tokens. Loading works the same for a tokenizer trained
here and for the official DeepSeek-V3 one, whose special tokens we reuse.

Special tokens are looked up *by name*: first the names in
``tokenizer_config.json`` (if present), then the DeepSeek-V3 names, then
common names of other families (GPT-2, Llama, StarCoder ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .corpus import DataError, iter_documents

# DeepSeek-V3 special tokens (note the full-width bars and the "▁" U+2581).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
FIM_BEGIN = "<｜fim▁begin｜>"  # precedes the prefix
FIM_HOLE = "<｜fim▁hole｜>"  # marks where the middle was cut out; precedes the suffix
FIM_END = "<｜fim▁end｜>"  # follows the suffix; the middle comes after it
SPECIAL_TOKENS = [BOS, EOS, PAD, FIM_BEGIN, FIM_HOLE, FIM_END]  # ids 0..5 when trained here

# Fallback names of other tokenizer families, tried in order after ours.
_BOS_NAMES = [BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"]
_EOS_NAMES = [EOS, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"]
_PAD_NAMES = [PAD, "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"]
_FIM_BEGIN_NAMES = [FIM_BEGIN, "<|fim_prefix|>", "<fim_prefix>", "<PRE>"]
_FIM_HOLE_NAMES = [FIM_HOLE, "<|fim_suffix|>", "<fim_suffix>", "<SUF>"]
_FIM_END_NAMES = [FIM_END, "<|fim_middle|>", "<fim_middle>", "<MID>"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
DEFAULT_VOCAB_SIZE = 4096


class Tokenizer:
    """Thin wrapper around a ``tokenizers.Tokenizer`` with named special-token ids.

    ``encode`` never adds special tokens and, by default, treats special-token
    strings found in the text as plain text, so corpus text can never inject
    an EOS or FIM sentinel. ``eos_id`` is required; ``bos_id`` falls back to
    the EOS id for tokenizers with a single boundary token (GPT-2 style); pad
    and FIM ids are ``None`` when the tokenizer has no such token.
    """

    def __init__(self, hf: HFTokenizer, config: dict | None = None):
        self.hf = hf
        config = config or {}
        self.eos_id = self._find("eos", config, _EOS_NAMES)
        if self.eos_id is None:
            raise DataError(f"tokenizer has no end-of-sequence token (tried {_EOS_NAMES})")
        bos_id = self._find("bos", config, _BOS_NAMES)
        self.bos_id: int = self.eos_id if bos_id is None else bos_id
        self.pad_id = self._find("pad", config, _PAD_NAMES)
        self.fim_begin_id = self._find(None, config, _FIM_BEGIN_NAMES)
        self.fim_hole_id = self._find(None, config, _FIM_HOLE_NAMES)
        self.fim_end_id = self._find(None, config, _FIM_END_NAMES)

    def _find(self, role: str | None, config: dict, names: list[str]) -> int | None:
        configured = config.get(f"{role}_token") if role else None
        if isinstance(configured, dict):  # transformers writes AddedToken dicts
            configured = configured.get("content")
        for name in ([configured] if configured else []) + names:
            token_id = self.hf.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    # --- loading and saving -------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or a directory that contains one.

        A ``tokenizer_config.json`` next to it, if present, names the BOS/EOS/pad tokens.
        """
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        config_file = file.parent / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{file}: not a valid Hugging Face tokenizer.json ({e})") from None
        return cls(hf, config)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(out / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.hf.id_to_token(self.bos_id),
            "eos_token": self.hf.id_to_token(self.eos_id),
            "pad_token": None if self.pad_id is None else self.hf.id_to_token(self.pad_id),
            "add_bos_token": False,
            "add_eos_token": False,
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return out

    # --- encoding -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows needed)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the serialised tokenizer: changes whenever encoding can change."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).

        With ``allow_special`` special-token strings in the text (e.g. a chat
        template) become their ids; otherwise they are encoded as plain text.
        """
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Encode many texts at once, in parallel on all cores (much faster than a loop)."""
        self.hf.encode_special_tokens = not allow_special
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept as their strings."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def new_byte_level_bpe() -> HFTokenizer:
    """An untrained byte-level BPE: any UTF-8 text round-trips exactly."""
    hf = HFTokenizer(models.BPE())
    # No prefix space: decode(encode(s)) == s without stripping anything.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(
    source: str | Path | None,
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_docs: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on the *train* split of ``source`` and save it to ``out_dir``.

    ``source=None`` is the built-in standard-library corpus; ``max_docs`` caps
    the number of documents read (for quick experiments). Returns the loaded
    tokenizer. The vocabulary includes the 256 byte symbols and ``SPECIAL_TOKENS``.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"vocab_size must be at least {minimum} (bytes + special tokens)")
    hf = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,  # our tqdm bar below covers the reading phase
    )
    docs = iter_documents(source, "train")
    bar = tqdm(docs, total=max_docs, desc="reading documents", unit="doc", disable=not show_progress)

    def limited() -> Iterable[str]:
        for n, text in enumerate(bar):
            if max_docs is not None and n >= max_docs:
                break
            yield text
        bar.set_description("reading done, learning merges")  # the slow part after reading

    hf.train_from_iterator(limited(), trainer=trainer)
    bar.close()
    tokenizer = Tokenizer(hf)
    tokenizer.save(out_dir)
    return tokenizer
