"""Pre-tokenised corpora: one flat, memory-mapped token file per split.

A split is tokenised once into ``<cache_dir>/<split>.bin``: every document's
ids followed by EOS, concatenated, as ``uint16`` when the vocabulary fits
(else ``uint32``). ``<split>.docs.npy`` holds the document start offsets
(``n_docs + 1`` entries, the last one is the token count) so packing and FIM
can find document boundaries without scanning. ``<split>.json`` is the sidecar:
sizes, dtype, special ids, and the tokenizer hash and corpus fingerprint that
decide whether the cache is still valid.

Files are written under temporary names and renamed into place, the sidecar
last, so an interrupted build never looks like a valid cache. One cache dir
holds one corpus + tokenizer pair; pointing it at another rebuilds it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .corpus import Split, corpus_fingerprint, iter_documents
from .fim import FimTokens
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
ENCODE_BATCH_DOCS = 64  # documents per encode_batch call: enough to keep all cores busy


@dataclass
class TokenFile:
    """A loaded split: the token stream (memory-mapped), document offsets and metadata."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32, read-only memmap
    doc_offsets: np.ndarray  # (n_docs + 1,) int64: document d is tokens[offsets[d]:offsets[d+1]]
    meta: dict

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def fim_tokens(self) -> FimTokens | None:
        """FIM sentinel ids, or None when the tokenizer has none."""
        ids = self.meta["fim_ids"]
        return None if ids is None else FimTokens(*ids)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def expected_meta(tokenizer: Tokenizer, source: str | Path | None, split: Split) -> dict:
    """The sidecar fields that must match for a cached file to be reused."""
    fim = (tokenizer.fim_begin_id, tokenizer.fim_hole_id, tokenizer.fim_end_id)
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "source": "<stdlib>" if source is None else str(Path(source).expanduser().resolve()),
        "corpus_fingerprint": corpus_fingerprint(source, split),
        "tokenizer_hash": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "eos_id": tokenizer.eos_id,
        "fim_ids": None if None in fim else list(fim),
    }


def load_or_build(
    tokenizer: Tokenizer,
    source: str | Path | None,
    split: Split,
    cache_dir: str | Path,
    show_progress: bool = True,
) -> TokenFile:
    """The token file of ``split``, reusing ``cache_dir`` when it is up to date.

    ``source=None`` is the built-in standard-library corpus. A cache whose
    tokenizer hash, corpus fingerprint or format differs is rebuilt.
    """
    cache = Path(cache_dir).expanduser()
    want = expected_meta(tokenizer, source, split)
    sidecar = cache / f"{split}.json"
    if sidecar.is_file():
        have = json.loads(sidecar.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return open_token_file(cache, split)
    build(tokenizer, iter_documents(source, split), cache, split, want, show_progress)
    return open_token_file(cache, split)


def build(
    tokenizer: Tokenizer,
    documents: Iterator[str],
    cache: Path,
    split: str,
    meta: dict,
    show_progress: bool = True,
) -> None:
    """Tokenise ``documents`` (EOS after each) into ``cache/<split>.*``, atomically."""
    cache.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(meta["dtype"])
    tmp = {name: cache / f".{split}.{name}.tmp" for name in ("bin", "docs.npy", "json")}
    offsets = [0]
    bar = tqdm(desc=f"tokenising {split}", unit="doc", disable=not show_progress)
    with tmp["bin"].open("wb") as out:
        for batch in _batched(documents, ENCODE_BATCH_DOCS):
            encoded = tokenizer.encode_batch(batch)
            for ids in encoded:
                ids.append(tokenizer.eos_id)
                offsets.append(offsets[-1] + len(ids))
            np.concatenate([np.asarray(ids, dtype=dtype) for ids in encoded]).tofile(out)
            bar.update(len(batch))
            bar.set_postfix(tokens=offsets[-1], refresh=False)
    bar.close()
    with tmp["docs.npy"].open("wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    full_meta = {**meta, "n_tokens": offsets[-1], "n_docs": len(offsets) - 1}
    tmp["json"].write_text(json.dumps(full_meta, indent=2) + "\n")
    # Drop the old sidecar first and install the new one last: a sidecar is
    # what marks the cache as complete, so a crash in between leaves none.
    (cache / f"{split}.json").unlink(missing_ok=True)
    for name in ("bin", "docs.npy", "json"):
        os.replace(tmp[name], cache / f"{split}.{name}")


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_token_file(cache_dir: str | Path, split: str) -> TokenFile:
    """Map an existing token file read-only (no validity check; see ``load_or_build``)."""
    cache = Path(cache_dir).expanduser()
    meta = json.loads((cache / f"{split}.json").read_text())
    dtype = np.dtype(meta["dtype"])
    if meta["n_tokens"] == 0:  # numpy cannot map an empty file
        tokens = np.zeros(0, dtype=dtype)
    else:
        tokens = np.memmap(cache / f"{split}.bin", dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    offsets = np.load(cache / f"{split}.docs.npy")
    return TokenFile(tokens=tokens, doc_offsets=offsets, meta=meta)
