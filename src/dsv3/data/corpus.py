"""Text corpora: where training documents come from and how they are split.

A *source* is one of:

* ``None`` -- the built-in default corpus: the ``*.py`` files of the running
  Python's standard library (no ``site-packages``). Every machine with Python
  has it, so the tiny preset trains without downloading anything.
* a text file (``.txt``, ``.md``, ``.py``, any UTF-8 text): one document;
* a ``.jsonl`` file: one document per line, taken from its ``"text"`` field;
* a directory: all of the above found recursively (hidden entries and
  ``__pycache__`` skipped; files that are not UTF-8 text are skipped).

Every document has a stable *key* (its relative path, plus ``:<line>`` for a
JSONL record). The train/validation split is a pure function of that key: a
key goes to validation when a 64-bit BLAKE2 hash of it falls in the lowest
``VAL_FRACTION`` of the hash range. The split thus never depends on file
order, machine or Python version, and adding files does not move old ones
between splits. If no key falls in that range (tiny corpora), the key with
the smallest hash is used, so validation is never empty; a corpus of a single
document uses it for both splits.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "val"]


class DataError(ValueError):
    """Unusable training data or tokenizer (bad JSONL record, non-text file, split too small ...): the
    command line reports it as a one-line error rather than a traceback."""

VAL_FRACTION = 0.02
"""Share of documents (by key hash) held out for validation."""

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_FINGERPRINT_VERSION = 1  # bump when reading or splitting rules change


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus: its path, its key prefix and how to read it."""

    path: Path
    rel: str  # POSIX path relative to the corpus root: stable across machines
    kind: Literal["text", "jsonl"]


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(source: str | Path | None) -> list[SourceFile]:
    """All readable files of ``source``, sorted by relative path.

    Raises ``FileNotFoundError`` for a missing path. Text files that are not
    valid UTF-8 (or contain NUL bytes) are skipped inside directories and are
    an error when named directly.
    """
    if source is None:
        root = stdlib_root()
        paths = [p for p in _walk(root) if p.suffix == ".py"]
        return _readable(root, paths)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if path.is_file():
        files = _readable(path.parent, [path])
        if not files:
            raise DataError(f"corpus file is not UTF-8 text: {path}")
        return files
    return _readable(path, list(_walk(path)))


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root``, skipping hidden entries and package caches."""
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name in _SKIPPED_DIRS:
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _readable(root: Path, paths: list[Path]) -> list[SourceFile]:
    files = []
    for path in paths:
        kind = "jsonl" if path.suffix == ".jsonl" else "text"
        if kind == "text" and _read_text(path) is None:
            continue
        files.append(SourceFile(path, path.relative_to(root).as_posix(), kind))
    return sorted(files, key=lambda f: f.rel)


def _read_text(path: Path) -> str | None:
    """The file as text, or None when unreadable, not UTF-8 or binary."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\x00" in text else text


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line of a JSONL file."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def document_keys(files: list[SourceFile]) -> list[str]:
    """Stable keys of all documents in ``files``, in reading order."""
    keys = []
    for file in files:
        if file.kind == "text":
            keys.append(file.rel)
        else:
            keys.extend(f"{file.rel}:{n}" for n, _ in _jsonl_lines(file.path))
    return keys


def validation_keys(keys: list[str]) -> set[str]:
    """The keys held out for validation (see module docstring for the rule)."""
    threshold = int(VAL_FRACTION * 2**64)
    held_out = {k for k in keys if _key_hash(k) < threshold}
    if not held_out and keys:
        held_out = {min(keys, key=_key_hash)}
    return held_out


def iter_documents(source: str | Path | None, split: Split = "train") -> Iterator[str]:
    """Yield the non-empty documents of one split of ``source``, in a fixed order.

    ``source=None`` is the built-in standard-library corpus.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    files = list_source_files(source)
    keys = document_keys(files)
    held_out = validation_keys(keys)
    single = len(keys) == 1  # one document: use it for both splits

    def wanted(key: str) -> bool:
        return single or (key in held_out) == (split == "val")

    for file in files:
        if file.kind == "text":
            if wanted(file.rel):
                text = _read_text(file.path)
                if text:  # may have changed since listing; skip if now empty
                    yield text
            continue
        for number, line in _jsonl_lines(file.path):
            if wanted(f"{file.rel}:{number}"):
                text = _jsonl_text(file.path, number, line)
                if text:
                    yield text


def _jsonl_text(path: Path, number: int, line: str) -> str:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f'{where}: JSONL record has no "text" field')
    if not isinstance(record["text"], str):
        raise DataError(f'{where}: "text" field is not a string')
    return record["text"]


def corpus_fingerprint(source: str | Path | None, split: Split) -> str:
    """Cheap hash identifying the corpus contents (paths, sizes, mtimes) and split.

    Used to detect stale token caches without re-reading every file.
    """
    h = hashlib.sha256(f"v{_FINGERPRINT_VERSION}|{VAL_FRACTION}|{split}".encode())
    root = str(stdlib_root() if source is None else Path(source).expanduser().resolve())
    h.update(root.encode())
    for file in list_source_files(source):
        stat = file.path.stat()
        h.update(f"|{file.rel}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return h.hexdigest()
