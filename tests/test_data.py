"""Tests of the data pipeline: corpus split, tokenizer, token cache, FIM, packing, loader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.data import (
    EOS,
    FIM_BEGIN,
    FimTokens,
    PackedLoader,
    Tokenizer,
    apply_fim,
    corpus,
    invert_fim,
    iter_documents,
    iter_eval_batches,
    load_or_build,
    plan_fim,
    train_tokenizer,
)
from dsv3.data import tokens as token_cache

WORDS = ["def", "return", "class", "self", "value", "naïve", "café", "日本", "données", "x", "=", "(", ")", ":"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "\n" for _ in range(n)]


def write_text_dir(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    return write_text_dir(tmp_path_factory.mktemp("corpus"), make_docs(150))


@pytest.fixture(scope="module")
def tokenizer(small_corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(small_corpus, tmp_path_factory.mktemp("tok"), vocab_size=400, show_progress=False)


@pytest.fixture(scope="module")
def train_tokens(tokenizer, small_corpus, tmp_path_factory):
    return load_or_build(tokenizer, small_corpus, "train", tmp_path_factory.mktemp("cache"), show_progress=False)


# --- corpus -------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(small_corpus):
    train, val = list(iter_documents(small_corpus, "train")), list(iter_documents(small_corpus, "val"))
    assert train == list(iter_documents(small_corpus, "train"))
    assert val and len(train) + len(val) == 150
    keys = corpus.document_keys(corpus.list_source_files(small_corpus))
    held_out = corpus.validation_keys(keys)
    assert held_out < set(keys) and held_out == corpus.validation_keys(list(reversed(keys)))


def test_split_of_a_file_does_not_move_when_files_are_added(tmp_path):
    keys = [f"doc{i}.txt" for i in range(500)]
    before = corpus.validation_keys(keys)
    after = corpus.validation_keys(keys + [f"new{i}.txt" for i in range(500)])
    assert before and before <= after  # old keys keep their split
    assert 0.005 < len(after) / 1000 < 0.05  # about VAL_FRACTION


def test_tiny_corpora_have_nonempty_splits(tmp_path):
    write_text_dir(tmp_path / "three", ["a\n", "b\n", "c\n"])
    assert len(list(iter_documents(tmp_path / "three", "val"))) == 1
    assert len(list(iter_documents(tmp_path / "three", "train"))) == 2
    (tmp_path / "one.txt").write_text("only document")
    assert list(iter_documents(tmp_path / "one.txt", "train")) == ["only document"]
    assert list(iter_documents(tmp_path / "one.txt", "val")) == ["only document"]


def test_stdlib_corpus_validation_split():
    val = list(iter_documents(None, "val"))
    assert 5 <= len(val) <= 200 and all(isinstance(d, str) and d for d in val)
    files = corpus.list_source_files(None)
    assert all(f.rel.endswith(".py") and "site-packages" not in f.rel for f in files)
    assert [f.rel for f in files] == sorted(f.rel for f in files)


def test_reads_text_jsonl_and_directories(tmp_path):
    root = tmp_path / "mixed"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("plain text")
    (root / "sub" / "b.md").write_text("# markdown ü")
    (root / "sub" / "deeper" / "c.py").write_text("print('hi')\n")
    records = [{"text": "first record"}, {"text": "second ✓", "meta": 1}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (root / "binary.bin").write_bytes(b"\x00\x01\xff\xfe")  # skipped: not text
    (root / ".hidden.txt").write_text("hidden")  # skipped: hidden
    (root / "empty.txt").write_text("")  # skipped: empty document
    docs = list(iter_documents(root, "train")) + list(iter_documents(root, "val"))
    assert sorted(docs) == sorted(["plain text", "# markdown ü", "print('hi')\n", "first record", "second ✓"])
    assert list(iter_documents(root / "d.jsonl", "train")) + list(iter_documents(root / "d.jsonl", "val"))


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(tmp_path / "missing", "train"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n' * 3)
    with pytest.raises(ValueError, match='"text"'):
        list(iter_documents(bad, "train")) + list(iter_documents(bad, "val"))
    with pytest.raises(ValueError, match="split"):
        list(iter_documents(bad, "test"))


# --- tokenizer ----------------------------------------------------------------


ROUND_TRIP_TEXTS = ["def f(x):\n    return x + 1\n", "  leading spaces", "naïve café, 日本語 ✓ données 🙂\t\r\n  "]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip_after_save_and_load(tokenizer, tmp_path, text):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    # At most the requested size: a small corpus can run out of merges.
    assert Tokenizer.load(tmp_path / "tokenizer.json").vocab_size == loaded.vocab_size <= 400
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == "<｜begin▁of▁sentence｜>" and config["eos_token"] == EOS


def test_tokenizer_special_ids(tokenizer):
    ids = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.fim_begin_id,
           tokenizer.fim_hole_id, tokenizer.fim_end_id]
    assert ids == [0, 1, 2, 3, 4, 5]
    # Special-token text inside a document stays text unless explicitly allowed.
    assert tokenizer.eos_id not in tokenizer.encode(f"a {EOS} b")
    assert tokenizer.encode(EOS, allow_special=True) == [tokenizer.eos_id]
    assert tokenizer.decode([tokenizer.fim_begin_id]) == FIM_BEGIN


def test_foreign_tokenizer_fallback_names(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    hf = HF(models.BPE())
    hf.add_special_tokens(["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_id == tok.bos_id == 0 and tok.pad_id is None
    assert (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (1, 2, 3)
    # tokenizer_config.json names win over the built-in fallbacks.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|fim_middle|>"}}))
    assert Tokenizer.load(tmp_path).eos_id == 3
    hf = HF(models.BPE())
    hf.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="end-of-sequence"):
        Tokenizer.load(tmp_path / "noeos.json")


# --- token file ---------------------------------------------------------------


def test_token_file_contents(tokenizer, small_corpus, train_tokens):
    docs = list(iter_documents(small_corpus, "train"))
    assert train_tokens.n_docs == len(docs) and train_tokens.tokens.dtype == np.uint16
    offsets = train_tokens.doc_offsets
    for d in (0, 7, len(docs) - 1):
        ids = train_tokens.tokens[offsets[d] : offsets[d + 1]]
        assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
        assert tokenizer.decode(ids[:-1].tolist()) == docs[d]
    assert train_tokens.meta["n_tokens"] == offsets[-1] == train_tokens.n_tokens


def test_token_file_reuse_and_stale_rebuild(tokenizer, tmp_path, monkeypatch):
    source = write_text_dir(tmp_path / "corpus", make_docs(40, seed=1))
    cache = tmp_path / "cache"
    first = load_or_build(tokenizer, source, "train", cache, show_progress=False)
    builds = []
    real_build = token_cache.build
    monkeypatch.setattr(token_cache, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    again = load_or_build(tokenizer, source, "train", cache, show_progress=False)
    assert not builds and np.array_equal(first.tokens, again.tokens)
    # Changing any train document makes the cache stale.
    train_file = next(p for p in sorted(source.iterdir()) if p.read_text() in set(iter_documents(source, "train")))
    train_file.write_text("a brand new document with different words\n")
    changed = load_or_build(tokenizer, source, "train", cache, show_progress=False)
    assert builds == [1] and changed.n_tokens != first.n_tokens
    # So does another tokenizer.
    other = train_tokenizer(source, tmp_path / "tok2", vocab_size=300, show_progress=False)
    rebuilt = load_or_build(other, source, "train", cache, show_progress=False)
    assert builds == [1, 1] and rebuilt.meta["tokenizer_hash"] == other.fingerprint
    assert not list(cache.glob(".*tmp"))  # no temporary files left behind


# --- FIM ----------------------------------------------------------------------

FIM = FimTokens(begin=3, hole=4, end=5)


def test_fim_round_trip():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 10, 100]:
        body = rng.integers(10, 400, size=n)
        for _ in range(20):
            out = apply_fim(body, rng, FIM)
            assert len(out) == n + 3 and out[0] == FIM.begin
            assert np.array_equal(invert_fim(out, FIM), body)
            with_eos = np.concatenate([out, [1]])
            assert np.array_equal(invert_fim(with_eos, FIM, eos_id=1), np.concatenate([body, [1]]))
    assert np.array_equal(invert_fim(np.array([7, 8, 1]), FIM, eos_id=1), [7, 8, 1])  # untouched doc


def test_fim_rate_and_determinism():
    lengths = np.full(20_000, 50)
    plan = plan_fim(lengths, 0.1, seed=0, epoch=0)
    assert 0.09 < plan.chosen.mean() < 0.11
    assert np.all((0 <= plan.start) & (plan.start <= plan.stop) & (plan.stop <= 50))
    same = plan_fim(lengths, 0.1, seed=0, epoch=0)
    assert np.array_equal(plan.chosen, same.chosen) and np.array_equal(plan.start, same.start)
    assert not np.array_equal(plan.chosen, plan_fim(lengths, 0.1, seed=0, epoch=1).chosen)
    # A document's fate depends on its index only, not on how many documents follow.
    assert np.array_equal(plan_fim(lengths[:100], 0.1, 0, 0).chosen, plan.chosen[:100])
    assert plan_fim(lengths, 0.0, 0, 0).chosen.sum() == 0


# --- packing and loading --------------------------------------------------------


def one_epoch(loader: PackedLoader) -> list:
    """All batches of epoch 0 (windows beyond the epoch end are dropped)."""
    n = loader.windows_in_epoch(0)
    rows, ids = [], []
    while len(rows) < n:
        batch = next(loader)
        rows += list(batch.tokens)
        ids += list(batch.doc_ids) if batch.doc_ids is not None else []
    return rows[:n], ids[:n]


def test_packing_round_trip(train_tokens, tokenizer):
    seq_len = 32
    loader = PackedLoader(train_tokens, seq_len, batch_size=4, shuffle=False, return_doc_ids=True)
    rows, _ = one_epoch(loader)
    stream = torch.cat([r[:seq_len] for r in rows]).numpy()
    assert np.array_equal(stream, train_tokens.tokens[: len(stream)].astype(np.int64))
    for a, b in zip(rows, rows[1:]):  # the extra target token is the next window's first
        assert a[seq_len] == b[0]
    assert (stream == tokenizer.eos_id).sum() >= len(stream) // 400  # EOS separators present
    batch = next(PackedLoader(train_tokens, seq_len, 2, shuffle=False))
    assert batch.tokens.dtype == torch.int64 and batch.tokens.shape == (2, seq_len + 1)
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])


def test_packing_with_fim_recovers_documents(train_tokens, tokenizer):
    seq_len = 64
    loader = PackedLoader(train_tokens, seq_len, 8, shuffle=False, fim_rate=0.5, seed=3, return_doc_ids=True)
    rows, ids = one_epoch(loader)
    stream = torch.cat([r[:seq_len] for r in rows]).numpy()
    doc_ids = torch.cat([i[:seq_len] for i in ids]).numpy()
    fim = train_tokens.fim_tokens
    n_fim = 0
    for d in np.unique(doc_ids)[:-1]:  # the last document may be cut off
        packed = stream[doc_ids == d]
        n_fim += packed[0] == fim.begin
        original = train_tokens.tokens[train_tokens.doc_offsets[d] : train_tokens.doc_offsets[d + 1]]
        assert packed[-1] == tokenizer.eos_id
        assert np.array_equal(invert_fim(packed, fim, eos_id=tokenizer.eos_id), original)
    assert 0 < n_fim < len(np.unique(doc_ids))


def test_doc_ids(train_tokens):
    seq_len = 48
    loader = PackedLoader(train_tokens, seq_len, 4, shuffle=False, return_doc_ids=True)
    offsets = train_tokens.doc_offsets
    for step in range(3):
        batch = next(loader)
        for i, (row, ids) in enumerate(zip(batch.tokens.numpy(), batch.doc_ids.numpy())):
            # Window k starts at k * seq_len; each token lies inside its document's range.
            positions = (step * 4 + i) * seq_len + np.arange(seq_len + 1)
            assert np.all((offsets[ids] <= positions) & (positions < offsets[ids + 1]))
            # A new document starts right after an EOS.
            boundary = np.flatnonzero(np.diff(ids)) + 1
            assert np.all(row[boundary - 1] == train_tokens.eos_id)


def test_loader_resume_is_exact(train_tokens):
    kwargs = dict(seq_len=40, batch_size=8, seed=7, fim_rate=0.2, return_doc_ids=True)
    a = PackedLoader(train_tokens, **kwargs)
    per_epoch = a.windows_in_epoch(0)
    for _ in range(per_epoch // 8 - 1):  # stop just before the epoch boundary
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(4)]  # crosses into epoch 1
    assert a.epoch == 1
    b = PackedLoader(train_tokens, **kwargs)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for want in expected:
        got = next(b)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.doc_ids, want.doc_ids)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(train_tokens, **{**kwargs, "seq_len": 41}).load_state_dict(state)


def test_shuffle_and_sharding(train_tokens):
    single = PackedLoader(train_tokens, 32, 6, seed=5)
    ranks = [PackedLoader(train_tokens, 32, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = next(single).tokens
        assert torch.equal(torch.cat([next(r).tokens for r in ranks]), whole)
    sequential = next(PackedLoader(train_tokens, 32, 6, shuffle=False)).tokens
    assert not torch.equal(next(PackedLoader(train_tokens, 32, 6, seed=5)).tokens, sequential)


def test_eval_batches_are_fixed(train_tokens):
    first = list(iter_eval_batches(train_tokens, 32, 16, return_doc_ids=True))
    second = list(iter_eval_batches(train_tokens, 32, 16, return_doc_ids=True))
    assert len(first) == len(second) > 1
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, second))
    n_windows = (train_tokens.n_tokens - 1) // 32
    assert sum(len(b.tokens) for b in first) == n_windows
    assert len(list(iter_eval_batches(train_tokens, 32, 16, max_batches=1))) == 1
    fim = train_tokens.fim_tokens
    assert not any((b.tokens == fim.begin).any() for b in first)  # no FIM in evaluation


def test_too_small_split_is_an_error(train_tokens):
    with pytest.raises(ValueError, match="too few"):
        PackedLoader(train_tokens, train_tokens.n_tokens, 1)
